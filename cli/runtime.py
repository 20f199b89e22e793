"""Composition root: build every service from the settings, once per process."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from prometheus_client import CollectorRegistry
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import _config as pynetdicom_config
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from cli.database import (
    SqliteWriteGate,
    current_revision,
    durability_barrier,
    head_revision,
    make_engine,
    make_sessions,
)
from config.db import reading
from config.settings import Settings
from consent.decision import Resolution
from consent.service import ConsentStore
from dicom_node.archive.files import InstanceFiles, node_identity
from dicom_node.archive.flusher import JournalFlusher
from dicom_node.archive.header import dataset_offset
from dicom_node.archive.index import ArchiveIndex
from dicom_node.archive.journal import IngestJournal, sync_filesystem
from dicom_node.archive.recovery import ReplayReport, replay_journal
from dicom_node.archive.service import Archive
from dicom_node.archive.writer import FileWriter
from dicom_node.contexts import supported_contexts
from dicom_node.errors import InvalidInstance
from dicom_node.handlers import NodeHandlers
from dicom_node.metrics import NodeMetrics
from dicom_node.server import DicomNode
from router.forwarder import forwarded_destinations
from router.gate import AccessGate, ArchivedPatient
from router.hook import RoutingHook, Wakeups
from router.planner import PatientFacts, Planner
from router.queue import JobQueue, RetryPolicy
from router.routes import RouteTable

LOG = logging.getLogger(__name__)


def replay_issuer(settings: Settings, calling_ae: str) -> str | None:
    """The default issuer for an instance stored again from the journal, or ``None``
    when it cannot be told.

    The journal keeps the sending AE title, not the sender's address. The issuer applied
    when the instance was received is known only when the configured peers with that AE
    title all have the same one. Otherwise (several issuers, or no such peer any more)
    the instance is filed without a patient identity (``Archive.store``,
    ``sender_known=False``): held for reconciliation where a route needs consent,
    withheld from purpose-bound peers, rather than resolved under a guessed issuer, or
    by its INS alone, to a patient it may not be.
    """
    issuers = {p.issuer for p in settings.peers if p.ae_title == calling_ae}
    return issuers.pop() if len(issuers) == 1 else None


class SchemaOutOfDate(RuntimeError):
    """The database schema is older than this version of consentgate."""


@dataclass
class Runtime:
    """The services of one consentgate process."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    read_sessions: sessionmaker[Session]
    files: InstanceFiles
    index: ArchiveIndex
    archive: Archive
    registry: CollectorRegistry
    metrics: NodeMetrics
    consent: ConsentStore
    queue: JobQueue
    routes: RouteTable
    planner: Planner
    wakeups: Wakeups
    gate: AccessGate
    write_gate: SqliteWriteGate
    journal: IngestJournal | None = None

    def close(self) -> None:
        """Release the database connections."""
        self.consent.close()
        self.index.close()
        self.engine.dispose()


def setup_logging(level: int) -> None:
    """The logging of a consentgate process (the CLI, the node, the forwarder process).

    Below DEBUG, the libraries keep to their warnings and errors, and pydicom to its
    errors: pynetdicom logs each DIMSE message at INFO, Alembic its dialect whenever the
    schema revision is read, and pydicom warns about a value it finds invalid *with the
    value* (a malformed birth date in a C-FIND answer is the patient's year and month of
    birth), in its log and as a Python warning, both silenced. No patient data in
    ordinary logs.
    """
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    debug = level <= logging.DEBUG
    for name, quiet in (
        ("pynetdicom", logging.WARNING),
        ("alembic", logging.WARNING),
        ("pydicom", logging.ERROR),
    ):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else quiet)
    if not debug:
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")


def configure_pynetdicom() -> None:
    """Process-wide pynetdicom settings: no identifiers (patient data) in its logs, and
    files sent from disk as they are."""
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True


def build_runtime(settings: Settings) -> Runtime:
    """Wire the settings to the archive, index and metrics (no network yet)."""
    node = settings.node
    write_gate = SqliteWriteGate()
    engine = make_engine(
        node.effective_database_url, pool_size=node.max_associations + 2, write_gate=write_gate
    )
    sessions = make_sessions(engine)
    files = InstanceFiles(node.data_dir)
    index = ArchiveIndex(sessions)
    registry = CollectorRegistry()
    consent = ConsentStore(sessions)
    routes = RouteTable(settings.routes)

    def resolve_facts(facts: PatientFacts) -> Resolution:
        return consent.resolve_dicom_patient(
            issuer=facts.issuer,
            patient_id=facts.patient_id,
            ins_values=facts.ins_values,
            birth_date=facts.birth_date,
            sex=facts.sex,
        )

    def resolve_archived(patient: ArchivedPatient) -> Resolution:
        return consent.resolve_dicom_patient(
            issuer=patient.issuer,
            patient_id=patient.patient_id,
            ins_values=(),
            birth_date=patient.birth_date,
            sex=patient.sex,
        )

    queue = _make_queue(settings, sessions)
    planner = Planner(routes, resolve_facts, consent.decide)
    wakeups = Wakeups()
    return Runtime(
        settings=settings,
        engine=engine,
        sessions=sessions,
        read_sessions=reading(engine),
        files=files,
        index=index,
        archive=Archive(files, index, RoutingHook(planner, queue, wakeups, consent.audit)),
        registry=registry,
        metrics=NodeMetrics(registry),
        consent=consent,
        queue=queue,
        routes=routes,
        planner=planner,
        wakeups=wakeups,
        gate=AccessGate(resolve_archived, consent.decide, resolve_facts),
        write_gate=write_gate,
        journal=(
            IngestJournal(node.data_dir / "journal", node.journal_segment_mb * 1024 * 1024)
            if node.journal_segment_mb
            else None
        ),
    )


def _make_queue(settings: Settings, sessions: sessionmaker[Session]) -> JobQueue:
    tuning = settings.router
    return JobQueue(
        sessions,
        RetryPolicy(
            max_attempts=tuning.max_attempts,
            base_delay=tuning.retry_base_delay,
            max_delay=tuning.retry_max_delay,
            lease_seconds=tuning.lease_seconds,
        ),
        origin=node_identity(settings.node.data_dir),
    )


@dataclass
class ForwardingServices:
    """What the forwarder process needs: the queue, the archive files, consent decisions."""

    engine: Engine
    files: InstanceFiles
    queue: JobQueue
    consent: ConsentStore

    def close(self) -> None:
        """Release the database connections."""
        self.consent.close()
        self.engine.dispose()


def build_forwarding(settings: Settings) -> ForwardingServices:
    """Wire the settings to the forwarders' services, in the forwarder process.

    The archive files are written by the serving process (a file not placed yet is
    waited for). With the ingest journal on, the queue's claims and acknowledgements do
    not wait for their own sync, as in the serving process: the journal's checkpoints
    make them durable (a lost acknowledgement costs a resend, never a lost job).
    """
    node = settings.node
    write_gate = SqliteWriteGate()
    # a connection per forwarder (one per destination), plus one
    pool_size = len(forwarded_destinations(settings)) + 1
    engine = make_engine(node.effective_database_url, pool_size=pool_size, write_gate=write_gate)
    sessions = make_sessions(engine)
    queue = _make_queue(settings, sessions)
    if node.journal_segment_mb:
        queue.defer_bookkeeping(
            make_engine(
                node.effective_database_url,
                pool_size=pool_size,
                durable_commits=False,
                write_gate=write_gate,
            )
        )
    return ForwardingServices(
        engine=engine,
        files=InstanceFiles(node.data_dir, written_by_another_process=True),
        queue=queue,
        consent=ConsentStore(sessions),
    )


class Ingest:
    """The receiving side of a serving process: archive directories and ingest journal.

    :meth:`start` prepares the archive directories, takes the journal lock, replays what a
    crash left in the journal, then attaches the journal to the archive: from then on an
    instance is durable once its journal record is synced, index commits (and the
    forwarders' claims and acknowledgements) do not wait for their own sync, and the
    archive files are written in the background. :meth:`stop`
    writes what is queued and makes every file and index row durable.
    """

    def __init__(self, runtime: Runtime, flush_interval: float = 0.5) -> None:
        self._runtime = runtime
        self._flusher: JournalFlusher | None = None
        self._writer: FileWriter | None = None
        self._flush_interval = flush_interval
        self.leftover_staging_files = 0
        self.replay: ReplayReport | None = None
        self._unknown_senders: set[str] = set()

    def start(self) -> None:
        """Prepare, replay, attach (before the node accepts any association)."""
        runtime = self._runtime
        self.leftover_staging_files = runtime.files.prepare()
        journal = runtime.journal
        if journal is None:
            return
        journal.lock()
        barrier = self._barrier(journal)
        try:
            self.replay = replay_journal(
                journal, runtime.files, runtime.index, self._reindex, barrier
            )
            journal.start(barrier)
        except BaseException:
            journal.close()
            raise
        node = runtime.settings.node
        ingest_engine = make_engine(
            node.effective_database_url,
            pool_size=node.max_associations + 2,
            durable_commits=False,
            write_gate=runtime.write_gate,
        )
        runtime.index.defer_durability(ingest_engine)
        runtime.queue.defer_bookkeeping(ingest_engine)
        self._writer = FileWriter(runtime.files)
        self._writer.start()
        runtime.archive.attach_journal(journal, self._writer)
        self._flusher = JournalFlusher(journal, self._flush_interval)
        self._flusher.start()

    def health(self) -> dict[str, str]:
        """The ingest checks of ``/healthz``: journal checkpoints and archive writes."""
        if self._runtime.journal is None:
            return {"journal": "off"}
        if self._flusher is None or self._writer is None:
            return {"journal": "error: not started"}
        return {
            "journal": "error: checkpoint failing" if self._flusher.last_failed else "ok",
            "archive_writer": "error: cannot write archive files" if self._writer.failing else "ok",
        }

    @property
    def archive_writes_failing(self) -> bool:
        """Whether the background writer cannot write archive files (stores refused)."""
        return self._writer is not None and self._writer.failing

    def _barrier(self, journal: IngestJournal) -> Callable[[], None]:
        """What a checkpoint must make durable besides the journal's file system: the
        archive's file system (if another) and the database."""
        synced = os.stat(journal.directory).st_dev
        archive_root = self._runtime.files.root
        sync_archive = os.stat(archive_root).st_dev != synced
        database = durability_barrier(self._runtime.engine, synced)

        def barrier() -> None:
            if sync_archive:
                sync_filesystem(archive_root)
            database()

        return barrier

    def _reindex(self, part10: bytes) -> None:
        """Store a journalled Part 10 file again (replay), as its sender sent it."""
        try:
            meta = dcmread(BytesIO(part10), stop_before_pixels=True).file_meta
            syntax, sop_class, sop_instance = (
                str(meta.TransferSyntaxUID),
                str(meta.MediaStorageSOPClassUID),
                str(meta.MediaStorageSOPInstanceUID),
            )
            dataset_start = dataset_offset(part10)
        except (InvalidDicomError, AttributeError, ValueError, EOFError) as exc:
            raise InvalidInstance(f"unreadable file meta ({type(exc).__name__})") from None
        calling_ae = str(meta.get("SourceApplicationEntityTitle", "") or "").strip()
        issuer = replay_issuer(self._runtime.settings, calling_ae)
        if issuer is None and calling_ae not in self._unknown_senders:
            self._unknown_senders.add(calling_ae)  # said once per AE title
            LOG.warning(
                "journal replay: the configured peers with AE title %s have several issuers "
                "or none; what they sent is indexed again without a patient identity (held "
                "for reconciliation, withheld from purpose-bound peers)",
                calling_ae,
            )
        self._runtime.archive.store(
            memoryview(part10)[dataset_start:],
            transfer_syntax_uid=syntax,
            command_sop_class_uid=sop_class,
            command_sop_instance_uid=sop_instance,
            calling_ae=calling_ae,
            default_issuer=issuer or "",
            sender_known=issuer is not None,
        )

    def stop(self) -> None:
        """Write what is queued, final checkpoint: every file and index row durable,
        journal segments free, lock released."""
        if self._writer is not None:
            self._writer.stop()
            self._writer = None
        if self._flusher is not None:
            self._flusher.stop()
            self._flusher = None
        if self._runtime.journal is not None:
            self._runtime.journal.close()


def check_schema(runtime: Runtime) -> None:
    """Raise :class:`SchemaOutOfDate` unless the database is at the newest revision."""
    current, head = current_revision(runtime.engine), head_revision()
    if current != head:
        raise SchemaOutOfDate(
            f"database schema is at {current or 'nothing'}, this version needs {head}: "
            "run 'consentgate init' (new installation) or 'consentgate db upgrade'"
        )


def build_node(runtime: Runtime) -> DicomNode:
    """The DICOM node with its handlers bound to the runtime's services."""
    configure_pynetdicom()
    contexts = supported_contexts()
    consent = runtime.consent

    def audit(actor: str, action: str, target: str, details: Mapping[str, Any]) -> None:
        consent.audit(actor=actor, action=action, target=target, details=details)

    handlers = NodeHandlers(
        runtime.settings,
        runtime.archive,
        runtime.read_sessions,
        runtime.metrics,
        contexts,
        access=runtime.gate,
        audit=audit,
    )
    return DicomNode(runtime.settings.node, contexts, handlers.bindings())
