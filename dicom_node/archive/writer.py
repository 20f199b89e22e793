"""Background writing of journalled archive files.

Once an instance's bytes are durable in the ingest journal and its index row has
committed, nothing requires its archive file to exist before the sender gets its answer:
the file is written by this thread, off the receiving thread's critical path (creating a
file costs a file-system journal handle, often a fraction of a millisecond while other
syncs are in progress). Readers never see a missing or partial file: the path is
*reserved* in :class:`~dicom_node.archive.files.InstanceFiles` before the index row
commits, and :meth:`InstanceFiles.absolute` waits for a reserved path to be written.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence

from dicom_node.archive.files import InstanceFiles

LOG = logging.getLogger(__name__)

Chunk = bytes | bytearray | memoryview
_RETRY_DELAY = 1.0


class FileWriter:
    """A thread writing reserved archive files, with a bound on the bytes it holds."""

    def __init__(self, files: InstanceFiles, max_pending_bytes: int = 256 * 1024 * 1024) -> None:
        self._files = files
        self._max_pending = max_pending_bytes
        self._queue: deque[tuple[str, Sequence[Chunk], int, Callable[[], None]]] = deque()
        self._pending_bytes = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="archive-writer", daemon=True)
        self.failures = 0
        self._failing = False

    @property
    def failing(self) -> bool:
        """Whether the last write attempt failed (new stores are then refused)."""
        return self._failing

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def submit(self, relative: str, chunks: Sequence[Chunk], done: Callable[[], None]) -> None:
        """Write ``chunks`` to the reserved ``relative`` path, then call ``done``.

        Blocks while more than ``max_pending_bytes`` wait to be written (a disk slower
        than the network slows the senders down instead of filling memory).
        """
        size = sum(len(c) for c in chunks)
        with self._cond:
            while self._pending_bytes and self._pending_bytes + size > self._max_pending:
                self._cond.wait()
            self._queue.append((relative, chunks, size, done))
            self._pending_bytes += size
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                relative, chunks, size, done = self._queue[0]
            if self._write(relative, chunks):
                done()
            with self._cond:
                self._queue.popleft()
                self._pending_bytes -= size
                self._cond.notify_all()

    def _write(self, relative: str, chunks: Sequence[Chunk]) -> bool:
        """Write one file, retrying while the disk refuses; ``False`` if given up (stop).

        A file given up stays live in the journal (``done`` is not called), so the next
        start's replay writes it.
        """
        try:
            while True:
                try:
                    self._files.write_unsynced(relative, chunks)
                    self._failing = False
                    return True
                except OSError as exc:
                    self.failures += 1
                    self._failing = True
                    LOG.error(
                        "cannot write an archive file (%s); the journal keeps it",
                        exc.strerror or type(exc).__name__,
                    )
                    with self._cond:
                        if self._stopping:
                            return False
                        self._cond.wait(_RETRY_DELAY)
        finally:
            self._files.release(relative)

    def stop(self) -> None:
        """Write what is queued (unless the disk keeps failing), then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=60)
