"""The ingest journal's background checkpoint thread."""

from __future__ import annotations

import logging
import threading

from dicom_node.archive.journal import IngestJournal

LOG = logging.getLogger(__name__)


class JournalFlusher:
    """Checkpoints the journal every ``interval`` seconds while something was appended.

    A checkpoint syncs the archive's file system once and recycles the segments whose
    records are all durable in the archive. A failed checkpoint recycles nothing (the
    records stay live) and is retried at the next interval.
    """

    def __init__(self, journal: IngestJournal, interval: float = 0.5) -> None:
        self._journal = journal
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="journal-flusher", daemon=True)
        self.failures = 0
        self.last_failed = False

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            if not self._journal.appended_since_checkpoint:
                continue
            try:
                self._journal.checkpoint()
                self.last_failed = False
            except OSError as exc:
                self.failures += 1
                self.last_failed = True
                LOG.error("journal checkpoint failed: %s", exc.strerror or type(exc).__name__)

    def stop(self) -> None:
        """Stop the thread; the journal's own :meth:`~IngestJournal.close` does the rest."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
