"""Consent at every exit follows each instance's own identity, as routing resolves it.

An instance filed under a consented patient's archive row or study while naming someone
else (a reused Study Instance UID, the issuer only in the qualifiers sequence,
contradicting demographics or INS) must not reach a purpose-bound peer by C-FIND, C-GET
or C-MOVE; two INS of two patients are held, not forwarded; a withdrawal committed while
the forwarder opens its association stops the send; retention never deletes an instance
held for reconciliation because its candidate patient refused. Each test stores
instances from the modality peer (default issuer CHR-METZ) and queries or retrieves as
the purpose-bound peer "regional" (SQLite and PostgreSQL).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import click
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select, update

from cli.router_commands import _resolve_held
from cli.runtime import setup_logging
from config.settings import MatchCondition, PeerSettings, RouteSettings
from dicom_node.archive.identity import UNSTORABLE
from dicom_node.archive.models import Instance as ArchivedInstance
from dicom_node.archive.models import Patient as ArchivedPatient
from dicom_node.archive.patient_rows import PatientRowError, show_study_patient
from router.consent_sync import ConsentSync
from router.forwarder import ForwarderOptions, ForwarderPool
from router.retention import Retention
from tests.conftest import (
    ISSUER,
    MODALITY_AE,
    PACS_AE,
    RecordingScp,
    RunningNode,
    free_port,
    job_states,
    make_settings,
    seed_purpose,
    start_node,
    wait_until,
)
from tests.identity_support import (
    INS_NIR_OID,
    PURPOSE,
    QR_AE,
    add_patient,
    c_find,
    c_get,
    c_move,
    make_ds,
    matricule,
    regional_settings,
    store,
)
from tests.scu_support import associate


@pytest.fixture
def node(tmp_path: Path, db_url: str) -> Iterator[RunningNode]:
    settings = regional_settings(tmp_path, db_url)
    running = start_node(settings)
    try:
        seed_purpose(running.runtime.consent, PURPOSE)
        yield running
    finally:
        running.stop()
        running.runtime.close()


def grant(node, pid: str, issuer: str = ISSUER) -> None:
    node.runtime.consent.grant(
        issuer=issuer, patient_id=pid, purpose=PURPOSE, channel="cli", actor="t"
    )


def refuse(node, pid: str, issuer: str = ISSUER) -> None:
    node.runtime.consent.refuse(
        issuer=issuer, patient_id=pid, purpose=PURPOSE, channel="cli", actor="t"
    )


def granted_and_refused(node) -> None:
    """P-GRANTED has granted the purpose, P-REFUSED has refused it."""
    add_patient(node, "P-GRANTED")
    add_patient(node, "P-REFUSED")
    grant(node, "P-GRANTED")
    refuse(node, "P-REFUSED")


def test_foreign_instance_in_a_consented_study_is_withheld(node) -> None:
    """Instance B (refused patient) carries the StudyInstanceUID of a consented patient's
    study, so the index files B under that study: B's own identity still withholds it,
    and the consented patient's instance A is still served (C-GET sends A's own file).
    C-FIND lists nothing of that study at any level: a SERIES or IMAGE answer shows study
    attributes (B may have written them, and the study's counts include B)."""
    granted_and_refused(node)
    study = generate_uid()
    a = make_ds("P-GRANTED", study_uid=study)
    b = make_ds("P-REFUSED", study_uid=study, name="SECRET^REFUSED")
    assert store(node, a, b) == [0, 0]
    jobs = job_states(node.runtime)
    assert jobs[b.SOPInstanceUID] == "dropped"  # routing got it right
    # C-GET of the study from the purpose-bound peer
    status, got = c_get(node, QR_AE, QueryRetrieveLevel="STUDY", StudyInstanceUID=study)
    leaked_study = b.SOPInstanceUID in got
    # C-GET of B by its SOP Instance UID
    status2, got2 = c_get(
        node,
        QR_AE,
        QueryRetrieveLevel="IMAGE",
        StudyInstanceUID=study,
        SOPInstanceUID=b.SOPInstanceUID,
    )
    # C-FIND at IMAGE level
    found = c_find(
        node, QR_AE, QueryRetrieveLevel="IMAGE", StudyInstanceUID=study, SOPInstanceUID=""
    )
    listed = {str(d.SOPInstanceUID) for d in found}
    # B is neither sent nor counted: a purpose-bound peer is not told it exists
    assert a.SOPInstanceUID in got and status == 0x0000
    assert status2 == 0x0000
    assert listed == set()
    assert not leaked_study and b.SOPInstanceUID not in got2 and b.SOPInstanceUID not in listed, (
        f"LEAK: study get status={status:#06x} got B={leaked_study}; "
        f"image get status={status2:#06x} got B={b.SOPInstanceUID in got2}; "
        f"find lists B={b.SOPInstanceUID in listed}"
    )
    # nor above IMAGE level: neither series (their answers carry the study's attributes)
    # nor the study (its counts and modalities include B)
    series = {
        str(d.SeriesInstanceUID)
        for d in c_find(
            node, QR_AE, QueryRetrieveLevel="SERIES", StudyInstanceUID=study, SeriesInstanceUID=""
        )
    }
    assert series == set()
    assert c_find(node, QR_AE, QueryRetrieveLevel="STUDY", StudyInstanceUID=study) == []
    # the care team (no purpose) sees everything
    assert (
        len(
            c_find(
                node,
                PACS_AE,
                QueryRetrieveLevel="IMAGE",
                StudyInstanceUID=study,
                SOPInstanceUID="",
            )
        )
        == 2
    )


def test_identity_read_from_the_file_for_instances_indexed_without_one(node) -> None:
    """Instances indexed before the identity column (schema 0004) have none: the checks
    read each file's identity instead, at every level (a C-FIND answer for a study that
    holds a refused patient's instance lists none of it)."""
    granted_and_refused(node)
    study = generate_uid()
    a = make_ds("P-GRANTED", study_uid=study)
    b = make_ds("P-REFUSED", study_uid=study)
    other = generate_uid()
    c = make_ds("P-GRANTED", study_uid=other)
    assert store(node, a, b, c) == [0, 0, 0]
    with node.runtime.sessions.begin() as session:
        session.execute(update(ArchivedInstance).values(identity=None))
    status, got = c_get(node, QR_AE, QueryRetrieveLevel="STUDY", StudyInstanceUID=study)
    assert got == {a.SOPInstanceUID} and status == 0x0000  # b withheld, not disclosed
    listed = {
        str(d.SOPInstanceUID)
        for d in c_find(
            node, QR_AE, QueryRetrieveLevel="IMAGE", StudyInstanceUID=study, SOPInstanceUID=""
        )
    }
    assert listed == set()
    assert c_find(node, QR_AE, QueryRetrieveLevel="STUDY", StudyInstanceUID=study) == []
    # the check did read the files: a study of the consented patient alone is listed
    listed = {
        str(d.SOPInstanceUID)
        for d in c_find(
            node, QR_AE, QueryRetrieveLevel="IMAGE", StudyInstanceUID=other, SOPInstanceUID=""
        )
    }
    assert listed == {c.SOPInstanceUID}


def test_other_demographics_under_one_patient_id_are_not_listed(node) -> None:
    """B has P-GRANTED's Patient ID but other demographics, in a study of its own: the
    archive files it under P-GRANTED's row. B's study and the patient row (which holds B)
    are not listed; P-GRANTED's own study is."""
    add_patient(node, "P-GRANTED")
    grant(node, "P-GRANTED")
    a = make_ds("P-GRANTED", study_uid=generate_uid())
    b = make_ds("P-GRANTED", study_uid=generate_uid(), birth="19851231", sex="M")
    assert store(node, a, b) == [0, 0]
    studies = {
        str(d.StudyInstanceUID)
        for d in c_find(
            node, QR_AE, QueryRetrieveLevel="STUDY", PatientID="P-GRANTED", StudyInstanceUID=""
        )
    }
    assert studies == {str(a.StudyInstanceUID)}
    assert (
        c_find(node, QR_AE, patient_root=True, QueryRetrieveLevel="PATIENT", PatientID="P-GRANTED")
        == []
    )
    assert (
        len(
            c_find(
                node,
                PACS_AE,
                patient_root=True,
                QueryRetrieveLevel="PATIENT",
                PatientID="P-GRANTED",
            )
        )
        == 1
    )


def test_issuer_only_in_qualifiers_sequence_keys_the_archive(node) -> None:
    """B names its issuer only in Issuer of Patient ID Qualifiers Sequence (no (0010,0021)).
    Routing resolves it to the other establishment's patient (refused); the archive files
    it under that issuer too (not under the consented CHR-METZ patient with the same
    Patient ID), so neither C-FIND nor C-GET shows it."""
    other_issuer = "1.2.250.1.71.4.2.1"
    add_patient(node, "SHARED-1")  # CHR-METZ, 1970-01-01
    add_patient(node, "SHARED-1", issuer=other_issuer, birth="1980-05-05", sex="F")
    grant(node, "SHARED-1")
    refuse(node, "SHARED-1", issuer=other_issuer)
    a = make_ds("SHARED-1", study_uid=generate_uid())  # the consented CHR-METZ patient
    study_b = generate_uid()
    b = make_ds(
        "SHARED-1",
        study_uid=study_b,
        issuer=None,
        qualifier_uid=other_issuer,
        birth="19800505",
        sex="F",
        name="OTHER^PATIENT",
    )
    assert store(node, a, b) == [0, 0]
    assert job_states(node.runtime)[b.SOPInstanceUID] == "dropped"  # routing: refused
    status, got = c_get(node, QR_AE, QueryRetrieveLevel="STUDY", StudyInstanceUID=study_b)
    assert b.SOPInstanceUID not in got, f"LEAK: status={status:#06x}, B retrieved"
    studies = {
        str(d.StudyInstanceUID)
        for d in c_find(
            node, QR_AE, QueryRetrieveLevel="STUDY", PatientID="SHARED-1", StudyInstanceUID=""
        )
    }
    assert studies == {str(a.StudyInstanceUID)}
    found = node.runtime.index.find_instance(b.SOPInstanceUID)
    assert found is not None
    with node.runtime.sessions() as session:
        issuers = set(session.scalars(select(ArchivedPatient.issuer)).all())
    assert issuers == {ISSUER, other_issuer}


def test_contradicting_demographics_held_and_withheld(node) -> None:
    """B has P-GRANTED's IPP but another birth date and sex: routing holds it for
    reconciliation; the archive files it under P-GRANTED's row (same IPP), and B's own
    demographics withhold it."""
    add_patient(node, "P-GRANTED")
    grant(node, "P-GRANTED")
    a = make_ds("P-GRANTED", study_uid=generate_uid())
    study_b = generate_uid()
    b = make_ds("P-GRANTED", study_uid=study_b, birth="19851231", sex="M", name="SOMEONE^ELSE")
    assert store(node, a, b) == [0, 0]
    jobs = job_states(node.runtime)
    assert jobs[a.SOPInstanceUID] == "ready"
    assert jobs[b.SOPInstanceUID] == "held"
    status, got = c_get(node, QR_AE, QueryRetrieveLevel="STUDY", StudyInstanceUID=study_b)
    assert b.SOPInstanceUID not in got, f"LEAK: status={status:#06x}, held instance retrieved"


def test_conflicting_ins_held_and_withheld(node) -> None:
    """B has P-GRANTED's IPP and, in Other Patient IDs Sequence, the qualified INS of a
    patient who refused. Routing: mismatch, held; retrieve: withheld on the same INS."""
    ins = matricule("1700175123456")
    add_patient(node, "P-GRANTED")
    add_patient(node, "P-INS", sex="M", ins=ins, status="QUAL")
    grant(node, "P-GRANTED")
    refuse(node, "P-INS")
    study_b = generate_uid()
    b = make_ds("P-GRANTED", study_uid=study_b, ins=(INS_NIR_OID, ins))
    assert store(node, b) == [0]
    assert job_states(node.runtime)[b.SOPInstanceUID] == "held"
    status, got = c_get(node, QR_AE, QueryRetrieveLevel="STUDY", StudyInstanceUID=study_b)
    assert b.SOPInstanceUID not in got, f"LEAK: status={status:#06x}, INS conflict"


def test_foreign_instance_not_moved_by_care_team_pacs_to_regional(node) -> None:
    """The care team's PACS (no purpose) moves the consented study to the purpose-bound
    regional peer: the destination's purpose applies to each instance's own identity, so
    the refused patient's instance filed in that study stays."""
    regional = node.settings.peer_by_name("regional")
    dest = RecordingScp(QR_AE, regional.port).start()
    try:
        add_patient(node, "P-GRANTED")
        add_patient(node, "P-REFUSED")
        grant(node, "P-GRANTED")
        refuse(node, "P-REFUSED")
        study = generate_uid()
        a = make_ds("P-GRANTED", study_uid=study)
        b = make_ds("P-REFUSED", study_uid=study, name="SECRET^REFUSED")
        assert store(node, a, b) == [0, 0]
        status = c_move(node, PACS_AE, QR_AE, QueryRetrieveLevel="STUDY", StudyInstanceUID=study)
        assert b.SOPInstanceUID not in dest.uids(), f"LEAK via C-MOVE: status={status:#06x}"
        assert a.SOPInstanceUID in dest.uids()
    finally:
        dest.stop()


def test_two_conflicting_ins_in_other_patient_ids_are_held(node) -> None:
    """Other Patient IDs Sequence carries two qualified INS of two different patients: the
    consented one first, then one who refused. Every INS counts: the instance is held for
    reconciliation, not forwarded."""
    ins_ok = matricule("1700175123456")
    ins_no = matricule("2700175654321")
    add_patient(node, "P-OK", sex="M", ins=ins_ok, status="QUAL")
    add_patient(node, "P-NO", sex="F", ins=ins_no, status="QUAL")
    grant(node, "P-OK")
    refuse(node, "P-NO")
    b = make_ds("P-OK", study_uid=generate_uid(), ins=(INS_NIR_OID, ins_ok))
    # append the refused patient's INS as a second item
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    item = Dataset()
    item.PatientID = ins_no
    item.IssuerOfPatientID = "ASIP-SANTE-INS-NIR"
    q = Dataset()
    q.UniversalEntityID = INS_NIR_OID
    q.UniversalEntityIDType = "ISO"
    item.IssuerOfPatientIDQualifiersSequence = DicomSequence([q])
    b.OtherPatientIDsSequence.append(item)
    b.PatientSex = "M"  # P-OK's sex
    assert store(node, b) == [0]
    state = job_states(node.runtime)[b.SOPInstanceUID]
    from sqlalchemy import select

    from router.models import ForwardJob

    with node.runtime.sessions() as s:
        note = s.scalars(select(ForwardJob.last_error)).all()
    assert state == "held", f"LEAK (forward): contradictory INS, job {state} {note}"


def _row_created_by_a_held_instance(node) -> tuple[str, str, Dataset, Dataset]:
    """Consented P-G, refused P-R (with a qualified INS). W (P-R) and X (P-G's Patient ID,
    P-R's INS: held) share P-R's Study Instance UID; X is the first instance naming P-G,
    so it creates P-G's archive row; Y is P-G's genuine study. Returns (P-R's study,
    P-G's study, X, Y)."""
    ins_r = matricule("1700175123456")
    add_patient(node, "P-G")
    add_patient(node, "P-R", sex="M", ins=ins_r, status="QUAL")
    grant(node, "P-G")
    refuse(node, "P-R")
    study_r = generate_uid()
    w = make_ds("P-R", study_uid=study_r, sex="M", name="REFUSED^PERSON")
    x = make_ds("P-G", study_uid=study_r, ins=(INS_NIR_OID, ins_r), name="SECRET^REFUSED")
    study_g = generate_uid()
    y = make_ds("P-G", study_uid=study_g, name="GENUINE^GRANTED")
    assert store(node, w, x, y) == [0, 0, 0]
    return study_r, study_g, x, y


def test_held_instance_that_created_a_patient_row_does_not_show_through_it(node) -> None:
    """X carries consented P-G's Patient ID but refused P-R's INS (held), and reuses
    P-R's Study Instance UID: it is filed under P-R's study, yet it is the first
    instance naming P-G, so it creates P-G's archive row with its own name. The row is
    checked on X's identity (INS included): neither the row nor P-G's genuine study,
    which shows the row's name, is listed; the row alone, without instances, neither."""
    _, study_g, x, y = _row_created_by_a_held_instance(node)
    jobs = job_states(node.runtime)
    assert (jobs[x.SOPInstanceUID], jobs[y.SOPInstanceUID]) == ("held", "ready")
    patients = c_find(
        node, QR_AE, patient_root=True, QueryRetrieveLevel="PATIENT", PatientID="*", PatientName=""
    )
    studies = c_find(
        node, QR_AE, QueryRetrieveLevel="STUDY", StudyInstanceUID=study_g, PatientName=""
    )
    names = {str(d.PatientName) for d in [*patients, *studies]}
    assert "SECRET^REFUSED" not in names
    # the care team sees the row as the archive holds it
    care = c_find(node, PACS_AE, patient_root=True, QueryRetrieveLevel="PATIENT", PatientID="P-G")
    assert len(care) == 1


def test_instance_whose_identity_cannot_be_stored_is_withheld(node) -> None:
    """An identity too long for the index (here 20 Other Patient IDs items with INS
    OIDs) is stored as a marker that no check accepts: the instance is withheld from the
    purpose-bound peer even though its Patient ID names a consented patient."""
    add_patient(node, "P-GRANTED")
    grant(node, "P-GRANTED")
    ds = make_ds("P-GRANTED", study_uid=generate_uid())
    ds.OtherPatientIDsSequence = DicomSequence(
        [_ins_item(f"9{i:014d}", "1.2.250.1.213.1.4.10") for i in range(20)]
    )
    assert store(node, ds) == [0]
    found = node.runtime.index.find_instance(ds.SOPInstanceUID)
    assert found is not None and found.identity == UNSTORABLE
    status, got = c_get(
        node, QR_AE, QueryRetrieveLevel="STUDY", StudyInstanceUID=ds.StudyInstanceUID
    )
    assert got == set() and status == 0x0000  # withheld, not disclosed


def test_file_check_tries_every_issuer_that_may_have_applied(tmp_path: Path, db_url: str) -> None:
    """An instance indexed without a stored identity (before schema 0004) and whose file
    names no issuer: two peers share its sender's AE title with different issuers, and it
    was filed under the other site's consented patient's study. Every issuer that may
    have applied is tried, and the refused CHR-METZ patient withholds it."""
    twin = PeerSettings(
        "modality-site-a",
        MODALITY_AE,
        "10.9.9.9",
        104,
        frozenset({"echo", "store"}),
        issuer="HOSP-A",
    )
    settings = regional_settings(tmp_path, db_url, first_peers=(twin,))
    running = start_node(settings)
    try:
        seed_purpose(running.runtime.consent, PURPOSE)
        add_patient(running, "P-X", issuer="HOSP-A")
        add_patient(running, "P-X")
        grant(running, "P-X", issuer="HOSP-A")
        refuse(running, "P-X")
        study = generate_uid()
        a = make_ds("P-X", study_uid=study, issuer="HOSP-A")
        x = make_ds("P-X", study_uid=study, issuer=None)
        assert store(running, a, x) == [0, 0]
        assert job_states(running.runtime)[x.SOPInstanceUID] == "dropped"
        with running.runtime.sessions.begin() as session:  # as if indexed before 0004/0005
            session.execute(update(ArchivedInstance).values(identity=None))
            session.execute(update(ArchivedPatient).values(identity=None))
        status, got = c_get(running, QR_AE, QueryRetrieveLevel="STUDY", StudyInstanceUID=study)
        assert got == {a.SOPInstanceUID} and status == 0x0000  # x withheld, not disclosed
    finally:
        running.stop()
        running.runtime.close()


def test_held_study_naming_several_patients_is_not_linked_as_a_whole(node) -> None:
    """An unknown patient's instance and a refused patient's instance with other
    demographics share a Study Instance UID, both held for reconciliation. Linking the
    study to the newly registered patient would release the refused patient's instance
    under someone else's consent: the link is refused with a message; reject works."""
    add_patient(node, "P-R")
    refuse(node, "P-R")
    study = generate_uid()
    unknown = make_ds("P-UNREG", study_uid=study, name="NEW^PATIENT")
    foreign = make_ds("P-R", study_uid=study, birth="19851231", sex="M", name="OTHER^ONE")
    assert store(node, unknown, foreign) == [0, 0]
    jobs = job_states(node.runtime)
    assert jobs[unknown.SOPInstanceUID] == jobs[foreign.SOPInstanceUID] == "held"
    add_patient(node, "P-UNREG")
    grant(node, "P-UNREG")
    with pytest.raises(click.ClickException, match="naming 2 different patient"):
        _resolve_held(node.runtime, study, ISSUER, "P-UNREG", False, "op")
    assert set(job_states(node.runtime).values()) == {"held"}
    assert "2 job(s)" in _resolve_held(node.runtime, study, None, None, True, "op")


def _ins_item(value: str, oid: str) -> Dataset:
    item = Dataset()
    item.PatientID = value
    qualifier = Dataset()
    qualifier.UniversalEntityID = oid
    qualifier.UniversalEntityIDType = "ISO"
    item.IssuerOfPatientIDQualifiersSequence = DicomSequence([qualifier])
    return item


# ---------------------------------------------------------------- forwarding and retention


class SlowAcceptScp:
    """Storage SCP that holds its first association request until released."""

    def __init__(self, ae_title: str) -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.received: list[str] = []
        self.arrived = threading.Event()
        self.release = threading.Event()
        self._first = True

    def start(self) -> SlowAcceptScp:
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30

        def on_requested(event):  # type: ignore[no-untyped-def]
            if self._first:
                self._first = False
                self.arrived.set()
                self.release.wait(20)

        def on_store(event):  # type: ignore[no-untyped-def]
            self.received.append(str(event.request.AffectedSOPInstanceUID))
            return 0

        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_REQUESTED, on_requested), (evt.EVT_C_STORE, on_store)],
        )
        return self

    def stop(self) -> None:
        self._server.shutdown()


def test_withdrawal_during_association_setup_stops_the_send(tmp_path: Path) -> None:
    """The forwarder decides consent after its association is open, immediately before
    the send: a withdrawal committed while the destination is slow to accept wins."""
    dest = SlowAcceptScp("SLOWDEST").start()
    settings = make_settings(tmp_path / "data", f"sqlite:///{tmp_path / 'index.db'}")
    peer = PeerSettings(
        "slow", "SLOWDEST", "127.0.0.1", dest.port, frozenset({"echo"}), purpose=PURPOSE
    )
    route = RouteSettings(
        "to-slow",
        (MatchCondition("calling_ae", "equals", (MODALITY_AE,)),),
        ("slow",),
        purpose=PURPOSE,
    )
    settings = replace(settings, peers=(*settings.peers, peer), routes=(route,))
    node = start_node(settings)
    pool = None
    try:
        consent = node.runtime.consent
        seed_purpose(consent, PURPOSE)
        add_patient(node, "P-1")
        consent.grant(issuer=ISSUER, patient_id="P-1", purpose=PURPOSE, channel="cli", actor="t")
        pool = ForwarderPool(
            settings,
            node.runtime.queue,
            node.runtime.files,
            consent.decide,
            ForwarderOptions(batch_size=8, poll_interval=0.1, idle_release=1.0),
        )
        node.runtime.wakeups.subscribe(pool.wake)
        pool.start()
        ds = make_ds("P-1", study_uid=generate_uid())
        assert store(node, ds) == [0]
        assert dest.arrived.wait(10), "forwarder never connected"
        # the worker has decided PERMIT and is waiting for the association to be accepted
        consent.withdraw(issuer=ISSUER, patient_id="P-1", purpose=PURPOSE, channel="cli", actor="t")
        assert not consent.decide(consent.find_patient(ISSUER, "P-1"), PURPOSE).permitted
        dest.release.set()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not dest.received:
            time.sleep(0.1)
        state = job_states(node.runtime)[ds.SOPInstanceUID]
        assert ds.SOPInstanceUID not in dest.received, (
            f"LEAK: sent after the withdrawal was committed (job state {state})"
        )
        assert wait_until(
            lambda: job_states(node.runtime)[ds.SOPInstanceUID] == "dropped", 10, "job dropped"
        )
    finally:
        dest.release.set()
        if pool is not None:
            pool.stop()
        node.stop()
        node.runtime.close()
        dest.stop()


def test_reject_then_candidate_refusal_keeps_unconfirmed_instance(tmp_path: Path) -> None:
    settings = regional_settings(tmp_path)
    settings = replace(settings, router=replace(settings.router, retention="delete-unneeded"))
    node = start_node(settings)
    rt = node.runtime
    try:
        consent = rt.consent
        seed_purpose(consent, PURPOSE)
        add_patient(node, "P-X")  # born 1970-01-01
        study = generate_uid()
        other_person = make_ds("P-X", study_uid=study, birth="19851231", sex="M")
        assert store(node, other_person) == [0]
        assert job_states(rt)[other_person.SOPInstanceUID] == "held"  # reconciliation
        sync = ConsentSync(
            rt.queue,
            rt.sessions,
            consent.decide,
            consent.changes_since,
            consent.last_event_id,
            retention=Retention(
                "delete-unneeded", rt.sessions, rt.files, forget_parents=rt.index.forget_parents
            ),
        )
        assert "dropped" in _resolve_held(rt, study, None, None, True, "admin")
        assert rt.index.find_instance(other_person.SOPInstanceUID) is not None
        consent.refuse(issuer=ISSUER, patient_id="P-X", purpose=PURPOSE, channel="cli", actor="t")
        sync.poll()
        assert rt.index.find_instance(other_person.SOPInstanceUID) is not None, (
            "DATA LOSS: an instance never matched to P-X was deleted by P-X's refusal"
        )
    finally:
        node.stop()
        node.runtime.close()


# ---------------------------------------------------------------- identity variants and logs


@pytest.fixture
def variants_node(tmp_path: Path) -> Iterator[RunningNode]:
    """A node where CHR-METZ "P-123" refused and "123" and "abc" consented."""
    settings = regional_settings(tmp_path)
    running = start_node(settings)
    try:
        seed_purpose(running.runtime.consent, PURPOSE)
        for pid in ("P-123", "123", "abc"):
            add_patient(running, pid)
        refuse(running, "P-123")
        grant(running, "123")
        grant(running, "abc")
        yield running
    finally:
        running.stop()
        running.runtime.close()


@pytest.mark.parametrize(
    ("pid", "extra", "shared"),
    [
        ("0123", {}, False),  # a leading zero: another Patient ID
        ("ABC", {}, False),  # another case
        ("P-123  ", {}, False),  # the refused patient, with trailing spaces
        ("123", {"birth": "19700102"}, False),  # birth date contradicts
        ("123", {"sex": "F"}, True),  # stored sex U is compatible (by design)
        ("123", {"issuer": "OTHER-HOSP"}, False),  # another issuer
        ("P-123\\123", {}, False),  # a multi-valued Patient ID
    ],
)
def test_identity_variants(
    variants_node: RunningNode, pid: str, extra: dict[str, str], shared: bool
) -> None:
    """Near-miss identities are neither forwarded nor served to the purpose-bound peer."""
    study = generate_uid()
    ds = make_ds(pid, study_uid=study, **extra)
    assert store(variants_node, ds) == [0]
    state = job_states(variants_node.runtime)[ds.SOPInstanceUID]
    _, got = c_get(variants_node, QR_AE, QueryRetrieveLevel="STUDY", StudyInstanceUID=study)
    found = c_find(variants_node, QR_AE, QueryRetrieveLevel="STUDY", StudyInstanceUID=study)
    served = ds.SOPInstanceUID in got or bool(found)
    assert (state == "ready", served) == (shared, shared), (state, served)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_no_patient_data_in_ordinary_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """INFO and above hold no patient name, ID or birth date: stores (one held for
    reconciliation, one refused by the node), queries with those keys, a bad query
    level, a retrieve and a move to an unknown destination."""
    secrets = ("ZORGLUB", "PID-SECRET-77", "19551122")
    setup_logging(logging.INFO)  # the library log levels of a node, whatever ran before
    caplog.set_level(logging.INFO)
    settings = regional_settings(tmp_path)
    node = start_node(settings)
    try:
        seed_purpose(node.runtime.consent, PURPOSE)
        add_patient(node, "PID-SECRET-77", birth="1955-11-22")
        grant(node, "PID-SECRET-77")
        study = generate_uid()
        good = make_ds("PID-SECRET-77", study_uid=study, name="ZORGLUB^A", birth="19551122")
        mismatch = make_ds(
            "PID-SECRET-77", study_uid=generate_uid(), name="ZORGLUB^B", birth="19551121"
        )
        assert store(node, good, mismatch) == [0, 0]
        # a data set the node refuses (its Study Instance UID is not a UID)
        bad = make_ds("PID-SECRET-77", study_uid="not-a-uid", name="ZORGLUB^C")
        ae = AE(ae_title=MODALITY_AE)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = associate(ae, node.host, node.port, ae_title=node.ae_title)
        assert assoc.is_established
        try:
            status = assoc.send_c_store(bad)
            assert int(status.Status) == 0xC212
        finally:
            assoc.release()
        c_find(
            node,
            QR_AE,
            QueryRetrieveLevel="STUDY",
            PatientName="ZORGLUB*",
            PatientID="PID-SECRET-77",
            PatientBirthDate="19551122",
        )
        c_find(node, QR_AE, expect=0xA900, QueryRetrieveLevel="BOGUS", PatientName="ZORGLUB*")
        c_get(node, QR_AE, QueryRetrieveLevel="STUDY", StudyInstanceUID=study)
        c_move(node, QR_AE, "NOWHERE", QueryRetrieveLevel="STUDY", PatientID="PID-SECRET-77")
    finally:
        node.stop()
        node.runtime.close()
    lines = [
        f"{r.name} {r.levelname} {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.INFO
    ]
    assert sum(line.startswith("dicom_node") for line in lines) > 5  # the node did log
    hits = [line for line in lines if any(s in line for s in secrets)]
    assert not hits, "patient data in logs:\n" + "\n".join(hits[:20])


def test_fixing_a_patient_row_shows_the_genuine_studies_again(node) -> None:
    """The held instance X created P-G's archive row (see the test above), so P-G's
    genuine study is withheld from the purpose-bound peer. Pointing the row at that study
    (`consentgate studies fix-patient-row`) lists it again, with the genuine name; X's
    name never shows, and a study already showing its patient is left as it is."""
    study_r, study_g, _, _ = _row_created_by_a_held_instance(node)

    def visible() -> tuple[list[Dataset], list[Dataset]]:
        return (
            c_find(
                node, QR_AE, QueryRetrieveLevel="STUDY", StudyInstanceUID=study_g, PatientName=""
            ),
            c_find(
                node,
                QR_AE,
                patient_root=True,
                QueryRetrieveLevel="PATIENT",
                PatientID="P-G",
                PatientName="",
            ),
        )

    assert visible() == ([], [])
    runtime = node.runtime
    change = show_study_patient(runtime.sessions, runtime.files, study_g, runtime.gate.confirms)
    assert change.changed
    studies, patients = visible()
    assert [str(d.PatientName) for d in studies + patients] == ["GENUINE^GRANTED"] * 2
    with runtime.sessions() as session:
        row = session.get_one(ArchivedPatient, change.patient_pk)
    assert (row.patient_id, row.patient_name) == ("P-G", "GENUINE^GRANTED")

    # study_r's row is P-R's, created by W, which names P-R: nothing to change
    assert not show_study_patient(
        runtime.sessions, runtime.files, study_r, runtime.gate.confirms
    ).changed
    with pytest.raises(PatientRowError, match="no archived study"):
        show_study_patient(runtime.sessions, runtime.files, generate_uid(), runtime.gate.confirms)


def test_an_instance_of_an_unknown_sender_is_held_and_withheld(node) -> None:
    """What a journal replay files when it cannot tell which peer (so which issuer) sent
    an instance: here P-A's Patient ID with P-B's qualified INS, which the live path
    holds as a mismatch. Filed without an identity, it is held for reconciliation (not
    resolved by its INS alone to P-B, who consented) and withheld from the regional
    peer; the care team still sees it."""
    ins_b = matricule("1700175123456")
    add_patient(node, "P-A")
    add_patient(node, "P-B", ins=ins_b, status="QUAL")
    grant(node, "P-B")
    study = generate_uid()
    x = make_ds("P-A", study_uid=study, issuer=None, ins=(INS_NIR_OID, ins_b))
    dataset = encode(x, False, True)
    assert dataset is not None
    node.runtime.archive.store(
        dataset,
        transfer_syntax_uid=str(ExplicitVRLittleEndian),
        command_sop_class_uid=str(x.SOPClassUID),
        command_sop_instance_uid=str(x.SOPInstanceUID),
        calling_ae=MODALITY_AE,
        sender_known=False,
    )
    assert job_states(node.runtime)[x.SOPInstanceUID] == "held"
    with node.runtime.sessions() as session:
        stored = session.scalars(
            select(ArchivedInstance.identity).where(
                ArchivedInstance.sop_instance_uid == x.SOPInstanceUID
            )
        ).one()
    assert stored == UNSTORABLE
    assert c_find(node, QR_AE, QueryRetrieveLevel="STUDY", StudyInstanceUID=study) == []
    assert len(c_find(node, PACS_AE, QueryRetrieveLevel="STUDY", StudyInstanceUID=study)) == 1
