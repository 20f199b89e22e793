"""Value types of the decision function, the rule that gives a decision from the stored
consent, and the fast read path behind ``decide()`` (:class:`consent.decider.Decider`).

The read path bypasses the ORM session on purpose: a session per call costs ~120 µs on
SQLite (its transaction starts with ``BEGIN IMMEDIATE``, a write lock), while a pooled DBAPI
connection running one pre-compiled Core statement in autocommit costs ~15 µs and never
blocks or waits for writers (WAL readers see the last committed state). Nothing is cached
but the compiled SQL text: every call reads the current committed state.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Engine, Integer, any_, bindparam, create_engine, exists, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql import ColumnElement, Select

from consent.models import ConsentState, Patient, Purpose


class Outcome(enum.Enum):
    """What a route, a query or a viewer may do with a patient's data for a purpose."""

    PERMIT = "permit"
    DENY = "deny"
    UNDECIDED = "undecided"


@dataclass(frozen=True)
class Decision:
    """The answer of :meth:`consent.service.ConsentStore.decide`.

    Attributes
    ----------
    outcome : Outcome
        ``PERMIT``: data may leave. ``DENY``: it must not (the router drops the job).
        ``UNDECIDED``: not yet known (the router holds the job).
    reason : str
        Why, in a few words; never holds patient data.
    """

    outcome: Outcome
    reason: str

    @property
    def permitted(self) -> bool:
        """Whether the outcome is :attr:`Outcome.PERMIT`."""
        return self.outcome is Outcome.PERMIT


@dataclass(frozen=True)
class ConsentChange:
    """A consent decision changed for a patient and purpose.

    Attributes
    ----------
    patient_pk : int
        The patient's primary key in the consent store.
    purpose_code : str
        The purpose concerned.
    outcome : Outcome
        The outcome :meth:`~consent.service.ConsentStore.decide` gives now.
    event_id : int
        The consent event that made the change (0 when unknown); pass the highest one seen
        to :meth:`~consent.service.ConsentStore.changes_since` to poll for the next.
    """

    patient_pk: int
    purpose_code: str
    outcome: Outcome
    event_id: int = 0


@dataclass(frozen=True)
class Resolution:
    """Which consent-store patient a DICOM dataset designates.

    Attributes
    ----------
    patient_pk : int or None
        The patient when ``status`` is ``"matched"`` (and, for ``"mismatch"``, the candidate
        whose demographics disagree), else ``None``.
    status : {"matched", "unknown", "mismatch"}
        ``unknown`` and ``mismatch`` are held for reconciliation, never forwarded.
    reason : str
        Why, in a few words; never holds patient data.
    """

    patient_pk: int | None
    status: Literal["matched", "unknown", "mismatch"]
    reason: str


UNKNOWN_PATIENT = Decision(Outcome.UNDECIDED, "unknown patient")
UNKNOWN_PURPOSE = Decision(Outcome.DENY, "unknown purpose")
PERMITTED = Decision(Outcome.PERMIT, "consent given")
DENIED = Decision(Outcome.DENY, "consent refused or withdrawn")
NO_DECISION = Decision(Outcome.UNDECIDED, "no decision yet (opt-in purpose)")
NON_OPPOSITION = Decision(Outcome.PERMIT, "no opposition (opt-out purpose)")


def decision_from_state(decision: str | None, model: str) -> Decision:
    """The decision for a known patient, from the stored decision (``permit``, ``deny``, or
    ``None`` when there is none) and the purpose's model (``opt-in`` or ``opt-out``)."""
    if decision == "permit":
        return PERMITTED
    if decision == "deny":
        return DENIED
    return NON_OPPOSITION if model == "opt-out" else NO_DECISION


def state_query(many: bool, array: bool = False) -> Select[Any]:
    """``patient id, decision`` of one patient (or a list) for one purpose.

    The outer join tells an unknown patient (no row) from a known one without a decision
    (a row with a NULL decision). A list is an expanding ``IN`` (rendered per call), or with
    ``array`` (PostgreSQL) one array parameter (``= ANY``): one statement for any length.
    """
    joined = Patient.__table__.outerjoin(
        ConsentState.__table__,
        (ConsentState.patient_pk == Patient.id) & (ConsentState.purpose_pk == bindparam("purpose")),
    )
    stmt = select(Patient.id, ConsentState.decision).select_from(joined)
    if many and array:
        return stmt.where(Patient.id == any_(bindparam("patients", type_=ARRAY(Integer))))
    if many:
        return stmt.where(Patient.id.in_(bindparam("patients", expanding=True)))
    return stmt.where(Patient.id == bindparam("patient"))


def refusal_in_force(patient_pk: int, purpose_code: str) -> ColumnElement[bool]:
    """A condition true while the patient's current decision for the purpose is a
    refusal (or withdrawal): for a statement that must act on a refusal only while it
    still holds, in the statement itself (a grant committed after the refusal was read
    turns it false)."""
    return exists().where(
        ConsentState.patient_pk == patient_pk,
        ConsentState.decision == "deny",
        ConsentState.purpose_pk
        == select(Purpose.id).where(Purpose.code == purpose_code).scalar_subquery(),
    )


class StateReader:
    """Runs the decision lookup on a DBAPI connection, one statement per call.

    Thread-safe: each call takes an idle connection of the reader's own stack (or makes
    one) and puts it back. The connections are detached from an engine's pool (made by
    it, so with its settings) and in autocommit mode: a decision is the statement alone,
    one round trip on PostgreSQL, without the pool's check-out, reset and check-in, which
    cost about as much as the statement on SQLite (the forwarder decides before every
    send). A connection that fails is closed; after a database error every idle
    connection is dropped (a restarted server left them all stale) and the lookup tried
    once more. An in-memory SQLite database (one connection per pool) uses the pool.
    """

    def __init__(self, engine: Engine) -> None:
        if engine.dialect.name == "postgresql":
            # for decide_many: autocommit, no pre-ping or reset on return
            engine = create_engine(
                engine.url,
                isolation_level="AUTOCOMMIT",
                pool_pre_ping=False,
                pool_reset_on_return=None,
                pool_size=4,
                max_overflow=16,
            )
        self._own_engine = engine.dialect.name == "postgresql"
        self._engine = engine
        self._dialect = engine.dialect.name
        self._detached = not (
            self._dialect == "sqlite" and engine.url.database in (None, "", ":memory:")
        )
        # (pool fairy kept referenced so that it does not close the connection, DBAPI
        # connection); list.pop and list.append are atomic
        self._idle: list[tuple[Any, Any]] = []
        compiled = state_query(False).compile(dialect=engine.dialect)
        self._sql = compiled.string
        self._positional: tuple[str, ...] | None = (
            tuple(compiled.positiontup) if compiled.positiontup is not None else None
        )
        # PostgreSQL: one pre-compiled statement with an array parameter for any list
        self._many_sql: str | None = None
        if self._dialect == "postgresql":
            self._many_sql = state_query(True, array=True).compile(dialect=engine.dialect).string

    def _params(self, values: dict[str, Any]) -> Any:
        if self._positional is None:
            return values
        return tuple(values[name] for name in self._positional)

    def close(self) -> None:
        """Release the reader's own connections."""
        self._drop_idle()
        if self._own_engine:
            self._engine.dispose()

    def _drop_idle(self) -> None:
        while self._idle:
            try:
                fairy, _ = self._idle.pop()
            except IndexError:  # taken by another thread meanwhile
                return
            with contextlib.suppress(Exception):
                fairy.close()

    def lookup(self, patient_pk: int, purpose_pk: int) -> tuple[bool, str | None]:
        """Return ``(patient exists, stored decision or None)``."""
        try:
            return self._lookup(patient_pk, purpose_pk)
        except self._engine.dialect.loaded_dbapi.OperationalError:
            self._drop_idle()  # a restarted server left every idle connection stale
            return self._lookup(patient_pk, purpose_pk)

    def _lookup(self, patient_pk: int, purpose_pk: int) -> tuple[bool, str | None]:
        if self._detached:
            return self._lookup_detached(patient_pk, purpose_pk)
        connection = self._engine.raw_connection()
        try:
            row = self._execute(connection, patient_pk, purpose_pk)
        except self._engine.dialect.loaded_dbapi.OperationalError:
            connection.invalidate()  # never handed out again
            raise
        finally:
            connection.close()
        if row is None:
            return False, None
        return True, row[1]

    def _execute(self, connection: Any, patient_pk: int, purpose_pk: int) -> Any:
        """The lookup statement's row (or ``None``) on a DBAPI ``connection``."""
        cursor = connection.cursor()
        try:
            cursor.execute(self._sql, self._params({"patient": patient_pk, "purpose": purpose_pk}))
            return cursor.fetchone()
        finally:
            cursor.close()

    def _lookup_detached(self, patient_pk: int, purpose_pk: int) -> tuple[bool, str | None]:
        connection: Any
        try:
            fairy, connection = self._idle.pop()
        except IndexError:
            fairy = self._engine.raw_connection()
            fairy.detach()  # ours now: closed by us, not returned to the pool
            connection = fairy.dbapi_connection
            # autocommit: no transaction (and no snapshot) left open between calls
            if self._dialect == "sqlite":
                connection.isolation_level = None
            else:
                connection.autocommit = True
        try:
            row = self._execute(connection, patient_pk, purpose_pk)
        except BaseException:
            fairy.close()  # never used again
            raise
        self._idle.append((fairy, connection))
        if row is None:
            return False, None
        return True, row[1]

    def lookup_many(self, patient_pks: Sequence[int], purpose_pk: int) -> dict[int, str | None]:
        """Return ``{patient_pk: stored decision or None}`` for the patients that exist."""
        found: dict[int, str | None] = {}
        connection = self._engine.raw_connection()
        try:
            cursor = connection.cursor()
            try:
                for start in range(0, len(patient_pks), 500):
                    chunk = [int(pk) for pk in patient_pks[start : start + 500]]
                    cursor.execute(*self._many_statement(chunk, purpose_pk))
                    for pk, decision in cursor.fetchall():
                        found[int(pk)] = decision
            finally:
                cursor.close()
        finally:
            connection.close()
        return found

    def _many_statement(self, chunk: list[int], purpose_pk: int) -> tuple[str, Any]:
        """SQL text and DBAPI parameters of the lookup of the patients ``chunk``."""
        if self._many_sql is not None:
            return self._many_sql, {"patients": chunk, "purpose": purpose_pk}
        compiled = (
            state_query(True)
            .params(patients=chunk, purpose=purpose_pk)
            .compile(dialect=self._engine.dialect, compile_kwargs={"render_postcompile": True})
        )
        params = compiled.params
        if compiled.positiontup is not None:
            return compiled.string, tuple(params[name] for name in compiled.positiontup)
        return compiled.string, params
