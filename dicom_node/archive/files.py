"""Durable instance files: write to a temporary file, fsync, rename, fsync the directory.

Paths are derived from the SHA-256 of the SOP Instance UID, never from the raw string, so
a hostile UID cannot escape the archive directory. The layout is ``<ab>/<sha256>.dcm``
with the 256 ``<ab>`` directories created before the first file is placed: placing a
file then costs one directory fsync (a deeper tree created directories, and fsynced their
parents, for most instances of a fresh archive). The index stores each file's relative
path, so files placed under another layout stay readable.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StoredFile:
    """Where an instance's bytes were written (relative to the archive root)."""

    relative_path: str
    size: int


class InstanceFiles:
    """The instance file tree under ``<data_dir>/archive`` with its ``tmp`` staging area."""

    def __init__(self, data_dir: Path, *, written_by_another_process: bool = False) -> None:
        self.root = data_dir / "archive"
        self.tmp = data_dir / "tmp"
        # True in the forwarder process: the files are written by the serving process,
        # whose reservations this process cannot see; a file not there yet is waited for
        self._written_elsewhere = written_by_another_process
        self._layout_ready = False
        self._layout_lock = threading.Lock()
        # paths whose file is being written in the background: readers wait for them
        self._reserved: dict[str, threading.Event] = {}
        self._reserved_lock = threading.Lock()

    def prepare(self) -> int:
        """Create the directories and delete staging files a crash left behind.

        Returns the number of leftover temporary files removed.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        removed = 0
        for leftover in self.tmp.glob("*.part"):
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    @staticmethod
    def relative_path_for(sop_instance_uid: str) -> str:
        """The archive-relative path of an instance: ``ab/<sha256>.dcm``."""
        digest = hashlib.sha256(sop_instance_uid.encode("ascii", "replace")).hexdigest()
        return f"{digest[:2]}/{digest}.dcm"

    def absolute(self, relative_path: str, wait: float = 60.0, size: int = 0) -> Path:
        """The absolute path of an archive-relative path (which must stay inside the root).

        If the file is reserved (being written in the background), waits up to ``wait``
        seconds for it to be written, so that a reader never sees a partial file. In a
        process that does not write the files (``written_by_another_process``), waits
        a bounded time for the file to exist and hold at least ``size`` bytes (its
        indexed size: the serving process writes archive files in place, after the
        index row has committed).
        """
        if not _SAFE_RELATIVE.fullmatch(relative_path):
            # a path of another layout: check it the slow way (symbolic links resolved)
            resolved = (self.root / relative_path).resolve()
            if self.root.resolve() not in resolved.parents:
                raise ValueError("path escapes the archive root")
        path = self.root / relative_path
        written = self._reserved.get(relative_path)
        if written is not None and not written.wait(wait):
            raise OSError(errno.EBUSY, "archive file still being written", str(path))
        if self._written_elsewhere:
            # written within milliseconds normally; one still missing or short after a
            # few seconds was lost or cannot be written (the caller fails, retries later)
            _await_file(path, size, min(wait, _ELSEWHERE_WAIT))
        return path

    def reserve(self, relative_path: str) -> None:
        """Mark a file as about to be written: :meth:`absolute` waits for it."""
        with self._reserved_lock:
            self._reserved.setdefault(relative_path, threading.Event())

    def release(self, relative_path: str) -> None:
        """The reserved file is written (or will not be): wake its readers."""
        with self._reserved_lock:
            written = self._reserved.pop(relative_path, None)
        if written is not None:
            written.set()

    def stage(self, chunks: Sequence[bytes | bytearray | memoryview]) -> tuple[Path, int]:
        """Write ``chunks`` to a new fsync'd staging file; returns its path and size.

        The chunks go to the file as they are (``writev``): nothing is copied to join them.
        """
        path = self.tmp / f"{secrets.token_hex(12)}.part"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o644)
        try:
            try:
                size = _write_all(fd, chunks)
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path, size

    def write_unsynced(
        self, relative_path: str, chunks: Sequence[bytes | bytearray | memoryview]
    ) -> int:
        """Write ``chunks`` straight to the file's final place, without any sync.

        Only for a file whose bytes are already durable elsewhere (the ingest journal);
        returns the size written. A failed write removes what it left. (Readers in this
        process wait for the reservation; one in another process for the file to reach
        its indexed size: see :meth:`absolute`.)
        """
        if not self._layout_ready:
            self._create_layout()
        final = self.root / relative_path
        fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_CLOEXEC, 0o644)
        try:
            try:
                return _write_all(fd, chunks)
            finally:
                os.close(fd)
        except BaseException:
            final.unlink(missing_ok=True)
            raise

    def commit(self, staged: Path, relative_path: str) -> None:
        """Atomically move a staged file to its final place and make the rename durable.

        A background write of the same path still pending is waited for first, so that
        it cannot land over this file.
        """
        if not self._layout_ready:
            self._create_layout()
        final = self.absolute(relative_path)
        parent = final.parent
        created = [] if parent.is_dir() else self._makedirs(parent)
        os.replace(staged, final)
        fsync_directory(parent)
        for directory in created:
            fsync_directory(directory.parent)

    def _create_layout(self) -> None:
        """Create the 256 ``<ab>`` directories once (before the first file is placed)."""
        with self._layout_lock:
            if self._layout_ready:
                return
            created = False
            for prefix in range(256):
                try:
                    (self.root / f"{prefix:02x}").mkdir()
                    created = True
                except FileExistsError:
                    pass
            if created:
                fsync_directory(self.root)
            self._layout_ready = True

    def discard(self, staged: Path) -> None:
        """Remove a staging file that will not be committed."""
        staged.unlink(missing_ok=True)

    def remove(self, relative_path: str) -> None:
        """Remove an archived file (used when its index row could not be committed)."""
        (self.root / relative_path).unlink(missing_ok=True)

    def _makedirs(self, directory: Path) -> list[Path]:
        created: list[Path] = []
        missing = []
        current = directory
        while not current.exists() and current != self.root:
            missing.append(current)
            current = current.parent
        for path in reversed(missing):
            try:
                path.mkdir()
                created.append(path)
            except FileExistsError:
                pass
        return created


_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# the layout's own paths (hex digest names): inside the root by construction
_SAFE_RELATIVE = re.compile(r"[0-9a-f]{2}(?:/[0-9a-f]{2})?/[0-9a-f]{64}\.dcm")
_IOV_MAX = 512
#: seconds a reader in another process waits for a file the serving process has not placed
_ELSEWHERE_WAIT = 10.0


def _write_all(fd: int, chunks: Sequence[bytes | bytearray | memoryview]) -> int:
    """Write every chunk (short writes resumed); returns the byte count."""
    views = [memoryview(chunk).cast("B") for chunk in chunks if len(chunk)]
    total = sum(len(view) for view in views)
    while views:
        written = os.writev(fd, views[:_IOV_MAX])
        if written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if written:
            views[0] = views[0][written:]
    return total


def _await_file(path: Path, size: int, wait: float) -> None:
    """Wait up to ``wait`` seconds for another process to write ``size`` bytes (at least
    one) to ``path``."""
    deadline = time.monotonic() + wait
    delay = 0.001
    while True:
        try:
            if os.stat(path).st_size >= max(size, 1):
                return
            code, problem = errno.EBUSY, "archive file incomplete"
        except FileNotFoundError:
            code, problem = errno.ENOENT, "archive file not written"
        if time.monotonic() >= deadline:
            raise OSError(code, problem, str(path))
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def node_identity(data_dir: Path) -> str:
    """The identity of the archive under ``data_dir``: a random id kept in
    ``<data_dir>/node-id``, made on first use (``""`` while ``data_dir`` does not exist).

    Nodes that share one database but not one data directory hold different files: each
    forward job records the identity of the archive that holds its instance, and only a
    node with that archive claims it (nodes sharing a data directory share its id).
    """
    path = data_dir / "node-id"
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        if not data_dir.is_dir():
            return ""
    # first use: write the id aside, then link it in place (another process that got
    # there first wins, and both read its id)
    tmp = data_dir / f"node-id.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(uuid.uuid4().hex + "\n", encoding="ascii")
    try:
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        with contextlib.suppress(FileExistsError):  # another process got there first
            os.link(tmp, path)
        fsync_directory(data_dir)
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text(encoding="ascii").strip()


def fsync_directory(directory: Path) -> None:
    """Make the entries of ``directory`` (created, renamed, removed files) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
