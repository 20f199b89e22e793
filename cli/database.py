"""Database engine, sessions and schema migrations (Alembic) for every store."""

from __future__ import annotations

import sqlite3
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


def make_engine(url: str, *, pool_size: int = 10, durable_commits: bool = True) -> Engine:
    """Create an engine (the process has one, plus the ingest engine of a serving node).

    SQLite runs in WAL mode with ``synchronous=FULL`` (a committed row survives a crash)
    and ``BEGIN IMMEDIATE`` transactions so concurrent writers queue instead of failing.

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

        def on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
            _sqlite_on_connect(dbapi_connection, synchronous)

        event.listen(engine, "connect", on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    connect_args = {} if durable_commits else {"options": "-c synchronous_commit=off"}
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        connect_args=connect_args,
    )


def durability_barrier(engine: Engine) -> Callable[[], None]:
    """A call that returns once every transaction committed before it is on disk.

    PostgreSQL: a transaction that takes a transaction id commits with
    ``synchronous_commit=on`` (``engine`` must be a durable-commit engine), which flushes
    the WAL up to its commit record, so every earlier asynchronous commit too. SQLite:
    a sync of the file system holding the database (its WAL).
    """
    if engine.dialect.name == "postgresql":

        def flush_postgresql() -> None:
            with engine.begin() as conn:
                conn.exec_driver_sql("SELECT txid_current()")

        return flush_postgresql
    database = engine.url.database
    directory = Path(database).resolve().parent if database and database != ":memory:" else None

    def flush_sqlite() -> None:
        if directory is not None:
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


def _sqlite_on_begin(connection: Any) -> None:
    # straight on the sqlite3 connection: through exec_driver_sql this statement cost
    # about as much as the rest of a small instance's transaction
    raw = connection.connection.dbapi_connection
    if connection.get_execution_options().get(READ_ONLY_OPTION):
        raw.execute("BEGIN")  # a WAL reader: no write lock taken or awaited
    else:
        raw.execute("BEGIN IMMEDIATE")


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
