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
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ

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
                if self._process_recv_primitive():  # encode and send (state machine)
                    pass
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
                self._wait()
                continue

            self.state_machine.do_action(event)

    def _wait(self) -> None:
        """Block until the socket is readable, another thread woke us, or a timeout."""
        assoc_socket = self.socket
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


class GatewayAssociation(Association):
    """An association whose reactor waits for work instead of polling every 1 ms."""

    def __init__(self, ae: ApplicationEntity, mode: str) -> None:
        super().__init__(ae, mode)
        self._activity = threading.Event()
        self._activity.set()
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

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                activity.set()  # more messages may be queued: look again at once
                self._serve_request(msg, cast(int, context_id))

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
