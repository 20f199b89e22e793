"""Event-driven reactors for pynetdicom's association and upper layer (DUL) threads.

pynetdicom 3.0 runs two polling loops per association: the DUL thread sleeps 1 ms whenever
a loop found nothing to do and polls the socket with ``select(timeout=0)``; the association
thread sleeps 1 ms before every look at the DIMSE message queue.  Each C-STORE therefore
waits for up to two sleeps (request in, response out), and the loops burn CPU while idle.

Here both threads block instead of sleeping:

- :class:`GatewayDUL` waits in ``poll()`` on the peer socket plus a wake-up socket pair
  that is signalled whenever another thread queues a primitive to send (or an event, or
  asks the reactor to stop).  The loop body is pynetdicom's: one primitive sent or one PDU
  read and one state machine event handled per iteration.
- :class:`GatewayAssociation` waits on an :class:`threading.Event` that is set whenever
  the DIMSE provider queues a decoded message or the DUL queues a primitive for the
  service user (release, abort), or the DUL thread ends.  A bounded timeout keeps the
  periodic checks (network idle timer) working.

The association reactor also closes pynetdicom's pause race (``_is_paused`` and
``_reactor_checkpoint`` not checked together, upstream #842/#850/#875): it clears
``_is_paused`` *before* re-reading the checkpoint and takes a message only when the
checkpoint is still set, so a thread that paused the reactor (``checkpoint.clear()`` then
wait for ``_is_paused``) can no longer have its response taken off the queue.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from typing import TYPE_CHECKING, Any, TypeVar, cast

from pynetdicom import _config as pynetdicom_config
from pynetdicom import _handlers, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

if TYPE_CHECKING:
    from pynetdicom.ae import ApplicationEntity
    from pynetdicom.transport import AssociationSocket

LOG = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Longest the DUL waits in poll() without an event: bounds the ARTIM timer's precision.
DUL_MAX_WAIT = 0.05
#: Longest the association reactor waits without activity: bounds the network idle
#: timer's precision and any check not driven by a queue.
ASSOC_MAX_WAIT = 0.1

_POLL_IN = getattr(select, "POLLIN", 1) | getattr(select, "POLLPRI", 2)

_PYNETDICOM_LOG = logging.getLogger("pynetdicom")
#: Notification events the C-STORE fast path does not emit; with a handler of its own
#: (other than pynetdicom's standard debug loggers) bound to one, the fast path is off.
_SKIPPED_NOTIFICATIONS = (
    evt.EVT_DATA_RECV,
    evt.EVT_PDU_RECV,
    evt.EVT_DIMSE_RECV,
    evt.EVT_DIMSE_SENT,
    evt.EVT_PDU_SENT,
)
_STANDARD_LOGGERS = frozenset(
    {
        _handlers.standard_dimse_recv_handler,
        _handlers.standard_dimse_sent_handler,
        _handlers.standard_pdu_recv_handler,
        _handlers.standard_pdu_sent_handler,
    }
)
#: Command elements a C-STORE-RQ may carry (anything else goes to pynetdicom).
_STORE_RQ_ELEMENTS = frozenset(
    {0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000, 0x1030, 0x1031}
)
_PDU_TYPES = frozenset(range(1, 8))


def _decode_command(data: bytes) -> dict[int, bytes] | None:
    """The elements of an implicit VR little endian command set, or ``None``."""
    elements: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < 8:
            return None
        group, element, length = struct.unpack_from("<HHI", data, pos)
        pos += 8
        if group != 0 or length > end - pos:
            return None
        elements[element] = data[pos : pos + length]
        pos += length
    return elements


def _us(value: bytes) -> int | None:
    return struct.unpack("<H", value)[0] if len(value) == 2 else None


def _text(value: bytes) -> str:
    return value.decode("latin-1").rstrip("\x00 ").lstrip(" ")


def ui_element(element: int, value: str) -> bytes:
    """An implicit VR little endian UI element of a command set (NUL padded)."""
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += b"\x00"
    return struct.pack("<HHI", 0, element, len(raw)) + raw


def store_response_status(body: bytes | bytearray, message_id: int) -> int | None:
    """The status of a P-DATA-TF PDU ``body`` carrying, in one PDV, the whole C-STORE-RSP
    command set answering ``message_id``; ``None`` for anything else."""
    if len(body) < 6:
        return None
    (length,) = struct.unpack_from(">I", body, 0)
    if length != len(body) - 4 or body[5] != 0x03:  # one PDV: command, last fragment
        return None
    elements = _decode_command(bytes(body[6:]))
    if (
        elements is None
        or _us(elements.get(0x0100, b"")) != 0x8001
        or _us(elements.get(0x0120, b"")) != message_id
    ):
        return None
    return _us(elements.get(0x0900, b""))


def store_response_pdu(context_id: int, request: C_STORE, status: int) -> bytes:
    """A P-DATA-TF PDU carrying the C-STORE-RSP command set for ``request``.

    The same encoding as pynetdicom's (implicit VR little endian, elements in order,
    UIDs padded with NUL), built directly.
    """
    body = b"".join(
        (
            ui_element(0x0002, str(request.AffectedSOPClassUID)),
            struct.pack("<HHIH", 0, 0x0100, 2, 0x8001),
            struct.pack("<HHIH", 0, 0x0120, 2, request.MessageID),
            struct.pack("<HHIH", 0, 0x0800, 2, 0x0101),
            struct.pack("<HHIH", 0, 0x0900, 2, status),
            ui_element(0x1000, str(request.AffectedSOPInstanceUID)),
        )
    )
    command = struct.pack("<HHII", 0, 0, 4, len(body)) + body
    return struct.pack(">BBIIBB", 4, 0, len(command) + 6, len(command) + 2, context_id, 3) + command


#: Responses a handler may have waiting to be sent on its association: what a C-CANCEL
#: read meanwhile can no longer recall (see :func:`await_send_room`).
SEND_BACKLOG = 8


def await_send_room(assoc: Association, limit: int = SEND_BACKLOG) -> None:
    """Wait while more than ``limit`` messages wait to be sent on ``assoc``.

    pynetdicom queues every response a handler yields without bound, so a C-FIND handler
    that matches faster than the connection sends would queue all its matches, and a
    C-CANCEL read meanwhile would stop nothing already queued. Returns at once when the
    association ends or its DUL thread has stopped.
    """
    dul = assoc.dul
    waiting = dul.to_provider_queue
    # ``queue`` and ``not_full`` (notified by every get) are the attributes of
    # queue.Queue that pynetdicom itself reads; the lock is held, so no qsize()
    with waiting.not_full:
        while len(waiting.queue) > limit and assoc.is_established and dul.is_alive():
            waiting.not_full.wait(ASSOC_MAX_WAIT)


class _PendingStore:
    """A C-STORE request taken on the fast path, waiting for its data set fragments."""

    __slots__ = ("context", "context_id", "fragments", "request")

    def __init__(self, context_id: int, context: Any, request: C_STORE) -> None:
        self.context_id = context_id
        self.context = context
        self.request = request
        self.fragments: list[memoryview] = []


class NotifyingQueue(queue.Queue[_T]):
    """A FIFO queue that calls ``notify`` after every item put (with the queue locked)."""

    def __init__(self, notify: Callable[[], None]) -> None:
        super().__init__()
        self._notify = notify

    def _put(self, item: _T) -> None:
        super()._put(item)
        self._notify()


class GatewayDUL(DULServiceProvider):
    """A DUL service provider whose reactor blocks on the socket and a wake-up pipe.

    Parameters
    ----------
    assoc
        The parent association.
    on_user_activity
        Called whenever a primitive is queued for the service user and when the reactor
        thread ends (the association reactor waits on it).
    """

    def __init__(self, assoc: Association, on_user_activity: Callable[[], None]) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._on_user_activity = on_user_activity
        self.event_queue = NotifyingQueue(self._wake_from_other_thread)
        self.to_provider_queue = NotifyingQueue(self._wake_from_other_thread)
        self.to_user_queue = NotifyingQueue(on_user_activity)
        self._poller: Any = select.poll() if hasattr(select, "poll") else None
        self._polled_fd = -1
        # C-STORE fast path: command fragments of the message being read, and the
        # request whose data set is being read
        self._command: list[tuple[int, int, memoryview]] = []
        self._pending: _PendingStore | None = None
        # C-STORE SCU fast path: a StoreSender reads its own response; the reactor does
        # not read the connection meanwhile (see reading())
        self._reader = threading.Lock()
        self._lent = False
        # after sending, look at the connection before sending again (see _run)
        self._read_next = False

    # -- waking ----------------------------------------------------------------------

    def _wake_from_other_thread(self) -> None:
        """Signal the reactor, unless the caller is the reactor itself."""
        if threading.get_ident() != self.ident:
            self.wake()

    def wake(self) -> None:
        """Make the reactor's current (or next) wait return at once."""
        # OSError: full (already signalled) or closed (the reactor has finished)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\x00")

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):  # BlockingIOError once empty
            while self._wake_r.recv(4096):
                pass

    def kill_dul(self) -> None:
        """Stop the reactor (it notices at once instead of at its next poll timeout)."""
        super().kill_dul()
        self.wake()

    # -- reactor ---------------------------------------------------------------------

    def run_reactor(self) -> None:
        """pynetdicom's DUL loop, blocking in poll() instead of sleeping 1 ms."""
        try:
            self._run()
        finally:
            for sock in (self._wake_r, self._wake_w):
                sock.close()
            self._on_user_activity()

    @contextmanager
    def reading(self) -> Iterator[AssociationSocket | None]:
        """Lend the connection to the calling thread, which reads a response itself.

        Meanwhile the reactor does not read the connection: the C-STORE SCU fast path
        (:class:`dicom_node.store_scu.StoreSender`) writes its request and reads the
        response on its own thread, without a hand-off to the reactor thread and back.
        Whatever the caller read and did not consume it gives back to the socket's
        read-ahead buffer (``unread``); the reactor then processes it as usual.
        """
        with self._reader:
            self._lent = True
            try:
                yield self.socket
            finally:
                self._lent = False
        if int(getattr(self.socket, "buffered", 0)):
            self.wake()  # bytes given back: the reactor reads them now

    def restart_idle_timer(self) -> None:
        """Traffic was read on a lent connection: the association is not idle."""
        self._idle_timer.restart()

    def _is_transport_event(self) -> bool:
        """pynetdicom's check and read of incoming data, unless the connection is lent."""
        if not self._reader.acquire(blocking=False):
            return False
        try:
            return bool(super()._is_transport_event())
        finally:
            self._reader.release()

    def _run(self) -> None:
        self._idle_timer.start()
        self.socket = cast("AssociationSocket", self.socket)
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()

            if self._kill_thread:
                break

            if self.artim_timer.expired:
                self.event_queue.put("Evt18")

            try:
                # One event per iteration, as in pynetdicom, which gives sending priority:
                # a stream of C-FIND responses queued faster than they are sent would
                # then leave the requestor's C-CANCEL unread until the stream ends. Here
                # an iteration that sent is followed by a look at the connection.
                if self._read_next and self._incoming_pdu():
                    self._read_next = False
                    self._idle_timer.restart()
                elif self._process_recv_primitive():  # encode and send (state machine)
                    self._read_next = True
                elif self._is_transport_event():  # receive and decode a PDU
                    self._idle_timer.restart()
            except Exception as exc:
                LOG.error("Exception in the DUL reactor, aborting association")
                LOG.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return

            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                if not self.to_provider_queue.empty():
                    continue  # a read handled on the fast path; primitives wait to be sent
                self._wait()
                continue

            self.state_machine.do_action(event)

    def _incoming_pdu(self) -> bool:
        """Read a PDU if one is arriving during data transfer (without waiting; never
        while the connection is lent: see :meth:`_is_transport_event`)."""
        return self.state_machine.current_state == "Sta6" and self._is_transport_event()

    def _wait(self) -> None:
        """Block until the socket is readable, another thread woke us, or a timeout."""
        assoc_socket = self.socket
        if self._lent:
            # another thread reads the connection: wait for a wake-up (or the timeout)
            with contextlib.suppress(OSError, ValueError):
                select.select([self._wake_r], [], [], DUL_MAX_WAIT)
            self._drain_wake()
            return
        if getattr(assoc_socket, "buffered", 0):
            return  # PDUs already read ahead: no need to wait for the connection
        sock = assoc_socket.socket if assoc_socket is not None else None
        fd = -1
        if sock is not None and getattr(assoc_socket, "_is_connected", False):
            try:
                fd = sock.fileno()
            except OSError:
                fd = -1
            pending = getattr(sock, "pending", None)  # TLS: buffered bytes select cannot see
            if fd >= 0 and pending is not None and pending():
                return
        if fd < 0 or self.state_machine.current_state == "Sta13":
            # No usable socket (not connected yet, or closing): pynetdicom's short sleep.
            time.sleep(self._run_loop_delay)
            return

        timeout = DUL_MAX_WAIT
        if self.artim_timer.timeout is not None and self.artim_timer._start_time is not None:
            timeout = max(0.0, min(timeout, self.artim_timer.remaining))
        try:
            if self._poller is not None:
                self._poll(fd, timeout)
            else:  # pragma: no cover - platforms without poll()
                select.select([fd, self._wake_r.fileno()], [], [], timeout)
        except (OSError, ValueError):
            time.sleep(self._run_loop_delay)
            return
        self._drain_wake()

    def _poll(self, fd: int, timeout: float) -> None:
        poller = self._poller
        if fd != self._polled_fd:
            if self._polled_fd >= 0:
                with contextlib.suppress(KeyError, OSError, ValueError):
                    poller.unregister(self._polled_fd)
            else:
                poller.register(self._wake_r, _POLL_IN)
            poller.register(fd, _POLL_IN)
            self._polled_fd = fd
        poller.poll(int(timeout * 1000) + (timeout > 0))

    # -- C-STORE fast path --------------------------------------------------------------

    def _read_pdu_data(self) -> None:
        """pynetdicom's PDU read, with P-DATA-TF PDUs offered to the C-STORE fast path.

        The fast path decodes C-STORE requests itself, calls the ``EVT_C_STORE``
        handler on this thread and sends the response directly: no pydicom decode of
        the command, no hand-off to the association thread and back, no BytesIO
        assembly of the data set. Anything else (other messages, an association that
        is busy, unusual commands) goes to pynetdicom exactly as received.
        """
        sock = cast("AssociationSocket", self.socket)
        try:
            header = sock.recv(6)
            if len(header) != 6:
                self.event_queue.put("Evt17")
                return
            pdu_type, _, pdu_length = struct.unpack(">BBL", header)
            if pdu_type not in _PDU_TYPES:
                LOG.error("Unknown PDU type received '0x%02X'", pdu_type)
                self.event_queue.put("Evt19")
                return
            body = sock.recv(pdu_length)
        except (OSError, TimeoutError) as exc:
            LOG.error("Connection closed before the entire PDU was received (%s)", exc)
            self.event_queue.put("Evt17")
            return
        if len(body) != pdu_length:
            LOG.error(
                "The received PDU is shorter than expected (%d of %d bytes received)",
                len(body) + 6,
                pdu_length + 6,
            )
            self.event_queue.put("Evt17")
            return
        if pdu_type == 0x04 and self._fast_p_data(body):
            return
        header.extend(body)
        try:
            pdu, event = self._decode_pdu(header)
            self.event_queue.put(event)
        except Exception as exc:
            LOG.error("Unable to decode the received PDU data")
            LOG.exception(exc)
            self.event_queue.put("Evt19")
            return
        self._recv_pdu.put(pdu)

    def _fast_path_open(self) -> bool:
        """Whether a new message may be taken on the fast path."""
        assoc = self.assoc
        if (
            self.state_machine.current_state != "Sta6"
            or not assoc.is_acceptor
            or not assoc.is_established
            or assoc._sent_release
            or assoc.dimse.message is not None
            or not self._recv_pdu.empty()
            or not self.event_queue.empty()
            # queue first, then the flag: see GatewayAssociation._run_reactor
            or not assoc.dimse.msg_queue.empty()
            or getattr(assoc, "serving", True)
            or _PYNETDICOM_LOG.isEnabledFor(logging.DEBUG)
        ):
            return False
        for event in _SKIPPED_NOTIFICATIONS:
            bound = cast("list[tuple[Callable[..., Any], Any]]", assoc.get_handlers(event))
            for handler, _args in bound:
                if handler not in _STANDARD_LOGGERS:
                    return False
        return True

    def _fast_p_data(self, body: bytearray) -> bool:
        """Handle a P-DATA-TF PDU on the fast path; ``False`` leaves it to pynetdicom."""
        if self._pending is None and not self._command and not self._fast_path_open():
            return False
        view = memoryview(body)
        values: list[tuple[int, int, memoryview]] = []
        pos, end = 0, len(view)
        while pos < end:
            if end - pos < 6:
                return self._give_up(None)
            (length,) = struct.unpack_from(">I", view, pos)
            if length < 2 or length > end - pos - 4:
                return self._give_up(None)
            values.append((view[pos + 4], view[pos + 5], view[pos + 6 : pos + 4 + length]))
            pos += 4 + length
        for index, (context_id, control, data) in enumerate(values):
            pending = self._pending
            if pending is not None:
                if control & 1 or context_id != pending.context_id:
                    LOG.error("C-STORE data set interrupted by another message: aborting")
                    self._pending = None
                    self.event_queue.put("Evt19")
                    return True
                pending.fragments.append(data)
                if control & 2:
                    self._pending = None
                    self._complete_store(pending)
                continue
            if not control & 1:
                # a data set without a command (pynetdicom decides what that means)
                self._forward(values[index:])
                return True
            self._command.append((context_id, control, data))
            if control & 2 and not self._start_store():
                self._forward(values[index + 1 :])
                return True
        return True

    def _give_up(self, _reason: None) -> bool:
        """A malformed PDU: let pynetdicom decode it (it aborts), unless mid-message."""
        if self._pending is None and not self._command:
            return False
        self._pending = None
        self._command = []
        self.event_queue.put("Evt19")
        return True

    def _forward(self, values: list[tuple[int, int, memoryview]]) -> None:
        """Hand fragments to pynetdicom's DIMSE provider as its DT-2 action would."""
        if not values:
            return
        primitive = P_DATA()
        primitive.presentation_data_value_list = []  # filled as pynetdicom's to_primitive()
        primitive.presentation_data_value_list.extend(
            (context_id, bytes((control,)) + bytes(data)) for context_id, control, data in values
        )
        self.assoc.dimse.receive_primitive(primitive)

    def _start_store(self) -> bool:
        """The command set is complete: take a C-STORE-RQ, or give the message back."""
        fragments, self._command = self._command, []
        context_id = fragments[-1][0]
        command = b"".join(bytes(data) for _cx, _control, data in fragments)
        request = self._store_request(context_id, command)
        if request is None:
            self._forward(fragments)
            return False
        context = self.assoc._accepted_cx[context_id]
        self._pending = _PendingStore(context_id, context, request)
        return True

    def _store_request(self, context_id: int, command: bytes) -> C_STORE | None:
        """The C-STORE-RQ primitive of a command set the fast path can serve."""
        elements = _decode_command(command)
        if (
            elements is None
            or not elements.keys() <= _STORE_RQ_ELEMENTS
            or _us(elements.get(0x0100, b"")) != 0x0001
            or _us(elements.get(0x0800, b"")) in (None, 0x0101)
            or 0x0002 not in elements
            or 0x1000 not in elements
            or context_id not in self.assoc._accepted_cx
        ):
            return None
        message_id = _us(elements.get(0x0110, b""))
        priority = _us(elements.get(0x0700, b""))
        if message_id is None or priority is None:
            return None
        sop_class = _text(elements[0x0002])
        acceptor = self.assoc.acceptor
        if sop_class in acceptor.accepted_common_extended or (
            not pynetdicom_config.UNRESTRICTED_STORAGE_SERVICE
            and uid_to_service_class(sop_class) is not StorageServiceClass
        ):
            return None
        request = C_STORE()
        try:
            request.MessageID = message_id
            request.AffectedSOPClassUID = sop_class
            request.AffectedSOPInstanceUID = _text(elements[0x1000])
            request.Priority = priority
            if 0x1030 in elements:
                request.MoveOriginatorApplicationEntityTitle = _text(elements[0x1030])
            if 0x1031 in elements:
                request.MoveOriginatorMessageID = _us(elements[0x1031])
        except Exception:
            return None  # pynetdicom decides (it refuses such commands)
        return request

    def _complete_store(self, pending: _PendingStore) -> None:
        """Call the C-STORE handler and answer, as pynetdicom's storage SCP would."""
        assoc = self.assoc
        request = pending.request
        fragments = pending.fragments
        data = bytes(fragments[0]) if len(fragments) == 1 else b"".join(fragments)
        fragments.clear()
        request.DataSet = BytesIO(data)  # shares ``data``: getvalue() returns it
        if assoc._sent_release:
            LOG.warning("C-STORE message received during association release, ignoring")
            return
        setattr(assoc, "abort", assoc._abort_nonblocking)  # noqa: B010 - as pynetdicom
        try:
            status = evt.trigger(
                assoc,
                evt.EVT_C_STORE,
                {"request": request, "context": pending.context.as_tuple},
            )
        except Exception as exc:
            LOG.error("Exception in handler bound to 'evt.EVT_C_STORE'")
            LOG.exception(exc)
            status = 0xC211
        finally:
            setattr(assoc, "abort", assoc._abort_blocking)  # noqa: B010
        request.DataSet = None
        del data
        if not assoc.is_established:
            return
        if isinstance(status, int) and not isinstance(status, bool) and 0 <= status <= 0xFFFF:
            pdu = store_response_pdu(pending.context_id, request, status)
            peer_max = assoc.requestor.maximum_length or 0
            if not peer_max or len(pdu) - 6 <= peer_max:
                cast("AssociationSocket", self.socket).send(pdu)
                return
        # a status data set, an odd value or a tiny peer PDU: pynetdicom's way
        response = C_STORE()
        response.MessageID = request.MessageID
        response.MessageIDBeingRespondedTo = request.MessageID
        response.AffectedSOPInstanceUID = request.AffectedSOPInstanceUID
        response.AffectedSOPClassUID = request.AffectedSOPClassUID
        response = StorageServiceClass(assoc).validate_status(cast(Any, status), response)
        assoc.dimse.send_msg(response, pending.context_id)


class GatewayAssociation(Association):
    """An association whose reactor waits for work instead of polling every 1 ms."""

    def __init__(self, ae: ApplicationEntity, mode: str) -> None:
        super().__init__(ae, mode)
        self._activity = threading.Event()
        self._activity.set()
        #: True while the reactor may be serving a request (read by the DUL's fast path)
        self.serving = False
        self.dul = GatewayDUL(self, self._activity.set)
        self.dimse.msg_queue = NotifyingQueue(self._activity.set)
        # the timeouts live on the DUL's timers: apply them to the new DUL
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout

    def kill(self) -> None:
        """Kill the association thread (waking its reactor at once)."""
        self._activity.set()
        super().kill()

    def _run_reactor(self) -> None:
        """pynetdicom's acceptor/requestor loop, waiting on activity instead of sleeping.

        Apart from the wait, the body is pynetdicom 3.0's, with the pause handshake made
        race free (see the module docstring).
        """
        self._is_paused = False
        activity = self._activity
        while not self._kill:
            # Paused while waiting: a thread that clears the checkpoint may go on at once.
            self._is_paused = True
            self._reactor_checkpoint.wait()
            activity.wait(ASSOC_MAX_WAIT)
            activity.clear()
            self._is_paused = False
            if not self._reactor_checkpoint.is_set():
                # Paused between our wait and now: leave the queue to the pausing thread,
                # and look again as soon as we are let go.
                activity.set()
                continue

            # flag before taking: the DUL's fast path checks the queue, then the flag
            self.serving = True
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                activity.set()  # more messages may be queued: look again at once
                self._serve_request(msg, cast(int, context_id))
            self.serving = False

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                LOG.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                LOG.info(log_msg)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                LOG.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return
