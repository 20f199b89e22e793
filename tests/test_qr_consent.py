"""Consent at the query/retrieve exits: C-FIND, C-MOVE and C-GET from a purpose-bound peer.

The node holds four patients' studies: one granted, one refused, one registered but never
asked, one unknown to the consent store. The peer "regional-qr" has ``purpose`` set and
uses the DCMTK tools (findscu, movescu, getscu); it must see and receive the granted
patient only. The peer "pacs" (no purpose: the care team's own PACS) sees everything.
Every test runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)
from sqlalchemy import select

from config.settings import PeerSettings
from consent.models import AuditEntry
from tests.conftest import (
    ISSUER,
    PACS_AE,
    RunningNode,
    free_port,
    make_settings,
    run_tool,
    seed_patient,
    seed_purpose,
    send_storescu,
    start_node,
)
from tests.corpus import CorpusFile, make_small_series
from tests.scu_support import associate

PURPOSE = "regional-sharing"
QR_AE = "REGIONALQR"


@dataclass
class QrSetup:
    node: RunningNode
    qr_port: int  # where "regional-qr" receives C-MOVE sub-operations
    pacs_port: int
    studies: dict[str, list[CorpusFile]]  # by role: granted, refused, never, unknown
    tmp: Path

    def uids(self, *roles: str) -> set[str]:
        return {f.sop_instance_uid for r in roles for f in self.studies[r]}

    def study(self, role: str) -> str:
        return self.studies[role][0].study_uid

    def series(self, role: str) -> str:
        return self.studies[role][0].series_uid

    def pid(self, role: str) -> str:
        return self.studies[role][0].patient_id


@pytest.fixture
def qr(tmp_path: Path, db_url: str) -> Iterator[QrSetup]:
    studies = {
        role: make_small_series(tmp_path / role, count, patient_id=f"P-{role.upper()}", seed=n)
        for n, (role, count) in enumerate(
            [("granted", 3), ("refused", 2), ("never", 2), ("unknown", 2)], start=21
        )
    }
    settings = make_settings(tmp_path / "data", db_url)
    qr_port = free_port()
    regional = PeerSettings(
        "regional-qr",
        QR_AE,
        "127.0.0.1",
        qr_port,
        frozenset({"echo", "find", "move", "get"}),
        purpose=PURPOSE,
    )
    settings = replace(settings, peers=(*settings.peers, regional))
    pacs = settings.peer_by_name("pacs")
    assert pacs is not None and not pacs.purpose
    node = start_node(settings)
    try:
        store = node.runtime.consent
        seed_purpose(store, PURPOSE)
        for role in ("granted", "refused", "never"):
            seed_patient(store, f"P-{role.upper()}")
        store.grant(
            issuer=ISSUER, patient_id="P-GRANTED", purpose=PURPOSE, channel="cli", actor="t"
        )
        store.refuse(
            issuer=ISSUER, patient_id="P-REFUSED", purpose=PURPOSE, channel="cli", actor="t"
        )
        send_storescu(node.host, node.port, [f.path for fs in studies.values() for f in fs])
        yield QrSetup(node, qr_port, pacs.port, studies, tmp_path)
    finally:
        node.stop()
        node.runtime.close()


# -- DCMTK helpers -----------------------------------------------------------------------------

_counter = iter(range(1_000_000))


def _out_dir(qr: QrSetup, name: str) -> Path:
    path = qr.tmp / f"{name}-{next(_counter)}"
    path.mkdir()
    return path


def findscu(qr: QrSetup, calling_ae: str, model: str, *keys: str) -> list[Dataset]:
    """The C-FIND matches findscu receives; fails unless the final status is Success."""
    out = _out_dir(qr, "find")
    args: list[str] = []
    for key in keys:
        args += ["-k", key]
    result = run_tool(
        "/usr/bin/findscu",
        "-v",
        "-X",
        "-od",
        out,
        "-aet",
        calling_ae,
        "-aec",
        qr.node.ae_title,
        model,
        *args,
        qr.node.host,
        qr.node.port,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-2000:]
    assert "Received Final Find Response (Success)" in output, output[-2000:]
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def _received(directory: Path) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in directory.iterdir()}


_FINAL = re.compile(r"Received (?:Final Move Response|C-GET Response) \(([^)]*)\)")


def _final_status(output: str) -> str:
    """The text DCMTK prints for the last (final) C-MOVE / C-GET response."""
    found = _FINAL.findall(output)
    assert found, output[-2000:]
    return str(found[-1])


def movescu(qr: QrSetup, calling_ae: str, port: int, *keys: str) -> tuple[str, set[str]]:
    """C-MOVE (Study Root) to the caller itself; returns the final status text and the SOP
    Instance UIDs movescu received on ``port``."""
    out = _out_dir(qr, "move")
    args: list[str] = []
    for key in keys:
        args += ["-k", key]
    result = run_tool(
        "/usr/bin/movescu",
        "-v",
        "-aet",
        calling_ae,
        "-aem",
        calling_ae,
        "+P",
        port,
        "-od",
        out,
        "-aec",
        qr.node.ae_title,
        "-S",
        *args,
        qr.node.host,
        qr.node.port,
    )
    return _final_status(result.stdout + result.stderr), _received(out)


def getscu(qr: QrSetup, calling_ae: str, *keys: str) -> tuple[str, set[str]]:
    """C-GET (Study Root); returns the final status text and the received UIDs."""
    out = _out_dir(qr, "get")
    args: list[str] = []
    for key in keys:
        args += ["-k", key]
    result = run_tool(
        "/usr/bin/getscu",
        "-v",
        "-aet",
        calling_ae,
        "-aec",
        qr.node.ae_title,
        "-S",
        "-od",
        out,
        *args,
        qr.node.host,
        qr.node.port,
    )
    return _final_status(result.stdout + result.stderr), _received(out)


SUCCESS = "Success"
WARNING = "Warning: SubOperationsCompleteOneOrMoreFailures"
REFUSED = "Unknown Status: 0x124"  # DCMTK has no name for 0x0124 (Refused: Not Authorized)
#: what a purpose-bound peer gets for instances withheld from it: the answer it would get
#: if they did not exist (a status or a count would tell that they do)
UNDISCLOSED = SUCCESS


# -- C-FIND ----------------------------------------------------------------------------------


def test_find_shows_only_consented_patients_at_every_level(qr: QrSetup) -> None:
    granted = qr.pid("granted")
    # PATIENT level (Patient Root), universal match
    found = findscu(qr, QR_AE, "-P", "QueryRetrieveLevel=PATIENT", "PatientID")
    assert [str(d.PatientID) for d in found] == [granted]
    # PATIENT level, asking for a hidden patient by id
    for role in ("refused", "never", "unknown"):
        found = findscu(qr, QR_AE, "-P", "QueryRetrieveLevel=PATIENT", f"PatientID={qr.pid(role)}")
        assert found == [], role
    # STUDY level, both roots
    for model in ("-P", "-S"):
        keys = ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientID"]
        if model == "-P":
            keys.append("PatientID=*")
        found = findscu(qr, QR_AE, model, *keys)
        assert {str(d.StudyInstanceUID) for d in found} == {qr.study("granted")}, model
    # SERIES and IMAGE levels, naming each study (and series) explicitly
    for role in ("granted", "refused", "never", "unknown"):
        found = findscu(
            qr,
            QR_AE,
            "-S",
            "QueryRetrieveLevel=SERIES",
            f"StudyInstanceUID={qr.study(role)}",
            "SeriesInstanceUID",
        )
        expected = {qr.series(role)} if role == "granted" else set()
        assert {str(d.SeriesInstanceUID) for d in found} == expected, role
        found = findscu(
            qr,
            QR_AE,
            "-S",
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={qr.study(role)}",
            f"SeriesInstanceUID={qr.series(role)}",
            "SOPInstanceUID",
        )
        expected = qr.uids(role) if role == "granted" else set()
        assert {str(d.SOPInstanceUID) for d in found} == expected, role


def test_find_from_a_peer_without_purpose_sees_everything(qr: QrSetup) -> None:
    found = findscu(qr, PACS_AE, "-P", "QueryRetrieveLevel=PATIENT", "PatientID")
    assert {str(d.PatientID) for d in found} == {
        qr.pid(r) for r in ("granted", "refused", "never", "unknown")
    }
    found = findscu(qr, PACS_AE, "-S", "QueryRetrieveLevel=IMAGE", "SOPInstanceUID")
    assert {str(d.SOPInstanceUID) for d in found} == qr.uids(
        "granted", "refused", "never", "unknown"
    )


# -- C-MOVE and C-GET --------------------------------------------------------------------------


def test_move_sends_only_permitted_instances(qr: QrSetup) -> None:
    study = "QueryRetrieveLevel=STUDY"
    status, received = movescu(
        qr, QR_AE, qr.qr_port, study, f"StudyInstanceUID={qr.study('granted')}"
    )
    assert (status, received) == (SUCCESS, qr.uids("granted"))
    for role in ("refused", "unknown"):  # (never asked: C-FIND and C-GET tests)
        status, received = movescu(
            qr, QR_AE, qr.qr_port, study, f"StudyInstanceUID={qr.study(role)}"
        )
        assert (status, received) == (UNDISCLOSED, set()), role
    # a request naming a permitted and a refused study: the permitted part only
    both = f"StudyInstanceUID={qr.study('granted')}\\{qr.study('refused')}"
    status, received = movescu(qr, QR_AE, qr.qr_port, study, both)
    assert (status, received) == (UNDISCLOSED, qr.uids("granted"))
    # image level, a hidden instance named by its UID
    hidden = next(iter(qr.uids("unknown")))
    status, received = movescu(
        qr, QR_AE, qr.qr_port, "QueryRetrieveLevel=IMAGE", f"SOPInstanceUID={hidden}"
    )
    assert (status, received) == (UNDISCLOSED, set())
    # the care team's PACS (no purpose) retrieves the refused study
    status, received = movescu(
        qr, PACS_AE, qr.pacs_port, study, f"StudyInstanceUID={qr.study('refused')}"
    )
    assert (status, received) == (SUCCESS, qr.uids("refused"))


def test_move_to_a_purpose_bound_destination_needs_that_purpose(qr: QrSetup) -> None:
    """The care team's PACS (no purpose of its own) asks for studies to be moved to the
    purpose-bound regional peer: the destination's purpose decides what leaves."""
    study = "QueryRetrieveLevel=STUDY"

    def move_to_regional(*roles: str) -> tuple[str, set[str]]:
        out = _out_dir(qr, "move-to-regional")
        result = run_tool(
            "/usr/bin/movescu",
            "-v",
            "-aet",
            PACS_AE,
            "-aem",
            QR_AE,  # received by movescu itself, listening as the regional peer
            "+P",
            qr.qr_port,
            "-od",
            out,
            "-aec",
            qr.node.ae_title,
            "-S",
            "-k",
            study,
            "-k",
            "StudyInstanceUID=" + "\\".join(qr.study(role) for role in roles),
            qr.node.host,
            qr.node.port,
        )
        return _final_status(result.stdout + result.stderr), _received(out)

    # the requester may see everything: it is told what the destination's purpose withheld
    assert move_to_regional("granted") == (SUCCESS, qr.uids("granted"))
    for role in ("refused", "never", "unknown"):
        assert move_to_regional(role) == (REFUSED, set()), role
    assert move_to_regional("granted", "refused") == (WARNING, qr.uids("granted"))


def test_get_sends_only_permitted_instances(qr: QrSetup) -> None:
    study = "QueryRetrieveLevel=STUDY"
    assert getscu(qr, QR_AE, study, f"StudyInstanceUID={qr.study('granted')}") == (
        SUCCESS,
        qr.uids("granted"),
    )
    for role in ("refused", "never", "unknown"):
        assert getscu(qr, QR_AE, study, f"StudyInstanceUID={qr.study(role)}") == (
            UNDISCLOSED,
            set(),
        ), role
    both = f"StudyInstanceUID={qr.study('unknown')}\\{qr.study('granted')}"
    assert getscu(qr, QR_AE, study, both) == (UNDISCLOSED, qr.uids("granted"))
    assert getscu(qr, PACS_AE, study, f"StudyInstanceUID={qr.study('never')}") == (
        SUCCESS,
        qr.uids("never"),
    )


def test_withdrawal_takes_effect_on_the_next_request(qr: QrSetup) -> None:
    """Two C-FINDs on one association around a withdrawal, then C-MOVE and C-GET."""
    store = qr.node.runtime.consent
    store.grant(issuer=ISSUER, patient_id="P-NEVER", purpose=PURPOSE, channel="cli", actor="t")
    ae = AE(ae_title=QR_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = associate(ae, qr.node.host, qr.node.port, ae_title=qr.node.ae_title)
    assert assoc.is_established

    def patients() -> set[str]:
        query = Dataset()
        query.QueryRetrieveLevel = "PATIENT"
        query.PatientID = ""
        found, final = set(), None
        for status, identifier in assoc.send_c_find(
            query, PatientRootQueryRetrieveInformationModelFind
        ):
            assert "Status" in status, "no C-FIND response"
            if status.Status == 0xFF00:
                found.add(str(identifier.PatientID))
            else:
                final = int(status.Status)
        assert final == 0x0000
        return found

    try:
        assert patients() == {qr.pid("granted"), qr.pid("never")}
        study = "QueryRetrieveLevel=STUDY"
        key = f"StudyInstanceUID={qr.study('never')}"
        assert movescu(qr, QR_AE, qr.qr_port, study, key) == (SUCCESS, qr.uids("never"))
        store.withdraw(
            issuer=ISSUER, patient_id="P-NEVER", purpose=PURPOSE, channel="cli", actor="t"
        )
        assert patients() == {qr.pid("granted")}  # same association, next request
    finally:
        assoc.release()
    assert movescu(qr, QR_AE, qr.qr_port, study, key) == (UNDISCLOSED, set())
    assert getscu(qr, QR_AE, study, key) == (UNDISCLOSED, set())
    # the purpose-bound peer's requests are traced in the (intact) audit log, with counts
    with qr.node.runtime.sessions() as session:
        entries = session.execute(
            select(AuditEntry.action, AuditEntry.details).where(AuditEntry.actor == "regional-qr")
        ).all()
    moves = [json.loads(d) for a, d in entries if a == "dicom.move"]
    assert [(m["permitted"], m["withheld"]) for m in moves] == [(2, 0), (0, 2)]
    assert len([a for a, _ in entries if a == "dicom.find"]) == 2
    assert len([a for a, _ in entries if a == "dicom.get"]) == 1
    assert store.verify_audit().ok
