"""The router commands: ``consentgate route test``, ``queue stats|list|retry|drop`` and
``held list|resolve``, against a configuration with routes and a consent store holding a
granted, a refused, a never-asked and a mismatching patient (and studies of patients it
does not know). Jobs are created by the real store path (archive + routing hook). Runs on
SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from pydicom import dcmread
from sqlalchemy import select

from cli.main import cli
from cli.router_commands import _resolve_held, restore_retracted
from cli.runtime import Runtime, build_runtime
from config.settings import load_settings
from consent.decision import Decision, Outcome
from consent.models import AuditEntry
from dicom_node.archive.models import Instance
from dicom_node.archive.models import Patient as ArchivedPatient
from router.consent_sync import ConsentSync
from router.models import ForwardJob, JobState
from tests.conftest import (
    ISSUER,
    MODALITY_AE,
    free_port,
    job_states,
    seed_patient,
    seed_purpose,
    store_files,
    toml_routes,
    write_config,
)
from tests.corpus import CorpusFile, make_small_series

PURPOSE = "regional-sharing"
PERMIT_REUSE = 2.1  # seconds: longer than the planner reuses a permit (router.planner)
STATES = [s.value for s in JobState]  # the column order of `queue stats`

Run = Callable[..., Result]


@dataclass
class Env:
    run: Run
    runtime: Runtime
    files: dict[str, list[CorpusFile]]
    tmp: Path

    def uids(self, role: str) -> set[str]:
        return {f.sop_instance_uid for f in self.files[role]}

    def study(self, role: str) -> str:
        return self.files[role][0].study_uid

    def store(self, *roles: str) -> None:
        """Receive these files as from the modality (the archive's real store path)."""
        for role in roles:
            store_files(self.runtime, self.files[role], MODALITY_AE, ISSUER)

    def states(self, role: str) -> set[str]:
        states = job_states(self.runtime)
        return {states[u] for u in self.uids(role)}


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def one_line_error(result: Result, fragment: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and fragment in lines[0], lines[0]


def usage_error(result: Result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr, result.stderr


def _with_modality(files: list[CorpusFile], modality: str, out: Path) -> list[CorpusFile]:
    """Copies of ``files`` with another Modality (same UIDs: use series of their own)."""
    out.mkdir()
    copies = []
    for f in files:
        ds = dcmread(f.path)
        ds.Modality = modality
        path = out / f.path.name
        ds.save_as(path, enforce_file_format=True)
        copies.append(replace(f, path=path, modality=modality))
    return copies


@pytest.fixture
def env(tmp_path: Path, db_url: str) -> Iterator[Env]:
    data_dir = tmp_path / "data"
    peers = [
        {
            "name": "modality",
            "ae_title": MODALITY_AE,
            "host": "127.0.0.1",
            "port": 104,
            "services": ["echo", "store"],
            "issuer": ISSUER,
        },
        {
            "name": "regional",
            "ae_title": "REGIONAL",
            "host": "127.0.0.1",
            "port": free_port(),
            "services": ["echo"],
        },
        {
            "name": "pacs",
            "ae_title": "PACS",
            "host": "127.0.0.1",
            "port": free_port(),
            "services": ["echo"],
        },
    ]
    config = write_config(
        tmp_path / "cg.toml",
        data_dir,
        db_url,
        dicom_port=free_port(),
        http_port=free_port(),
        peers=peers,
    )
    with config.open("a", encoding="utf-8") as fh:
        fh.write(
            toml_routes(
                [
                    {
                        "name": "ct-regional",
                        "match": {"Modality": "CT", "PatientID": {"glob": "P-*"}},
                        "destinations": ["regional"],
                        "purpose": PURPOSE,
                    },
                    {
                        "name": "mr-pacs",
                        "match": {"Modality": ["MR", "OT"]},
                        "destinations": ["pacs"],
                    },
                ]
            )
        )
    runner = CliRunner()

    def run(*args: object) -> Result:
        return runner.invoke(cli, ["--config", str(config), *map(str, args)])

    ok(run("init"))
    roles = ["granted", "refused", "never", "unknown", "unknown2", "unknown3", "mismatch"]
    files = {
        role: make_small_series(tmp_path / role, 2, patient_id=f"P-{role.upper()}", seed=n)
        for n, role in enumerate(roles, start=40)
    }
    files["mr"] = _with_modality(
        make_small_series(tmp_path / "mr-src", 1, patient_id="P-GRANTED", seed=60),
        "MR",
        tmp_path / "mr",
    )
    files["us"] = _with_modality(
        make_small_series(tmp_path / "us-src", 1, patient_id="P-GRANTED", seed=61),
        "US",
        tmp_path / "us",
    )
    runtime = build_runtime(load_settings(config))
    try:
        store = runtime.consent
        seed_purpose(store, PURPOSE)
        for role in ("granted", "refused", "never"):
            seed_patient(store, f"P-{role.upper()}")
        seed_patient(store, "P-MISMATCH", birth_date="1980-05-05")  # the DICOM says 1970
        store.grant(
            issuer=ISSUER, patient_id="P-GRANTED", purpose=PURPOSE, channel="cli", actor="t"
        )
        store.refuse(
            issuer=ISSUER, patient_id="P-REFUSED", purpose=PURPOSE, channel="cli", actor="t"
        )
        yield Env(run, runtime, files, tmp_path)
    finally:
        runtime.close()


# -- route test ------------------------------------------------------------------------------


def test_route_test_shows_matches_and_decisions_and_changes_nothing(env: Env) -> None:
    def report(role: str, *extra: str) -> str:
        return ok(env.run("route", "test", *extra, env.files[role][0].path))

    out = report("granted")
    assert "patient: matched (matched by patient id)" in out
    assert f"route ct-regional -> regional, purpose {PURPOSE}: ready" in out
    out = report("refused")
    assert f"route ct-regional -> regional, purpose {PURPOSE}: dropped: consent:" in out
    out = report("never")
    assert f"route ct-regional -> regional, purpose {PURPOSE}: held (consent): consent:" in out
    out = report("unknown")
    assert "patient: unknown" in out
    assert "held (reconciliation): patient unknown" in out
    out = report("mismatch")
    assert "patient: mismatch (birth date differs)" in out
    assert "held (reconciliation)" in out
    out = report("mr")
    assert "route mr-pacs -> pacs, purpose none (care team): ready" in out
    assert "ct-regional" not in out and "patient:" not in out  # no consent question asked
    out = report("us")
    assert out.splitlines() == [f"{env.files['us'][0].path}:", "  no route matches"]
    # several files at once, each reported
    out = ok(env.run("route", "test", env.files["granted"][0].path, env.files["us"][0].path))
    assert out.count(":\n") >= 2 and "no route matches" in out and ": ready" in out
    # --peer gives the calling AE and the issuer; a calling_ae-independent route still matches
    assert ": ready" in report("granted", "--peer", "modality")
    # nothing was stored, queued or decided
    assert env.runtime.queue.stats() == {}
    assert env.runtime.index.counts()["instances"] == 0


def test_route_test_bad_input(env: Env) -> None:
    junk = env.tmp / "junk.dcm"
    junk.write_bytes(b"not a dicom file at all" * 10)
    one_line_error(env.run("route", "test", junk), "not a readable DICOM file")
    one_line_error(
        env.run("route", "test", "--peer", "nosuch", env.files["granted"][0].path),
        "unknown peer 'nosuch'",
    )
    usage_error(env.run("route", "test", env.tmp / "missing.dcm"), "does not exist")
    usage_error(env.run("route", "test"), "Missing argument")


# -- queue -------------------------------------------------------------------------------------


def _stats(out: str) -> dict[str, dict[str, int]]:
    lines = out.splitlines()
    assert lines[0].split() == ["DESTINATION", *STATES], lines[0]
    table = {}
    for line in lines[1:]:
        name, *counts = line.split()
        table[name] = dict(zip(STATES, map(int, counts), strict=True))
    return table


def _zero(**counts: int) -> dict[str, int]:
    return {s: counts.get(s, 0) for s in STATES}


def test_queue_stats_list_retry_drop(env: Env) -> None:
    assert ok(env.run("queue", "stats")).strip() == "queue is empty"
    env.store("granted", "refused", "never", "unknown", "mr", "us")
    assert _stats(ok(env.run("queue", "stats"))) == {
        "pacs": _zero(ready=1),
        "regional": _zero(ready=2, held=4, dropped=2),
    }
    out = ok(env.run("queue", "list", "--state", "held"))
    lines = out.splitlines()
    assert lines[-1] == "4 job(s)"
    assert sum("consent: consent:" in line for line in lines) == 2
    assert sum("reconciliation: patient unknown" in line for line in lines) == 2
    assert all(PURPOSE in line for line in lines[1:-1])
    out = ok(env.run("queue", "list", "--destination", "pacs"))
    assert out.splitlines()[-1] == "1 job(s)" and " ready " in out and " - " in out
    assert ok(env.run("queue", "list", "--limit", "3")).splitlines()[-1] == "3 job(s)"

    # the destination refuses the granted patient's instances for good: dead letters
    queue = env.runtime.queue
    claimed = queue.claim("regional", "node-test", 10)
    assert {j.sop_instance_uid for j in claimed} == env.uids("granted")
    for job in claimed:
        queue.retry_later(job, "node-test", "destination answered 0xA700", permanent=True)
    assert env.states("granted") == {JobState.FAILED}
    failed = sorted(j.id for j in claimed)
    listed = ok(env.run("queue", "list", "--state", "failed"))
    assert "destination answered 0xA700" in listed and listed.splitlines()[-1] == "2 job(s)"

    assert ok(env.run("queue", "retry", failed[0], "--by", "alice")).strip() == (
        "1 job(s) queued again"
    )
    assert [j.state for j in queue.list_jobs(state="failed")] == [JobState.FAILED]
    assert ok(env.run("queue", "retry", "--all-failed", "--by", "alice")).strip() == (
        "1 job(s) queued again"
    )
    assert env.states("granted") == {JobState.READY}

    held = [j.id for j in queue.list_jobs(state="held")]
    out = ok(env.run("queue", "drop", held[0], "--reason", "sent on CD", "--by", "alice"))
    assert out.strip() == "1 job(s) dropped"
    # an id that names no droppable job (already dropped, or unknown) is an error
    again = env.run("queue", "drop", held[0], 999999, "--reason", "again", "--by", "alice")
    assert again.exit_code == 1
    assert "nothing dropped: job(s) " in again.output and "Traceback" not in again.output
    unknown = env.run("queue", "retry", 999999, "--by", "alice")
    assert unknown.exit_code == 1 and "only failed jobs can be retried" in unknown.output
    dropped = next(j for j in queue.list_jobs(state="dropped") if j.id == held[0])
    assert "sent on CD" in dropped.last_error and "alice" in dropped.last_error
    with env.runtime.sessions() as session:
        audit = session.execute(
            select(AuditEntry.actor, AuditEntry.action, AuditEntry.details).where(
                AuditEntry.action.in_(("queue.retry", "queue.drop"))
            )
        ).all()
    assert [(a, act) for a, act, _ in audit] == [
        ("alice", "queue.retry"),
        ("alice", "queue.retry"),
        ("alice", "queue.drop"),
    ]
    assert json.loads(audit[-1][2])["reason"] == "sent on CD"

    # bad input
    one_line_error(env.run("queue", "retry", "--by", "alice"), "--all-failed")
    usage_error(env.run("queue", "drop", held[1], "--by", "alice"), "--reason")
    usage_error(env.run("queue", "drop", "--reason", "x", "--by", "alice"), "JOB_IDS")
    usage_error(env.run("queue", "retry", "abc", "--by", "alice"), "not a valid integer")
    usage_error(env.run("queue", "list", "--state", "bogus"), "bogus")
    usage_error(env.run("queue", "list", "--limit", "0"), "--limit")


# -- held --------------------------------------------------------------------------------------


def test_held_list_and_resolve(env: Env) -> None:
    assert ok(env.run("held", "list")).strip() == "no study is held for reconciliation"
    env.store("unknown", "unknown2", "unknown3", "mismatch", "never")
    out = ok(env.run("held", "list"))
    lines = out.splitlines()
    assert len(lines) == 4  # the never-asked patient's study waits for consent, not identity
    for role, reason in [
        ("unknown", "patient unknown"),
        ("unknown2", "patient unknown"),
        ("unknown3", "patient unknown"),
        ("mismatch", "patient mismatch: birth date differs"),
    ]:
        line = next(x for x in lines if x.startswith(env.study(role)))
        assert f"{ISSUER}/P-{role.upper()}" in line and "2 job(s)" in line and reason in line

    # link to a patient: consent decides (granted -> ready, refused -> dropped, never -> held)
    def resolve(role: str, patient_id: str) -> str:
        return ok(
            env.run(
                "held",
                "resolve",
                env.study(role),
                "--issuer",
                ISSUER,
                "--patient-id",
                patient_id,
                "--by",
                "bob",
            )
        )

    out = resolve("unknown", "P-GRANTED")
    assert out.strip() == f"study {env.study('unknown')} linked: 2 job(s) for {PURPOSE}: ready"
    assert env.states("unknown") == {JobState.READY}
    granted_pk = env.runtime.consent.find_patient(ISSUER, "P-GRANTED")
    assert {j.patient_pk for j in env.runtime.queue.list_jobs(state="ready")} == {granted_pk}
    assert resolve("mismatch", "P-REFUSED").strip().endswith(f"for {PURPOSE}: dropped")
    assert env.states("mismatch") == {JobState.DROPPED}
    assert resolve("unknown2", "P-NEVER").strip().endswith(f"for {PURPOSE}: held")
    assert env.states("unknown2") == {JobState.HELD}
    assert "unknown2".upper() not in ok(env.run("held", "list"))  # now waits for consent
    # reject: never forwarded
    out = ok(env.run("held", "resolve", env.study("unknown3"), "--reject", "--by", "bob"))
    assert out.strip() == f"2 job(s) of study {env.study('unknown3')} dropped"
    assert env.states("unknown3") == {JobState.DROPPED}
    assert ok(env.run("held", "list")).strip() == "no study is held for reconciliation"
    with env.runtime.sessions() as session:
        actions = session.scalars(
            select(AuditEntry.action).where(AuditEntry.actor == "bob").order_by(AuditEntry.seq)
        ).all()
    assert actions == ["held.link", "held.link", "held.link", "held.reject"]

    # bad input: one line, non-zero
    study = env.study("unknown")
    one_line_error(
        env.run("held", "resolve", study, "--reject", "--issuer", ISSUER, "--by", "bob"),
        "pass either",
    )
    one_line_error(env.run("held", "resolve", study, "--by", "bob"), "pass either")
    one_line_error(
        env.run("held", "resolve", study, "--issuer", ISSUER, "--by", "bob"), "pass both"
    )
    one_line_error(
        env.run("held", "resolve", "2.25.999", "--reject", "--by", "bob"),
        "no job held for reconciliation",
    )
    held_again = make_small_series(env.tmp / "again", 1, patient_id="P-NOBODY", seed=70)
    env.files["again"] = held_again
    env.store("again")
    one_line_error(
        env.run(
            "held",
            "resolve",
            env.study("again"),
            "--issuer",
            ISSUER,
            "--patient-id",
            "P-NOBODY",
            "--by",
            "bob",
        ),
        "no patient P-NOBODY",
    )
    assert env.states("again") == {JobState.HELD}  # unchanged by the failed attempt


def test_held_resolve_keeps_jobs_held_when_the_decision_fails(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linking a held study while the consent store cannot decide: the jobs stay held
    (decided again by the sweep), never dropped for good."""
    env.store("unknown")
    monkeypatch.setattr(
        env.runtime.consent,
        "decide",
        lambda _pk, _purpose: Decision(Outcome.DENY, "error: OperationalError"),
    )
    out = _resolve_held(env.runtime, env.study("unknown"), ISSUER, "P-GRANTED", False, "bob")
    assert out.endswith(f"for {PURPOSE}: held")
    assert env.states("unknown") == {JobState.HELD}


# -- a refusal entered in error ------------------------------------------------------


def _sync(env: Env) -> ConsentSync:
    """The node's consent reaction (no retention: copies are kept)."""
    rt = env.runtime
    return ConsentSync(
        rt.queue, rt.sessions, rt.consent.decide, rt.consent.changes_since, rt.consent.last_event_id
    )


def _decide(env: Env, patient_id: str, action: str) -> int:
    """Record a grant or refusal for PURPOSE; return its event id."""
    record = getattr(env.runtime.consent, action)
    return int(
        record(issuer=ISSUER, patient_id=patient_id, purpose=PURPOSE, channel="cli", actor="t")
    )


def _later_study(env: Env, role: str, patient_id: str, seed: int, count: int = 2) -> None:
    env.files[role] = make_small_series(env.tmp / role, count, patient_id=patient_id, seed=seed)


def _job_ids(env: Env, role: str) -> list[int]:
    with env.runtime.sessions() as session:
        return list(
            session.scalars(
                select(ForwardJob.id)
                .join(Instance, Instance.id == ForwardJob.instance_pk)
                .where(Instance.sop_instance_uid.in_(env.uids(role)))
            )
        )


def _job_state(env: Env, job_id: int) -> str:
    with env.runtime.sessions() as session:
        return session.get_one(ForwardJob, job_id).state


def test_entered_in_error_refusal_restores_what_it_dropped(env: Env) -> None:
    """A refusal recorded by mistake dropped a consented patient's jobs (queued ones, and
    those of a study stored while it stood); retracting it queues them again. A job an
    operator dropped stays dropped; running the restore again changes nothing."""
    sync = _sync(env)
    _later_study(env, "after", "P-GRANTED", 70)
    _later_study(env, "operator", "P-GRANTED", 71, count=1)
    env.store("granted", "operator")
    assert env.states("granted") == {JobState.READY}
    operator_job = _job_ids(env, "operator")[0]
    ok(env.run("queue", "drop", operator_job, "--reason", "sent by hand", "--by", "ops"))

    wrong = _decide(env, "P-GRANTED", "refuse")
    sync.poll()
    time.sleep(PERMIT_REUSE)  # the planner no longer reuses the permit it saw last
    env.store("after")  # stored while the refusal stood: created dropped
    assert env.states("granted") == env.states("after") == {JobState.DROPPED}

    out = ok(
        env.run("consent", "entered-in-error", wrong, "--reason", "wrong patient", "--by", "desk1")
    )
    assert out.splitlines() == [
        f"event {wrong} marked entered-in-error (event {wrong + 1})",
        "4 job(s) dropped by the retracted refusal queued again",
    ]
    assert env.states("granted") == env.states("after") == {JobState.READY}
    assert _job_state(env, operator_job) == JobState.DROPPED
    with env.runtime.sessions() as session:
        entry = session.scalars(
            select(AuditEntry).where(AuditEntry.action == "queue.restore")
        ).one()
    assert entry.actor == "desk1" and entry.target == f"event:{wrong}"
    assert json.loads(entry.details)["count"] == 4

    assert ok(env.run("queue", "restore", wrong)).strip() == (
        "0 job(s) dropped by the retracted refusal queued again"
    )
    one_line_error(env.run("queue", "restore", wrong + 1), "not a consent decision marked")
    one_line_error(env.run("queue", "restore", 999_999), "not a consent decision marked")


def test_restore_covers_only_the_time_the_retracted_refusal_stood(env: Env) -> None:
    """refuse (mistake) -> grant -> refuse -> grant: retracting the first refusal restores
    what it dropped, not what the second, genuine refusal dropped."""
    sync = _sync(env)
    _later_study(env, "second", "P-GRANTED", 72)
    env.store("granted")
    wrong = _decide(env, "P-GRANTED", "refuse")
    sync.poll()
    _decide(env, "P-GRANTED", "grant")
    sync.poll()
    env.store("second")
    _decide(env, "P-GRANTED", "refuse")
    sync.poll()
    _decide(env, "P-GRANTED", "grant")
    sync.poll()
    assert env.states("granted") == env.states("second") == {JobState.DROPPED}

    out = ok(env.run("consent", "entered-in-error", wrong, "--reason", "wrong patient"))
    assert out.splitlines()[1] == "2 job(s) dropped by the retracted refusal queued again"
    assert env.states("granted") == {JobState.READY}
    assert env.states("second") == {JobState.DROPPED}


def test_restore_after_retraction_holds_stays_or_refuses(env: Env) -> None:
    """Opt-in purpose, the refusal was the patient's only decision: the jobs come back
    held. A duplicate refusal retracted: the one before would have dropped them, nothing
    comes back. A mistaken refusal followed by a genuine one: still refused. A retracted
    permit: nothing to restore."""
    sync = _sync(env)
    wrong = _decide(env, "P-NEVER", "refuse")
    sync.poll()
    env.store("never", "refused")
    assert env.states("never") == env.states("refused") == {JobState.DROPPED}
    out = ok(env.run("consent", "entered-in-error", wrong, "--reason", "wrong patient"))
    assert out.splitlines()[1] == (
        f"2 job(s) dropped by the retracted refusal held again: the patient has not decided "
        f"for {PURPOSE}"
    )
    assert env.states("never") == {JobState.HELD}

    duplicate = _decide(env, "P-REFUSED", "refuse")
    out = ok(env.run("consent", "entered-in-error", duplicate, "--reason", "twice"))
    assert out.splitlines()[1] == (
        f"the decision before the retracted refusal was a refusal for {PURPOSE} too: the "
        "jobs stay dropped"
    )
    assert env.states("refused") == {JobState.DROPPED}

    env.store("granted")
    wrong = _decide(env, "P-GRANTED", "refuse")
    sync.poll()
    _decide(env, "P-GRANTED", "refuse")  # the patient then refuses for real
    out = ok(env.run("consent", "entered-in-error", wrong, "--reason", "too early"))
    assert out.splitlines()[1] == (
        f"the patient's consent for {PURPOSE} is still refused: the jobs the retracted "
        "refusal dropped stay dropped"
    )
    assert env.states("granted") == {JobState.DROPPED}

    grant = _decide(env, "P-GRANTED", "grant")
    out = ok(env.run("consent", "entered-in-error", grant, "--reason", "wrong patient"))
    assert out.splitlines()[1] == "the retracted decision was a permit: no job to restore"


def test_restore_fails_closed_and_can_be_run_again(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The consent decision fails while restoring: nothing is restored and the operator
    is told how to finish; `queue restore` does it once the database answers."""
    sync = _sync(env)
    env.store("granted")
    wrong = _decide(env, "P-GRANTED", "refuse")
    sync.poll()
    env.runtime.consent.mark_entered_in_error(wrong, actor="desk1", reason="wrong patient")
    real = env.runtime.consent.decide
    monkeypatch.setattr(
        env.runtime.consent,
        "decide",
        lambda _pk, _purpose: Decision(Outcome.DENY, "error: OperationalError"),
    )
    with pytest.raises(click.ClickException, match=f"queue restore {wrong}' again"):
        restore_retracted(env.runtime, wrong, "desk1")
    assert env.states("granted") == {JobState.DROPPED}
    monkeypatch.setattr(env.runtime.consent, "decide", real)
    assert ok(env.run("queue", "restore", wrong)).strip() == (
        "2 job(s) dropped by the retracted refusal queued again"
    )
    assert env.states("granted") == {JobState.READY}


def test_studies_fix_patient_row(env: Env) -> None:
    """A first study of P-GRANTED with another birth date created the patient row; the
    command points the row at the genuine study (audited); run again, it changes
    nothing; an unknown study, or one whose instances the consent store does not
    confirm, is one error line."""
    _later_study(env, "other-birth", "P-GRANTED", 73, count=1)
    for f in env.files["other-birth"]:
        ds = dcmread(f.path)
        ds.PatientBirthDate = "19990101"
        ds.save_as(f.path)
    env.store("other-birth", "granted")
    study = env.study("granted")
    out = ok(env.run("studies", "fix-patient-row", study, "--by", "ops"))
    assert out.startswith(f"the patient row of study {study} now shows its instance")
    with env.runtime.sessions() as session:
        entry = session.scalars(
            select(AuditEntry).where(AuditEntry.action == "archive.patient-row")
        ).one()
        row = session.scalars(
            select(ArchivedPatient).where(ArchivedPatient.patient_id == "P-GRANTED")
        ).one()
    assert (entry.actor, entry.target) == ("ops", f"study:{study}")
    assert row.birth_date == dcmread(env.files["granted"][0].path).PatientBirthDate
    assert ok(env.run("studies", "fix-patient-row", study)).strip() == (
        f"the patient row of study {study} already shows its patient"
    )
    one_line_error(env.run("studies", "fix-patient-row", "1.2.3.4"), "no archived study 1.2.3.4")
    # the study whose instance contradicts the consent store cannot be what the row shows
    one_line_error(
        env.run("studies", "fix-patient-row", env.study("other-birth")),
        "with an identity the consent store confirms",
    )


def test_retracting_a_duplicate_refusal_after_a_grant_keeps_the_genuine_drops(env: Env) -> None:
    """P-REFUSED genuinely refused; the refusal is recorded a second time by mistake, a
    study arrives (dropped), the patient grants later. Retracting the duplicate restores
    nothing: the genuine refusal alone would have dropped those jobs."""
    sync = _sync(env)
    duplicate = _decide(env, "P-REFUSED", "refuse")
    sync.poll()
    env.store("refused")
    _decide(env, "P-REFUSED", "grant")
    sync.poll()
    assert env.states("refused") == {JobState.DROPPED}
    out = ok(env.run("consent", "entered-in-error", duplicate, "--reason", "recorded twice"))
    assert out.splitlines()[1] == (
        f"the decision before the retracted refusal was a refusal for {PURPOSE} too: the "
        "jobs stay dropped"
    )
    assert env.states("refused") == {JobState.DROPPED}
