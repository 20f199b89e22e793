"""The archive service: accept one received instance durably, or refuse it cleanly.

Order of operations (an acknowledged instance is never lost, a refused one leaves nothing):

1. parse the header from the received bytes (no pixel decoding) and validate its UIDs;
2. write preamble + file meta + the bytes as received to a staging file, fsync;
3. under a per-UID lock: rename into place, fsync the directory, commit the index row;
4. only then does the caller answer success.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from enum import Enum

from sqlalchemy.exc import SQLAlchemyError

from dicom_node.archive.files import InstanceFiles
from dicom_node.archive.header import (
    InstanceHeader,
    check_complete,
    file_meta_bytes,
    read_header,
)
from dicom_node.archive.index import ArchiveIndex
from dicom_node.errors import InvalidInstance, StorageFailure
from dicom_node.uids import is_valid_uid

LOG = logging.getLogger(__name__)


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


class Archive:
    """Stores received instances and indexes them.

    Duplicate policy ``keep``: when a SOP Instance UID is already archived, the first
    stored copy stays authoritative; the new copy is acknowledged (success) and discarded.
    """

    def __init__(self, files: InstanceFiles, index: ArchiveIndex) -> None:
        self.files = files
        self.index = index
        self._locks = _StripedLocks()

    def store(
        self,
        dataset: bytes | bytearray | memoryview,
        *,
        transfer_syntax_uid: str,
        command_sop_class_uid: str,
        command_sop_instance_uid: str,
        calling_ae: str,
        default_issuer: str = "",
    ) -> StoreResult:
        """Durably store one instance received with a C-STORE request.

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
        check_complete(dataset, transfer_syntax_uid)
        header = read_header(meta, dataset)
        if header.sop_instance_uid != command_sop_instance_uid:
            raise InvalidInstance(
                "dataset SOP Instance UID differs from the command's", status=0xC211
            )
        if header.sop_class_uid != command_sop_class_uid:
            raise InvalidInstance("dataset SOP Class UID differs from the command's", 0xA900)
        if not header.patient_id:
            LOG.info("instance received without Patient ID from %s", calling_ae)

        if self._already_stored(header.sop_instance_uid):
            return StoreResult(StoreOutcome.DUPLICATE, header, len(dataset))

        try:
            staged, size = self.files.stage((meta, dataset))
        except OSError as exc:
            raise StorageFailure(f"cannot write staging file ({exc.strerror})") from None

        relative = self.files.relative_path_for(header.sop_instance_uid)
        with self._locks.for_key(header.sop_instance_uid):
            if self._already_stored(header.sop_instance_uid):
                self.files.discard(staged)
                return StoreResult(StoreOutcome.DUPLICATE, header, size)
            try:
                self.files.commit(staged, relative)
            except OSError as exc:
                self.files.discard(staged)
                raise StorageFailure(f"cannot place file ({exc.strerror})") from None
            try:
                self.index.add_instance(
                    header,
                    issuer=header.issuer or default_issuer,
                    transfer_syntax_uid=transfer_syntax_uid,
                    size=size,
                    relative_path=relative,
                    calling_ae=calling_ae,
                )
            except SQLAlchemyError as exc:
                self.files.remove(relative)
                LOG.error("index write failed: %s", type(exc).__name__)
                raise StorageFailure("cannot write the index") from None
        return StoreResult(StoreOutcome.STORED, header, size)

    def _already_stored(self, sop_instance_uid: str) -> bool:
        try:
            return self.index.has_instance(sop_instance_uid)
        except SQLAlchemyError as exc:
            LOG.error("index read failed: %s", type(exc).__name__)
            raise StorageFailure("cannot read the index") from None
