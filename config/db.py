"""Database conventions shared by every store: read-only units of work, and statements
compiled once for the hottest paths.

On SQLite every write transaction starts with ``BEGIN IMMEDIATE`` (writers queue for the
lock instead of failing when they upgrade). A unit of work opened on :func:`reading`
starts with a plain deferred ``BEGIN`` instead: in WAL mode it reads a snapshot without
taking or waiting for the write lock. On PostgreSQL the option changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from sqlalchemy import Connection, Engine
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

#: Execution option marking a connection whose transactions only read.
READ_ONLY_OPTION = "consentgate_read_only"


def reading(engine: Engine) -> sessionmaker[Session]:
    """A sessionmaker for units of work that only read."""
    return sessionmaker(
        engine.execution_options(**{READ_ONLY_OPTION: True}), expire_on_commit=False
    )


class CompiledStatement:
    """A Core statement compiled once for a dialect and run on a connection's DBAPI
    cursor, inside that connection's transaction.

    For the few statements of the store path, run for every received instance:
    SQLAlchemy's execution machinery (execution context, result objects, events) cost
    about as much CPU as SQLite's own work. The SQL text, the order of positional
    parameters and each parameter's bind processor (a ``DateTime`` becomes SQLite's text
    form, exactly as SQLAlchemy writes it) come from SQLAlchemy, so rows read back
    through the ORM are the same. Parameters are passed by bind name.
    """

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect))
        self.sql = compiled.string
        # literal values of the statement itself (the ``1`` of ``n + 1``)
        self._defaults: dict[str, Any] = dict(compiled.params)
        self._names: tuple[str, ...] | None = (
            tuple(compiled.positiontup) if compiled.positiontup is not None else None
        )
        self._processors: dict[str, Callable[[Any], Any]] = {}
        for name, bind in compiled.binds.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self._processors[name] = processor

    def _parameters(self, values: Mapping[str, Any]) -> Any:
        values = {**self._defaults, **values}
        processors = self._processors
        if processors:
            values = {
                k: (processors[k](v) if k in processors and v is not None else v)
                for k, v in values.items()
            }
        if self._names is None:
            return values
        return tuple(values[name] for name in self._names)

    def execute(self, connection: Connection, values: Mapping[str, Any]) -> Any:
        """Run with ``values``; returns the first row returned (``RETURNING``), if any."""
        cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(self.sql, self._parameters(values))
            return cursor.fetchone() if cursor.description is not None else None
        finally:
            cursor.close()

    def execute_many(self, connection: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Run once per row of ``rows`` (no result)."""
        if not rows:
            return
        cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            if len(rows) == 1:
                cursor.execute(self.sql, self._parameters(rows[0]))
            else:
                cursor.executemany(self.sql, [self._parameters(row) for row in rows])
        finally:
            cursor.close()
