"""The forwarders in a child process of ``consentgate serve`` (``[router] forwarders``).

Receiving and forwarding are both Python: in one process they share one interpreter lock
and so one core. With ``forwarders = "process"`` the serving process starts this module
as a child (``python -m cli.forward_process``), which runs the same forwarders
(:class:`router.forwarder.ForwarderPool`) on its own database connections. The two
processes share only the database (the queue) and the archive directory, and two pipes:

* **wake** (parent -> child): one byte per wake-up, the index of a destination in
  :func:`router.forwarder.forwarded_destinations` (255: every destination). End of file
  means the parent stopped or died: the child stops its forwarders (claimed, unsent jobs
  go back to the queue) and exits, so no forwarder outlives its node. The child ignores
  SIGINT and SIGTERM (a terminal's Ctrl-C and a service manager reach the whole process
  group): its parent decides when it stops.
* **report** (child -> parent): lines ``ready`` and ``sent <index> <count>`` (for the
  ``consentgate_forwarded_total`` metric).

The parent supervises the child: if it exits while the node runs, its leases are
released and a new one is started after a delay (1 s, doubling up to 30 s), and
``/healthz`` reports ``forwarders`` as an error until it is back. The start-up
parameters (settings, tuning, lease owner, log level) reach the child pickled on its
standard input, from its own parent only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from config.settings import Settings
from router.forwarder import ForwarderOptions, ForwarderPool, forwarded_destinations, new_owner
from router.queue import JobQueue

LOG = logging.getLogger(__name__)
_ALL = 255
_RESTART_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
_READY_TIMEOUT = 60.0


@dataclass(frozen=True)
class ChildParameters:
    """What the parent hands the child on its standard input."""

    settings: Settings
    options: ForwarderOptions
    owner: str
    log_level: int


class ForwarderProcess:
    """Parent side: starts, wakes, supervises and stops the forwarder process.

    Same interface as :class:`~router.forwarder.ForwarderPool` (``start``, ``wake``,
    ``stop``), plus :meth:`health`.
    """

    def __init__(
        self,
        settings: Settings,
        queue: JobQueue,
        options: ForwarderOptions,
        on_sent: Callable[[str, int], None] | None = None,
    ) -> None:
        self._settings = settings
        self._queue = queue
        self._options = options
        self._on_sent = on_sent
        self._destinations = forwarded_destinations(settings)
        self._index = {name: i for i, name in enumerate(self._destinations[:_ALL])}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._wake_fd: int | None = None
        self._ready = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.owner = ""
        self.starts = 0

    # -- interface of ForwarderPool ------------------------------------------------

    def start(self) -> None:
        """Recover expired leases, start the child and wait (bounded) until it runs."""
        if not self._destinations:
            return
        recovered = self._queue.recover_stale()
        if recovered:
            LOG.info("recovered %d forward job(s) whose lease had expired", recovered)
        report = self._spawn()
        self._supervisor = threading.Thread(
            target=self._supervise, args=(report,), name="forwarder-supervisor", daemon=True
        )
        self._supervisor.start()
        deadline = time.monotonic() + _READY_TIMEOUT
        while not self._ready.wait(0.05):
            # a child that died at once is restarted by the supervisor: do not wait for it
            if self.pid is None or time.monotonic() > deadline:
                LOG.error("the forwarder process is not running yet (see /healthz)")
                return

    def wake(self, destination: str | None = None) -> None:
        """Tell the child that jobs may be ready (never blocks: a lost wake-up costs at
        most the forwarders' poll interval)."""
        index = _ALL if destination is None else self._index.get(destination, _ALL)
        with self._lock:  # the descriptor is closed under this lock: never a reused one
            if self._wake_fd is None:
                return
            # full (the child has wake-ups pending) or the child is gone: nothing to do
            with contextlib.suppress(OSError):
                os.write(self._wake_fd, bytes((index,)))

    def stop(self, timeout: float = 20.0) -> None:
        """Close the wake pipe (the child stops and exits), wait, then release leases."""
        self._stopping.set()
        with self._lock:
            proc, self._proc = self._proc, None
            self._close_wake()
        if proc is not None:
            _finish(proc, timeout)
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
        if self.owner:
            self._release(self.owner)

    @property
    def pid(self) -> int | None:
        """The running child's process id."""
        with self._lock:
            return self._proc.pid if self._proc is not None else None

    def health(self) -> str:
        """``ok``, or an error while the forwarder process is not running."""
        if not self._destinations:
            return "ok"
        with self._lock:
            proc = self._proc
        if proc is None or proc.poll() is not None or not self._ready.is_set():
            return "error: forwarder process not running (restarting)"
        return "ok"

    # -- the child's life ------------------------------------------------------------

    def _spawn(self) -> IO[bytes]:
        """Start a child; returns the read end of its report pipe."""
        self.owner = new_owner()
        self._ready.clear()
        wake_r, wake_w = os.pipe()
        report_r, report_w = os.pipe()
        parameters = ChildParameters(
            self._settings, self._options, self.owner, logging.getLogger().getEffectiveLevel()
        )
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cli.forward_process", str(wake_r), str(report_w)],
                stdin=subprocess.PIPE,
                pass_fds=(wake_r, report_w),
            )
        finally:
            os.close(wake_r)
            os.close(report_w)
        assert proc.stdin is not None
        try:
            proc.stdin.write(pickle.dumps(parameters))
            proc.stdin.close()
        except OSError:  # the child died at once: the supervisor sees its report end
            pass
        os.set_blocking(wake_w, False)
        with self._lock:
            self._proc = proc
            self._wake_fd = wake_w
            if self._stopping.is_set():  # stop() ran meanwhile: this child ends at once
                self._close_wake()
        self.starts += 1
        return os.fdopen(report_r, "rb")

    def _supervise(self, report: IO[bytes]) -> None:
        failures = 0
        while True:
            started = time.monotonic()
            self._read_reports(report)
            report.close()
            with self._lock:
                # None: stop() took the child (and waits for it)
                proc, self._proc = self._proc, None
                self._close_wake()
                stopping = self._stopping.is_set()
            if proc is None:
                return
            status = _finish(proc, 20.0)
            if stopping:  # a child started while the node was stopping
                return
            LOG.error("the forwarder process exited unexpectedly (status %s)", status)
            self._release(self.owner)
            failures = 0 if time.monotonic() - started > 60 else failures + 1
            delay = _RESTART_DELAYS[min(failures, len(_RESTART_DELAYS) - 1)]
            if self._stopping.wait(delay):
                return
            respawned = self._respawn()
            if respawned is None:
                return
            report = respawned
            LOG.info("forwarder process restarted")

    def _respawn(self) -> IO[bytes] | None:
        """Start a new child, retrying while that fails; ``None`` once the node stops."""
        while not self._stopping.is_set():
            try:
                return self._spawn()
            except OSError as exc:
                LOG.error("cannot start the forwarder process: %s", exc.strerror or exc)
                self._stopping.wait(_RESTART_DELAYS[-1])
        return None

    def _read_reports(self, report: IO[bytes]) -> None:
        for raw in report:
            words = raw.decode("ascii", "replace").split()
            if words == ["ready"]:
                self._ready.set()
            elif len(words) == 3 and words[0] == "sent" and self._on_sent is not None:
                try:
                    name, count = self._destinations[int(words[1])], int(words[2])
                except (ValueError, IndexError):
                    continue
                self._on_sent(name, count)

    def _close_wake(self) -> None:
        if self._wake_fd is not None:
            os.close(self._wake_fd)
            self._wake_fd = None

    def _release(self, owner: str) -> None:
        try:
            released = self._queue.release_own_leases(owner)
        except Exception as exc:  # the leases expire and are recovered later
            LOG.error("cannot release the forwarder process's leases: %s", type(exc).__name__)
            return
        if released:
            LOG.info("%d claimed forward job(s) put back in the queue", released)


def _finish(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """Wait for ``proc`` to exit; killed after ``timeout`` seconds."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        LOG.error("the forwarder process did not stop within %.0f s: killed", timeout)
        proc.kill()
        return proc.wait()


# --------------------------------------------------------------------------- child side


def child_main(wake_fd: int, report_fd: int) -> int:
    """Run the forwarders until the wake pipe ends; returns the exit status."""
    from cli.runtime import build_forwarding, configure_pynetdicom, setup_logging

    # the parent stops this process by closing the wake pipe (see the module's docstring)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # written by the parent that started this process (the same user), nobody else
    parameters: ChildParameters = pickle.load(sys.stdin.buffer)  # noqa: S301
    setup_logging(parameters.log_level)
    configure_pynetdicom()
    settings = parameters.settings
    destinations = forwarded_destinations(settings)
    report = os.fdopen(report_fd, "wb", buffering=0)
    report_lock = threading.Lock()

    def send_report(line: str) -> None:
        # an error: the parent is gone (and the wake pipe ends too)
        with report_lock, contextlib.suppress(OSError):
            report.write(line.encode("ascii") + b"\n")

    index = {name: i for i, name in enumerate(destinations)}

    def on_sent(destination: str, count: int) -> None:
        send_report(f"sent {index[destination]} {count}")

    services = build_forwarding(settings)
    pool = ForwarderPool(
        settings,
        services.queue,
        services.files,
        services.consent.decide,
        parameters.options,
        on_sent=on_sent,
        owner=parameters.owner,
    )
    pool.start()
    send_report("ready")
    try:
        _relay_wakeups(wake_fd, pool, destinations)
    finally:
        pool.stop()
        services.close()
        report.close()
    return 0


def _relay_wakeups(wake_fd: int, pool: ForwarderPool, destinations: list[str]) -> None:
    """Wake the forwarders named by the bytes read, until end of file."""
    while data := os.read(wake_fd, 4096):
        for index in set(data):
            pool.wake(destinations[index] if index < len(destinations) else None)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.stdin.isatty():
        sys.exit("cli.forward_process is started by 'consentgate serve', not by hand")
    sys.exit(child_main(int(sys.argv[1]), int(sys.argv[2])))
