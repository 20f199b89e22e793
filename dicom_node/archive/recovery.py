"""Replay of the ingest journal after a crash, before the node accepts associations.

For every archive path named by a live journal record, the last record decides:

* the index row of the record's instance points at that path: the instance was
  acknowledged, and its file may not have reached the disk. A journalled record rewrites
  the file from the record; a *direct marker* means the file was written and synced
  directly, and is left alone;
* no index row points at it: the store never committed (so it was never acknowledged),
  and whatever file it left at that path is removed.

The rewritten files are then synced to disk (one ``syncfs``) before the journal's
segments are recycled by :meth:`IngestJournal.start`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dicom_node.archive.files import InstanceFiles
from dicom_node.archive.index import ArchiveIndex
from dicom_node.archive.journal import IngestJournal, JournalRecord, read_payload, sync_filesystem

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayReport:
    """What a replay found and did."""

    segments: int
    records: int
    restored: int
    removed: int


def replay_journal(
    journal: IngestJournal, files: InstanceFiles, index: ArchiveIndex
) -> ReplayReport:
    """Bring the archive files in line with the index using the live journal records.

    The caller holds the journal's lock and has not started it yet.
    """
    last: dict[str, JournalRecord] = {}
    segments = journal.live_segments()
    records = 0
    for seq, path in segments:
        for record in journal.scan(seq, path):
            last[record.relative_path] = record
            records += 1
    restored = removed = 0
    for relative, record in last.items():
        target = files.absolute(relative)
        row = index.find_instance(record.sop_instance_uid)
        if row is not None and row.path == relative:
            if not record.direct:
                files.write_unsynced(relative, (read_payload(record),))
                restored += 1
        elif target.exists():
            target.unlink()
            removed += 1
    if restored or removed:
        sync_filesystem(files.root)
    if records:
        LOG.warning(
            "ingest journal replayed: %d record(s) in %d segment(s), %d file(s) restored, "
            "%d file(s) of unacknowledged stores removed",
            records,
            len(segments),
            restored,
            removed,
        )
    return ReplayReport(len(segments), records, restored, removed)
