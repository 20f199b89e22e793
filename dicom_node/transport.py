"""Network layer adjustments around pynetdicom's transport, by subclassing its public hooks.

- Each accepted connection gets a :class:`GatewaySocket`: it refuses a PDU whose declared
  length exceeds what we accept (pynetdicom would allocate whatever a peer claims), reads
  ahead (:class:`ReadAheadSocket`: one system call usually brings a C-STORE's command and
  data set), sets ``TCP_NODELAY`` and keep-alive, and answers with an immediate ACK
  (``TCP_QUICKACK``) so a sender that leaves Nagle's algorithm on is not held up by our
  delayed ACKs.
- :class:`GatewayServer` is pynetdicom's threaded server with that socket and a shutdown
  that does not reach into the AE's private server list.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

if TYPE_CHECKING:
    from pynetdicom.association import Association

LOG = logging.getLogger(__name__)

#: A-ASSOCIATE-RQ PDUs may exceed a small maximum PDU size; never refuse below this.
MIN_PDU_ALLOWANCE = 256 * 1024
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def tune_socket(sock: socket.socket, *, keepalive_idle: int = 60) -> None:
    """Disable Nagle and enable keep-alive (half-open connections are eventually found)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, keepalive_idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    except OSError:  # pragma: no cover - platform without these options
        pass


#: bytes read from the kernel at a time when a PDU (or its header) is smaller
READ_AHEAD = 256 * 1024


class ReadAheadSocket(AssociationSocket):
    """pynetdicom's association socket reading ahead: one ``recv`` system call usually
    brings in several PDUs (a C-STORE's command and its data set, often), which the DUL
    then takes from the buffer; PDUs larger than the buffer are read straight into
    their own buffer. Each read acknowledges at once (``TCP_QUICKACK``): a peer that
    leaves Nagle's algorithm on is not held up by our delayed ACKs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ahead = bytearray(READ_AHEAD)
        self._ahead_view = memoryview(self._ahead)
        self._start = 0
        self._end = 0

    @property
    def buffered(self) -> int:
        """Bytes already read from the connection and not yet taken."""
        return self._end - self._start

    def unread(self, data: bytes | bytearray) -> None:
        """Give bytes back: the next reads return them first."""
        if not data:
            return
        rest = bytes(self._ahead_view[self._start : self._end])
        combined = bytes(data) + rest
        if len(combined) > len(self._ahead):
            self._ahead = bytearray(len(combined))
            self._ahead_view = memoryview(self._ahead)
        self._ahead_view[: len(combined)] = combined
        self._start, self._end = 0, len(combined)

    @property
    def ready(self) -> bool:
        """Whether data can be read (buffered, or waiting in the connection)."""
        return self._end > self._start or bool(super().ready)

    def recv(self, nr_bytes: int) -> bytearray:
        """Read exactly ``nr_bytes`` (or fewer if the peer closes)."""
        out = bytearray(nr_bytes)
        view = memoryview(out)
        got = min(nr_bytes, self._end - self._start)
        if got:
            view[:got] = self._ahead_view[self._start : self._start + got]
            self._start += got
            if got == nr_bytes:
                return out
        sock = self.socket
        if sock is None:
            return out[:got]
        while got < nr_bytes:
            remaining = nr_bytes - got
            if remaining >= len(self._ahead):
                n = sock.recv_into(view[got:], remaining)
                taken = n
            else:
                n = sock.recv_into(self._ahead_view)
                taken = min(n, remaining)
                view[got : got + taken] = self._ahead_view[:taken]
                self._start, self._end = taken, n
            if n == 0:
                return out[:got]
            got += taken
        if _QUICKACK is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        return out


class GatewaySocket(ReadAheadSocket):
    """An accepted connection's socket with a bound on declared PDU lengths."""

    def __init__(
        self, assoc: Association, client_socket: socket.socket, *, max_pdu_length: int
    ) -> None:
        super().__init__(assoc, client_socket=client_socket)
        self.max_pdu_length = max(max_pdu_length, MIN_PDU_ALLOWANCE)
        tune_socket(client_socket)
        # A peer that stops inside a PDU must not hold the reader (and an association
        # slot) for ever: a read waits at most the network timeout, then the DUL sees
        # the transport as closed (Evt17).
        if assoc.network_timeout is not None:
            client_socket.settimeout(assoc.network_timeout)

    def recv(self, nr_bytes: int) -> bytearray:
        """Read exactly ``nr_bytes`` (or fewer if the peer closes); a declared length over
        the limit is not read at all."""
        if nr_bytes > self.max_pdu_length + 6:
            LOG.warning(
                "peer declared a %d-byte PDU, over the %d-byte limit: closing connection",
                nr_bytes,
                self.max_pdu_length,
            )
            return bytearray()  # the DUL sees a short read and closes the transport
        return super().recv(nr_bytes)


class GatewayRequestHandler(RequestHandler):
    """Creates each accepted association with a :class:`GatewaySocket`."""

    def _create_association(self) -> Association:
        from dicom_node.reactor import GatewayAssociation

        server: Any = self.server
        ae = self.ae
        assoc = GatewayAssociation(ae, MODE_ACCEPTOR)
        assoc._server = server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"  # pynetdicom counts these
        sock = GatewaySocket(assoc, client_socket=self.request, max_pdu_length=ae.maximum_pdu_size)
        assoc.set_socket(sock)
        acceptor = assoc.acceptor
        acceptor.maximum_length = ae.maximum_pdu_size
        acceptor.ae_title = server.ae_title
        acceptor.address_info = self.local
        acceptor.implementation_class_uid = ae.implementation_class_uid
        acceptor.implementation_version_name = ae.implementation_version_name
        # pynetdicom deep-copies the ~180 contexts here (60 ms per association); its
        # negotiation only reads them and builds new result contexts, so share them
        acceptor.supported_contexts = list(server.contexts)
        assoc.requestor.address_info = self.remote
        for event, handlers in server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in handlers:
                    assoc.bind(event, handler, args)
        return assoc


class GatewayServer(ThreadedAssociationServer):
    """Threaded association server using :class:`GatewayRequestHandler`."""

    daemon_threads = True

    def stop_accepting(self) -> None:
        """Stop the accept loop and close the listening socket; associations go on."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()
