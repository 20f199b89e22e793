"""Durable instance files: write to a temporary file, fsync, rename, fsync the directory.

Paths are derived from the SHA-256 of the SOP Instance UID, never from the raw string, so
a hostile UID cannot escape the archive directory.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StoredFile:
    """Where an instance's bytes were written (relative to the archive root)."""

    relative_path: str
    size: int


class InstanceFiles:
    """The instance file tree under ``<data_dir>/archive`` with its ``tmp`` staging area."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "archive"
        self.tmp = data_dir / "tmp"

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
        """The archive-relative path of an instance: ``ab/cd/<sha256>.dcm``."""
        digest = hashlib.sha256(sop_instance_uid.encode("ascii", "replace")).hexdigest()
        return f"{digest[:2]}/{digest[2:4]}/{digest}.dcm"

    def absolute(self, relative_path: str) -> Path:
        """The absolute path of an archive-relative path (which must stay inside the root)."""
        path = (self.root / relative_path).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError("path escapes the archive root")
        return path

    def stage(self, chunks: Iterable[bytes | bytearray | memoryview]) -> tuple[Path, int]:
        """Write ``chunks`` to a new fsync'd staging file; returns its path and size."""
        fd, name = tempfile.mkstemp(dir=self.tmp, suffix=".part")
        size = 0
        try:
            with os.fdopen(fd, "wb", buffering=0) as fh:
                for chunk in chunks:
                    fh.write(chunk)
                    size += len(chunk)
                os.fsync(fh.fileno())
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return Path(name), size

    def commit(self, staged: Path, relative_path: str) -> None:
        """Atomically move a staged file to its final place and make the rename durable."""
        final = self.root / relative_path
        parent = final.parent
        created = self._makedirs(parent)
        os.replace(staged, final)
        _fsync_dir(parent)
        for directory in created:
            _fsync_dir(directory.parent)

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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
