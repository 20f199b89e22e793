"""The DICOM node: one pynetdicom AE serving the archive, started and stopped cleanly."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, cast

from pynetdicom import AE
from pynetdicom.presentation import PresentationContext

from config.settings import NodeSettings
from dicom_node.archive.header import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
from dicom_node.transport import GatewayRequestHandler, GatewayServer

LOG = logging.getLogger(__name__)


class DicomNode:
    """Listens for associations and dispatches them to the handlers it was given."""

    def __init__(
        self,
        node: NodeSettings,
        contexts: list[PresentationContext],
        evt_handlers: list[tuple[Any, Any]],
    ) -> None:
        self._node = node
        self._contexts = contexts
        self._evt_handlers = evt_handlers
        self._server: GatewayServer | None = None
        self._thread: threading.Thread | None = None
        self.ae = make_ae(node)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the port is the real one when 0 was configured."""
        if self._server is None:
            raise RuntimeError("node is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> tuple[str, int]:
        """Bind the listening socket and serve in a background thread."""
        server = GatewayServer(
            self.ae,
            (self._node.dicom_host, self._node.dicom_port),
            self._node.ae_title,
            self._contexts,
            None,
            evt_handlers=cast(Any, self._evt_handlers),
            request_handler=GatewayRequestHandler,
        )
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="dicom-accept",
            daemon=True,
        )
        self._thread.start()
        LOG.info("DICOM node %s listening on %s:%d", self._node.ae_title, *self.address)
        return self.address

    def active_associations(self) -> int:
        """How many associations are in progress."""
        return len(self._server.active_associations) if self._server else 0

    def stop(self, grace: float | None = None) -> int:
        """Stop accepting, let in-flight associations finish, abort the rest after ``grace``.

        Returns the number of associations that had to be aborted.
        """
        server = self._server
        if server is None:
            return 0
        server.stop_accepting()
        deadline = time.monotonic() + (self._node.shutdown_grace if grace is None else grace)
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        remaining = list(server.active_associations)
        for assoc in remaining:
            assoc.abort()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        return len(remaining)


def make_ae(node: NodeSettings) -> AE:
    """An AE configured from the node settings (PDU size, limits, timeouts)."""
    ae = AE(ae_title=node.ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION
    ae.maximum_pdu_size = node.max_pdu
    ae.maximum_associations = node.max_associations
    ae.acse_timeout = node.acse_timeout
    ae.dimse_timeout = node.dimse_timeout
    ae.network_timeout = node.network_timeout
    ae.connection_timeout = node.acse_timeout
    ae.require_called_aet = True
    return ae
