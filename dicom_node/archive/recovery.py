"""Replay of the ingest journal after a crash, before the node accepts associations.

For every archive path named by a live journal record, the last record decides:

* a journalled instance whose index row is missing: its index transaction committed
  without waiting for its own sync and a power loss took it, or the process died just
  before the commit (the sender then got no answer and will send again). Either way the
  instance is stored again from the record, through the archive's durable path (index
  row, forward jobs, file);
* the index row of the record's instance points at that path: the file may not have
  reached the disk, and is rewritten from the record;
* a *direct marker* (the file was written and synced directly) or a *cancel marker* (the
  store failed and the sender was told so): an indexed file is left alone, an unindexed
  one is removed.

Everything restored is synced to disk before the journal's segments are recycled by
:meth:`IngestJournal.start`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from dicom_node.archive.files import InstanceFiles
from dicom_node.archive.index import ArchiveIndex
from dicom_node.archive.journal import IngestJournal, JournalRecord, read_payload, sync_filesystem
from dicom_node.errors import InvalidInstance

LOG = logging.getLogger(__name__)

Reindex = Callable[[bytes], None]


@dataclass(frozen=True)
class ReplayReport:
    """What a replay found and did."""

    segments: int
    records: int
    restored: int
    reindexed: int
    removed: int


def replay_journal(
    journal: IngestJournal,
    files: InstanceFiles,
    index: ArchiveIndex,
    reindex: Reindex,
    barrier: Callable[[], None],
) -> ReplayReport:
    """Bring the archive files and the index in line with the live journal records.

    ``reindex(file_bytes)`` stores a Part 10 file again through the archive's durable
    path (raising :class:`InvalidInstance` for bytes it cannot store: their file is
    removed; a storage failure stops the replay, and the start); ``barrier()`` makes
    the index commits durable. The caller holds the journal's
    lock and has not started it yet.
    """
    last: dict[str, JournalRecord] = {}
    segments = journal.live_segments()
    records = 0
    for seq, path in segments:
        for record in journal.scan(seq, path):
            last[record.relative_path] = record
            records += 1
    restored = reindexed = removed = 0
    for relative, record in last.items():
        target = files.absolute(relative)
        row = index.find_instance(record.sop_instance_uid)
        if row is not None and row.path == relative:
            if not (record.direct or record.cancelled):
                files.write_unsynced(relative, (read_payload(record),))
                restored += 1
        elif not (record.direct or record.cancelled):
            try:
                reindex(read_payload(record))
                reindexed += 1
            except InvalidInstance as exc:
                LOG.error("journal record not indexed again: %s", exc)
                target.unlink(missing_ok=True)
                removed += 1
        elif target.exists():
            target.unlink()
            removed += 1
    if restored or removed or reindexed:
        sync_filesystem(files.root)
        barrier()
    if records:
        LOG.warning(
            "ingest journal replayed: %d record(s) in %d segment(s); %d file(s) restored, "
            "%d instance(s) indexed again, %d file(s) of failed stores removed",
            records,
            len(segments),
            restored,
            reindexed,
            removed,
        )
    return ReplayReport(len(segments), records, restored, reindexed, removed)
