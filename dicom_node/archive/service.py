"""The archive service: accept one received instance durably, or refuse it cleanly.

Order of operations (an acknowledged instance is never lost, a refused one leaves nothing):

1. parse the header from the received bytes (no pixel decoding) and validate its UIDs;
2. under a per-UID lock, unless the instance is already archived: make preamble + file
   meta + the bytes as received durable, either through the ingest journal (one data
   sync; see :mod:`dicom_node.archive.journal`) or, without a journal or for a file too
   large for it, as a staging file (fsync, rename, directory fsync);
3. commit the index row (and the router's jobs, in the same transaction);
4. only then does the caller answer success. A journalled file is written at its place
   by a background writer (:mod:`dicom_node.archive.writer`); readers of that path wait
   for it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.archive.attributes import ReceivedAttributes, attributes_of
from dicom_node.archive.files import InstanceFiles
from dicom_node.archive.header import (
    InstanceHeader,
    extra_tags,
    file_meta_bytes,
    parse_header,
    scan_dataset,
)
from dicom_node.archive.identity import (
    IDENTITY_KEYWORDS,
    UNSTORABLE,
    PatientIdentity,
    identity_of,
    store_identity,
)
from dicom_node.archive.index import ArchiveIndex
from dicom_node.archive.journal import IngestJournal, Ticket
from dicom_node.archive.writer import FileWriter
from dicom_node.errors import InvalidInstance, StorageFailure
from dicom_node.uids import is_valid_uid

LOG = logging.getLogger(__name__)

# the identity of an instance whose sender, and so issuer, is not known for sure: it
# designates no patient (no Patient ID, no INS), so nothing with a purpose accepts it
NOBODY = PatientIdentity(issuer="", patient_id="", ins_values=(), birth_date="", sex="")

Buffer = bytes | bytearray | memoryview


class StoreOutcome(Enum):
    """What happened to a received instance that was accepted."""

    STORED = "stored"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class StoreResult:
    """The outcome of :meth:`Archive.store` and the header it read."""

    outcome: StoreOutcome
    header: InstanceHeader
    size: int


class _StripedLocks:
    """A fixed set of locks indexed by a key's hash: serialises work on one UID."""

    def __init__(self, stripes: int = 64) -> None:
        self._locks = [threading.Lock() for _ in range(stripes)]

    def for_key(self, key: str) -> threading.Lock:
        digest = hashlib.blake2b(key.encode("ascii", "replace"), digest_size=4).digest()
        return self._locks[int.from_bytes(digest, "big") % len(self._locks)]


@dataclass(frozen=True)
class _Journalled:
    """A file durable in the journal, whose archive copy is yet to be written."""

    journal: IngestJournal
    writer: FileWriter
    ticket: Ticket

    def sync(self) -> None:
        """Wait for the record to be on disk (before the index commit)."""
        try:
            self.journal.sync(self.ticket)
        except OSError as exc:
            raise StorageFailure(f"cannot sync the journal ({exc.strerror})") from None

    def write(self, relative: str, chunks: tuple[bytes, Buffer]) -> None:
        """Hand the file to the background writer (the index row has committed)."""
        self.writer.submit(relative, chunks, lambda: self.journal.written(self.ticket))

    def abandon(self, sop_instance_uid: str, relative: str) -> None:
        """The store failed: nothing is written, and a cancel marker keeps a replay from
        indexing the record (best effort: the sender is told of the failure anyway)."""
        try:
            self.journal.cancel(sop_instance_uid, relative)
        except (OSError, ValueError) as exc:
            LOG.error("cannot write a journal cancel marker: %s", type(exc).__name__)
        finally:
            self.journal.written(self.ticket)


class StoreHook(Protocol):
    """Work that must commit together with a new instance's index row (the router's
    forward jobs). Implemented by :class:`router.hook.RoutingHook`."""

    def keywords(self) -> frozenset[str]:
        """Attributes to read from each dataset besides the index's own."""
        ...

    def prepare(
        self,
        attributes: ReceivedAttributes,
        header: InstanceHeader,
        calling_ae: str,
        identity: PatientIdentity,
    ) -> object | None:
        """Decide before the transaction; ``None`` when there is nothing to persist.

        ``attributes`` holds the values of :meth:`keywords` (``header`` the index
        attributes, ``identity`` the patient identity the data set carries, the sending
        peer's issuer applied).
        """
        ...

    def persist(self, connection: Connection, instance_pk: int, prepared: object) -> None:
        """Write inside the index transaction."""
        ...

    def committed(self, prepared: object) -> None:
        """Called once the transaction has committed."""
        ...


class Archive:
    """Stores received instances and indexes them.

    Duplicate policy ``keep``: when a SOP Instance UID is already archived, the first
    stored copy stays authoritative; the new copy is acknowledged (success) and discarded
    (and creates no forward job).
    """

    def __init__(
        self, files: InstanceFiles, index: ArchiveIndex, hook: StoreHook | None = None
    ) -> None:
        self.files = files
        self.index = index
        self.hook = hook
        # the identity attributes are always read: the issuer keys the archived patient,
        # and each instance keeps the identity it carries (consent checks of Q/R)
        self._keywords = (hook.keywords() if hook is not None else frozenset()) | frozenset(
            IDENTITY_KEYWORDS
        )
        self._extra_tags = extra_tags(self._keywords)
        self._locks = _StripedLocks()
        self._journal: IngestJournal | None = None
        self._writer: FileWriter | None = None

    def store(
        self,
        dataset: bytes | bytearray | memoryview,
        *,
        transfer_syntax_uid: str,
        command_sop_class_uid: str,
        command_sop_instance_uid: str,
        calling_ae: str,
        default_issuer: str = "",
        sender_known: bool = True,
    ) -> StoreResult:
        """Durably store one instance received with a C-STORE request.

        ``sender_known=False`` (a journal replay that cannot tell which peer sent it, so
        which issuer applied): the instance is filed without a patient identity. Its
        routes with a purpose hold it for reconciliation, and query/retrieve withholds it
        from purpose-bound peers; routes without purpose forward it as usual.

        Raises
        ------
        InvalidInstance
            The dataset is malformed or contradicts the command.
        StorageFailure
            The file or the index row could not be written; nothing remains.
        """
        if not is_valid_uid(command_sop_instance_uid) or not is_valid_uid(command_sop_class_uid):
            raise InvalidInstance("command carries an invalid SOP UID", status=0xC212)
        if not is_valid_uid(transfer_syntax_uid):
            raise InvalidInstance("invalid transfer syntax UID", status=0xC212)
        meta = file_meta_bytes(
            command_sop_class_uid, command_sop_instance_uid, transfer_syntax_uid, calling_ae
        )
        # one walk checks the data set is complete and reads the index attributes
        # straight from the bytes (pydicom decodes only the few elements routing reads);
        # pydicom reads the whole header when the fast reader declines (unusual encodings)
        scanned = scan_dataset(dataset, transfer_syntax_uid, self._extra_tags)
        if scanned.fast is None:
            header, parsed = parse_header(
                meta, memoryview(dataset)[: scanned.header_end], self._keywords
            )
            attributes = attributes_of(parsed, self._keywords)
        else:
            header, attributes = scanned.fast
        if header.sop_instance_uid != command_sop_instance_uid:
            raise InvalidInstance(
                "dataset SOP Instance UID differs from the command's", status=0xC211
            )
        if header.sop_class_uid != command_sop_class_uid:
            raise InvalidInstance("dataset SOP Class UID differs from the command's", 0xA900)
        if not header.patient_id:
            LOG.info("instance received without Patient ID from %s", calling_ae)

        identity = identity_of(attributes, default_issuer) if sender_known else NOBODY
        hook = self.hook
        prepared = (
            hook.prepare(attributes, header, calling_ae, identity) if hook is not None else None
        )
        chunks = (meta, dataset)
        size = len(meta) + len(dataset)
        relative = self.files.relative_path_for(header.sop_instance_uid)
        with self._locks.for_key(header.sop_instance_uid):
            if self._already_stored(header.sop_instance_uid):
                return StoreResult(StoreOutcome.DUPLICATE, header, size)
            ticket = self._place(header.sop_instance_uid, relative, chunks)
            on_inserted = None
            if hook is not None and prepared is not None:

                def on_inserted(connection: Connection, instance_pk: int) -> None:
                    hook.persist(connection, instance_pk, prepared)

            try:
                self.index.add_instance(
                    header,
                    # the same rule as routing's: the qualifiers' Universal Entity ID
                    # when Issuer of Patient ID is absent, then the sending peer's
                    issuer=header.issuer or identity.issuer[:64],
                    identity=store_identity(identity) if sender_known else UNSTORABLE,
                    transfer_syntax_uid=transfer_syntax_uid,
                    size=size,
                    relative_path=relative,
                    calling_ae=calling_ae,
                    on_inserted=on_inserted,
                    before_commit=ticket.sync if ticket is not None else None,
                )
            except (SQLAlchemyError, StorageFailure) as exc:
                if ticket is None:
                    self.files.remove(relative)
                else:
                    self.files.release(relative)
                    ticket.abandon(header.sop_instance_uid, relative)
                if isinstance(exc, StorageFailure):
                    raise
                LOG.error("index write failed: %s", type(exc).__name__)
                raise StorageFailure("cannot write the index") from None
            if ticket is not None:
                ticket.write(relative, chunks)
        if hook is not None and prepared is not None:
            hook.committed(prepared)
        return StoreResult(StoreOutcome.STORED, header, size)

    def attach_journal(self, journal: IngestJournal, writer: FileWriter) -> None:
        """Store through ``journal`` from now on (once it has been replayed and started),
        with archive files written by ``writer``."""
        self._journal = journal
        self._writer = writer

    def _place(
        self, sop_instance_uid: str, relative: str, chunks: tuple[bytes, Buffer]
    ) -> _Journalled | None:
        """Make the file durable before the index row commits.

        Through the journal when one is attached and the file fits in a record: the
        bytes are appended to the journal (their write-back starts; the index
        transaction waits for it just before committing) and the path reserved; the
        returned handle writes the file once the row has committed. Else (no journal,
        or a file larger than a record): staging file, fsync, rename, directory fsync;
        returns ``None``.
        """
        journal, writer = self._journal, self._writer
        size = len(chunks[0]) + len(chunks[1])
        try:
            if writer is not None and writer.failing:
                # the archive disk refuses writes: say so now rather than queue more
                raise StorageFailure("the archive cannot be written")
            if journal is not None and writer is not None and size <= journal.max_payload:
                ticket = journal.append(sop_instance_uid, relative, chunks, sync=False)
                self.files.reserve(relative)
                return _Journalled(journal, writer, ticket)
            if journal is not None:
                journal.mark_direct(sop_instance_uid, relative)
        except OSError as exc:
            raise StorageFailure(f"cannot write the journal ({exc.strerror})") from None
        try:
            staged, _ = self.files.stage(chunks)
        except OSError as exc:
            raise StorageFailure(f"cannot write staging file ({exc.strerror})") from None
        try:
            self.files.commit(staged, relative)
        except OSError as exc:
            self.files.discard(staged)
            raise StorageFailure(f"cannot place file ({exc.strerror})") from None
        return None

    def _already_stored(self, sop_instance_uid: str) -> bool:
        try:
            return self.index.has_instance(sop_instance_uid)
        except SQLAlchemyError as exc:
            LOG.error("index read failed: %s", type(exc).__name__)
            raise StorageFailure("cannot read the index") from None
