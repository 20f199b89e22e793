"""The ingest journal: one data sync makes a received instance durable.

Placing an archive file durably costs, on ext4, a file fsync plus a directory fsync
(each a journal commit of the file system): several milliseconds for a 0.5 MB CT image,
more than a fast sender's whole C-STORE. The ingest journal moves them off the critical
path:

1. the instance's bytes are appended to a pre-allocated, pre-zeroed *segment* file and
   ``fdatasync``'d: an overwrite of allocated blocks, so only data (no metadata) is synced;
2. the index row commits without waiting for its own sync (SQLite ``synchronous=NORMAL``,
   PostgreSQL ``synchronous_commit=off``), and the sender gets its success status;
3. a background writer (:mod:`dicom_node.archive.writer`) puts the archive file at its
   place, without any sync.

A background checkpoint (:class:`~dicom_node.archive.flusher.JournalFlusher`) later
syncs the file system once for many files (``syncfs``), makes the index commits durable
(the *barrier*), and recycles the segments whose records are all durable elsewhere.
After a crash, :func:`dicom_node.archive.recovery.replay_journal` re-indexes the
instances whose index row a power loss took, rewrites every indexed file from the live
records, and removes files whose store never committed or was refused.

Instances larger than a segment bypass the journal (fsync, rename, directory fsync as
before); a *direct marker* record is appended first, so that a replay never overwrites the
direct file with an older journal copy of the same path. A store whose index transaction
failed (the sender was answered with a failure) appends a *cancel marker*, so that a
replay does not index it.

Segment layout: a 4 KiB header (magic, sequence number, size, CRC), then records, each
starting on a 4 KiB boundary: a 34-byte header (magic, segment sequence, flags, lengths,
checksum of UID, path and payload, checksum of the header), the SOP Instance UID, the
archive-relative path and the file bytes. The record magic names the checksum: ``CGJC``
CRC-32C (Castagnoli, with the ``crc32c`` package's hardware-accelerated implementation:
19 us for a 0.5 MB CT image here, where zlib's CRC-32 took 172 us on the receiving
thread), or ``CGJR`` zlib's CRC-32 (records of earlier versions). A scan reads both.
Records are written one at a time under a lock, so a torn record can only be the last
one of a segment. A record whose checksum does not match is skipped (it was never
acknowledged, or the disk damaged it); a header that is not a record of this segment
(zeros, or a leftover of the file's previous use) ends the scan.

Files: ``seg-<seq>.jnl`` (live), ``free-<n>.jnl`` (ready for reuse), ``lock`` (held by
the serving process: one writer per data directory).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import crc32c as crc32c_lib

from dicom_node.archive.files import fsync_directory

LOG = logging.getLogger(__name__)

PAGE = 4096
SEGMENT_MAGIC = b"CGJS"
RECORD_MAGIC = b"CGJR"  # checksums: zlib CRC-32
RECORD_MAGIC_C = b"CGJC"  # checksums: CRC-32C
FLAG_DIRECT = 0x01
FLAG_CANCEL = 0x02

# magic, sequence, segment size, crc of the preceding fields
_SEGMENT_HEADER = struct.Struct("<4sQQI")
# magic, segment sequence, flags, reserved, uid length, path length, payload length,
# CRC-32 of UID + path + payload, CRC-32 of the header fields before it
_RECORD_HEADER = struct.Struct("<4sQBBHHQII")
_RECORD_FIELDS = struct.Struct("<4sQBBHHQI")
_MAX_UID = 64
_MAX_PATH = 512
_ZEROS = bytes(1024 * 1024)
_KEEP_FREE = 2

Chunk = bytes | bytearray | memoryview
SyncFs = Callable[[int], int]
Checksum = Callable[[Chunk, int], int]


class JournalError(OSError):
    """The journal cannot be opened or written."""


class JournalLocked(JournalError):
    """Another process holds the journal of this data directory."""


@dataclass(frozen=True)
class JournalRecord:
    """One record found by :meth:`IngestJournal.scan` (payload not loaded)."""

    segment_seq: int
    offset: int  # of the record header within the segment file
    flags: int
    sop_instance_uid: str
    relative_path: str
    payload_offset: int
    payload_length: int
    crc: int
    path: Path  # the segment file

    @property
    def direct(self) -> bool:
        """A marker: the file was written and synced directly, not from this record."""
        return bool(self.flags & FLAG_DIRECT)

    @property
    def cancelled(self) -> bool:
        """A marker: the store of the preceding record for this path failed."""
        return bool(self.flags & FLAG_CANCEL)


@dataclass(frozen=True)
class Ticket:
    """An appended record whose archive file is being written (see :meth:`written`)."""

    ident: int
    segment_seq: int
    offset: int
    fd: int


def _round_up(value: int) -> int:
    return (value + PAGE - 1) // PAGE * PAGE


@dataclass
class _Segment:
    seq: int
    path: Path
    fd: int
    size: int
    end: int = PAGE  # next free offset


class IngestJournal:
    """Append-only, segment-recycling journal of received instance files."""

    def __init__(self, directory: Path, segment_size: int, *, crc32c: bool = True) -> None:
        if segment_size < 16 * PAGE or segment_size % PAGE:
            raise ValueError("segment size must be a multiple of 4 KiB and at least 64 KiB")
        self.directory = directory
        self.segment_size = segment_size
        self._lock = threading.Lock()
        self._lock_fd: int | None = None
        self._segments: list[_Segment] = []  # live, oldest first; the last is active
        self._in_flight: dict[int, tuple[int, int]] = {}
        self._next_ticket = 0
        self._last_seq = 0
        self._syncfs = _syncfs()
        self._start_writeback = _sync_file_range()
        self._barrier: Callable[[], None] | None = None
        self._appended_since_checkpoint = 0
        self._open = False
        # new records are checksummed with CRC-32C (``crc32c=False``: zlib's CRC-32, as
        # earlier versions wrote them)
        self._magic = RECORD_MAGIC_C if crc32c else RECORD_MAGIC
        self._checksum: Checksum = _CHECKSUMS[self._magic]

    # ------------------------------------------------------------------ opening

    @property
    def max_payload(self) -> int:
        """The largest file (bytes) that fits in one record; larger files go direct."""
        return self.segment_size - 2 * PAGE - _RECORD_HEADER.size - _MAX_UID - _MAX_PATH

    @property
    def is_open(self) -> bool:
        """Whether :meth:`start` succeeded and :meth:`close` has not been called."""
        return self._open

    def lock(self) -> None:
        """Take the data directory's journal lock (one serving process at a time)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalLocked(
                errno.EWOULDBLOCK,
                f"another consentgate process is serving from {self.directory.parent}",
            ) from None
        self._lock_fd = fd

    def live_segments(self) -> list[tuple[int, Path]]:
        """Live segment files (sequence, path), oldest first."""
        found = []
        for path in self.directory.glob("seg-*.jnl"):
            try:
                found.append((int(path.stem[4:], 16), path))
            except ValueError:
                LOG.warning("ignoring unexpected journal file %s", path.name)
        return sorted(found)

    def scan(self, segment_seq: int, path: Path) -> Iterator[JournalRecord]:
        """The valid records of one live segment, in append order."""
        with path.open("rb") as fh:
            head = fh.read(_SEGMENT_HEADER.size)
            if len(head) < _SEGMENT_HEADER.size:
                return
            magic, seq, size, crc = _SEGMENT_HEADER.unpack(head)
            if (
                magic != SEGMENT_MAGIC
                or seq != segment_seq
                or zlib.crc32(head[: _SEGMENT_HEADER.size - 4]) != crc
            ):
                LOG.warning("journal segment %s has no valid header; skipped", path.name)
                return
            offset = PAGE
            while offset + _RECORD_HEADER.size <= size:
                fh.seek(offset)
                raw = fh.read(_RECORD_HEADER.size)
                if len(raw) < _RECORD_HEADER.size:
                    return
                fields = _RECORD_HEADER.unpack(raw)
                magic, rseq, flags, _, uid_len, path_len, length, crc, header_crc = fields
                checksum = _CHECKSUMS.get(magic)
                if checksum is None or rseq != segment_seq:
                    return
                if checksum(raw[: _RECORD_FIELDS.size], 0) != header_crc:
                    return  # a torn header: the last record written, never acknowledged
                if uid_len > _MAX_UID or path_len > _MAX_PATH:
                    return
                names = fh.read(uid_len + path_len)
                payload_offset = offset + _RECORD_HEADER.size + uid_len + path_len
                record_end = payload_offset + length
                if len(names) < uid_len + path_len or record_end > size:
                    return
                check = checksum(names, 0)
                remaining = length
                while remaining:
                    block = fh.read(min(remaining, 1024 * 1024))
                    if not block:
                        return
                    check = checksum(block, check)
                    remaining -= len(block)
                next_offset = _round_up(record_end)
                if check != crc:
                    # torn (the last record being written when the process died) or
                    # damaged: not replayed; a later intact record still is
                    LOG.warning("journal %s: damaged record at %d skipped", path.name, offset)
                    offset = next_offset
                    continue
                try:
                    uid = names[:uid_len].decode("ascii")
                    relative = names[uid_len:].decode("ascii")
                except UnicodeDecodeError:
                    offset = next_offset
                    continue
                yield JournalRecord(
                    segment_seq,
                    offset,
                    flags,
                    uid,
                    relative,
                    payload_offset,
                    length,
                    crc,
                    path,
                )
                offset = next_offset

    def start(self, barrier: Callable[[], None] | None = None) -> None:
        """Retire every live segment (after a replay) and open a fresh active one.

        ``barrier`` is called by each checkpoint after the file-system sync: it must
        return only once every index transaction committed before it is durable (the
        index commits of a serving node do not wait for their own sync).
        """
        if self._lock_fd is None:
            raise JournalError(errno.EPERM, "journal lock not taken")
        # sequences keep growing across runs: a free file reused as a new segment still
        # holds the records of its earlier uses after the new ones, and the scan tells
        # them apart only by their segment sequence (were numbering to start again at 1
        # after a clean stop, a replay would take an earlier run's record of a path for
        # its latest one)
        self._last_seq = max(self._last_seq, self._highest_free_seq())
        for seq, path in self.live_segments():
            self._last_seq = max(self._last_seq, seq)
            self._retire(path)
        self._fsync_directory()
        with self._lock:
            self._segments = [self._activate(self._next_seq())]
        self._ensure_spare()
        self._barrier = barrier
        self._open = True

    # ------------------------------------------------------------------ writing

    def append(
        self,
        sop_instance_uid: str,
        relative_path: str,
        chunks: Sequence[Chunk],
        *,
        sync: bool = True,
    ) -> Ticket:
        """Append a record with the file's bytes and make it durable (one data sync).

        With ``sync=False`` the write-back only starts; call :meth:`sync` before relying
        on the record (the store path does so just before its index commit, so that the
        disk works while the index statements run). Call :meth:`written` with the ticket
        once the archive file has been written (or given up): until then the record is
        not checkpointed.
        """
        return self._append(sop_instance_uid, relative_path, chunks, 0, sync)

    def sync(self, ticket: Ticket) -> None:
        """Wait until the record of ``ticket`` is on disk."""
        os.fdatasync(ticket.fd)

    def mark_direct(self, sop_instance_uid: str, relative_path: str) -> None:
        """Record (durably) that ``relative_path`` is about to be written directly."""
        ticket = self._append(sop_instance_uid, relative_path, (), FLAG_DIRECT, True)
        self.written(ticket)

    def cancel(self, sop_instance_uid: str, relative_path: str) -> None:
        """Record (durably) that the store of the last record for this path failed (the
        sender was told so), so that a replay does not index it."""
        ticket = self._append(sop_instance_uid, relative_path, (), FLAG_CANCEL, True)
        self.written(ticket)

    def forget(self, items: Sequence[tuple[str, str]]) -> None:
        """Record (durably, one data sync) that the instances ``items`` (SOP Instance UID,
        archive-relative path) are being deleted from the archive, before their index
        rows go: a replay then neither indexes them again from a record still live nor
        keeps their files (cancel markers; should the deletion not commit, a replay
        leaves the indexed instance as it is)."""
        tickets: list[Ticket] = []
        try:
            for uid, path in items:
                tickets.append(self._append(uid, path, (), FLAG_CANCEL, False))
            for fd in {ticket.fd for ticket in tickets}:
                os.fdatasync(fd)
        finally:  # in flight until then: a checkpoint would not recycle their segments
            for ticket in tickets:
                self.written(ticket)

    def written(self, ticket: Ticket) -> None:
        """The archive file of ``ticket``'s record is written (or will not be)."""
        with self._lock:
            self._in_flight.pop(ticket.ident, None)

    def _append(
        self,
        sop_instance_uid: str,
        relative_path: str,
        chunks: Sequence[Chunk],
        flags: int,
        sync: bool,
    ) -> Ticket:
        if not self._open:
            raise JournalError(errno.EBADF, "journal is not open")
        uid = sop_instance_uid.encode("ascii")
        rel = relative_path.encode("ascii")
        if len(uid) > _MAX_UID or len(rel) > _MAX_PATH:
            raise ValueError("UID or path too long for the journal")
        views = [memoryview(c).cast("B") for c in chunks if len(c)]
        length = sum(len(v) for v in views)
        if length > self.max_payload:
            raise ValueError("record larger than a journal segment")
        checksum = self._checksum
        body_crc = checksum(rel, checksum(uid, 0))
        for view in views:  # outside the lock: other associations append meanwhile
            body_crc = checksum(view, body_crc)
        record_len = _RECORD_HEADER.size + len(uid) + len(rel) + length
        padded = _round_up(record_len)
        with self._lock:
            segment = self._segments[-1]
            if segment.end + record_len > segment.size:
                segment = self._rotate()
            offset = segment.end
            fields = _RECORD_FIELDS.pack(
                self._magic, segment.seq, flags, 0, len(uid), len(rel), length, body_crc
            )
            header_crc = struct.pack("<I", checksum(fields, 0))
            parts: list[Chunk] = [fields, header_crc, uid, rel, *views]
            if padded > record_len:
                parts.append(_ZEROS[: padded - record_len])
            _pwrite_all(segment.fd, parts, offset)
            segment.end = offset + padded
            self._appended_since_checkpoint += padded
            self._next_ticket += 1
            ticket = Ticket(self._next_ticket, segment.seq, offset, segment.fd)
            self._in_flight[ticket.ident] = (segment.seq, offset)
        try:
            if sync:
                os.fdatasync(ticket.fd)
            elif self._start_writeback is not None and padded >= _EARLY_WRITEBACK:
                self._start_writeback(ticket.fd, offset, padded, _SYNC_FILE_RANGE_WRITE)
        except OSError:
            self.written(ticket)
            raise
        return ticket

    def _rotate(self) -> _Segment:
        """Make a new active segment (called with the lock held)."""
        segment = self._activate(self._next_seq())
        self._segments.append(segment)
        return segment

    def _next_seq(self) -> int:
        self._last_seq += 1
        return self._last_seq

    def _activate(self, seq: int) -> _Segment:
        """Turn a free (or new) file into live segment ``seq`` with a durable header."""
        path = self.directory / f"seg-{seq:016x}.jnl"
        free = sorted(self.directory.glob("free-*.jnl"))
        if free:
            os.replace(free[0], path)
        else:
            self._create(path)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            head = struct.pack("<4sQQ", SEGMENT_MAGIC, seq, self.segment_size)
            header = _SEGMENT_HEADER.pack(SEGMENT_MAGIC, seq, self.segment_size, zlib.crc32(head))
            _pwrite_all(fd, [header], 0)
            os.fdatasync(fd)
            self._fsync_directory()
        except BaseException:
            os.close(fd)
            raise
        return _Segment(seq, path, fd, self.segment_size)

    def _highest_free_seq(self) -> int:
        """The highest sequence a free file's header names (its last use as a segment;
        each use rewrites the header with a higher one), 0 when none does."""
        highest = 0
        for path in self.directory.glob("free-*.jnl"):
            try:
                with path.open("rb") as fh:
                    head = fh.read(_SEGMENT_HEADER.size)
            except OSError:
                continue
            if len(head) < _SEGMENT_HEADER.size:
                continue
            magic, seq, _, crc = _SEGMENT_HEADER.unpack(head)
            if magic == SEGMENT_MAGIC and zlib.crc32(head[: _SEGMENT_HEADER.size - 4]) == crc:
                highest = max(highest, seq)
        return highest

    def _create(self, path: Path) -> None:
        """A zero-filled, fully written (allocated) segment file at ``path``."""
        tmp = path.with_suffix(".new")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            written = 0
            while written < self.segment_size:
                written += os.write(fd, _ZEROS[: min(len(_ZEROS), self.segment_size - written)])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def _ensure_spare(self) -> None:
        """Keep one free segment ready so that a rotation does not write 64 MB."""
        if not any(self.directory.glob("free-*.jnl")):
            self._create(self.directory / f"free-{os.urandom(6).hex()}.jnl")
            self._fsync_directory()

    # ------------------------------------------------------------------ checkpoints

    @property
    def appended_since_checkpoint(self) -> int:
        """Bytes appended since the last :meth:`checkpoint` (for the flusher)."""
        return self._appended_since_checkpoint

    def checkpoint(self, *, final: bool = False) -> int:
        """Make every completed archive write and index commit durable, then recycle
        segments.

        Segments older than the oldest record still being written are recycled; with
        ``final`` (shutdown, nothing in flight) the active one too. Returns the number
        of segments recycled.
        """
        with self._lock:
            if not self._segments:
                return 0
            if self._in_flight:
                bound = min(self._in_flight.values())[0]
            else:
                bound = self._segments[-1].seq + (1 if final else 0)
            self._appended_since_checkpoint = 0
        sync_filesystem(self.directory, self._syncfs)
        if self._barrier is not None:
            self._barrier()
        with self._lock:
            done = [s for s in self._segments if s.seq < bound]
            self._segments = [s for s in self._segments if s.seq >= bound]
        for segment in done:
            os.close(segment.fd)
            self._retire(segment.path)
        if done:
            self._fsync_directory()
        if not final:
            self._ensure_spare()
        return len(done)

    def close(self) -> None:
        """Final checkpoint (every file durable, every segment free), release the lock."""
        if self._open:
            self._open = False
            self.checkpoint(final=True)
        with self._lock:
            for segment in self._segments:
                os.close(segment.fd)
            self._segments = []
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _retire(self, path: Path) -> None:
        """A segment whose records are all durable elsewhere becomes free (or goes)."""
        if len(list(self.directory.glob("free-*.jnl"))) >= _KEEP_FREE:
            path.unlink(missing_ok=True)
        else:
            os.replace(path, self.directory / f"free-{os.urandom(6).hex()}.jnl")

    def _fsync_directory(self) -> None:
        fsync_directory(self.directory)


def read_payload(record: JournalRecord) -> bytes:
    """The file bytes of a record (checked against its CRC by :meth:`IngestJournal.scan`)."""
    with record.path.open("rb") as fh:
        fh.seek(record.payload_offset)
        data = fh.read(record.payload_length)
    if len(data) != record.payload_length:
        raise JournalError(errno.EIO, f"journal record in {record.path.name} is truncated")
    return data


def _pwrite_all(fd: int, parts: Sequence[Chunk], offset: int) -> None:
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        written = os.pwritev(fd, views[:512], offset)
        if written <= 0:
            raise JournalError(errno.EIO, "journal write made no progress")
        offset += written
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if written:
            views[0] = views[0][written:]


def sync_filesystem(path: Path, syncfs: SyncFs | None = None) -> None:
    """Flush every dirty page and metadata change of the file system holding ``path``.

    ``syncfs(2)`` (Linux): one journal commit for all the archive files written since
    the last call, and it reports write-back errors. Elsewhere: ``sync()``.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syncfs = syncfs or _syncfs()
        if syncfs is None:
            os.sync()
            return
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs failed: {os.strerror(err)}")
    finally:
        os.close(fd)


def _crc32c(data: Chunk, value: int) -> int:
    """CRC-32C of ``data`` continuing ``value``."""
    return int(crc32c_lib.crc32c(data, value))


_CHECKSUMS: dict[bytes, Checksum] = {RECORD_MAGIC: zlib.crc32, RECORD_MAGIC_C: _crc32c}

_SYNC_FILE_RANGE_WRITE = 2
# records from this size on start their write-back at once (for a small one the extra
# I/O submission costs more than the overlap saves)
_EARLY_WRITEBACK = 64 * 1024


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (starts write-back without waiting), if any."""
    try:
        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func  # type: ignore[no-any-return]


def _syncfs() -> SyncFs | None:
    """libc's ``syncfs``, or ``None`` where the C library has none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.syncfs
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int]
    func.restype = ctypes.c_int
    return func  # type: ignore[no-any-return]
