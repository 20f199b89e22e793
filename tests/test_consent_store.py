"""The consent store on SQLite and PostgreSQL: purposes, patients, decisions, resolution."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine, select, text

from cli.database import make_engine, make_sessions
from consent.decision import ConsentChange, Decision, Outcome
from consent.errors import (
    DuplicatePatient,
    DuplicatePurpose,
    InvalidIdentity,
    InvalidRequest,
    InvalidTransition,
    UnknownEvent,
    UnknownPatient,
    UnknownPurpose,
)
from consent.identity import validate_matricule
from consent.models import ConsentState
from consent.service import ConsentStore
from tests.test_consent_support import (
    INS_F_1985,
    INS_M_1960,
    NOTICE_V1,
    NOTICE_V2,
    StepClock,
    add_alice,
    ins_key,
    migrated_store,
)

PURPOSE = "regional"
KEY = {"issuer": "CHR-METZ", "patient_id": "IPP001"}


@pytest.fixture
def env(db_url: str) -> Iterator[tuple[ConsentStore, Engine]]:
    with migrated_store(db_url) as pair:
        yield pair


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsentStore]:
    url = f"sqlite:///{tmp_path_factory.mktemp('consent') / 'consent.db'}"
    with migrated_store(url) as (store, _engine):
        yield store


@pytest.fixture
def store(env: tuple[ConsentStore, Engine]) -> ConsentStore:
    return env[0]


def _setup(store: ConsentStore, model: str = "opt-in") -> int:
    store.add_purpose(PURPOSE, "Partage régional", model=model, notice_text=NOTICE_V1, actor="dpo")
    return add_alice(store)


# ---------------------------------------------------------------------- purposes and notices


def test_purpose_notice_versions_and_sha256(store: ConsentStore) -> None:
    info = store.add_purpose(
        PURPOSE, "Partage régional", reference="REG-1", notice_text=NOTICE_V1, actor="dpo"
    )
    assert (info.code, info.model, info.notice_version) == (PURPOSE, "opt-in", 1)
    assert info.notice_sha256 == hashlib.sha256(NOTICE_V1.encode("utf-8")).hexdigest()
    assert store.add_notice(PURPOSE, NOTICE_V2, actor="dpo") == 2
    latest = store.notice(PURPOSE)
    assert (latest.version, latest.text) == (2, NOTICE_V2)
    assert store.notice(PURPOSE, 1).text == NOTICE_V1  # kept exactly, trailing newline included
    store.add_purpose("research", "Recherche", model="opt-out", actor="dpo")
    listed = {p.code: p for p in store.list_purposes()}
    assert listed[PURPOSE].notice_version == 2
    assert listed["research"].notice_version is None and listed["research"].model == "opt-out"


def test_purpose_errors(store: ConsentStore) -> None:
    store.add_purpose(PURPOSE, "Partage", actor="dpo")
    with pytest.raises(DuplicatePurpose):
        store.add_purpose(PURPOSE, "Encore", actor="dpo")
    with pytest.raises(InvalidRequest):
        store.add_purpose("bad code", "x", actor="dpo")
    with pytest.raises(InvalidRequest):
        store.add_purpose("x", "x", model="maybe", actor="dpo")
    with pytest.raises(InvalidRequest):
        store.add_notice(PURPOSE, "   ", actor="dpo")
    with pytest.raises(UnknownPurpose):
        store.add_notice("nope", "text", actor="dpo")


# ---------------------------------------------------------------------- decisions


def test_opt_in_grant_withdraw(store: ConsentStore) -> None:
    pk = _setup(store)
    assert store.decide(pk, PURPOSE).outcome is Outcome.UNDECIDED
    with pytest.raises(InvalidTransition, match="nothing to withdraw"):
        store.withdraw(**KEY, purpose=PURPOSE, channel="desk", actor="desk1")
    store.grant(**KEY, purpose=PURPOSE, channel="desk", actor="desk1")
    assert store.decide(pk, PURPOSE) == Decision(Outcome.PERMIT, "consent given")
    store.withdraw(**KEY, purpose=PURPOSE, channel="remote", actor="patient-portal")
    assert store.decide(pk, PURPOSE).outcome is Outcome.DENY
    with pytest.raises(InvalidTransition):
        store.withdraw(**KEY, purpose=PURPOSE, channel="desk", actor="desk1")
    history = store.history(**KEY)
    assert [e["action"] for e in history] == ["grant", "withdraw"]
    assert [e["effective_status"] for e in history] == ["inactive", "active"]
    assert history[1]["supersedes"] == history[0]["id"]
    assert history[0]["notice_version"] == 1


def test_refuse_then_grant_latest_wins(store: ConsentStore) -> None:
    pk = _setup(store)
    store.refuse(**KEY, purpose=PURPOSE, channel="paper", actor="desk1")
    assert store.decide(pk, PURPOSE).outcome is Outcome.DENY
    store.grant(**KEY, purpose=PURPOSE, channel="desk", actor="desk1")
    store.record_consent(**KEY, purpose=PURPOSE, decision="deny", channel="cli", actor="x")
    store.grant(**KEY, purpose=PURPOSE, channel="desk", actor="desk1")
    assert store.decide(pk, PURPOSE).outcome is Outcome.PERMIT
    history = store.history(**KEY, purpose=PURPOSE)
    assert [e["action"] for e in history] == ["refuse", "grant", "withdraw", "grant"]
    assert [e["effective_status"] for e in history] == ["inactive"] * 3 + ["active"]


def test_opt_out_non_opposition(store: ConsentStore) -> None:
    pk = _setup(store, model="opt-out")
    assert store.decide(pk, PURPOSE) == Decision(Outcome.PERMIT, "no opposition (opt-out purpose)")
    store.withdraw(**KEY, purpose=PURPOSE, channel="remote", actor="portal")  # opposition
    assert store.decide(pk, PURPOSE).outcome is Outcome.DENY


def test_permit_needs_a_notice_and_representative_needs_a_name(store: ConsentStore) -> None:
    store.add_purpose("bare", "Sans notice", actor="dpo")
    add_alice(store)
    with pytest.raises(InvalidTransition, match="no notice"):
        store.grant(**KEY, purpose="bare", channel="desk", actor="desk1")
    store.refuse(**KEY, purpose="bare", channel="desk", actor="desk1")  # refusing needs none
    store.add_notice("bare", NOTICE_V1, actor="dpo")
    with pytest.raises(InvalidRequest, match="representative"):
        store.grant(**KEY, purpose="bare", channel="desk", actor="d", performed_by="representative")
    with pytest.raises(InvalidTransition, match="version 7"):
        store.grant(**KEY, purpose="bare", channel="desk", actor="d", notice_version=7)
    store.grant(
        **KEY,
        purpose="bare",
        channel="desk",
        actor="d",
        performed_by="representative",
        representative_name="Jean Dupont (père)",
        evidence={"form": "F-12"},
    )
    last = store.history(**KEY)[-1]
    assert last["representative_name"] == "Jean Dupont (père)"
    assert json.loads(last["evidence"]) == {"form": "F-12"}


def test_unknown_patient_and_purpose(store: ConsentStore) -> None:
    pk = _setup(store)
    assert store.decide(None, PURPOSE) == Decision(Outcome.UNDECIDED, "unknown patient")
    assert store.decide(pk + 1000, PURPOSE).outcome is Outcome.UNDECIDED
    assert store.decide(pk, "nope") == Decision(Outcome.DENY, "unknown purpose")
    with pytest.raises(UnknownPatient):
        store.grant(issuer="CHR-METZ", patient_id="NOPE", purpose=PURPOSE, channel="cli", actor="x")
    with pytest.raises(UnknownPurpose):
        store.grant(**KEY, purpose="nope", channel="cli", actor="x")
    with pytest.raises(InvalidRequest):
        store.grant(**KEY, purpose=PURPOSE, channel="fax", actor="x")


def test_error_while_deciding_denies(env: tuple[ConsentStore, Engine]) -> None:
    store, engine = env
    pk = _setup(store)
    store.grant(**KEY, purpose=PURPOSE, channel="desk", actor="desk1")
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE consent_state"))
    decision = store.decide(pk, PURPOSE)
    assert decision.outcome is Outcome.DENY
    assert decision.reason.startswith("error: ")
    assert set(store.decide_many([pk], PURPOSE).values()) == {decision}


def test_entered_in_error_falls_back_to_previous_decision(store: ConsentStore) -> None:
    pk = _setup(store)
    refused = store.refuse(**KEY, purpose=PURPOSE, channel="desk", actor="desk1")
    wrong = store.grant(**KEY, purpose=PURPOSE, channel="desk", actor="desk1")
    assert store.decide(pk, PURPOSE).outcome is Outcome.PERMIT
    marker = store.mark_entered_in_error(wrong, actor="desk1", reason="wrong patient")
    assert store.decide(pk, PURPOSE).outcome is Outcome.DENY
    statuses = {e["id"]: e["effective_status"] for e in store.history(**KEY)}
    assert statuses == {refused: "active", wrong: "entered-in-error", marker: "entered-in-error"}
    with pytest.raises(InvalidTransition, match="already"):
        store.mark_entered_in_error(wrong, actor="desk1", reason="again")
    with pytest.raises(InvalidTransition, match="retraction"):
        store.mark_entered_in_error(marker, actor="desk1", reason="undo")
    with pytest.raises(UnknownEvent):
        store.mark_entered_in_error(999_999, actor="desk1", reason="x")
    store.mark_entered_in_error(refused, actor="desk1", reason="wrong purpose")
    assert store.decide(pk, PURPOSE).outcome is Outcome.UNDECIDED  # no decision left


def test_state_is_a_rebuildable_cache(env: tuple[ConsentStore, Engine]) -> None:
    store, engine = env
    pk = _setup(store)
    store.add_patient(
        issuer="CHR-METZ",
        patient_id="IPP002",
        birth_name="Martin",
        first_name="Paul",
        birth_date=date(1960, 2, 3),
        sex="M",
        actor="a",
    )
    store.grant(**KEY, purpose=PURPOSE, channel="desk", actor="d")
    wrong = store.refuse(
        issuer="CHR-METZ", patient_id="IPP002", purpose=PURPOSE, channel="desk", actor="d"
    )
    store.mark_entered_in_error(wrong, actor="d", reason="wrong patient")
    store.withdraw(**KEY, purpose=PURPOSE, channel="desk", actor="d")

    def snapshot() -> set[tuple[int, int, str, int]]:
        with make_sessions(engine)() as session:
            rows = session.execute(
                select(
                    ConsentState.patient_pk,
                    ConsentState.purpose_pk,
                    ConsentState.decision,
                    ConsentState.event_pk,
                )
            ).all()
        return {tuple(r) for r in rows}  # type: ignore[misc]

    before = snapshot()
    assert len(before) == 1 and next(iter(before))[0] == pk
    assert store.rebuild_state(actor="ops") == 1
    assert snapshot() == before


def test_decide_many(store: ConsentStore) -> None:
    pk = _setup(store)
    other = add_alice(store, patient_id="IPP002")
    store.grant(**KEY, purpose=PURPOSE, channel="desk", actor="d")
    result = store.decide_many([pk, other, 424242, None], PURPOSE)
    assert result[pk].outcome is Outcome.PERMIT
    assert result[other].outcome is Outcome.UNDECIDED
    assert result[424242] == Decision(Outcome.UNDECIDED, "unknown patient")
    assert set(result) == {pk, other, 424242}
    assert set(store.decide_many([pk], "nope").values()) == {
        Decision(Outcome.DENY, "unknown purpose")
    }


def test_decide_many_across_batches(store: ConsentStore) -> None:
    """More patients than one lookup takes (500): every batch is read, none mixed up."""
    _setup(store)
    rows = "".join(f"CHR-METZ,B{n:04d},NOM,PRENOM,1970-01-01,F\n" for n in range(1203))
    report = store.import_patients_csv(
        "issuer,patient_id,birth_name,first_name,birth_date,sex\n" + rows, actor="ops"
    )
    assert report.ok
    pks = list(report.patient_pks)
    granted = {pks[3], pks[499], pks[500], pks[1202]}
    refused = {pks[7], pks[1000]}
    for n, pk in enumerate(pks):
        if pk in granted | refused:
            action = store.grant if pk in granted else store.refuse
            action(
                issuer="CHR-METZ",
                patient_id=f"B{n:04d}",
                purpose=PURPOSE,
                channel="desk",
                actor="d",
            )
    result = store.decide_many([*pks, 10**9], PURPOSE)
    assert {pk for pk, d in result.items() if d.outcome is Outcome.PERMIT} == granted
    assert {pk for pk, d in result.items() if d.outcome is Outcome.DENY} == refused
    assert result[10**9] == Decision(Outcome.UNDECIDED, "unknown patient")
    assert len(result) == 1204
    assert all(result[pk] == store.decide(pk, PURPOSE) for pk in pks[495:505])


def test_current_for_every_purpose(store: ConsentStore) -> None:
    _setup(store)
    store.add_purpose("research", "Recherche", model="opt-out", actor="dpo")
    store.grant(**KEY, purpose=PURPOSE, channel="desk", actor="d")
    current = store.current(**KEY)
    assert {k: v.outcome for k, v in current.items()} == {
        PURPOSE: Outcome.PERMIT,
        "research": Outcome.PERMIT,
    }
    with pytest.raises(UnknownPatient):
        store.current("CHR-METZ", "NOPE")


def test_purpose_added_by_another_process_is_seen(db_url: str) -> None:
    with migrated_store(db_url) as (first, _engine):
        add_alice(first)
        pk = first.find_patient("CHR-METZ", "IPP001")
        assert first.decide(pk, PURPOSE).outcome is Outcome.DENY  # unknown purpose
        second = ConsentStore(make_sessions(make_engine(db_url, pool_size=2)), StepClock())
        second.add_purpose(PURPOSE, "Partage", model="opt-out", actor="dpo")
        assert first.decide(pk, PURPOSE).outcome is Outcome.PERMIT


def test_a_change_made_by_another_process_is_decided_at_once(db_url: str) -> None:
    """The decision reader keeps its connections between calls (on SQLite, outside the
    pool): none may answer from an older snapshot."""
    with migrated_store(db_url) as (first, _engine):
        pk = _setup(first)
        assert first.decide(pk, PURPOSE).outcome is Outcome.UNDECIDED
        second = ConsentStore(make_sessions(make_engine(db_url, pool_size=2)), StepClock())
        outcomes = []
        for change in (second.grant, second.refuse, second.grant, second.withdraw):
            change(**KEY, purpose=PURPOSE, channel="desk", actor="desk2")
            outcomes.append(first.decide(pk, PURPOSE).outcome)
        assert outcomes == [Outcome.PERMIT, Outcome.DENY, Outcome.PERMIT, Outcome.DENY]


@pytest.mark.postgres
def test_a_connection_closed_by_the_server_costs_a_retry_not_a_refusal(pg_url: str) -> None:
    """The decision reader keeps idle connections between calls; the server may close
    them (restart, idle timeout). The next decision still reads the store."""
    with migrated_store(pg_url) as (store, engine):
        pk = _setup(store)
        store.grant(**KEY, purpose=PURPOSE, channel="desk", actor="desk1")
        assert store.decide(pk, PURPOSE).outcome is Outcome.PERMIT
        with engine.connect() as connection:
            killed = connection.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
        assert killed >= 1
        decision = store.decide(pk, PURPOSE)
        assert decision.outcome is Outcome.PERMIT, decision.reason


# ---------------------------------------------------------------------- patients


def test_add_patient_with_ins(store: ConsentStore) -> None:
    pk = add_alice(
        store,
        ins=INS_F_1985,
        identity_status="QUAL",
        usage_name="Durand",
        email="alice@example.org",
        phone="+33 6 12 34 56 78",
        first_names=["Alice", "Marie"],
        establishment="CHR Metz",
    )
    shown = store.show_patient(pk)
    assert shown["first_names"] == ["Alice", "Marie"] and shown["first_name"] == "Alice"
    assert shown["birth_date"] == "1985-05-12" and shown["identity_status"] == "QUAL"
    assert {(i["kind"], i["system"], i["value"]) for i in shown["identifiers"]} == {
        ("IPP", "CHR-METZ", "IPP001"),
        ("INS-NIR", "1.2.250.1.213.1.4.8", INS_F_1985),
    }
    assert store.find_patient("CHR-METZ", "IPP001") == pk
    assert store.find_patient("CHU-REIMS", "IPP001") is None
    with pytest.raises(DuplicatePatient, match="already exists"):
        add_alice(store)
    with pytest.raises(DuplicatePatient, match="INS"):
        add_alice(store, patient_id="IPP009", ins=INS_F_1985)
    with pytest.raises(UnknownPatient):
        store.show_patient(pk + 100)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ins": INS_F_1985[:-2] + "00"}, "control key"),
        ({"ins": "12345"}, "15 characters"),
        ({"ins": INS_F_1985, "ins_oid": "1.2.250.1.213.1.4.10"}, "test/demo"),
        ({"ins": INS_F_1985, "ins_oid": "1.2.250.1.213.1.4.11"}, "test/demo"),
        ({"ins": INS_F_1985, "ins_oid": "1.2.3"}, "not an INS OID"),
        ({"ins": INS_M_1960}, "contradicts the sex"),
        ({"sex": "X"}, "sex"),
        ({"birth_name": "  "}, "birth name"),
        ({"birth_date": date(2999, 1, 1)}, "future"),
        ({"email": "not-an-address"}, "e-mail"),
        ({"identity_status": "GOOD"}, "identity status"),
        ({"first_names": ["Marie", "Alice"]}, "first of the birth given names"),
    ],
)
def test_identity_validation(
    sqlite_store: ConsentStore, overrides: dict[str, object], message: str
) -> None:
    # validation happens before any database access: SQLite alone is enough here
    with pytest.raises(InvalidIdentity, match=message):
        add_alice(sqlite_store, **overrides)
    assert sqlite_store.find_patient("CHR-METZ", "IPP001") is None


def test_test_ins_oid_allowed_on_request_and_corsica(store: ConsentStore) -> None:
    add_alice(store, ins=INS_F_1985, ins_oid="1.2.250.1.213.1.4.10", allow_test_ins=True)
    corsican = ins_key("18502" + "2A" + "004123")
    add_alice(store, patient_id="IPP002", sex="M", birth_date=date(1985, 2, 1), ins=corsican)
    assert validate_matricule(corsican) == corsican


@given(st.text(alphabet="0123456789", min_size=13, max_size=13), st.integers(0, 12))
def test_matricule_key_property(body: str, position: int) -> None:
    valid = ins_key(body)
    assert validate_matricule(valid) == valid
    changed = valid[:position] + str((int(valid[position]) + 1) % 10) + valid[position + 1 :]
    with pytest.raises(InvalidIdentity):
        validate_matricule(changed)


def test_search_patients(store: ConsentStore) -> None:
    add_alice(store, birth_name="Lefèvre", usage_name="Ñúñez", first_names=["Alice", "Éléonore"])
    add_alice(store, patient_id="IPP002", birth_name="Lefebvre", first_name="Bob", sex="M")
    assert [p["first_name"] for p in store.search_patients("lefevre")] == ["Alice"]
    assert len(store.search_patients("LEFE")) == 2
    assert [p["first_name"] for p in store.search_patients("nunez eleonore")] == ["Alice"]
    assert [p["first_name"] for p in store.search_patients("IPP002")] == ["Bob"]
    assert store.search_patients("%") == [] and store.search_patients("  ") == []


# ---------------------------------------------------------------------- CSV import

CSV_HEADER = "issuer,patient_id,birth_name,first_name,birth_date,sex,ins,identity_status\n"


def test_import_csv_all_or_nothing(store: ConsentStore, tmp_path: Path) -> None:
    good = (
        CSV_HEADER
        + f"CHR-METZ,P1,Dupont,Alice,1985-05-12,F,{INS_F_1985},QUAL\n"
        + "CHR-METZ,P2,Martin,Paul,1960-02-03,M,,\n"
    )
    bad = good + "CHR-METZ,P3,Durand,Léa,1990-13-01,F,,\n" + "CHR-METZ,P4,,Zoé,1990-01-01,F,,\n"
    report = store.import_patients_csv(bad, actor="ops")
    assert not report.ok and report.imported == 0
    assert [(p.line, p.message) for p in report.problems] == [
        (4, "birth date must be a valid date YYYY-MM-DD"),
        (5, "birth name is required"),
    ]
    assert store.find_patient("CHR-METZ", "P1") is None

    path = tmp_path / "patients.csv"
    path.write_text(good, encoding="utf-8")
    report = store.import_patients_csv(path, actor="ops")
    assert report.ok and report.imported == 2 and len(report.patient_pks) == 2
    assert store.find_patient("CHR-METZ", "P2") == report.patient_pks[1]

    again = (
        CSV_HEADER + "CHR-METZ,P9,Neuf,Nina,2000-01-01,F,,\n" + "CHR-METZ,P2,X,Y,1960-02-03,M,,\n"
    )
    report = store.import_patients_csv(again, actor="ops")
    assert [(p.line, p.message) for p in report.problems] == [
        (3, "patient CHR-METZ/P2 already exists")
    ]
    assert store.find_patient("CHR-METZ", "P9") is None


def test_import_csv_format_problems(store: ConsentStore) -> None:
    semicolons = "issuer;patient_id;birth_name;first_name;birth_date;sex\nH;1;A;B;2000-01-01;U\n"
    assert store.import_patients_csv(semicolons, actor="ops").imported == 1
    duplicate = CSV_HEADER + "H,7,A,B,2000-01-01,U,,\nH,7,C,D,2000-01-01,U,,\n"
    problems = store.import_patients_csv(duplicate, actor="ops").problems
    assert [p.line for p in problems] == [3] and "line 2" in problems[0].message
    report = store.import_patients_csv("issuer,patient_id,colour\nH,8,red\n", actor="ops")
    assert report.problems[0].line == 1 and "missing column" in report.problems[0].message
    with pytest.raises(InvalidRequest, match="cannot read"):
        store.import_patients_csv("/nonexistent/file.csv", actor="ops")


# ---------------------------------------------------------------------- FHIR


def test_export_fhir(store: ConsentStore) -> None:
    store.add_purpose(PURPOSE, "Partage régional", notice_text=NOTICE_V1, actor="dpo")
    add_alice(store, ins=INS_F_1985, identity_status="QUAL", establishment="CHR Metz")
    granted = store.grant(**KEY, purpose=PURPOSE, channel="desk", actor="desk1")
    store.withdraw(
        **KEY,
        purpose=PURPOSE,
        channel="remote",
        actor="portal",
        performed_by="representative",
        representative_name="Jean Dupont",
    )
    wrong = store.refuse(**KEY, purpose=PURPOSE, channel="cli", actor="ops")
    store.mark_entered_in_error(wrong, actor="ops", reason="typo")
    resources = store.export_fhir(**KEY)
    json.dumps(resources)  # JSON-serialisable
    assert [r["status"] for r in resources] == ["inactive", "active", "entered-in-error"]
    first = resources[0]
    assert first["resourceType"] == "Consent" and first["id"] == f"cg-event-{granted}"
    assert first["scope"]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/consentscope",
        "code": "patient-privacy",
        "display": "Privacy Consent",
    }
    assert first["category"][0]["coding"][0]["code"] == "59284-0"
    assert first["patient"] == {
        "identifier": {"system": "urn:oid:1.2.250.1.213.1.4.8", "value": INS_F_1985}
    }
    sha = hashlib.sha256(NOTICE_V1.encode()).hexdigest()
    assert first["policy"] == [{"uri": f"urn:consentgate:notice:{PURPOSE}:1#sha256={sha}"}]
    assert first["provision"]["type"] == "permit"
    assert first["provision"]["purpose"][0]["system"] == "urn:consentgate:purpose"
    assert first["provision"]["purpose"][0]["code"] == PURPOSE
    assert first["dateTime"].endswith("Z") and first["organization"] == [{"display": "CHR Metz"}]
    assert resources[1]["provision"]["type"] == "deny"
    assert resources[1]["performer"] == [{"display": "Jean Dupont"}]
    for resource in resources:
        assert resource["policy"] or resource["policyRule"]


def test_export_fhir_by_ipp_when_not_qualified(store: ConsentStore) -> None:
    _setup(store)
    store.grant(**KEY, purpose=PURPOSE, channel="desk", actor="d")
    (resource,) = store.export_fhir(**KEY)
    assert resource["patient"]["identifier"] == {
        "system": "urn:consentgate:issuer:CHR-METZ",
        "value": "IPP001",
    }


# ---------------------------------------------------------------------- DICOM resolution


def test_resolve_dicom_patient(store: ConsentStore) -> None:
    qual = add_alice(store, ins=INS_F_1985, identity_status="QUAL")
    prov = add_alice(
        store,
        patient_id="IPP002",
        birth_name="Martin",
        first_name="Paul",
        sex="M",
        birth_date=date(1960, 2, 3),
        ins=INS_M_1960,
    )
    ins_f = [("1.2.250.1.213.1.4.8", INS_F_1985)]

    def resolve(**kw: object) -> tuple[int | None, str, str]:
        args: dict[str, object] = {
            "issuer": "",
            "patient_id": "",
            "ins_values": [],
            "birth_date": "",
            "sex": "",
        }
        args.update(kw)
        r = store.resolve_dicom_patient(**args)  # type: ignore[arg-type]
        return r.patient_pk, r.status, r.reason

    assert resolve(
        patient_id="OTHER", issuer="CHU", ins_values=ins_f, birth_date="19850512", sex="F"
    ) == (qual, "matched", "matched by INS")
    assert resolve(issuer="CHR-METZ", patient_id="IPP002", birth_date="19600203", sex="M") == (
        prov,
        "matched",
        "matched by patient id",
    )
    # a PROV identity's INS does not identify
    assert resolve(ins_values=[("1.2.250.1.213.1.4.8", INS_M_1960)])[1] == "unknown"
    assert resolve(issuer="CHR-METZ", patient_id="IPP001", birth_date="19850513") == (
        qual,
        "mismatch",
        "birth date differs",
    )
    assert resolve(issuer="CHR-METZ", patient_id="IPP001", sex="M")[1:] == (
        "mismatch",
        "sex differs",
    )
    assert resolve(issuer="CHR-METZ", patient_id="IPP001", birth_date="1985")[1] == "mismatch"
    assert resolve(issuer="CHR-METZ", patient_id="IPP002", ins_values=ins_f)[1] == "mismatch"
    assert resolve(issuer="CHR-METZ", patient_id="NOPE") == (
        None,
        "unknown",
        "no patient with these identifiers",
    )


def test_resolve_two_ins_values(store: ConsentStore) -> None:
    """Every INS a dataset carries counts, in any order: two qualified INS of two
    patients, or a second INS that contradicts the matched patient's, is a mismatch."""
    alice = add_alice(store, ins=INS_F_1985, identity_status="QUAL")
    add_alice(
        store,
        patient_id="IPP002",
        birth_name="Martin",
        first_name="Paul",
        sex="M",
        birth_date=date(1960, 2, 3),
        ins=INS_M_1960,
        identity_status="QUAL",
    )
    nir = "1.2.250.1.213.1.4.8"
    unknown_ins = ins_key("2850575999999")

    def resolve(*ins: str) -> tuple[int | None, str]:
        r = store.resolve_dicom_patient(
            issuer="CHR-METZ",
            patient_id="IPP001",
            ins_values=[(nir, value) for value in ins],
            birth_date="",
            sex="",
        )
        return r.patient_pk, r.status

    assert resolve(INS_F_1985) == (alice, "matched")
    assert resolve(INS_F_1985, INS_M_1960)[1] == "mismatch"
    assert resolve(INS_M_1960, INS_F_1985)[1] == "mismatch"
    assert resolve(INS_F_1985, unknown_ins)[1] == "mismatch"
    assert resolve(INS_F_1985, INS_F_1985) == (alice, "matched")


# ---------------------------------------------------------------------- change notification


def test_listeners_and_changes_since(db_url: str) -> None:
    with migrated_store(db_url) as (store, _engine):
        pk = _setup(store)
        seen: list[ConsentChange] = []

        def broken(_change: ConsentChange) -> None:
            raise RuntimeError("listener bug")

        store.subscribe(broken)
        unsubscribe = store.subscribe(seen.append)
        start = store.last_event_id()
        granted = store.grant(**KEY, purpose=PURPOSE, channel="desk", actor="d")
        assert seen == [ConsentChange(pk, PURPOSE, Outcome.PERMIT, granted)]

        # the running node (another process, another store) polls for CLI changes
        poller = ConsentStore(make_sessions(make_engine(db_url, pool_size=2)), StepClock())
        assert poller.changes_since(start) == [ConsentChange(pk, PURPOSE, Outcome.PERMIT, granted)]
        withdrawn = store.withdraw(**KEY, purpose=PURPOSE, channel="desk", actor="d")
        other = add_alice(store, patient_id="IPP002")
        refused = store.refuse(
            issuer="CHR-METZ", patient_id="IPP002", purpose=PURPOSE, channel="desk", actor="d"
        )
        assert poller.changes_since(granted) == [
            ConsentChange(pk, PURPOSE, Outcome.DENY, withdrawn),
            ConsentChange(other, PURPOSE, Outcome.DENY, refused),
        ]
        marker = store.mark_entered_in_error(refused, actor="d", reason="wrong patient")
        assert seen[-1] == ConsentChange(other, PURPOSE, Outcome.UNDECIDED, marker)
        assert poller.changes_since(refused) == [
            ConsentChange(other, PURPOSE, Outcome.UNDECIDED, marker)
        ]
        assert poller.changes_since(marker) == []
        unsubscribe()
        store.grant(**KEY, purpose=PURPOSE, channel="desk", actor="d")
        assert len(seen) == 4


def test_concurrent_writers_keep_one_chain(db_url: str) -> None:
    with migrated_store(db_url) as (store, _engine):
        _setup(store)
        for n in range(2, 5):
            add_alice(store, patient_id=f"IPP00{n}")
        errors: list[BaseException] = []

        def work(patient_id: str) -> None:
            try:
                for _ in range(5):
                    store.grant(
                        issuer="CHR-METZ",
                        patient_id=patient_id,
                        purpose=PURPOSE,
                        channel="api",
                        actor="w",
                    )
                    store.refuse(
                        issuer="CHR-METZ",
                        patient_id=patient_id,
                        purpose=PURPOSE,
                        channel="api",
                        actor="w",
                    )
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(f"IPP00{n}",)) for n in range(1, 5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors
        report = store.verify_audit()
        assert report.ok, report.problem
        assert report.entries == 1 + 4 + 40
        for n in range(1, 5):
            history = store.history("CHR-METZ", f"IPP00{n}")
            assert [e["supersedes"] for e in history[1:]] == [e["id"] for e in history[:-1]]


def test_clock_must_be_aware(db_url: str) -> None:
    from datetime import datetime

    with migrated_store(db_url) as (_store, engine):
        naive = ConsentStore(make_sessions(engine), lambda: datetime(2026, 1, 1))
        with pytest.raises(ValueError, match="timezone-aware"):
            naive.add_purpose("x", "x", actor="dpo")
