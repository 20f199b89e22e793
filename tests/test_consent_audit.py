"""The hash-chained audit log: every change is audited, tampering is detected."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, text

from consent.audit import entry_hash
from consent.service import ConsentStore
from tests.test_consent_support import INS_F_1985, NOTICE_V1, add_alice, migrated_store

KEY = {"issuer": "CHR-METZ", "patient_id": "IPP001"}


@pytest.fixture
def env(db_url: str) -> Iterator[tuple[ConsentStore, Engine]]:
    """A store with a few audited changes of every kind (11 entries)."""
    with migrated_store(db_url) as (store, engine):
        store.add_purpose("regional", "Partage", notice_text=NOTICE_V1, actor="dpo")  # 1
        store.add_notice("regional", NOTICE_V1 + "v2", actor="dpo")  # 2
        add_alice(store, ins=INS_F_1985, identity_status="QUAL")  # 3
        store.import_patients_csv(
            "issuer,patient_id,birth_name,first_name,birth_date,sex\nH,2,Martin,Paul,1960-01-01,M\n",
            actor="ops",
        )  # 4
        store.grant(**KEY, purpose="regional", channel="desk", actor="desk1")  # 5
        wrong = store.refuse(**KEY, purpose="regional", channel="desk", actor="desk1")  # 6
        store.mark_entered_in_error(wrong, actor="desk1", reason="mistake")  # 7
        store.withdraw(**KEY, purpose="regional", channel="remote", actor="portal")  # 8
        store.rebuild_state(actor="ops")  # 9
        store.audit(actor="router", action="route.drop", target="job:1", details={"patient": 1})
        store.audit(actor="viewer", action="instances.accessed", target="study:1")  # 11
        yield store, engine


def _rows(engine: Engine) -> list[dict[str, object]]:
    with engine.connect() as connection:
        result = connection.execute(text("SELECT * FROM consent_audit ORDER BY seq"))
        return [dict(row._mapping) for row in result]


def test_every_change_is_audited_without_names(env: tuple[ConsentStore, Engine]) -> None:
    store, engine = env
    report = store.verify_audit()
    assert report.ok and report.entries == 11 and report.first_bad_seq is None
    rows = _rows(engine)
    assert [r["action"] for r in rows] == [
        "purpose.add",
        "notice.add",
        "patient.add",
        "patient.import",
        "consent.grant",
        "consent.withdraw",  # a deny while permitted is a withdrawal
        "consent.entered-in-error",
        "consent.withdraw",
        "consent.rebuild-state",
        "route.drop",
        "instances.accessed",
    ]
    assert {r["actor"] for r in rows} >= {"dpo", "admission", "ops", "desk1", "portal"}
    everything = json.dumps([r["details"] for r in rows] + [r["target"] for r in rows])
    for personal in ("Dupont", "Alice", "Martin", "Paul", INS_F_1985, "1985"):
        assert personal not in everything
    assert (report.head_seq, report.head_hash) == (11, rows[-1]["hash"])
    assert store.verify_audit(known_head=(5, str(rows[4]["hash"]))).ok


def test_edited_entry_is_detected(env: tuple[ConsentStore, Engine]) -> None:
    store, engine = env
    with engine.begin() as connection:
        connection.execute(text("UPDATE consent_audit SET actor = 'someone' WHERE seq = 5"))
    report = store.verify_audit()
    assert not report.ok and report.first_bad_seq == 5
    assert report.problem == "entry 5 has been altered"


def test_removed_entry_is_detected(env: tuple[ConsentStore, Engine]) -> None:
    store, engine = env
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM consent_audit WHERE seq = 6"))
    report = store.verify_audit()
    assert (report.ok, report.first_bad_seq, report.problem) == (False, 6, "entry 6 is missing")


def test_inserted_entry_is_detected(env: tuple[ConsentStore, Engine]) -> None:
    """A forged entry slipped in at seq 4 with a valid hash of its own: the entries after
    it had to be renumbered, and the first of them no longer chains."""
    store, engine = env
    rows = _rows(engine)
    at = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    forged = {
        "seq": 4,
        "at": at,
        "actor": "intruder",
        "action": "consent.grant",
        "target": "event:99",
        "details": "{}",
    }
    digest = entry_hash(str(rows[2]["hash"]), **forged)  # type: ignore[arg-type]
    with engine.begin() as connection:
        for seq in range(11, 3, -1):
            connection.execute(
                text("UPDATE consent_audit SET seq = :new WHERE seq = :old"),
                {"new": seq + 1, "old": seq},
            )
        connection.execute(
            text(
                "INSERT INTO consent_audit (seq, at, actor, action, target, details, prev_hash, "
                "hash) VALUES (:seq, :at, :actor, :action, :target, :details, :prev, :hash)"
            ),
            {
                **forged,
                "at": at.replace(tzinfo=None) if engine.dialect.name == "sqlite" else at,
                "prev": rows[2]["hash"],
                "hash": digest,
            },
        )
    report = store.verify_audit()
    assert not report.ok and report.first_bad_seq == 5
    assert report.problem == "entry 5 does not chain to its predecessor"


def test_appended_entry_with_a_bad_link_is_detected(env: tuple[ConsentStore, Engine]) -> None:
    store, engine = env
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO consent_audit (seq, at, actor, action, target, details, prev_hash, "
                "hash) VALUES (12, :at, 'x', 'x', 'x', '{}', :h, :h)"
            ),
            {"at": datetime(2026, 3, 2, tzinfo=UTC), "h": "f" * 64},
        )
    report = store.verify_audit()
    assert (report.ok, report.first_bad_seq) == (False, 12)


def test_truncation_and_rewrite_need_a_recorded_head(env: tuple[ConsentStore, Engine]) -> None:
    store, engine = env
    head = store.verify_audit()
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM consent_audit WHERE seq >= 10"))
    assert store.verify_audit().ok  # a shorter chain is still a valid chain...
    report = store.verify_audit(known_head=(head.head_seq, head.head_hash))
    assert not report.ok and report.first_bad_seq == 11  # ...but not the one recorded
    assert "missing" in report.problem
