"""Writes to the archive index: one transaction per stored instance."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from config.db import CompiledStatement
from dicom_node.archive.header import InstanceHeader
from dicom_node.archive.models import Instance, Patient, Series, Study

_PARENT_CACHE_SIZE = 4096
_INSTANCE_COLUMNS = (
    "series_pk",
    "sop_instance_uid",
    "sop_class_uid",
    "instance_number",
    "number_of_frames",
    "transfer_syntax_uid",
    "size",
    "path",
    "calling_ae",
    "received_at",
    "identity",
)


class ArchiveIndex:
    """The patient/study/series/instance index, bound to one sessionmaker."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._engine: Engine = sessions.kw["bind"]
        # series UID -> (study pk, series pk) of series this process has indexed into
        self._parents: dict[str, tuple[int, int]] = {}
        self._writers = _WriterConnections(self._engine)
        self._deferred_engine: Engine | None = None
        # Statements of the store path, compiled once and run on the DBAPI cursor (see
        # config.db.CompiledStatement): per instance, SQLAlchemy's execution machinery
        # cost as much CPU as the database's own work.
        dialect = self._engine.dialect
        self._insert_instance = CompiledStatement(
            insert(Instance)
            .values({name: bindparam(name) for name in _INSTANCE_COLUMNS})
            .returning(Instance.id),
            dialect,
        )
        self._count_series = CompiledStatement(
            update(Series)
            .where(Series.id == bindparam("pk"))
            .values(number_of_instances=Series.number_of_instances + 1),
            dialect,
        )
        self._count_study = CompiledStatement(
            update(Study)
            .where(Study.id == bindparam("pk"))
            .values(number_of_instances=Study.number_of_instances + 1),
            dialect,
        )
        self._count_study_series = CompiledStatement(
            update(Study)
            .where(Study.id == bindparam("pk"))
            .values(
                number_of_instances=Study.number_of_instances + 1,
                number_of_series=Study.number_of_series + 1,
            ),
            dialect,
        )
        placeholder = "?" if self._engine.dialect.paramstyle == "qmark" else "%s"
        self._has_instance_sql = (
            f"SELECT 1 FROM {Instance.__tablename__} "  # noqa: S608 - constant names
            f"WHERE sop_instance_uid = {placeholder}"
        )

    @property
    def sessions(self) -> sessionmaker[Session]:
        """The sessionmaker used for every unit of work."""
        return self._sessions

    def find_instance(self, sop_instance_uid: str) -> Instance | None:
        """The index row of an instance, or ``None``."""
        with self._sessions() as session:
            return session.scalars(
                select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)
            ).one_or_none()

    def has_instance(self, sop_instance_uid: str) -> bool:
        """Whether an instance is indexed.

        One read on a pooled DBAPI connection, outside any transaction (SQLite: no
        ``BEGIN IMMEDIATE`` write lock for a lookup). Raises :class:`SQLAlchemyError`.
        """
        dbapi_error = self._engine.dialect.dbapi.Error  # type: ignore[union-attr]
        if self._engine.dialect.name == "sqlite":
            # on a connection the store path keeps (autocommit: no transaction is begun)
            try:
                return self._writers.lookup(self._has_instance_sql, (sop_instance_uid,))
            except dbapi_error as exc:
                raise SQLAlchemyError(f"index lookup failed ({type(exc).__name__})") from exc
        try:
            raw = self._engine.raw_connection()
            try:
                cursor = raw.cursor()
                try:
                    cursor.execute(self._has_instance_sql, (sop_instance_uid,))
                    found = cursor.fetchone()
                finally:
                    cursor.close()
            finally:
                raw.close()
        except dbapi_error as exc:
            raise SQLAlchemyError(f"index lookup failed ({type(exc).__name__})") from exc
        return found is not None

    def add_instance(
        self,
        header: InstanceHeader,
        *,
        issuer: str,
        transfer_syntax_uid: str,
        size: int,
        relative_path: str,
        calling_ae: str,
        identity: str | None = None,
        received_at: datetime | None = None,
        on_inserted: Callable[[Connection, int], None] | None = None,
        before_commit: Callable[[], None] | None = None,
    ) -> int:
        """Insert the instance and its parents in one committed transaction.

        ``identity`` is the stored form of the patient identity the instance carries
        (:func:`dicom_node.archive.identity.store_identity`), ``None`` when unknown.

        ``on_inserted(connection, instance_pk)`` runs inside that transaction (the router
        adds the instance's forward jobs there); ``before_commit()`` runs last, just
        before the commit (the archive waits there for the journal record to be on
        disk), and an exception from it rolls back. Returns the new instance's primary key.
        """
        received = received_at or datetime.now(UTC)
        # Core statements on the session's connection: the ORM's per-statement overhead
        # was most of the cost of storing an instance.
        known = self._parents.get(header.series_instance_uid)
        with self._writers.transaction() as conn:
            if known is None:
                parents = self._create_parents(conn, header, issuer, identity)
            else:
                parents = (known[0], known[1], False)
            study_pk, series_pk, series_new = parents
            row = self._insert_instance.execute(
                conn,
                {
                    "series_pk": series_pk,
                    "sop_instance_uid": header.sop_instance_uid,
                    "sop_class_uid": header.sop_class_uid,
                    "instance_number": header.instance_number,
                    "number_of_frames": header.number_of_frames,
                    "transfer_syntax_uid": transfer_syntax_uid,
                    "size": size,
                    "path": relative_path,
                    "calling_ae": calling_ae[:16],
                    "received_at": received,
                    "identity": identity,
                },
            )
            instance_id = int(row[0])
            self._count_series.execute(conn, {"pk": series_pk})
            counter = self._count_study_series if series_new else self._count_study
            counter.execute(conn, {"pk": study_pk})
            if series_new and header.modality:
                _add_modality(conn, study_pk, header.modality)
            if on_inserted is not None:
                on_inserted(conn, instance_id)
            if before_commit is not None:
                before_commit()
        # remembered only once committed; only retention deletes index rows, and it calls
        # forget_parents() once it has (router.retention)
        if len(self._parents) >= _PARENT_CACHE_SIZE:
            self._parents.clear()
        self._parents[header.series_instance_uid] = (study_pk, series_pk)
        return instance_id

    def _create_parents(
        self, conn: Connection, header: InstanceHeader, issuer: str, identity: str | None
    ) -> tuple[int, int, bool]:
        """Find or create the patient, study and series rows of an instance.

        An existing series keeps its study (as on a hit of the series cache): an instance
        naming another study with a Series Instance UID already filed is counted in the
        series' own study, never in the study its header names.
        """
        known = conn.execute(
            select(Series.id, Series.study_pk).where(
                Series.series_instance_uid == header.series_instance_uid
            )
        ).first()
        if known is not None:
            return int(known.study_pk), int(known.id), False
        dialect_insert = _insert_for(conn)
        patient_pk = _get_or_create(
            conn,
            dialect_insert,
            Patient,
            {"issuer": issuer, "patient_id": header.patient_id},
            {
                "patient_name": header.patient_name,
                "birth_date": header.birth_date,
                "sex": header.sex,
                "identity": identity,
            },
            ["issuer", "patient_id"],
        )
        study_pk = _get_or_create(
            conn,
            dialect_insert,
            Study,
            {"study_instance_uid": header.study_instance_uid},
            {
                "patient_pk": patient_pk,
                "study_date": header.study_date,
                "study_time": header.study_time,
                "accession_number": header.accession_number,
                "study_id": header.study_id,
                "study_description": header.study_description,
                "referring_physician_name": header.referring_physician_name,
                "modalities": "",
                "number_of_series": 0,
                "number_of_instances": 0,
            },
            ["study_instance_uid"],
        )
        series_pk, series_new = _get_or_create_flag(
            conn,
            dialect_insert,
            Series,
            {"series_instance_uid": header.series_instance_uid},
            {
                "study_pk": study_pk,
                "modality": header.modality,
                "series_number": header.series_number,
                "series_description": header.series_description,
                "body_part_examined": header.body_part_examined,
                "series_date": header.series_date,
                "series_time": header.series_time,
                "number_of_instances": 0,
            },
            ["series_instance_uid"],
        )
        return study_pk, series_pk, series_new

    def counts(self) -> dict[str, int]:
        """Number of patients, studies, series and instances, and total bytes."""
        with self._sessions() as session:
            return {
                "patients": session.scalar(select(func.count(Patient.id))) or 0,
                "studies": session.scalar(select(func.count(Study.id))) or 0,
                "series": session.scalar(select(func.count(Series.id))) or 0,
                "instances": session.scalar(select(func.count(Instance.id))) or 0,
                "bytes": session.scalar(select(func.coalesce(func.sum(Instance.size), 0))) or 0,
            }

    def defer_durability(self, engine: Engine) -> None:
        """Commit the store path's transactions on ``engine`` from now on: an engine whose
        commits do not wait for their sync (see :func:`cli.database.make_engine`). Only
        once the ingest journal holds every instance until a checkpoint barrier."""
        previous, self._writers = self._writers, _WriterConnections(engine)
        self._deferred_engine = engine
        previous.close()

    def close(self) -> None:
        """Release the connections the store path keeps open (and its own engine)."""
        self._writers.close()
        if self._deferred_engine is not None:
            self._deferred_engine.dispose()
            self._deferred_engine = None

    def forget_parents(self) -> None:
        """Drop the remembered series -> (study, series) keys.

        Call it after deleting index rows (retention): a remembered key may name a deleted
        series, and the next instance of that series would be inserted under it.
        """
        self._parents.clear()


class _WriterConnections:
    """Connections kept open for the store path's transactions.

    Checking a connection out of SQLAlchemy's pool and back in (with its reset, and a
    pre-ping on PostgreSQL) cost about a third of the receiving thread's time per small
    instance; the store path instead reuses the connections it keeps (at most ``keep``
    idle). A connection idle for more than ``max_idle`` seconds goes back to the pool,
    which checks it is alive before handing one out; a connection that failed is closed.
    """

    def __init__(self, engine: Engine, keep: int = 16, max_idle: float = 5.0) -> None:
        self._engine = engine
        self._keep = keep
        self._max_idle = max_idle
        self._idle: list[tuple[Connection, float]] = []
        self._lock = threading.Lock()

    def _take(self) -> Connection:
        now = time.monotonic()
        stale: list[Connection] = []
        conn = None
        with self._lock:
            while self._idle:
                candidate, since = self._idle.pop()
                if now - since <= self._max_idle:
                    conn = candidate
                    break
                stale.append(candidate)
        for old in stale:
            old.close()
        return conn if conn is not None else self._engine.connect()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A connection in a transaction, committed on exit (rolled back on error)."""
        conn = self._take()
        try:
            transaction = conn.begin()
        except BaseException:
            conn.close()
            raise
        try:
            yield conn
            transaction.commit()
        except BaseException:
            try:
                transaction.rollback()
            finally:
                conn.close()
            raise
        with self._lock:
            if len(self._idle) < self._keep:
                self._idle.append((conn, time.monotonic()))
                return
        conn.close()

    def lookup(self, sql: str, parameters: tuple[Any, ...]) -> bool:
        """Whether ``sql`` returns a row, read outside any transaction (SQLite only: its
        connections are in autocommit mode, so no transaction is begun)."""
        conn = self._take()
        try:
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                found = cursor.execute(sql, parameters).fetchone() is not None
            finally:
                cursor.close()
        except BaseException:
            conn.close()
            raise
        with self._lock:
            if len(self._idle) < self._keep:
                self._idle.append((conn, time.monotonic()))
                return found
        conn.close()
        return found

    def close(self) -> None:
        """Give every kept connection back to the pool."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()


def _insert_for(conn: Connection) -> Callable[..., Any]:
    dialect = conn.dialect.name
    if dialect == "postgresql":
        return postgresql.insert
    if dialect == "sqlite":
        return sqlite.insert
    raise RuntimeError(f"unsupported database dialect {dialect}")


def _get_or_create(
    conn: Connection,
    insert: Callable[..., Any],
    model: type[Any],
    keys: dict[str, Any],
    values: dict[str, Any],
    conflict_columns: list[str],
) -> int:
    pk, _ = _get_or_create_flag(conn, insert, model, keys, values, conflict_columns)
    return pk


def _get_or_create_flag(
    conn: Connection,
    insert: Callable[..., Any],
    model: type[Any],
    keys: dict[str, Any],
    values: dict[str, Any],
    conflict_columns: list[str],
) -> tuple[int, bool]:
    """Return the primary key of the row with ``keys``, inserting it if absent.

    ``INSERT ... ON CONFLICT DO NOTHING`` makes concurrent creators agree on one row.
    """
    conditions = [getattr(model, k) == v for k, v in keys.items()]
    existing = conn.scalar(select(model.id).where(*conditions))
    if existing is not None:
        return int(existing), False
    stmt = (
        insert(model)
        .values(**keys, **values)
        .on_conflict_do_nothing(index_elements=conflict_columns)
        .returning(model.id)
    )
    created = conn.scalar(stmt)
    if created is not None:
        return int(created), True
    found = conn.scalar(select(model.id).where(*conditions))
    if found is None:  # pragma: no cover - the row must exist after a conflict
        raise RuntimeError(f"{model.__name__} row vanished during insert")
    return int(found), False


def _add_modality(conn: Connection, study_pk: int, modality: str) -> None:
    current = conn.scalar(select(Study.modalities).where(Study.id == study_pk)) or ""
    present = [m for m in current.split("\\") if m]
    if modality not in present:
        present.append(modality)
        conn.execute(
            update(Study).where(Study.id == study_pk).values(modalities="\\".join(present)[:128])
        )
