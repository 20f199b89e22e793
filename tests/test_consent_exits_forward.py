"""Consent at the forwarding exit (routes -> durable queue -> forwarders).

What reaches a destination needs the patient's consent to the purpose it is sent under,
checked again before each send; an identity that names two people is held for
reconciliation, not forwarded; and a consent change never drops or deletes an
acknowledged instance that consent still permits. SQLite and PostgreSQL.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click
import pytest
from pydicom.uid import generate_uid

from cli.router_commands import _resolve_held
from config.settings import ConfigError, parse_settings
from consent.decision import ConsentChange
from router.consent_sync import ConsentSync
from router.queue import RetryPolicy
from router.retention import Retention
from tests.conftest import (
    ISSUER,
    MODALITY_AE,
    RecordingScp,
    job_states,
    seed_purpose,
    start_node,
    wait_until,
)
from tests.consent_exits_forward_support import (
    dest_peer,
    forwarding,
    record,
    route,
    running,
    settings_with,
    settle,
)
from tests.identity_support import add_patient, make_ds, matricule, store

PARTAGE = "PARTAGE_GE"  # opt-in: the regional platform's purpose
TELE = "TELEEXPERTISE"  # opt-out
RECHERCHE = "RECHERCHE"  # opt-in
INS_NIR_OID = "1.2.250.1.213.1.4.8"


def _not_received(scp: RecordingScp, uid: str, node, dest: str) -> None:
    """Give the forwarder time to act on the job, then assert ``uid`` never arrived."""
    settle(lambda: job_states(node.runtime, dest).get(uid) not in ("ready", "sending"))
    settle(lambda: uid in scp.uids(), 1.5)
    state = job_states(node.runtime, dest).get(uid)
    assert uid not in scp.uids(), f"leak: delivered to {dest} (job {state})"


# ---------------------------------------------------------------------------- consent


def test_route_to_a_purpose_bound_peer_must_carry_the_peers_purpose(
    tmp_path: Path, db_url: str
) -> None:
    """A route to a peer bound to PARTAGE_GE (opt-in) may not carry another purpose
    (TELEEXPERTISE, opt-out): the configuration is refused at load time, or else the
    forwarder still withholds a study of a patient who refused PARTAGE_GE. Otherwise
    forwarding would be a weaker exit than the peer's own C-MOVE, which is checked
    against the peer's purpose, and the refused study would reach the peer.
    """
    raw = {
        "peers": [
            {
                "name": "regional",
                "ae_title": "REGDEST",
                "host": "127.0.0.1",
                "port": 11119,
                "services": ["echo"],
                "purpose": PARTAGE,
            }
        ],
        "routes": [
            {
                "name": "tele",
                "destinations": ["regional"],
                "purpose": TELE,
                "match": {"calling_ae": MODALITY_AE},
            }
        ],
    }
    try:
        parse_settings(raw, source="<test>", base_dir=tmp_path)
    except ConfigError:
        return  # refused at load time
    scp = RecordingScp("REGDEST").start()
    settings = settings_with(
        tmp_path,
        db_url,
        (dest_peer("regional", scp, purpose=PARTAGE),),
        (route("tele", "regional", purpose=TELE),),
    )
    try:
        with running(settings) as node:
            seed_purpose(node.runtime.consent, PARTAGE, "opt-in")
            seed_purpose(node.runtime.consent, TELE, "opt-out")
            add_patient(node, "P-1")
            record(node, "refuse", "P-1", PARTAGE)
            ds = make_ds("P-1", study_uid=generate_uid())
            assert store(node, ds) == [0]
            with forwarding(node):
                _not_received(scp, ds.SOPInstanceUID, node, "regional")
    finally:
        scp.stop()


def test_routes_to_one_destination_must_share_one_purpose(tmp_path: Path, db_url: str) -> None:
    """Two routes that send to one destination under different purposes are refused at load
    time; one shared purpose, or one route without purpose, loads. A job is checked
    against one purpose, so an instance both routes match would otherwise be sent on the
    consent to either one, and the outcome would depend on the order of the routes.
    """
    raw = {
        "peers": [{"name": "research", "ae_title": "RESEARCH", "host": "127.0.0.1", "port": 11119}],
        "routes": [
            {
                "name": name,
                "destinations": ["research"],
                "purpose": purpose,
                "match": {"calling_ae": MODALITY_AE},
            }
            for name, purpose in (("quality", TELE), ("research", RECHERCHE))
        ],
    }
    with pytest.raises(ConfigError, match="one purpose only"):
        parse_settings(raw, source="<test>", base_dir=tmp_path)
    # the same routes with one purpose, or one of them without any, load
    raw["routes"][1]["purpose"] = TELE
    parse_settings(raw, source="<test>", base_dir=tmp_path)
    del raw["routes"][1]["purpose"]
    parse_settings(raw, source="<test>", base_dir=tmp_path)


def test_queued_job_is_checked_against_the_peers_current_purpose(
    tmp_path: Path, db_url: str
) -> None:
    """A job queued for a care-team peer (no purpose) while it was down is not sent once
    the operator has made that peer purpose-bound (PARTAGE_GE), because the patient
    refused PARTAGE_GE. The forwarder decides the peer's current purpose before each
    send; otherwise jobs planned under an older configuration bypass the consent that
    the peer now requires.
    """
    scp = RecordingScp("EXTDEST")  # down while the job is queued
    care_team = settings_with(tmp_path, db_url, (dest_peer("ext", scp),), (route("to-ext", "ext"),))
    node = start_node(care_team)
    try:
        seed_purpose(node.runtime.consent, PARTAGE, "opt-in")
        add_patient(node, "P-1")
        record(node, "refuse", "P-1", PARTAGE)
        ds = make_ds("P-1", study_uid=generate_uid())
        assert store(node, ds) == [0]
        assert job_states(node.runtime)[ds.SOPInstanceUID] == "ready"
    finally:
        node.stop()
        node.runtime.close()
    bound = replace(
        care_team,
        peers=tuple(replace(p, purpose=PARTAGE) if p.name == "ext" else p for p in care_team.peers),
        routes=(route("to-ext", "ext", PARTAGE),),
    )
    scp.start()
    try:
        with running(bound) as node, forwarding(node):
            _not_received(scp, ds.SOPInstanceUID, node, "ext")
    finally:
        scp.stop()


def test_ins_of_another_provisional_identity_holds_the_instance(
    tmp_path: Path, db_url: str
) -> None:
    """An instance with P-A's Patient ID and the INS the consent store records for P-B
    (identity status PROV) is held for reconciliation, not forwarded on P-A's consent.
    An unqualified INS cannot designate a patient, but it still shows that the data set
    names two people; resolving it to P-A alone would send P-B's data, whom consent
    refuses, to the purpose-bound peer.
    """
    scp = RecordingScp("REGDEST").start()
    settings = settings_with(
        tmp_path,
        db_url,
        (dest_peer("regional", scp, purpose=PARTAGE),),
        (route("to-regional", "regional", PARTAGE),),
    )
    try:
        with running(settings) as node:
            seed_purpose(node.runtime.consent, PARTAGE, "opt-in")
            ins_b = matricule("1700175123456")
            add_patient(node, "P-A")
            add_patient(node, "P-B", ins=ins_b, status="PROV")
            record(node, "grant", "P-A", PARTAGE)
            record(node, "refuse", "P-B", PARTAGE)
            ds = make_ds("P-A", study_uid=generate_uid(), ins=(INS_NIR_OID, ins_b))
            assert store(node, ds) == [0]
            with forwarding(node):
                _not_received(scp, ds.SOPInstanceUID, node, "regional")
            assert job_states(node.runtime)[ds.SOPInstanceUID] == "held"
    finally:
        scp.stop()


def test_held_study_naming_two_people_under_one_patient_id_is_not_linked_whole(
    tmp_path: Path, db_url: str
) -> None:
    """``held resolve`` refuses to link a held study whose two instances share Patient ID
    P-X but differ in birth date and sex (two people), and neither job becomes ready.
    Held instances are compared on the whole identity (issuer, Patient ID, INS, birth
    date, sex), as routing and the Q/R gate do; otherwise one link gives two people one
    patient's consent and sends the other's data under it.
    """
    scp = RecordingScp("REGDEST").start()
    settings = settings_with(
        tmp_path,
        db_url,
        (dest_peer("regional", scp, purpose=PARTAGE),),
        (route("to-regional", "regional", PARTAGE),),
    )
    try:
        with running(settings) as node:
            rt = node.runtime
            seed_purpose(rt.consent, PARTAGE, "opt-in")
            add_patient(node, "P-X")  # born 1970-01-01
            record(node, "grant", "P-X", PARTAGE)
            study = generate_uid()
            first = make_ds("P-X", study_uid=study, birth="19851231", sex="M", name="ONE^A")
            second = make_ds("P-X", study_uid=study, birth="19920615", sex="F", name="TWO^B")
            assert store(node, first, second) == [0, 0]
            states = job_states(rt)
            assert states[first.SOPInstanceUID] == states[second.SOPInstanceUID] == "held"
            linked = ""
            with pytest.raises(click.ClickException):
                linked = _resolve_held(rt, study, ISSUER, "P-X", False, "admin")
            states = job_states(rt)
            assert "ready" not in (states[first.SOPInstanceUID], states[second.SOPInstanceUID]), (
                f"leak: two people linked as one: {linked}"
            )
    finally:
        scp.stop()


def test_ins_named_by_its_issuer_text_only_is_not_ignored(tmp_path: Path, db_url: str) -> None:
    """An INS in Other Patient IDs Sequence named by its Issuer of Patient ID text
    ("ASIP-SANTE-INS-NIR") without qualifiers is read as an INS like one named by its OID:
    P-A's Patient ID with P-B's qualified INS is held as a mismatch, not forwarded on
    P-A's consent. Otherwise dropping the unreadable item hides the contradiction and
    sends P-B's data, whom consent refuses.
    """
    scp = RecordingScp("REGDEST").start()
    settings = settings_with(
        tmp_path,
        db_url,
        (dest_peer("regional", scp, purpose=PARTAGE),),
        (route("to-regional", "regional", PARTAGE),),
    )
    try:
        with running(settings) as node:
            seed_purpose(node.runtime.consent, PARTAGE, "opt-in")
            ins_b = matricule("1700175123456")
            add_patient(node, "P-A")
            add_patient(node, "P-B", ins=ins_b, status="QUAL")
            record(node, "grant", "P-A", PARTAGE)
            record(node, "refuse", "P-B", PARTAGE)
            control = make_ds("P-A", study_uid=generate_uid(), ins=(INS_NIR_OID, ins_b))
            ds = make_ds("P-A", study_uid=generate_uid(), ins=(INS_NIR_OID, ins_b))
            del ds.OtherPatientIDsSequence[0].IssuerOfPatientIDQualifiersSequence
            assert store(node, control, ds) == [0, 0]
            assert job_states(node.runtime)[control.SOPInstanceUID] == "held"  # INS by its OID
            with forwarding(node):
                _not_received(scp, ds.SOPInstanceUID, node, "regional")
    finally:
        scp.stop()


def test_dead_letter_retried_after_a_withdrawal_is_not_sent(tmp_path: Path, db_url: str) -> None:
    """A job dead-lettered while its destination was down (``failed``) is left alone by the
    withdrawal that follows; ``queue retry`` puts it back and the forwarder's decision
    before sending drops it. An operator's retry of a dead letter must not send data
    whose consent was withdrawn in the meantime.
    """
    scp = RecordingScp("REGDEST")  # down at first
    settings = settings_with(
        tmp_path,
        db_url,
        (dest_peer("regional", scp, purpose=PARTAGE),),
        (route("to-regional", "regional", PARTAGE),),
    )
    with running(settings) as node:
        rt = node.runtime
        rt.queue.policy = RetryPolicy(max_attempts=1, base_delay=0.1, max_delay=0.2)
        seed_purpose(rt.consent, PARTAGE, "opt-in")
        add_patient(node, "P-1")
        record(node, "grant", "P-1", PARTAGE)
        sync = ConsentSync(
            rt.queue,
            rt.sessions,
            rt.consent.decide,
            rt.consent.changes_since,
            rt.consent.last_event_id,
        )
        ds = make_ds("P-1", study_uid=generate_uid())
        assert store(node, ds) == [0]
        with forwarding(node):
            wait_until(lambda: job_states(rt)[ds.SOPInstanceUID] == "failed", 10, "dead letter")
        record(node, "withdraw", "P-1", PARTAGE)
        sync.poll()
        assert job_states(rt)[ds.SOPInstanceUID] == "failed"
        assert rt.queue.retry_jobs(None) == 1
        scp.start()
        try:
            with forwarding(node):
                wait_until(lambda: job_states(rt)[ds.SOPInstanceUID] == "dropped", 10, "dropped")
            assert ds.SOPInstanceUID not in scp.uids()
        finally:
            scp.stop()


# ---------------------------------------------------------------------------- no loss


def test_refusal_does_not_drop_or_delete_an_instance_a_later_grant_permits(
    tmp_path: Path, db_url: str
) -> None:
    """The consent poll reads "P-1 refused"; before it updates the queue, P-1's grant
    commits and a new study of P-1 is stored. The new instance, which consent now
    permits, stays in the archive and its job stays open (ready, sending or done).
    Acting on a refusal that no longer holds would drop and, under retention
    delete-unneeded, delete an acknowledged instance: data loss.
    """
    scp = RecordingScp("REGDEST").start()
    settings = settings_with(
        tmp_path,
        db_url,
        (dest_peer("regional", scp, purpose=PARTAGE),),
        (route("to-regional", "regional", PARTAGE),),
        retention="delete-unneeded",
    )
    try:
        with running(settings) as node:
            rt = node.runtime
            consent = rt.consent
            seed_purpose(consent, PARTAGE, "opt-in")
            add_patient(node, "P-1")
            later: list[str] = []

            def changes_since(event_id: int) -> list[ConsentChange]:
                changes = consent.changes_since(event_id)
                if changes and not later:
                    # what another process does between the poll's read and its update
                    record(node, "grant", "P-1", PARTAGE)
                    ds = make_ds("P-1", study_uid=generate_uid())
                    assert store(node, ds) == [0]
                    later.append(ds.SOPInstanceUID)
                return changes

            sync = ConsentSync(
                rt.queue,
                rt.sessions,
                consent.decide,
                changes_since,
                consent.last_event_id,
                retention=Retention(
                    "delete-unneeded",
                    rt.sessions,
                    rt.files,
                    forget_parents=rt.index.forget_parents,
                ),
            )
            record(node, "refuse", "P-1", PARTAGE)
            sync.poll()  # reads the refusal; the grant and the new study land meanwhile
            sync.poll()  # sees the grant
            (uid,) = later
            assert consent.decide(consent.find_patient(ISSUER, "P-1"), PARTAGE).permitted
            assert rt.index.find_instance(uid) is not None, (
                "data loss: a permitted, acknowledged instance was deleted"
            )
            assert job_states(rt).get(uid) in ("ready", "sending", "done")
    finally:
        scp.stop()
