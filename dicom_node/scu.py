"""Our side as association requestor: C-ECHO and sending files to a peer."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable
from copy import deepcopy
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import build_context, evt
from pynetdicom._globals import MODE_REQUESTOR
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AddressInformation

from config.settings import NodeSettings, PeerSettings
from dicom_node.contexts import VERIFICATION
from dicom_node.reactor import GatewayAssociation
from dicom_node.server import make_ae
from dicom_node.transport import ReadAheadSocket, tune_socket

LOG = logging.getLogger(__name__)
_MAX_CONTEXTS = 128
_UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")


class ScuError(Exception):
    """The peer could not be reached or refused the association."""


@dataclass
class SendReport:
    """Outcome of :func:`send_files`."""

    sent: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    bytes_sent: int = 0


class _RequestorSocket(ReadAheadSocket):
    """Reads ahead and acknowledges every read at once (TCP_QUICKACK): a destination that
    leaves Nagle's algorithm on (Debian's DCMTK and Orthanc do) writes a response in two
    segments and would otherwise wait for our delayed ACK, about 40 ms per instance."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._send_lock = threading.Lock()

    def send(self, bytestream: bytes) -> None:
        """pynetdicom's send, serialised with :meth:`send_raw`."""
        with self._send_lock:
            super().send(bytestream)

    def send_raw(self, *buffers: bytes | bytearray | memoryview) -> None:
        """Write ``buffers`` in order from another thread than the DUL's (the C-STORE
        fast path), gathered into as few system calls as possible; raises
        :class:`OSError` if the connection is gone."""
        with self._send_lock:
            sock = self.socket
            if sock is None:
                raise OSError("association socket closed")
            send_all(sock, buffers)


_IOV_MAX = 1024


def send_all(sock: socket.socket, buffers: Iterable[bytes | bytearray | memoryview]) -> None:
    """Write every buffer, in order, with ``sendmsg`` (partial writes resumed)."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    while views:
        sent = sock.sendmsg(views[:_IOV_MAX])
        if sent <= 0:
            raise OSError("connection made no progress")
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]


def _nodelay(event: Event) -> None:
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        tune_socket(sock)


def connect(
    node: NodeSettings, peer: PeerSettings, contexts: list[PresentationContext]
) -> Association:
    """Open an association to ``peer`` with TCP_NODELAY set; raises :class:`ScuError`.

    The association is a :class:`~dicom_node.reactor.GatewayAssociation`: its reactor
    cannot take a C-STORE response off the queue while ``send_c_store`` waits for it
    (pynetdicom's race, which otherwise stalls a sender for the DIMSE timeout and makes
    it send the instance again).
    """
    if not contexts or len(contexts) > _MAX_CONTEXTS:
        raise ScuError(f"an association needs 1 to {_MAX_CONTEXTS} presentation contexts")
    ae = make_ae(node)
    assoc = GatewayAssociation(ae, MODE_REQUESTOR)
    assoc.name = f"RequestorThread@{datetime.now():%Y%m%d%H%M%S}"
    sock = _RequestorSocket(assoc, address=AddressInformation.from_tuple(("", 0)))
    sock.tls_args = None
    assoc.set_socket(sock)
    assoc.acceptor.ae_title = peer.ae_title
    try:
        assoc.acceptor.address_info = AddressInformation.from_tuple((peer.host, peer.port))
    except OSError as exc:  # the host name does not resolve
        raise _unreachable(peer, exc) from None
    requestor = assoc.requestor
    requestor.address_info = AddressInformation.from_tuple(("", 0))
    requestor.ae_title = ae.ae_title
    requestor.maximum_length = node.max_pdu
    requestor.implementation_class_uid = ae.implementation_class_uid
    requestor.implementation_version_name = ae.implementation_version_name
    proposed = deepcopy(contexts)
    for number, context in enumerate(proposed):
        context.context_id = 2 * number + 1
    requestor.requested_contexts = proposed
    assoc.bind(evt.EVT_CONN_OPEN, _nodelay)
    try:
        assoc.request()
    except OSError as exc:  # the host name does not resolve, or no route to it
        raise _unreachable(peer, exc) from None
    if not assoc.is_established:
        if assoc.is_rejected:
            raise ScuError(f"peer {peer.name} rejected the association")
        raise ScuError(f"cannot associate with peer {peer.name} at {peer.host}:{peer.port}")
    assoc.start()
    return assoc


def _unreachable(peer: PeerSettings, exc: OSError) -> ScuError:
    """The error for a peer whose address does not resolve or cannot be reached."""
    return ScuError(
        f"cannot reach peer {peer.name} at {peer.host}:{peer.port} "
        f"({exc.strerror or type(exc).__name__})"
    )


def echo(node: NodeSettings, peer: PeerSettings) -> int:
    """Send a C-ECHO; returns the status (raises :class:`ScuError` if unreachable)."""
    assoc = connect(node, peer, [build_context(VERIFICATION)])
    try:
        status = assoc.send_c_echo()
        if not status or "Status" not in status:
            raise ScuError(f"no C-ECHO response from peer {peer.name}")
        return int(status.Status)
    finally:
        assoc.release()


def expand_paths(paths: Iterable[Path]) -> list[Path]:
    """Files named directly, plus every file below named directories (sorted)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        else:
            files.append(path)
    return files


def send_files(
    node: NodeSettings,
    peer: PeerSettings,
    files: list[Path],
    progress: Callable[[Path, int], None] | None = None,
) -> SendReport:
    """Send Part 10 files over one association, as stored (no decode/re-encode).

    Files that are not DICOM Part 10 are skipped and reported.
    """
    report = SendReport()
    metas: list[tuple[Path, str, str]] = []
    for path in files:
        try:
            meta = read_file_meta_info(path)
            metas.append((path, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
        except (InvalidDicomError, OSError, AttributeError, ValueError) as exc:
            report.skipped.append((path, f"not a DICOM Part 10 file ({type(exc).__name__})"))
    if not metas:
        return report
    wanted: dict[str, set[str]] = {}
    for _, sop_class, syntax in metas:
        wanted.setdefault(sop_class, set()).add(syntax)
    contexts = []
    for sop_class, syntaxes in wanted.items():
        for syntax in sorted(syntaxes):
            contexts.append(build_context(sop_class, [syntax]))
    if len(contexts) > _MAX_CONTEXTS:
        raise ScuError(
            f"{len(contexts)} SOP class/transfer syntax pairs exceed the 128 presentation "
            "contexts of one association: send in smaller batches"
        )
    assoc = connect(node, peer, contexts)
    try:
        for path, _, _ in metas:
            size = os.path.getsize(path)
            try:
                status = assoc.send_c_store(path)
            except RuntimeError:
                # pynetdicom: the association ended (the peer aborted) between the
                # previous response and this request
                report.failed.append((path, "association lost"))
                break
            except (ValueError, AttributeError, OSError) as exc:
                report.failed.append((path, type(exc).__name__))
                continue
            finally:
                if progress is not None:
                    progress(path, size)
            code = int(status.Status) if status and "Status" in status else None
            if code is None:
                report.failed.append((path, "no response (association lost)"))
                if not assoc.is_established:
                    break
            elif code == 0x0000 or (code & 0xF000) == 0xB000:
                report.sent += 1
                report.bytes_sent += size
            else:
                report.failed.append((path, f"status 0x{code:04X}"))
    finally:
        if assoc.is_established:
            assoc.release()
    return report
