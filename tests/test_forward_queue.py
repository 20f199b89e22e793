"""The durable forward queue (router.queue.JobQueue) and its consent synchronisation, on
SQLite and PostgreSQL: claims under a lease, capped exponential backoff, dead letter,
stale-lease recovery, release/drop on consent changes, the administrator's retry/drop,
and two concurrent claimers (two "nodes": separate engines) never sharing a job.

Time is a fake clock handed to the queue, so leases and backoff are checked exactly and
without waiting.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from cli.database import make_engine, make_sessions, upgrade
from consent.decision import ConsentChange, Outcome
from dicom_node.archive.models import Instance, Patient, Series, Study
from router.consent_sync import ConsentSync
from router.models import ForwardJob, HoldReason, JobState
from router.queue import JobQueue, JobsNotEligible, JobSpec, RetryPolicy
from tests.conftest import ISSUER, seed_patient, seed_purpose

T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Db:
    engine: Engine
    sessions: sessionmaker[Session]
    clock: Clock
    instances: Iterator[int]

    def queue(self, policy: RetryPolicy | None = None) -> JobQueue:
        return JobQueue(self.sessions, policy or RetryPolicy(), clock=self.clock)

    def add(
        self,
        count: int,
        destination: str = "regional",
        state: JobState = JobState.READY,
        *,
        purpose: str = "",
        patient_pk: int | None = None,
        hold_reason: str = "",
    ) -> list[int]:
        """``count`` jobs, each for a new archived instance; returns their ids."""
        queue = self.queue()
        spec = JobSpec(destination, "route", purpose, patient_pk, state, hold_reason)
        with self.engine.begin() as conn:
            for _ in range(count):
                queue.insert_jobs(conn, next(self.instances), [spec])
        with self.sessions() as session:
            return list(session.scalars(select(ForwardJob.id).order_by(ForwardJob.id)))[-count:]

    def job(self, job_id: int) -> ForwardJob:
        with self.sessions() as session:
            job = session.get(ForwardJob, job_id)
            assert job is not None
            return job

    def states(self, ids: list[int]) -> list[str]:
        return [self.job(i).state for i in ids]


def _utc(value: datetime | None) -> datetime | None:
    """A stored timestamp as aware UTC (SQLite gives it back naive)."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


@pytest.fixture
def db(db_url: str) -> Iterator[Db]:
    engine = make_engine(db_url)
    upgrade(engine)
    sessions = make_sessions(engine)
    with sessions.begin() as session:
        patient = Patient(patient_id="P1", issuer=ISSUER)
        session.add(patient)
        session.flush()
        study = Study(patient_pk=patient.id, study_instance_uid="2.25.1")
        session.add(study)
        session.flush()
        series = Series(study_pk=study.id, series_instance_uid="2.25.2")
        session.add(series)
        session.flush()
        rows = [
            Instance(
                series_pk=series.id,
                sop_instance_uid=f"2.25.3.{n}",
                sop_class_uid=CT,
                transfer_syntax_uid=EXPLICIT,
                size=100,
                path=f"ab/{n}.dcm",
                received_at=T0,
            )
            for n in range(400)
        ]
        session.add_all(rows)
        session.flush()
        pks = [r.id for r in rows]
    try:
        yield Db(engine, sessions, Clock(), iter(pks))
    finally:
        engine.dispose()


def test_claim_takes_a_lease_others_wait(db: Db) -> None:
    ready = db.add(5)
    other_destination = db.add(2, "research")
    db.add(1, state=JobState.HELD, hold_reason=HoldReason.CONSENT.value)
    db.add(1, state=JobState.DROPPED)
    db.add(1, state=JobState.DONE)
    queue = db.queue(RetryPolicy(lease_seconds=60))

    first = queue.claim("regional", "node-a", 3)
    assert [j.id for j in first] == ready[:3]  # oldest first, at most the limit
    assert {(j.sop_class_uid, j.transfer_syntax_uid) for j in first} == {(CT, EXPLICIT)}
    assert all(j.path.endswith(".dcm") and j.sop_instance_uid for j in first)
    for job_id in ready[:3]:
        job = db.job(job_id)
        assert (job.state, job.lease_owner) == (JobState.SENDING, "node-a")
        assert _utc(job.lease_until) == T0 + timedelta(seconds=60)
    # another claimer gets only what is left; held, dropped and done jobs are never claimed
    assert [j.id for j in queue.claim("regional", "node-b", 10)] == ready[3:]
    assert queue.claim("regional", "node-c", 10) == []
    assert [j.id for j in queue.claim("research", "node-c", 10)] == other_destination
    # only the lease owner can acknowledge, once
    assert queue.complete(ready[0], "node-b") is False
    assert db.job(ready[0]).state == JobState.SENDING
    assert queue.complete(ready[0], "node-a") is True
    assert queue.complete(ready[0], "node-a") is False
    assert db.job(ready[0]).state == JobState.DONE


def test_backoff_grows_exponentially_and_is_capped(db: Db) -> None:
    policy = RetryPolicy(max_attempts=50, base_delay=2.0, max_delay=60.0)
    for attempts in range(1, 12):
        nominal = min(60.0, 2.0 * 2 ** (attempts - 1))
        for _ in range(20):  # jitter: within +-20 % of the nominal delay
            assert 0.8 * nominal <= policy.delay(attempts) <= 1.2 * nominal, attempts
    # through the queue: a failed job waits out its delay, then is claimable again
    queue = db.queue(policy)
    (job_id,) = db.add(1)
    waits = []
    for attempt in range(1, 9):
        (job,) = queue.claim("regional", "node-a", 10)
        assert job.attempts == attempt - 1
        assert queue.retry_later(job, "node-a", "cannot associate") == JobState.READY
        stored = db.job(job_id)
        assert (stored.state, stored.attempts, stored.last_error) == (
            JobState.READY,
            attempt,
            "cannot associate",
        )
        next_at = _utc(stored.next_attempt_at)
        assert next_at is not None
        wait = (next_at - db.clock.now).total_seconds()
        nominal = min(60.0, 2.0 * 2 ** (attempt - 1))
        assert 0.8 * nominal - 1e-3 <= wait <= 1.2 * nominal + 1e-3, attempt
        waits.append(wait)
        db.clock.advance(wait - 0.01)
        assert queue.claim("regional", "node-a", 10) == [], "claimed before its time"
        db.clock.advance(0.02)
    assert waits[-1] <= 72.0 and waits[-1] >= 48.0  # capped at max_delay (+-20 %)
    assert waits[3] > waits[0] * 4  # and it grew: 16 s nominal vs 2 s


def test_dead_letter_after_max_attempts(db: Db) -> None:
    queue = db.queue(RetryPolicy(max_attempts=3, base_delay=1.0, max_delay=1.0))
    (job_id,) = db.add(1)
    outcomes = []
    for _ in range(3):
        (job,) = queue.claim("regional", "node-a", 10)
        outcomes.append(queue.retry_later(job, "node-a", "destination answered 0xA700"))
        db.clock.advance(2)
    assert outcomes == [JobState.READY, JobState.READY, JobState.FAILED]
    stored = db.job(job_id)
    assert (stored.state, stored.attempts, stored.last_error) == (
        JobState.FAILED,
        3,
        "destination answered 0xA700",
    )
    db.clock.advance(3600)
    assert queue.claim("regional", "node-a", 10) == []  # a dead letter stays put
    # a permanent refusal is dead-lettered at once
    (other,) = db.add(1)
    (job,) = queue.claim("regional", "node-a", 10)
    assert queue.retry_later(job, "node-a", "no syntax", permanent=True) == JobState.FAILED
    assert (db.job(other).state, db.job(other).attempts) == (JobState.FAILED, 1)


def test_stale_lease_is_recovered(db: Db) -> None:
    queue = db.queue(RetryPolicy(lease_seconds=30))
    ids = db.add(3)
    crashed = queue.claim("regional", "node-crashed", 10)
    assert [j.id for j in crashed] == ids
    db.clock.advance(29)
    assert queue.claim("regional", "node-b", 10) == []  # lease still valid
    assert queue.recover_stale() == 0
    db.clock.advance(2)
    # expired: another node claims them straight away ...
    taken = queue.claim("regional", "node-b", 2)
    assert [j.id for j in taken] == ids[:2]
    # ... and the crashed node, were it to come back, can no longer acknowledge them
    assert queue.complete(ids[0], "node-crashed") is False
    assert queue.complete(ids[0], "node-b") is True
    # recover_stale (at forwarder start) puts the expired rest back to ready
    assert queue.recover_stale() == 1
    job = db.job(ids[2])
    assert (job.state, job.lease_owner, job.lease_until) == (JobState.READY, "", None)
    # a clean shutdown gives back its own leases at once (only its own)
    mine = queue.claim("regional", "node-b", 10)
    assert [j.id for j in mine] == [ids[2]]
    assert queue.release_own_leases("node-other") == 0
    assert db.states(ids) == [JobState.DONE, JobState.SENDING, JobState.SENDING]
    assert queue.release_own_leases("node-b") == 2
    assert db.states(ids) == [JobState.DONE, JobState.READY, JobState.READY]


def test_consent_changes_release_and_drop_only_their_jobs(db: Db) -> None:
    consent = HoldReason.CONSENT.value
    held = db.add(2, state=JobState.HELD, purpose="research", patient_pk=1, hold_reason=consent)
    other_purpose = db.add(
        1, state=JobState.HELD, purpose="regional", patient_pk=1, hold_reason=consent
    )
    other_patient = db.add(
        1, state=JobState.HELD, purpose="research", patient_pk=2, hold_reason=consent
    )
    reconciling = db.add(
        1,
        state=JobState.HELD,
        purpose="research",
        patient_pk=1,  # a candidate whose demographics disagree ("mismatch")
        hold_reason=HoldReason.RECONCILIATION.value,
    )
    ready = db.add(1, purpose="research", patient_pk=1)
    done = db.add(1, state=JobState.DONE, purpose="research", patient_pk=1)
    queue = db.queue()

    assert queue.release_for_consent(1, "research") == 2
    assert db.states(held) == [JobState.READY, JobState.READY]
    assert db.states(other_purpose + other_patient + reconciling) == [JobState.HELD] * 3
    sending = db.add(1, "elsewhere", purpose="research", patient_pk=1)
    assert [j.id for j in queue.claim("elsewhere", "node-a", 100)] == sending

    assert queue.drop_for_consent(1, "research", "consent refused or withdrawn") == 3
    assert db.states(held + ready) == [JobState.DROPPED] * 3
    assert db.job(ready[0]).last_error == "consent refused or withdrawn"
    # untouched: other purpose, other patient, sent, being sent (the forwarder re-checks
    # consent before sending), and a study still waiting for identity reconciliation
    assert db.states(other_purpose + other_patient) == [JobState.HELD] * 2
    assert db.states(done) == [JobState.DONE]
    assert db.states(sending) == [JobState.SENDING]
    assert db.states(reconciling) == [JobState.HELD]


def test_retry_and_drop_by_the_administrator(db: Db) -> None:
    queue = db.queue(RetryPolicy(max_attempts=1))
    failed = db.add(3)
    for job in queue.claim("regional", "node-a", 10):
        queue.retry_later(job, "node-a", "refused")
    assert db.states(failed) == [JobState.FAILED] * 3
    done = db.add(1, state=JobState.DONE)
    held = db.add(1, state=JobState.HELD, hold_reason=HoldReason.CONSENT.value)

    # only failed jobs, all or nothing: one that is not changes nothing
    with pytest.raises(JobsNotEligible) as refused:
        queue.retry_jobs([failed[0], done[0], 999_999])
    assert refused.value.job_ids == (done[0], 999_999)
    assert db.states(failed) == [JobState.FAILED] * 3
    assert queue.retry_jobs([failed[0]]) == 1
    job = db.job(failed[0])
    assert (job.state, job.attempts) == (JobState.READY, 0)
    assert db.states(done) == [JobState.DONE]
    assert queue.retry_jobs(None) == 2  # --all-failed
    assert db.states(failed) == [JobState.READY] * 3
    batch = queue.claim("regional", "node-a", 10)
    assert [j.id for j in batch] == failed
    for job in batch[:2]:
        assert queue.complete(job.id, "node-a")
    assert queue.retry_later(batch[2], "node-a", "refused") == JobState.FAILED
    with pytest.raises(JobsNotEligible) as refused:
        queue.drop_jobs([failed[2], held[0], done[0], failed[0]], "dropped by it: test")
    assert set(refused.value.job_ids) == {done[0], failed[0]}
    assert db.states([failed[2], held[0]]) == [JobState.FAILED, JobState.HELD]
    assert queue.drop_jobs([failed[2], held[0]], "dropped by it: test") == 2
    assert db.states([failed[2], held[0]]) == [JobState.DROPPED] * 2
    assert db.job(held[0]).last_error == "dropped by it: test"
    assert db.states([done[0], failed[0]]) == [JobState.DONE] * 2


def test_two_concurrent_claimers_never_get_the_same_job(db: Db, db_url: str) -> None:
    ids = set(db.add(300))
    barrier = threading.Barrier(2)
    claimed: dict[str, list[int]] = {"node-a": [], "node-b": []}
    errors: list[BaseException] = []

    def node(owner: str) -> None:
        engine = make_engine(db_url)  # its own engine and pool, like another process
        try:
            queue = JobQueue(make_sessions(engine), RetryPolicy(), clock=db.clock)
            barrier.wait(timeout=30)
            while batch := queue.claim("regional", owner, 7):
                for job in batch:
                    claimed[owner].append(job.id)
                    if not queue.complete(job.id, owner):
                        raise AssertionError(f"{owner} lost job {job.id}")
                time.sleep(0.002)  # let the other claimer in, even on a loaded machine
        except BaseException as exc:
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=node, args=(o,)) for o in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a claimer did not finish"
    assert not errors, errors
    a, b = set(claimed["node-a"]), set(claimed["node-b"])
    assert len(a) == len(claimed["node-a"]) and len(b) == len(claimed["node-b"])
    assert not a & b, f"claimed by both: {sorted(a & b)[:10]}"
    assert a | b == ids
    assert a and b, "one claimer got everything: no concurrency was exercised"
    assert set(db.states(sorted(ids))) == {JobState.DONE}


def test_consent_sync_applies_changes_and_the_sweep_repairs_missed_ones(db: Db) -> None:
    from consent.service import ConsentStore

    store = ConsentStore(db.sessions)
    seed_purpose(store, "research")
    pk_a = seed_patient(store, "P-A")
    pk_b = seed_patient(store, "P-B")
    consent = HoldReason.CONSENT.value
    a_jobs = db.add(
        2, state=JobState.HELD, purpose="research", patient_pk=pk_a, hold_reason=consent
    )
    b_jobs = db.add(
        2, state=JobState.HELD, purpose="research", patient_pk=pk_b, hold_reason=consent
    )
    queue = db.queue()
    woken: list[None] = []

    def sync() -> ConsentSync:
        return ConsentSync(
            queue,
            db.sessions,
            store.decide,
            store.changes_since,
            store.last_event_id,
            wake=lambda: woken.append(None),
        )

    live = sync()
    store.grant(issuer=ISSUER, patient_id="P-A", purpose="research", channel="cli", actor="t")
    assert live.poll() == 2
    assert db.states(a_jobs) == [JobState.READY] * 2 and woken
    assert live.poll() == 0  # each change is applied once
    # a change this instance never saw (recorded before it started, e.g. across a crash)
    store.refuse(issuer=ISSUER, patient_id="P-B", purpose="research", channel="cli", actor="t")
    late = sync()
    assert late.poll() == 0
    assert db.states(b_jobs) == [JobState.HELD] * 2
    assert late.sweep() == 2
    assert db.states(b_jobs) == [JobState.DROPPED] * 2
    # undecided patients stay held
    assert late.apply(ConsentChange(pk_a, "research", Outcome.UNDECIDED)) == 0
