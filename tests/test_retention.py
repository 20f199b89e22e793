"""Retention (``[router] retention``, router.retention) on SQLite and PostgreSQL.

A configuration with two routes: every instance goes to the care team's PACS ("pacs", no
purpose) and, under an opt-in purpose, to "regional". Instances are received by the real
store path (archive + routing hook); the PACS jobs are then settled through the queue
(acknowledged, dead-lettered, left queued or left being sent); a refusal recorded in the
consent store reaches the queue through ConsentSync, built as ``consentgate serve`` builds
it, with the retention policy read from the TOML file.

What a user checks: which instance files are left in ``<data_dir>/archive``, what
``consentgate status`` and the index list, that the counters match a recount, that a later
store into a series whose rows were deleted works, and that the audit log verifies and
records each deletion.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from cli.main import cli
from cli.runtime import Runtime
from config.settings import ConfigError, load_settings
from consent.decision import ConsentChange, Outcome
from consent.models import AuditEntry
from dicom_node.archive.files import InstanceFiles
from dicom_node.archive.models import Instance, Patient, Series, Study
from router.consent_sync import ConsentSync
from router.models import ForwardJob, JobState
from router.retention import (
    AUDIT_ACTION,
    DoomedFile,
    Retention,
    RetentionReport,
    remove_if_unchanged,
)
from tests.conftest import (
    ISSUER,
    MODALITY_AE,
    free_port,
    indexed_instances,
    prepare_runtime,
    seed_patient,
    seed_purpose,
    store_files,
    toml_routes,
    write_config,
)
from tests.corpus import CorpusFile, make_small_series

PURPOSE = "regional-sharing"
OWNER = "test-node"
REPO_CONFIG = Path(__file__).resolve().parent.parent / "config" / "consentgate.toml"


def write_retention_config(tmp_path: Path, db_url: str, retention: str) -> Path:
    """A consentgate.toml: modality, the care team's PACS and the regional archive; every
    instance routed to "pacs" (no purpose) and to "regional" (opt-in purpose)."""
    peers = [
        {
            "name": "modality",
            "ae_title": MODALITY_AE,
            "host": "127.0.0.1",
            "port": 104,
            "services": ["echo", "store"],
            "issuer": ISSUER,
        },
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()},
        {"name": "regional", "ae_title": "REGIONAL", "host": "127.0.0.1", "port": free_port()},
    ]
    config = write_config(
        tmp_path / "consentgate.toml",
        tmp_path / "data",
        db_url,
        dicom_port=free_port(),
        http_port=free_port(),
        peers=peers,
    )
    routes = [
        {"name": "care-team", "destinations": ["pacs"]},
        {"name": "regional", "destinations": ["regional"], "purpose": PURPOSE},
    ]
    with config.open("a", encoding="utf-8") as fh:
        fh.write(toml_routes(routes))
        fh.write(f"\n[router]\nretention = {json.dumps(retention)}\n")
    return config


def node_consent_sync(runtime: Runtime) -> ConsentSync:
    """ConsentSync as cli/node_process.py builds it, with the retention policy of the
    runtime's settings (the wiring given in the report)."""
    return ConsentSync(
        runtime.queue,
        runtime.sessions,
        runtime.consent.decide,
        runtime.consent.changes_since,
        runtime.consent.last_event_id,
        retention=Retention(
            runtime.settings.router.retention,
            runtime.sessions,
            runtime.files,
            forget_parents=runtime.index.forget_parents,
        ),
    )


def with_new_series(files: list[CorpusFile], modality: str, out: Path) -> list[CorpusFile]:
    """Copies of ``files`` moved to a new series (same study) with another Modality."""
    out.mkdir()
    series_uid = generate_uid(entropy_srcs=[files[0].series_uid, modality])
    copies = []
    for f in files:
        ds = dcmread(f.path)
        ds.SeriesInstanceUID = series_uid
        ds.Modality = modality
        path = out / f.path.name
        ds.save_as(path, enforce_file_format=True)
        copies.append(replace(f, path=path, series_uid=series_uid, modality=modality))
    return copies


@dataclass
class Env:
    config: Path
    runtime: Runtime
    sync: ConsentSync
    files: dict[str, CorpusFile]  # name -> file

    @property
    def archive_root(self) -> Path:
        return self.runtime.settings.node.data_dir / "archive"

    def store(self, *names: str) -> None:
        """Receive these files as from the modality (the archive's real store path)."""
        store_files(self.runtime, [self.files[name] for name in names], MODALITY_AE, ISSUER)

    def uid(self, name: str) -> str:
        return self.files[name].sop_instance_uid

    def settle_pacs(self, outcomes: dict[str, str]) -> None:
        """Settle the care team's jobs through the queue: name -> done, failed, sending;
        any other PACS job goes back to ready."""
        queue = self.runtime.queue
        by_uid = {self.uid(name): what for name, what in outcomes.items()}
        for job in queue.claim("pacs", OWNER, 1000):
            what = by_uid.get(job.sop_instance_uid, "ready")
            if what == "done":
                assert queue.complete(job.id, OWNER)
            elif what == "failed":
                state = queue.retry_later(job, OWNER, "0xA700", permanent=True)
                assert state == JobState.FAILED
            elif what == "ready":
                assert queue.requeue(job, OWNER)
            else:
                assert what == "sending"

    def refuse(self, patient_id: str) -> int:
        """Record a refusal in the consent store (as the CLI does) and let the node's
        synchronisation pick it up; returns the number of jobs it affected."""
        self.runtime.consent.refuse(
            issuer=ISSUER, patient_id=patient_id, purpose=PURPOSE, channel="cli", actor="desk"
        )
        return self.sync.poll()

    def present(self) -> set[str]:
        """Names of the files whose archive copy is on disk (relative path of the name's
        SOP Instance UID, as the archive lays it out)."""
        return {
            name
            for name, f in self.files.items()
            if (self.archive_root / InstanceFiles.relative_path_for(f.sop_instance_uid)).exists()
        }

    def indexed(self, db_url: str) -> set[str]:
        """Names of the files the index lists."""
        uids = set(indexed_instances(db_url))
        return {name for name, f in self.files.items() if f.sop_instance_uid in uids}

    def jobs(self) -> dict[tuple[str, str], str]:
        """(name, destination) -> state of every forward job of a named file."""
        names = {f.sop_instance_uid: name for name, f in self.files.items()}
        with self.runtime.sessions() as session:
            rows = session.execute(
                select(Instance.sop_instance_uid, ForwardJob.destination, ForwardJob.state).join(
                    Instance, Instance.id == ForwardJob.instance_pk
                )
            ).all()
        return {(names[uid], dest): state for uid, dest, state in rows if uid in names}

    def retention_audit(self) -> list[AuditEntry]:
        with self.runtime.sessions() as session:
            return list(
                session.scalars(
                    select(AuditEntry)
                    .where(AuditEntry.action == AUDIT_ACTION)
                    .order_by(AuditEntry.seq)
                )
            )

    def status(self) -> dict[str, int]:
        """The archive counts ``consentgate status`` prints."""
        result = CliRunner().invoke(cli, ["--config", str(self.config), "status"])
        assert result.exit_code == 0, result.output
        counts = {}
        for line in result.stdout.splitlines():
            key, _, value = line.partition(": ")
            if key in ("patients", "studies", "series", "instances"):
                counts[key] = int(value)
        assert len(counts) == 4, result.stdout
        return counts


def make_files(tmp_path: Path) -> dict[str, CorpusFile]:
    """P-REFUSED: study 1 with a CT series (ct0-ct2) and an MR series (mr0-mr3), and study
    2 (s2a, s2b); P-GONE: one series (g0, g1; g2 is received only later); P-OTHER: one
    series (o0, o1)."""
    refused = make_small_series(tmp_path / "r", 7, patient_id="P-REFUSED", seed=1)
    mr = with_new_series(refused[3:], "MR", tmp_path / "r-mr")
    study2 = make_small_series(tmp_path / "r2", 2, patient_id="P-REFUSED", seed=2)
    gone = make_small_series(tmp_path / "g", 3, patient_id="P-GONE", seed=3)
    other = make_small_series(tmp_path / "o", 2, patient_id="P-OTHER", seed=4)
    assert mr[0].study_uid == refused[0].study_uid != study2[0].study_uid
    files = {f"ct{i}": f for i, f in enumerate(refused[:3])}
    files.update({f"mr{i}": f for i, f in enumerate(mr)})
    files.update({"s2a": study2[0], "s2b": study2[1]})
    files.update({f"g{i}": f for i, f in enumerate(gone)})
    files.update({f"o{i}": f for i, f in enumerate(other)})
    return files


MakeEnv = Callable[[str], Env]


@pytest.fixture
def make_env(tmp_path: Path, db_url: str) -> Iterator[MakeEnv]:
    runtimes: list[Runtime] = []

    def build(retention: str) -> Env:
        config = write_retention_config(tmp_path, db_url, retention)
        runtime = prepare_runtime(load_settings(config))
        runtimes.append(runtime)
        store = runtime.consent
        seed_purpose(store, PURPOSE)
        for patient_id in ("P-REFUSED", "P-GONE", "P-OTHER"):
            seed_patient(store, patient_id)
        env = Env(config, runtime, node_consent_sync(runtime), make_files(tmp_path))
        env.store(*(name for name in env.files if name != "g2"))
        # opt-in purpose, nobody asked yet: every regional job is held for consent
        regional = {s for (_, dest), s in env.jobs().items() if dest == "regional"}
        assert regional == {JobState.HELD}
        env.settle_pacs(
            {
                **{name: "done" for name in ("ct0", "ct1", "ct2", "mr0", "s2a", "s2b")},
                "mr1": "failed",  # a dead letter an operator may retry
                # mr2: still queued for the PACS
                "mr3": "sending",
                **{name: "done" for name in ("g0", "g1", "o0", "o1")},
            }
        )
        return env

    yield build
    for runtime in runtimes:
        runtime.close()


def recount(runtime: Runtime) -> None:
    """Every stored counter and ModalitiesInStudy equals a recount of the rows below it."""
    with runtime.sessions() as session:
        for series in session.scalars(select(Series)):
            count = session.scalar(select(func.count()).where(Instance.series_pk == series.id))
            assert series.number_of_instances == count, series.series_instance_uid
        for study in session.scalars(select(Study)):
            series_rows = list(session.scalars(select(Series).where(Series.study_pk == study.id)))
            instances = session.scalar(
                select(func.count())
                .select_from(Instance)
                .join(Series, Series.id == Instance.series_pk)
                .where(Series.study_pk == study.id)
            )
            assert study.number_of_series == len(series_rows), study.study_instance_uid
            assert study.number_of_instances == instances, study.study_instance_uid
            modalities = [m for m in study.modalities.split("\\") if m]
            assert sorted(modalities) == sorted({s.modality for s in series_rows if s.modality})
        for patient in session.scalars(select(Patient)):
            assert session.scalar(select(func.count()).where(Study.patient_pk == patient.id))


ALL = {"ct0", "ct1", "ct2", "mr0", "mr1", "mr2", "mr3", "s2a", "s2b", "g0", "g1", "o0", "o1"}
UNNEEDED = {"ct0", "ct1", "ct2", "mr0", "s2a", "s2b"}  # P-REFUSED, every job done or dropped


def test_delete_unneeded_removes_what_no_route_needs_after_a_refusal(
    make_env: MakeEnv, db_url: str, tmp_path: Path
) -> None:
    env = make_env("delete-unneeded")
    assert env.present() == env.indexed(db_url) == ALL
    before = env.status()
    assert before == {"patients": 3, "studies": 4, "series": 5, "instances": 13}
    refused_name = "NAME" + "P-REFUSED".replace("-", "")

    assert env.refuse("P-REFUSED") == 9  # P-REFUSED's held regional jobs were dropped

    # gone from disk and from the index: the instances whose jobs are all done or dropped
    assert env.present() == env.indexed(db_url) == ALL - UNNEEDED
    assert env.status() == {"patients": 3, "studies": 3, "series": 3, "instances": 7}
    # kept: a failed PACS job (may be retried), a PACS job still queued, one being sent
    jobs = env.jobs()
    assert {jobs[(n, "pacs")] for n in ("mr1", "mr2", "mr3")} == {"failed", "ready", "sending"}
    assert {jobs[(n, "regional")] for n in ("mr1", "mr2", "mr3")} == {JobState.DROPPED}
    # the deleted instances' forward jobs went with them; other patients are untouched
    assert {name for name, _ in jobs} == ALL - UNNEEDED
    assert jobs[("g0", "regional")] == jobs[("o0", "regional")] == JobState.HELD
    assert not list((tmp_path / "data" / "tmp").iterdir()), "files left in the staging area"

    recount(env.runtime)
    with env.runtime.sessions() as session:
        study1 = session.scalars(
            select(Study).where(Study.study_instance_uid == env.files["ct0"].study_uid)
        ).one()
        assert (study1.modalities, study1.number_of_series, study1.number_of_instances) == (
            "MR",
            1,
            3,
        )
        assert (
            session.scalars(
                select(Study).where(Study.study_instance_uid == env.files["s2a"].study_uid)
            ).all()
            == []
        )
        assert session.scalars(select(Patient).where(Patient.patient_id == "P-REFUSED")).one()

    report = env.runtime.consent.verify_audit()
    assert report.ok, report.problem
    entries = env.retention_audit()
    by_study = {e.target: json.loads(e.details) for e in entries}
    assert set(by_study) == {env.files["ct0"].study_uid, env.files["s2a"].study_uid}
    patient_pk = env.runtime.consent.find_patient(ISSUER, "P-REFUSED")
    study1_audit = by_study[env.files["ct0"].study_uid]
    assert study1_audit["instances"] == 4
    assert study1_audit["series"] == {
        env.files["ct0"].series_uid: 3,
        env.files["mr0"].series_uid: 1,
    }
    assert (study1_audit["series_removed"], study1_audit["study_removed"]) == (1, False)
    assert study1_audit["jobs_deleted"] == {"pacs/done": 4, "regional/dropped": 4}
    assert (study1_audit["patient_pk"], study1_audit["purpose"]) == (patient_pk, PURPOSE)
    study2_audit = by_study[env.files["s2a"].study_uid]
    assert (study2_audit["instances"], study2_audit["study_removed"]) == (2, True)
    assert study2_audit["patient_removed"] is False
    assert all(refused_name not in e.details and "BENCH" not in e.details for e in entries)

    # applying the change again (another node, the sweep) deletes nothing more
    assert env.sync.apply(ConsentChange(patient_pk or 0, PURPOSE, Outcome.DENY)) == 0
    assert len(env.retention_audit()) == 2
    assert env.present() == ALL - UNNEEDED


def test_a_series_whose_rows_were_deleted_can_be_stored_again(
    make_env: MakeEnv, db_url: str
) -> None:
    env = make_env("delete-unneeded")
    env.refuse("P-GONE")
    # P-GONE's only series was emptied: series, study and patient rows are gone
    assert not {"g0", "g1"} & (env.present() | env.indexed(db_url))
    assert env.status() == {"patients": 2, "studies": 3, "series": 4, "instances": 11}
    (entry,) = env.retention_audit()
    assert json.loads(entry.details)["patient_removed"] is True

    # the next instance of that series arrives: it is stored under new rows (the node's
    # series cache was cleared, or it would name the deleted series)
    env.store("g2")
    assert "g2" in env.present() and "g2" in env.indexed(db_url)
    assert env.status() == {"patients": 3, "studies": 4, "series": 5, "instances": 12}
    recount(env.runtime)
    with env.runtime.sessions() as session:
        series = session.scalars(
            select(Series).where(Series.series_instance_uid == env.files["g2"].series_uid)
        ).one()
        assert series.number_of_instances == 1
    jobs = env.jobs()  # routed as usual: care team ready, refused purpose dropped at once
    assert (jobs[("g2", "pacs")], jobs[("g2", "regional")]) == ("ready", "dropped")
    assert env.runtime.consent.verify_audit().ok


def test_keep_deletes_nothing(make_env: MakeEnv, db_url: str) -> None:
    env = make_env("keep")
    assert env.runtime.settings.router.retention == "keep"
    assert env.refuse("P-REFUSED") == 9
    assert env.refuse("P-GONE") == 2
    assert env.present() == env.indexed(db_url) == ALL
    assert env.status() == {"patients": 3, "studies": 4, "series": 5, "instances": 13}
    jobs = env.jobs()
    assert {jobs[(n, "regional")] for n in UNNEEDED | {"g0", "g1"}} == {JobState.DROPPED}
    assert env.retention_audit() == []
    recount(env.runtime)


def test_a_failing_retention_never_stops_consent_changes(make_env: MakeEnv) -> None:
    env = make_env("delete-unneeded")

    class Broken(Retention):
        def after_consent_drop(self, patient_pk: int, purpose: str, reason: str) -> RetentionReport:
            raise OSError("disk gone")

    runtime = env.runtime
    sync = ConsentSync(
        runtime.queue,
        runtime.sessions,
        runtime.consent.decide,
        runtime.consent.changes_since,
        runtime.consent.last_event_id,
        retention=Broken("delete-unneeded", runtime.sessions, runtime.files),
    )
    runtime.consent.refuse(
        issuer=ISSUER, patient_id="P-GONE", purpose=PURPOSE, channel="cli", actor="desk"
    )
    assert sync.poll() == 2
    assert {env.jobs()[(n, "regional")] for n in ("g0", "g1")} == {JobState.DROPPED}
    assert {"g0", "g1"} <= env.present()  # nothing deleted: the copies are kept


# -- files --------------------------------------------------------------------------------


def identity(path: Path) -> tuple[int, int, int, int]:
    info = os.stat(path)
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def stored_long_ago(path: Path, content: bytes) -> None:
    """Write an archive file as the store did, a minute before the deletion."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    past = os.stat(path).st_mtime_ns - 60 * 10**9
    os.utime(path, ns=(past, past))


@pytest.mark.parametrize("how", ["renamed-into-place", "rewritten-in-place"])
def test_file_removal_keeps_a_copy_stored_again_after_the_deletion(
    tmp_path: Path, how: str
) -> None:
    files = InstanceFiles(tmp_path)
    files.prepare()
    relative = InstanceFiles.relative_path_for("1.2.3.4")
    path = files.root / relative
    stored_long_ago(path, b"first copy")
    doomed = DoomedFile(relative, identity(path))  # what the index named at deletion

    # the same SOP Instance UID is stored again before that file was removed: a new file
    # renamed over it, or (ingest journal) the same file rewritten, same size
    if how == "renamed-into-place":
        staged = files.tmp / "new.part"
        staged.write_bytes(b"again copy")
        os.replace(staged, path)
    else:
        with path.open("r+b") as fh:
            fh.truncate(0)
            fh.write(b"again copy")
    assert remove_if_unchanged(files, doomed) is False
    assert path.read_bytes() == b"again copy"
    assert list(files.tmp.iterdir()) == []


def test_file_removal_removes_the_file_the_deleted_row_named(tmp_path: Path) -> None:
    files = InstanceFiles(tmp_path)
    files.prepare()
    relative = InstanceFiles.relative_path_for("1.2.3.4")
    path = files.root / relative
    stored_long_ago(path, b"first copy")
    doomed = DoomedFile(relative, identity(path))
    assert remove_if_unchanged(files, doomed) is True
    assert not path.exists() and list(files.tmp.iterdir()) == []
    # already gone, or missing when the row was deleted: nothing to do
    assert remove_if_unchanged(files, doomed) is False
    assert remove_if_unchanged(files, DoomedFile(relative, None)) is False


# -- configuration ------------------------------------------------------------------------


def test_retention_setting_is_validated_and_documented(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[router]\nretention = "delete-unneeded"\n', encoding="utf-8")
    assert load_settings(good).router.retention == "delete-unneeded"
    absent = tmp_path / "absent.toml"
    absent.write_text("[router]\nmax_attempts = 3\n", encoding="utf-8")
    assert load_settings(absent).router.retention == "keep"
    # the documented default file names the key with its default
    assert load_settings(REPO_CONFIG).router.retention == "keep"
    assert 'retention = "keep"' in REPO_CONFIG.read_text(encoding="utf-8")

    for value in ('"delete"', '"KEEP"', "true", '""'):
        bad = tmp_path / "bad.toml"
        bad.write_text(f"[router]\nretention = {value}\n", encoding="utf-8")
        with pytest.raises(ConfigError) as caught:
            load_settings(bad)
        message = str(caught.value)
        assert str(bad) in message and "router.retention" in message, message
        assert "\n" not in message

    # start-up stops with that one line and exit code 2
    result = CliRunner().invoke(cli, ["--config", str(bad), "status"])
    assert result.exit_code == 2, result.output
    assert "router.retention" in result.stderr and str(bad) in result.stderr
