"""A database convention shared by every store: read-only units of work.

On SQLite every write transaction starts with ``BEGIN IMMEDIATE`` (writers queue for the
lock instead of failing when they upgrade). A unit of work opened on :func:`reading`
starts with a plain deferred ``BEGIN`` instead: in WAL mode it reads a snapshot without
taking or waiting for the write lock. On PostgreSQL the option changes nothing.
"""

from __future__ import annotations

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

#: Execution option marking a connection whose transactions only read.
READ_ONLY_OPTION = "consentgate_read_only"


def reading(engine: Engine) -> sessionmaker[Session]:
    """A sessionmaker for units of work that only read."""
    return sessionmaker(
        engine.execution_options(**{READ_ONLY_OPTION: True}), expire_on_commit=False
    )
