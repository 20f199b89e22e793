"""Database engine, sessions and schema migrations (Alembic) for every store."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from config.db import READ_ONLY_OPTION
from dicom_node.archive.journal import sync_filesystem

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


class SqliteWriteGate:
    """Serialises one process's SQLite write transactions with a lock of its own.

    SQLite admits one writer at a time; a ``BEGIN IMMEDIATE`` that finds the database
    locked is retried by SQLite's busy handler, which *sleeps* between attempts (1, 2, 5,
    10 ms and more). Between the threads of one process (the receiving associations, the
    forwarders, the consent synchronisation) that turned every collision into
    milliseconds of idle waiting; with the gate, the next writer starts the moment the
    previous one commits. Writers in other processes (the CLI) still meet SQLite's own
    lock and busy handler. A gate not obtained within ``timeout`` seconds (a thread that
    already writes on another connection) is skipped: SQLite's lock then decides, as
    without a gate.
    """

    def __init__(self, timeout: float = 30.0) -> None:
        self._lock = threading.Lock()
        self._holder: Any = None
        self._timeout = timeout

    def enter(self, dbapi_connection: Any) -> None:
        """Before ``BEGIN IMMEDIATE`` on ``dbapi_connection``."""
        if self._lock.acquire(timeout=self._timeout):
            self._holder = dbapi_connection

    def leave(self, connection: Any) -> None:
        """After the commit or rollback (or close) of ``connection``'s transaction."""
        dbapi_connection = getattr(connection, "dbapi_connection", connection)
        if self._holder is not None and self._holder is dbapi_connection:
            self._holder = None
            self._lock.release()

    def install(self, engine: Engine) -> None:
        """Release the gate whenever a connection of ``engine`` ends its transaction."""
        dialect = engine.dialect
        for name in ("do_commit", "do_rollback", "do_close"):
            original = getattr(dialect, name)
            setattr(dialect, name, self._releasing(original))

    def _releasing(self, original: Callable[[Any], None]) -> Callable[[Any], None]:
        def call(connection: Any) -> None:
            try:
                original(connection)
            finally:
                self.leave(connection)

        return call


def make_engine(
    url: str,
    *,
    pool_size: int = 10,
    durable_commits: bool = True,
    write_gate: SqliteWriteGate | None = None,
) -> Engine:
    """Create an engine (the process has one, plus the ingest engine of a serving node).

    SQLite runs in WAL mode with ``synchronous=FULL`` (a committed row survives a crash)
    and ``BEGIN IMMEDIATE`` transactions so concurrent writers queue instead of failing;
    engines of one process on one database share a ``write_gate`` (see
    :class:`SqliteWriteGate`).

    ``durable_commits=False`` is for the ingest path only, once the ingest journal holds
    what each transaction records: SQLite ``synchronous=NORMAL`` (a commit survives a
    process crash, and reaches the disk at the next sync of the WAL), PostgreSQL
    ``synchronous_commit=off``. Durability then comes from the journal's checkpoint
    barrier (:func:`durability_barrier`), and a replay re-indexes what a power loss took.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": 30, "check_same_thread": False},
            pool_size=pool_size,
            max_overflow=pool_size,
        )
        synchronous = "FULL" if durable_commits else "NORMAL"

        gate = write_gate or SqliteWriteGate()
        gate.install(engine)

        def on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
            _sqlite_on_connect(dbapi_connection, synchronous)

        def on_begin(connection: Any) -> None:
            _sqlite_on_begin(connection, gate)

        event.listen(engine, "connect", on_connect)
        event.listen(engine, "begin", on_begin)
        return engine
    connect_args = {} if durable_commits else {"options": "-c synchronous_commit=off"}
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        connect_args=connect_args,
    )


def durability_barrier(engine: Engine, synced_device: int | None = None) -> Callable[[], None]:
    """A call that returns once every transaction committed before it is on disk.

    PostgreSQL: a transaction that takes a transaction id commits with
    ``synchronous_commit=on`` (``engine`` must be a durable-commit engine), which flushes
    the WAL up to its commit record, so every earlier asynchronous commit too. SQLite:
    a sync of the file system holding the database (its WAL), unless that is
    ``synced_device``, which the caller syncs anyway.
    """
    if engine.dialect.name == "postgresql":

        def flush_postgresql() -> None:
            with engine.begin() as conn:
                conn.exec_driver_sql("SELECT txid_current()")

        return flush_postgresql
    database = engine.url.database
    directory = Path(database).resolve().parent if database and database != ":memory:" else None
    if directory is None or os.stat(directory).st_dev == synced_device:
        return lambda: None

    def flush_sqlite() -> None:
        sync_filesystem(directory)

    return flush_sqlite


def _sqlite_on_connect(dbapi_connection: sqlite3.Connection, synchronous: str) -> None:
    dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA synchronous={synchronous}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA case_sensitive_like=ON")
    cursor.close()


def _sqlite_on_begin(connection: Any, gate: SqliteWriteGate) -> None:
    # straight on the sqlite3 connection: through exec_driver_sql this statement cost
    # about as much as the rest of a small instance's transaction
    raw = connection.connection.dbapi_connection
    if connection.get_execution_options().get(READ_ONLY_OPTION):
        raw.execute("BEGIN")  # a WAL reader: no write lock taken or awaited
        return
    gate.enter(raw)
    try:
        raw.execute("BEGIN IMMEDIATE")
    except BaseException:
        gate.leave(raw)
        raise


def make_sessions(engine: Engine) -> sessionmaker[Session]:
    """The process's single sessionmaker; each unit of work opens its own session."""
    return sessionmaker(engine, expire_on_commit=False)


def _alembic_config(engine: Engine) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine) -> str | None:
    """Apply every pending migration; returns the resulting revision."""
    command.upgrade(_alembic_config(engine), "head")
    return current_revision(engine)


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at, or ``None`` when empty."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    """The newest revision this version of consentgate knows."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(cfg).get_current_head()
