"""The audit trail: tamper-evident consent records, traced accesses, no patient data in logs.

``audit verify`` checks the hash chain and the consent records it vouches for (events,
notices, the decision cache); purpose-bound queries and retrievals, CLI reads of patient
data and routing decisions taken on consent are audited; the node's log, the CLI's
stderr, ``/metrics`` and ``/healthz`` hold no name, Patient ID, INS or birth date.
Runs on SQLite and PostgreSQL (``db_url``).
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from pydicom.uid import generate_uid
from sqlalchemy import Engine, text

from cli.database import make_engine, make_sessions
from cli.main import cli
from consent.decision import Outcome
from consent.service import ConsentStore
from tests.conftest import (
    ISSUER,
    MODALITY_AE,
    PACS_AE,
    RecordingScp,
    RunningNode,
    ServeProcess,
    consentgate_cli,
    free_port,
    job_states,
    run_tool,
    seed_purpose,
    serve_setup,
    start_node,
    wait_until,
)
from tests.identity_support import (
    PURPOSE,
    QR_AE,
    add_patient,
    c_find,
    c_get,
    c_move,
    make_ds,
    regional_settings,
    store,
)
from tests.test_consent_support import (
    INS_F_1985,
    NOTICE_V1,
    StepClock,
    add_alice,
    migrated_store,
)

KEY = {"issuer": "CHR-METZ", "patient_id": "IPP001"}
REGIONAL = "regional"


@pytest.fixture
def env(db_url: str) -> Iterator[tuple[ConsentStore, Engine]]:
    """A store where Alice granted, then withdrew, the purpose ``regional``."""
    with migrated_store(db_url) as (consent, engine):
        consent.add_purpose(REGIONAL, "Partage", notice_text=NOTICE_V1, actor="dpo")
        add_alice(consent)
        consent.grant(**KEY, purpose=REGIONAL, channel="desk", actor="desk1")
        consent.withdraw(**KEY, purpose=REGIONAL, channel="remote", actor="portal")
        assert consent.verify_audit().ok
        yield consent, engine


def _execute(engine: Engine, sql: str, **params: object) -> None:
    with engine.begin() as connection:
        connection.execute(text(sql), params)


def _audit_rows(engine: Engine) -> list[dict[str, object]]:
    with engine.connect() as connection:
        result = connection.execute(text("SELECT * FROM consent_audit ORDER BY seq"))
        return [dict(row._mapping) for row in result]


# ---------------------------------------------------------------- tamper evidence


def test_edited_consent_event_is_detected(env: tuple[ConsentStore, Engine]) -> None:
    """A consent event rewritten in place (a withdrawal turned into a grant at the desk,
    the decision cache edited to match) makes ``audit verify`` fail: each event's audit
    entry carries a digest of the whole event row. The consent log is the proof GDPR
    Art. 7 asks for (who, when, which notice, which channel); without the check the
    history and FHIR export would show a consent the patient withdrew, untraced."""
    consent, engine = env
    withdrawal = consent.history(**KEY)[-1]["id"]
    _execute(
        engine,
        "UPDATE consent_event SET decision = 'permit', action = 'grant', channel = 'desk' "
        "WHERE id = :id",
        id=withdrawal,
    )
    _execute(engine, "UPDATE consent_state SET decision = 'permit'")  # and the cache
    assert [e["decision"] for e in consent.history(**KEY)] == ["permit", "permit"]
    report = consent.verify_audit()
    assert not report.ok, "an edited consent event passes 'audit verify'"


def test_edited_consent_state_is_detected(env: tuple[ConsentStore, Engine]) -> None:
    """An edited decision cache (``consent_state`` set to permit for a withdrawn patient)
    makes ``audit verify`` fail: the cache must equal what the consent log gives.
    ``decide()`` reads only the cache, so an unnoticed edit would let a withdrawn
    patient's data leave while the log and the audit chain still look intact."""
    consent, engine = env
    _execute(engine, "UPDATE consent_state SET decision = 'permit'")
    with make_sessions(engine)() as session:
        pk = session.scalar(text("SELECT patient_pk FROM consent_state"))
    leaked = consent.decide(pk, REGIONAL).outcome is Outcome.PERMIT
    report = consent.verify_audit()
    assert not report.ok, f"consent_state edited (decide() now permits: {leaked}); verify ok"


def test_edited_notice_text_is_detected(env: tuple[ConsentStore, Engine]) -> None:
    """A notice text edited in place makes ``audit verify`` fail: the text must still
    have its recorded SHA-256, and that hash must be the one the ``notice.add`` audit
    entry recorded. Otherwise the store would hand out another text than the one the
    patient consented to, under the original hash."""
    consent, engine = env
    _execute(engine, "UPDATE consent_notice_version SET text = 'Vos images sont vendues.'")
    served = consent.notice(REGIONAL, 1)
    report = consent.verify_audit()
    assert not report.ok, f"notice text edited ({served.text!r} served under the old sha256)"


def test_audit_tail_truncation_is_detected_from_the_consent_log(
    env: tuple[ConsentStore, Engine],
) -> None:
    """Deleting the last audit entry (the withdrawal's) leaves a valid, shorter chain,
    yet ``audit verify`` fails: every consent event has an audit entry written in its
    transaction, so a consent event without one proves that entries were removed.
    Without the check a consent change could lose its trace without anyone noticing."""
    consent, engine = env
    last = _audit_rows(engine)[-1]
    assert last["action"] == "consent.withdraw"
    _execute(engine, "DELETE FROM consent_audit WHERE seq = :seq", seq=last["seq"])
    report = consent.verify_audit()
    assert not report.ok, "the withdrawal's audit entry was removed; verify still ok"


def test_concurrent_writers_on_two_engines_keep_one_chain_and_the_latest_state(
    db_url: str,
) -> None:
    """Two stores on two engines (as two processes) record decisions for the same patient
    and purpose at the same moment: every event counts, the chain stays valid, each event
    supersedes the one before it, and the state is the latest event's decision. A lost
    or forked update would leave a decision untraced or a stale one in force."""
    with migrated_store(db_url) as (first, _engine):
        first.add_purpose(REGIONAL, "Partage", notice_text=NOTICE_V1, actor="dpo")
        add_alice(first)
        other_engine = make_engine(db_url, pool_size=4)
        try:
            second = ConsentStore(make_sessions(other_engine), StepClock())
            errors: list[BaseException] = []
            start = threading.Barrier(2)

            def work(consent: ConsentStore, decision: str) -> None:
                try:
                    start.wait(10)
                    for _ in range(8):
                        consent.record_consent(
                            **KEY,
                            purpose=REGIONAL,
                            decision=decision,  # type: ignore[arg-type]
                            channel="api",
                            actor=decision,
                        )
                except BaseException as exc:
                    errors.append(exc)

            threads = [
                threading.Thread(target=work, args=(first, "permit")),
                threading.Thread(target=work, args=(second, "deny")),
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not errors, errors
            history = first.history(**KEY)
            assert len(history) == 16
            assert [e["supersedes"] for e in history[1:]] == [e["id"] for e in history[:-1]]
            report = first.verify_audit()
            assert report.ok and report.entries == 2 + 16, report.problem
            pk = first.find_patient(**KEY)
            expected = Outcome.PERMIT if history[-1]["decision"] == "permit" else Outcome.DENY
            assert first.decide(pk, REGIONAL).outcome is expected
            assert second.decide(pk, REGIONAL).outcome is expected
            second.close()
        finally:
            other_engine.dispose()


# ---------------------------------------------------------------- accesses and decisions


@pytest.fixture
def node(tmp_path: Path, db_url: str) -> Iterator[RunningNode]:
    """A node with the purpose-bound peer ``regional`` (AE REGIONALQR) and a route to it
    requiring ``regional-sharing``; P-GRANTED granted it, P-REFUSED refused it."""
    running = start_node(regional_settings(tmp_path, db_url))
    try:
        consent = running.runtime.consent
        seed_purpose(consent, PURPOSE)
        for pid in ("P-GRANTED", "P-REFUSED"):
            add_patient(running, pid)
        consent.grant(
            issuer=ISSUER, patient_id="P-GRANTED", purpose=PURPOSE, channel="cli", actor="t"
        )
        consent.refuse(
            issuer=ISSUER, patient_id="P-REFUSED", purpose=PURPOSE, channel="cli", actor="t"
        )
        yield running
    finally:
        running.stop()
        running.runtime.close()


def _entries_after(node: RunningNode, seq: int) -> list[dict[str, object]]:
    return [r for r in _audit_rows(node.runtime.engine) if int(str(r["seq"])) > seq]


def _head(node: RunningNode) -> int:
    rows = _audit_rows(node.runtime.engine)
    return int(str(rows[-1]["seq"])) if rows else 0


def test_refused_and_failed_requests_of_a_purpose_bound_peer_are_audited(
    node: RunningNode,
) -> None:
    """A purpose-bound peer's C-MOVE to an unknown destination (0xA801) and its C-FIND
    with a bad level (0xA900) are audited (``dicom.move``, ``dicom.find``) like the
    successful ones, with their status. Refused and failed attempts are what an
    auditor looks for first (ATNA logs them with a failure outcome); without them an
    access attempt under a purpose would leave no trace."""
    before = _head(node)
    assert c_move(node, QR_AE, "NOWHERE", QueryRetrieveLevel="STUDY", PatientID="P-GRANTED") == (
        0xA801
    )
    c_find(node, QR_AE, expect=0xA900, QueryRetrieveLevel="BOGUS", PatientID="P-GRANTED")
    actions = [str(r["action"]) for r in _entries_after(node, before)]
    assert "dicom.move" in actions and "dicom.find" in actions, f"audited: {actions}"


def test_audit_of_a_retrieve_names_what_was_accessed(node: RunningNode) -> None:
    """The audit entry of a purpose-bound C-GET names what was sent: the patients
    (issuer/Patient ID) and the studies, besides the counts. Without them the DPO cannot
    answer "who received this patient's images" (R.6113-9-2 traceability of accesses;
    ATNA 110103/110104 name the patient and study as participant objects)."""
    study = generate_uid()
    assert store(node, make_ds("P-GRANTED", study_uid=study)) == [0]
    before = _head(node)
    status, got = c_get(node, QR_AE, QueryRetrieveLevel="STUDY", StudyInstanceUID=study)
    assert status == 0x0000 and len(got) == 1
    (entry,) = [r for r in _entries_after(node, before) if r["action"] == "dicom.get"]
    consent = node.runtime.consent
    pk = consent.find_patient(ISSUER, "P-GRANTED")
    details = json.loads(str(entry["details"]))
    named = study in json.dumps(details) + str(entry["target"]) or any(
        pk == v or (isinstance(v, list) and pk in v) for k, v in details.items() if "patient" in k
    )
    assert named, f"audit entry of the C-GET: target={entry['target']!r} details={details}"


def test_a_routing_refusal_is_audited(node: RunningNode) -> None:
    """An instance of a patient who refused the purpose is dropped at planning and the
    drop is audited (``routing.drop``, once per study, destination and purpose).
    DESIGN.md ("One study coming in", step 4: "Deny: dropped, audited") and invariant 4
    ("every decision ... is traced"): a consent decision that stops data must be
    traceable like one that lets it leave."""
    before = _head(node)
    ds = make_ds("P-REFUSED", study_uid=generate_uid())
    assert store(node, ds) == [0]
    assert job_states(node.runtime)[ds.SOPInstanceUID] == "dropped"
    actions = [str(r["action"]) for r in _entries_after(node, before)]
    assert actions, "the consent refusal that dropped a forward job left no audit entry"


def _cli(tmp_path: Path, db_url: str) -> tuple[CliRunner, Path]:
    config = tmp_path / "consentgate.toml"
    config.write_text(
        f'[node]\ndata_dir = "{(tmp_path / "data").as_posix()}"\ndatabase_url = "{db_url}"\n',
        encoding="utf-8",
    )
    runner = CliRunner()
    assert runner.invoke(cli, ["--config", str(config), "init"]).exit_code == 0
    return runner, config


def test_cli_reads_of_patient_data_are_audited(tmp_path: Path, db_url: str) -> None:
    """``patient show``, ``patient find``, ``consent history`` and ``consent export-fhir``
    each write an audit entry (the patients' primary keys) before showing or exporting a
    patient's identity and consent record. Invariant 4 ("every access by a person is
    traced"); ATNA 110110 Patient Record / 110106 Export: a read is an access too."""
    runner, config = _cli(tmp_path, db_url)
    notice = tmp_path / "notice.txt"
    notice.write_text(NOTICE_V1, encoding="utf-8")
    patient = ["--issuer", "CHR-METZ", "--patient-id", "IPP001"]

    def run(*args: str) -> Result:
        result = runner.invoke(cli, ["--config", str(config), *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result

    run("purpose", "add", REGIONAL, "--name", "Partage", "--notice", str(notice))
    run(
        "patient", "add", *patient, "--birth-name", "Dupont", "--first-name", "Alice",
        "--birth-date", "1985-05-12", "--sex", "F",
    )  # fmt: skip
    run("consent", "grant", *patient, "--purpose", REGIONAL)
    engine = make_engine(db_url, pool_size=1)
    try:
        unaudited = []
        for command in (
            ["patient", "show", *patient],
            ["patient", "find", "Dupont"],
            ["consent", "history", *patient],
            ["consent", "export-fhir", *patient],
        ):
            before = len(_audit_rows(engine))
            run(*command)
            if len(_audit_rows(engine)) == before:
                unaudited.append(" ".join(command[:2]))
    finally:
        engine.dispose()
    assert not unaudited, f"not audited: {unaudited}"


# ---------------------------------------------------------------- no patient data in logs

SECRET_NAME = "ZORGLUB"
SECRET_ID = "PID-SECRET-77"
SECRET_INS = INS_F_1985
INS_OID = "1.2.250.1.213.1.4.8"


def _serve_config(tmp_path: Path, db_url: str, scp: RecordingScp) -> tuple[Path, int, int]:
    return serve_setup(
        tmp_path,
        db_url,
        routes=[{"name": "to-regional", "destinations": ["regional"], "purpose": PURPOSE}],
        peers=[
            {
                "name": "modality",
                "ae_title": MODALITY_AE,
                "host": "127.0.0.1",
                "port": 104,
                "services": ["echo", "store"],
                "issuer": ISSUER,
            },
            {
                "name": "pacs",
                "ae_title": PACS_AE,
                "host": "127.0.0.1",
                "port": free_port(),
                "services": ["echo", "find", "move", "get"],
            },
            {
                "name": "regional",
                "ae_title": scp.ae_title,
                "host": "127.0.0.1",
                "port": scp.port,
                "services": ["echo", "find", "move", "get"],
                "purpose": PURPOSE,
            },
        ],
    )


def _cli_ok(config: Path, *args: object) -> str:
    """Run a CLI command in its own process; return its stderr (it must succeed)."""
    result = consentgate_cli(config, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stderr


def _findscu(port: int, *keys: str) -> None:
    args = [a for key in keys for a in ("-k", key)]
    found = run_tool("findscu", "-S", "-aet", PACS_AE, "-aec", "CONSENTGATE", *args,
                     "127.0.0.1", port)  # fmt: skip
    assert found.returncode == 0, found.stdout + found.stderr


def test_a_malformed_birth_date_is_not_logged_by_serve(tmp_path: Path, db_url: str) -> None:
    """A birth date sent in ISO form (``1955-11-22``, a common mistake of senders) is not
    a valid DA; when a C-FIND answer carries it, pydicom warns with the value quoted
    (``Invalid value for VR DA``), as a log record and as a Python warning. The node and
    forwarder processes silence pydicom's warnings below DEBUG, so the patient's year
    and month of birth never reach ``serve``'s log at the default level."""
    scp = RecordingScp("REGIONALQR").start()
    config, dicom_port, http_port = _serve_config(tmp_path, db_url, scp)
    notice = tmp_path / "notice.txt"
    notice.write_text(NOTICE_V1, encoding="utf-8")
    _cli_ok(config, "purpose", "add", PURPOSE, "--name", "Partage", "--notice", notice)
    _cli_ok(
        config, "patient", "add", "--issuer", ISSUER, "--patient-id", SECRET_ID,
        "--birth-name", SECRET_NAME, "--first-name", "Alice", "--birth-date", "1955-11-22",
        "--sex", "F",
    )  # fmt: skip
    _cli_ok(config, "consent", "grant", "--issuer", ISSUER, "--patient-id", SECRET_ID,
            "--purpose", PURPOSE)  # fmt: skip
    ds = make_ds(SECRET_ID, study_uid=generate_uid(), name=f"{SECRET_NAME}^ALICE", sex="F",
                 birth="1955-11-22")  # fmt: skip
    path = tmp_path / "malformed.dcm"
    ds.save_as(path, enforce_file_format=True)
    serve = ServeProcess(config, http_port, tmp_path / "serve.log")
    try:
        serve.start()
        sent = run_tool("storescu", "-aet", MODALITY_AE, "-aec", "CONSENTGATE",
                        "127.0.0.1", dicom_port, path)  # fmt: skip
        assert sent.returncode == 0, sent.stdout + sent.stderr
        # the care team lists the study with its birth date; and a query by birth date
        _findscu(dicom_port, "QueryRetrieveLevel=STUDY", f"PatientID={SECRET_ID}",
                 "PatientBirthDate", "PatientName")  # fmt: skip
        _findscu(dicom_port, "QueryRetrieveLevel=STUDY", "PatientBirthDate=1955-11-22",
                 "PatientID")  # fmt: skip
        serve.signal(signal.SIGTERM)
        assert serve.wait(30) == 0
    finally:
        serve.kill()
        scp.stop()
    log = serve.log()
    hits = [line for line in log.splitlines() if "1955-11" in line or "195511" in line]
    assert not hits, "patient birth date in the serve log:\n" + "\n".join(hits[:10])


def test_no_patient_data_in_serve_forwarder_cli_metrics_or_healthz(
    tmp_path: Path, db_url: str
) -> None:
    """A real ``serve`` (forwarder process) with a purpose route: a consented patient
    (qualified INS) forwarded, a refused one dropped, queries by name and birth date from
    the purpose-bound peer, an unknown caller, a withdrawal and the consent reads made
    with the CLI while it serves. Neither the node's log (its forwarder process
    included), nor the CLI's stderr, nor ``/metrics`` or ``/healthz`` contains a name,
    Patient ID, INS or birth date: ordinary logs and monitoring are not protected as
    health data are."""
    scp = RecordingScp("REGIONALQR").start()
    config, dicom_port, http_port = _serve_config(tmp_path, db_url, scp)
    notice = tmp_path / "notice.txt"
    notice.write_text(NOTICE_V1, encoding="utf-8")
    cli_stderr = _cli_ok(config, "purpose", "add", PURPOSE, "--name", "Partage", "--notice", notice)
    refused_id = "PID-REFUSED-88"
    people = [
        (SECRET_ID, SECRET_NAME, "1985-05-12", ["--ins", SECRET_INS, "--identity-status", "QUAL"]),
        (refused_id, "QUIMPERLE", "1944-02-29", []),
    ]
    for pid, name, birth, extra in people:
        cli_stderr += _cli_ok(
            config, "patient", "add", "--issuer", ISSUER, "--patient-id", pid,
            "--birth-name", name, "--first-name", "Alice", "--birth-date", birth,
            "--sex", "F", *extra,
        )  # fmt: skip
    who = ["--issuer", ISSUER, "--patient-id"]
    cli_stderr += _cli_ok(config, "consent", "grant", *who, SECRET_ID, "--purpose", PURPOSE)
    cli_stderr += _cli_ok(config, "consent", "refuse", *who, refused_id, "--purpose", PURPOSE)
    granted = make_ds(SECRET_ID, study_uid=generate_uid(), name=f"{SECRET_NAME}^ALICE",
                      sex="F", birth="19850512", ins=(INS_OID, SECRET_INS))  # fmt: skip
    refused = make_ds(refused_id, study_uid=generate_uid(), name="QUIMPERLE^ALICE",
                      sex="F", birth="19440229")  # fmt: skip
    paths = []
    for n, ds in enumerate((granted, refused)):
        paths.append(tmp_path / f"{n}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    serve = ServeProcess(config, http_port, tmp_path / "serve.log")
    try:
        serve.start()
        sent = run_tool("storescu", "-aet", MODALITY_AE, "-aec", "CONSENTGATE",
                        "127.0.0.1", dicom_port, *paths)  # fmt: skip
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_until(lambda: scp.uids() == [granted.SOPInstanceUID], 20, "the forward")
        run_tool("storescu", "-aet", "INTRUDER", "-aec", "CONSENTGATE", "127.0.0.1",
                 dicom_port, paths[0])  # fmt: skip
        for key in (f"PatientName={SECRET_NAME}*", "PatientBirthDate=19440229"):
            found = run_tool("findscu", "-S", "-aet", "REGIONALQR", "-aec", "CONSENTGATE",
                             "-k", "QueryRetrieveLevel=STUDY", "-k", key, "-k", "PatientID",
                             "127.0.0.1", dicom_port)  # fmt: skip
            assert found.returncode == 0, found.stderr
        cli_stderr += _cli_ok(config, "consent", "withdraw", *who, SECRET_ID, "--purpose", PURPOSE)
        for command in (["consent", "show"], ["consent", "history"], ["consent", "export-fhir"],
                        ["patient", "show"]):  # fmt: skip
            cli_stderr += _cli_ok(config, *command, *who, SECRET_ID)
        cli_stderr += _cli_ok(config, "audit", "verify")
        metrics = serve.http_get("/metrics")[1].decode()
        health = serve.healthz()[1].decode()
        serve.signal(signal.SIGTERM)
        assert serve.wait(30) == 0
    finally:
        serve.kill()
        scp.stop()
    log = serve.log()
    assert "forward" in metrics and "ok" in health and "ready" in log
    secrets = (SECRET_NAME, SECRET_ID, SECRET_INS, "19850512", "1985-05-12", "QUIMPERLE",
               refused_id, "19440229", "1944-02-29")  # fmt: skip
    for where, body in (("serve log", log), ("CLI stderr", cli_stderr),
                        ("/metrics", metrics), ("/healthz", health)):  # fmt: skip
        hits = [line for line in body.splitlines() if any(s in line for s in secrets)]
        assert not hits, f"patient data in {where}:\n" + "\n".join(hits[:10])
