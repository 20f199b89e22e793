"""Operations on the durable forward queue.

Claims take a lease (``sending`` until ``lease_until``); a lease left by a crashed node
expires and the job is claimed again. Failed sends are retried with capped exponential
backoff and dead-lettered (``failed``) after ``max_attempts``. On PostgreSQL claims use
``FOR UPDATE SKIP LOCKED`` so several nodes share one queue; on SQLite the ``BEGIN
IMMEDIATE`` transaction serialises them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Integer,
    and_,
    bindparam,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql import ColumnElement

from config.db import CompiledStatement
from dicom_node.archive.models import Instance
from router.models import ForwardJob, HoldReason, JobState

Clock = Callable[[], datetime]

# every job dropped by a consent decision has a reason starting with this
CONSENT_DROP_PREFIX = "consent"


def utcnow() -> datetime:
    """The current time in UTC."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class JobSpec:
    """A job to create for a newly stored instance."""

    destination: str
    route: str
    purpose: str
    patient_pk: int | None
    state: JobState
    hold_reason: str = ""
    note: str = ""


@dataclass(frozen=True)
class ClaimedJob:
    """A job claimed by a forwarder, with what it needs to send the instance."""

    id: int
    destination: str
    purpose: str
    patient_pk: int | None
    attempts: int
    path: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    size: int = 0  # of the archive file, in bytes (0: unknown)


class JobsNotEligible(Exception):
    """Some of the jobs an administrator named cannot take the change (unknown, or in
    another state): nothing was changed."""

    def __init__(self, job_ids: Sequence[int]) -> None:
        super().__init__(", ".join(str(i) for i in job_ids))
        self.job_ids = tuple(job_ids)


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter, and the dead-letter threshold."""

    max_attempts: int = 10
    base_delay: float = 2.0
    max_delay: float = 300.0
    lease_seconds: float = 120.0

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failure (1-based)."""
        raw = min(self.max_delay, self.base_delay * 2.0 ** max(0, attempts - 1))
        return raw * (0.8 + 0.4 * random.random())


_OPEN_STATES = (JobState.READY.value, JobState.HELD.value)
_JOB_COLUMNS = (
    "instance_pk",
    "destination",
    "route",
    "purpose",
    "patient_pk",
    "state",
    "hold_reason",
    "attempts",
    "next_attempt_at",
    "lease_owner",
    "lease_until",
    "last_error",
    "origin",
    "created_at",
    "updated_at",
)


def _claimable(now: Any) -> Any:
    """Ready and due, or claimed under a lease that has expired (its node died)."""
    return or_(
        and_(ForwardJob.state == JobState.READY.value, ForwardJob.next_attempt_at <= now),
        and_(ForwardJob.state == JobState.SENDING.value, ForwardJob.lease_until < now),
    )


class _HotStatements:
    """The statements each forwarder runs for every batch, built once (building a
    statement and its cache key cost more than running it); values are bound by name."""

    def __init__(self) -> None:
        ids: Any = bindparam("b_ids", expanding=True)
        now = bindparam("b_now", type_=ForwardJob.updated_at.type)
        self.claimable = (
            select(ForwardJob.id)
            .where(
                ForwardJob.destination == bindparam("b_dest"),
                _claimable(now),
                ForwardJob.origin.in_((bindparam("b_origin"), "")),
            )
            .order_by(ForwardJob.id)
            .limit(bindparam("b_limit", type_=Integer))
            .with_for_update(skip_locked=True)
        )
        self.take = (
            update(ForwardJob)
            .where(ForwardJob.id.in_(ids))
            .values(
                state=JobState.SENDING.value,
                lease_owner=bindparam("b_owner"),
                lease_until=bindparam("b_lease", type_=ForwardJob.lease_until.type),
                updated_at=now,
            )
        )
        self.claimed = (
            select(
                ForwardJob.id,
                ForwardJob.destination,
                ForwardJob.purpose,
                ForwardJob.patient_pk,
                ForwardJob.attempts,
                Instance.path,
                Instance.sop_class_uid,
                Instance.sop_instance_uid,
                Instance.transfer_syntax_uid,
                Instance.size,
            )
            .join(Instance, Instance.id == ForwardJob.instance_pk)
            .where(ForwardJob.id.in_(ids))
            .order_by(ForwardJob.id)
        )
        self.complete = (
            update(ForwardJob)
            .where(
                ForwardJob.id.in_(ids),
                ForwardJob.state == JobState.SENDING.value,
                ForwardJob.lease_owner == bindparam("b_owner"),
            )
            .values(
                state=JobState.DONE.value,
                last_error="",
                lease_owner="",
                lease_until=None,
                updated_at=now,
            )
        )


class JobQueue:
    """The forward queue in the database."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        policy: RetryPolicy | None = None,
        clock: Clock = utcnow,
        origin: str = "",
    ) -> None:
        self._sessions = sessions
        #: the archive this process's jobs are made in and claimed from (see
        #: ``ForwardJob.origin``)
        self.origin = origin
        # claims and acknowledgements (see defer_bookkeeping()), on Core connections:
        # they run for every forwarded instance, and the ORM session's unit of work
        # cost them most of their time
        self._bookkeeping: Engine = sessions.kw["bind"]
        self.policy = policy or RetryPolicy()
        self._clock = clock
        self._inserts: dict[str, CompiledStatement] = {}
        self._hot = _HotStatements()

    def defer_bookkeeping(self, engine: Engine) -> None:
        """Commit claims and acknowledgements on ``engine`` (a serving node's ingest
        engine, whose commits do not wait for their own sync).

        A power loss may then undo the latest claims (the jobs are claimable again) and
        acknowledgements (the instances are sent again: delivery is at least once, and a
        destination keeps one copy per SOP Instance UID). Consent is re-checked before
        every send whatever the job's recorded state, so an undone state change can never
        let an instance out that consent does not allow. Holds, drops and retries stay on
        durable commits.
        """
        self._bookkeeping = engine

    # -- creation (inside the caller's transaction) --------------------------------

    def insert_jobs(
        self, connection: Connection, instance_pk: int, specs: Iterable[JobSpec]
    ) -> int:
        """Add the jobs of a newly indexed instance inside the caller's transaction."""
        now = self._clock()
        rows = [
            {
                "instance_pk": instance_pk,
                "destination": spec.destination,
                "route": spec.route,
                "purpose": spec.purpose,
                "patient_pk": spec.patient_pk,
                "state": spec.state.value,
                "hold_reason": spec.hold_reason,
                "attempts": 0,
                "next_attempt_at": now,
                "lease_owner": "",
                "lease_until": None,
                "last_error": spec.note[:255],
                "origin": self.origin,
                "created_at": now,
                "updated_at": now,
            }
            for spec in specs
        ]
        if rows:
            self._insert_statement(connection).execute_many(connection, rows)
        return len(rows)

    def _insert_statement(self, connection: Connection) -> CompiledStatement:
        """The job insert, compiled once per dialect (it runs for every stored instance)."""
        name = connection.dialect.name
        statement = self._inserts.get(name)
        if statement is None:
            statement = CompiledStatement(
                insert(ForwardJob).values({c: bindparam(c) for c in _JOB_COLUMNS}),
                connection.dialect,
            )
            self._inserts[name] = statement
        return statement

    # -- forwarders ----------------------------------------------------------------

    def claim(self, destination: str, owner: str, limit: int) -> list[ClaimedJob]:
        """Claim up to ``limit`` sendable jobs for ``destination`` under a lease."""
        now = self._clock()
        lease = now + timedelta(seconds=self.policy.lease_seconds)
        hot = self._hot
        with self._bookkeeping.begin() as conn:
            ids = list(
                conn.scalars(
                    hot.claimable,
                    {
                        "b_dest": destination,
                        "b_now": now,
                        "b_limit": limit,
                        "b_origin": self.origin,
                    },
                )
            )
            if not ids:
                return []
            conn.execute(
                hot.take,
                {"b_ids": ids, "b_owner": owner[:64], "b_lease": lease, "b_now": now},
            )
            rows = conn.execute(hot.claimed, {"b_ids": ids}).all()
        return [ClaimedJob(*row) for row in rows]

    def _finish(self, job_id: int, owner: str, *, bookkeeping: bool = False, **values: Any) -> bool:
        values.setdefault("lease_owner", "")
        values.setdefault("lease_until", None)
        values["updated_at"] = self._clock()
        statement = (
            update(ForwardJob)
            .where(
                ForwardJob.id == job_id,
                ForwardJob.state == JobState.SENDING.value,
                ForwardJob.lease_owner == owner[:64],
            )
            .values(**values)
        )
        if bookkeeping:
            with self._bookkeeping.begin() as conn:
                return bool(conn.execute(statement).rowcount)
        with self._sessions.begin() as session:
            result = session.execute(statement)
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def complete(self, job_id: int, owner: str) -> bool:
        """The destination acknowledged the instance."""
        return self._finish(
            job_id, owner, bookkeeping=True, state=JobState.DONE.value, last_error=""
        )

    def complete_many(self, job_ids: Sequence[int], owner: str) -> int:
        """Several acknowledged jobs recorded in one transaction."""
        if not job_ids:
            return 0
        with self._bookkeeping.begin() as conn:
            result = conn.execute(
                self._hot.complete,
                {"b_ids": list(job_ids), "b_owner": owner[:64], "b_now": self._clock()},
            )
            return int(result.rowcount)

    def retry_later(
        self, job: ClaimedJob, owner: str, error: str, *, permanent: bool = False
    ) -> str:
        """Record a failed attempt; back off, or dead-letter. Returns the new state."""
        attempts = job.attempts + 1
        if permanent or attempts >= self.policy.max_attempts:
            self._finish(
                job.id,
                owner,
                state=JobState.FAILED.value,
                attempts=attempts,
                last_error=error[:255],
            )
            return JobState.FAILED.value
        next_at = self._clock() + timedelta(seconds=self.policy.delay(attempts))
        self._finish(
            job.id,
            owner,
            state=JobState.READY.value,
            attempts=attempts,
            next_attempt_at=next_at,
            last_error=error[:255],
        )
        return JobState.READY.value

    def requeue(self, job: ClaimedJob, owner: str) -> bool:
        """Give a claimed job back untouched (e.g. on shutdown before sending)."""
        return self._finish(job.id, owner, state=JobState.READY.value)

    def hold(
        self,
        job: ClaimedJob,
        owner: str,
        reason: str,
        *,
        hold_reason: HoldReason = HoldReason.CONSENT,
        purpose: str | None = None,
    ) -> bool:
        """Consent became undecided between planning and sending (or, with
        ``HoldReason.RECONCILIATION``, the patient must be resolved first): hold the
        job, under ``purpose`` when given (the destination peer's, see
        :class:`router.forwarder.DestinationWorker`)."""
        values: dict[str, Any] = {"purpose": purpose} if purpose is not None else {}
        return self._finish(
            job.id,
            owner,
            state=JobState.HELD.value,
            hold_reason=hold_reason.value,
            last_error=reason[:255],
            **values,
        )

    def drop(self, job: ClaimedJob, owner: str, reason: str, *, purpose: str | None = None) -> bool:
        """Consent is refused or withdrawn: the job will never be sent."""
        values: dict[str, Any] = {"purpose": purpose} if purpose is not None else {}
        return self._finish(
            job.id, owner, state=JobState.DROPPED.value, last_error=reason[:255], **values
        )

    # -- consent changes -----------------------------------------------------------

    def release_for_consent(self, patient_pk: int, purpose: str) -> int:
        """Held jobs of this patient and purpose become ready (consent permits)."""
        return self._bulk(
            [
                ForwardJob.patient_pk == patient_pk,
                ForwardJob.purpose == purpose,
                ForwardJob.state == JobState.HELD.value,
                ForwardJob.hold_reason == HoldReason.CONSENT.value,
            ],
            state=JobState.READY.value,
            hold_reason="",
            next_attempt_at=self._clock(),
        )

    def drop_for_consent(
        self,
        patient_pk: int,
        purpose: str,
        reason: str,
        *,
        still: ColumnElement[bool] | None = None,
    ) -> int:
        """Every not-yet-sent job of this patient and purpose is dropped; not a job held
        for reconciliation, whose ``patient_pk`` is only a candidate that did not match.

        ``still``: a condition evaluated in the same statement
        (:func:`consent.decision.refusal_in_force`), so that a refusal read a moment ago
        drops nothing once a later grant has committed (the jobs stored since are ready,
        and permitted)."""
        guard = [still] if still is not None else []
        return self._bulk(
            [
                *guard,
                ForwardJob.patient_pk == patient_pk,
                ForwardJob.purpose == purpose,
                or_(
                    ForwardJob.state == JobState.READY.value,
                    and_(
                        ForwardJob.state == JobState.HELD.value,
                        ForwardJob.hold_reason == HoldReason.CONSENT.value,
                    ),
                ),
            ],
            state=JobState.DROPPED.value,
            last_error=reason[:255],
        )

    def restore_consent_drops(
        self, patient_pk: int, purpose: str, since: datetime, until: datetime | None
    ) -> int:
        """Jobs of this patient and purpose that a consent decision dropped between
        ``since`` and ``until`` (``None``: up to now) are held for consent again.

        For a refusal retracted as entered-in-error: what it dropped was never refused.
        Only drops for consent count (their reason starts with ``consent``), not an
        operator's ``queue drop`` nor a reconciliation ``--reject``; a dropped job is final,
        so its ``updated_at`` is when it was dropped. The jobs come back *held*: only a
        permit releases them, and the forwarder decides again before sending.
        """
        conditions = [
            ForwardJob.patient_pk == patient_pk,
            ForwardJob.purpose == purpose,
            ForwardJob.state == JobState.DROPPED.value,
            ForwardJob.last_error.startswith(CONSENT_DROP_PREFIX, autoescape=True),
            ForwardJob.updated_at >= since,
        ]
        if until is not None:
            conditions.append(ForwardJob.updated_at < until)
        return self._bulk(
            conditions,
            state=JobState.HELD.value,
            hold_reason=HoldReason.CONSENT.value,
            last_error=f"{CONSENT_DROP_PREFIX}: the refusal that dropped it was entered in error",
            next_attempt_at=self._clock(),
        )

    def _bulk(self, conditions: Sequence[Any], *, bookkeeping: bool = False, **values: Any) -> int:
        values["updated_at"] = self._clock()
        statement = update(ForwardJob).where(*conditions).values(**values)
        if bookkeeping:
            with self._bookkeeping.begin() as conn:
                return int(conn.execute(statement).rowcount)
        with self._sessions.begin() as session:
            result = session.execute(statement)
            return int(result.rowcount)  # type: ignore[attr-defined]

    # -- administration ------------------------------------------------------------

    def recover_stale(self) -> int:
        """Leases that expired (a crashed node) go back to ready."""
        now = self._clock()
        return self._bulk(
            [ForwardJob.state == JobState.SENDING.value, ForwardJob.lease_until < now],
            state=JobState.READY.value,
            lease_owner="",
            lease_until=None,
        )

    def release_own_leases(self, owner: str) -> int:
        """On clean shutdown: our claimed-but-unsent jobs go back to ready."""
        return self._bulk(
            [ForwardJob.state == JobState.SENDING.value, ForwardJob.lease_owner == owner[:64]],
            state=JobState.READY.value,
            lease_owner="",
            lease_until=None,
        )

    def stats(self) -> dict[tuple[str, str], int]:
        """Job counts by (destination, state)."""
        with self._sessions() as session:
            rows = session.execute(
                select(ForwardJob.destination, ForwardJob.state, func.count(ForwardJob.id))
                .group_by(ForwardJob.destination, ForwardJob.state)
                .order_by(ForwardJob.destination, ForwardJob.state)
            ).all()
        return {(d, s): int(n) for d, s, n in rows}

    def list_jobs(
        self, *, state: str | None = None, destination: str | None = None, limit: int = 100
    ) -> list[ForwardJob]:
        """Jobs, newest first, optionally filtered."""
        stmt = select(ForwardJob).order_by(ForwardJob.id.desc()).limit(limit)
        if state:
            stmt = stmt.where(ForwardJob.state == state)
        if destination:
            stmt = stmt.where(ForwardJob.destination == destination)
        with self._sessions() as session:
            return list(session.scalars(stmt))

    def retry_jobs(self, ids: Sequence[int] | None) -> int:
        """Failed jobs (all, or these ids) go back to ready with a fresh attempt count.

        With ``ids``, all or nothing: raises :class:`JobsNotEligible` (nothing changed)
        when one of them is unknown or not failed."""
        values: dict[str, Any] = {
            "state": JobState.READY.value,
            "attempts": 0,
            "next_attempt_at": self._clock(),
        }
        failed = ForwardJob.state == JobState.FAILED.value
        if ids is None:
            return self._bulk([failed], **values)
        return self._bulk_exact(ids, [failed], **values)

    def relink(
        self, ids: Sequence[int], patient_pk: int, state: JobState, hold_reason: str, note: str
    ) -> int:
        """Held-for-reconciliation jobs linked to a patient get their new state."""
        return self._bulk(
            [
                ForwardJob.id.in_(list(ids)),
                ForwardJob.state == JobState.HELD.value,
                ForwardJob.hold_reason == HoldReason.RECONCILIATION.value,
            ],
            patient_pk=patient_pk,
            state=state.value,
            hold_reason=hold_reason,
            last_error=note[:255],
            next_attempt_at=self._clock(),
        )

    def drop_jobs(self, ids: Sequence[int], reason: str) -> int:
        """Drop open or failed jobs by id (administrator decision); all or nothing:
        raises :class:`JobsNotEligible` (nothing changed) when one of them is unknown,
        sent or already dropped."""
        return self._bulk_exact(
            ids,
            [ForwardJob.state.in_((*_OPEN_STATES, JobState.FAILED.value))],
            state=JobState.DROPPED.value,
            last_error=reason[:255],
        )

    def _bulk_exact(self, ids: Sequence[int], conditions: Sequence[Any], **values: Any) -> int:
        """Update the jobs ``ids``, each of which must meet ``conditions``, in one
        transaction: all of them, or none (:class:`JobsNotEligible`)."""
        wanted = sorted(set(ids))
        values["updated_at"] = self._clock()
        with self._sessions.begin() as session:
            found = set(
                session.scalars(
                    select(ForwardJob.id)
                    .where(ForwardJob.id.in_(wanted), *conditions)
                    .with_for_update()
                )
            )
            others = [job_id for job_id in wanted if job_id not in found]
            if others:
                raise JobsNotEligible(others)
            session.execute(
                update(ForwardJob).where(ForwardJob.id.in_(wanted), *conditions).values(**values)
            )
        return len(wanted)
