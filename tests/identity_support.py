"""Helpers of the patient-identity tests (tests/test_consent_exits.py): build data sets
with chosen identity attributes, store them from the modality peer, and query/retrieve as
the purpose-bound peer ``regional``."""

from __future__ import annotations

from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from config.settings import MatchCondition, PeerSettings, RouteSettings, Settings
from tests.conftest import (
    ISSUER,
    MODALITY_AE,
    RunningNode,
    free_port,
    make_settings,
)
from tests.scu_support import associate

PURPOSE = "regional-sharing"
QR_AE = "REGIONALQR"
INS_NIR_OID = "1.2.250.1.213.1.4.8"


def matricule(body13: str) -> str:
    return body13 + f"{97 - int(body13) % 97:02d}"


def make_ds(
    patient_id: str,
    *,
    study_uid: str,
    series_uid: str | None = None,
    issuer: str | None = ISSUER,
    qualifier_uid: str | None = None,
    birth: str = "19700101",
    sex: str = "O",
    name: str = "DOE^JOHN",
    ins: tuple[str, str] | None = None,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    sop = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.PatientName = name
    ds.PatientID = patient_id
    if issuer is not None:
        ds.IssuerOfPatientID = issuer
    if qualifier_uid is not None:
        q = Dataset()
        q.UniversalEntityID = qualifier_uid
        q.UniversalEntityIDType = "ISO"
        ds.IssuerOfPatientIDQualifiersSequence = DicomSequence([q])
    ds.PatientBirthDate = birth
    ds.PatientSex = sex
    if ins is not None:
        item = Dataset()
        item.PatientID = ins[1]
        item.IssuerOfPatientID = "ASIP-SANTE-INS-NIR"
        q = Dataset()
        q.UniversalEntityID = ins[0]
        q.UniversalEntityIDType = "ISO"
        item.IssuerOfPatientIDQualifiersSequence = DicomSequence([q])
        ds.OtherPatientIDsSequence = DicomSequence([item])
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "A1"
    ds.StudyID = "1"
    ds.Modality = "CT"
    ds.SeriesNumber = "1"
    ds.InstanceNumber = "1"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.zeros((8, 8), dtype=np.uint16).tobytes()
    return ds


def store(node: RunningNode, *datasets: Dataset, calling_ae: str = MODALITY_AE) -> list[int]:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = associate(ae, node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    statuses = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status))
    finally:
        assoc.release()
    return statuses


def c_get(node: RunningNode, calling_ae: str, **keys: str) -> tuple[int | None, set[str]]:
    """C-GET (Study Root); returns (final status, SOP Instance UIDs received)."""
    received: set[str] = set()

    def on_store(event):  # type: ignore[no-untyped-def]
        received.add(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    role = build_role(CTImageStorage, scp_role=True)
    assoc = associate(
        ae,
        node.host,
        node.port,
        ae_title=node.ae_title,
        ext_neg=[role],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    query = Dataset()
    for k, v in keys.items():
        setattr(query, k, v)
    final = None
    try:
        for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            if status and "Status" in status and status.Status != 0xFF00:
                final = int(status.Status)
    finally:
        assoc.release()
    return final, received


def c_find(
    node: RunningNode,
    calling_ae: str,
    *,
    patient_root: bool = False,
    expect: int = 0x0000,
    **keys: str,
) -> list[Dataset]:
    """C-FIND (Study Root, or Patient Root); the matches. Fails unless the final status is
    ``expect`` (success by default: a refused or failed query must not pass for "nothing
    found")."""
    model = (
        PatientRootQueryRetrieveInformationModelFind
        if patient_root
        else StudyRootQueryRetrieveInformationModelFind
    )
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    ae.add_requested_context(model)
    assoc = associate(ae, node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    query = Dataset()
    for k, v in keys.items():
        setattr(query, k, v)
    found = []
    final = None
    try:
        for status, ident in assoc.send_c_find(query, model):
            if status and status.Status == 0xFF00:
                found.append(ident)
            elif status:
                final = int(status.Status)
    finally:
        assoc.release()
    assert final == expect, f"C-FIND ended with {final}"
    return found


def c_move(node: RunningNode, calling_ae: str, destination_ae: str, **keys: str) -> int | None:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = associate(ae, node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    query = Dataset()
    for k, v in keys.items():
        setattr(query, k, v)
    final = None
    try:
        for status, _ in assoc.send_c_move(
            query, destination_ae, StudyRootQueryRetrieveInformationModelMove
        ):
            if status and "Status" in status and status.Status != 0xFF00:
                final = int(status.Status)
    finally:
        assoc.release()
    return final


def add_patient(
    node: RunningNode,
    patient_id: str,
    *,
    issuer: str = ISSUER,
    birth: str = "1970-01-01",
    sex: str = "U",
    ins: str | None = None,
    status: str = "PROV",
) -> int:
    return node.runtime.consent.add_patient(
        issuer=issuer,
        patient_id=patient_id,
        birth_name=f"N{patient_id}".replace("-", ""),
        first_name="TEST",
        birth_date=date.fromisoformat(birth),
        sex=sex,
        ins=ins,
        identity_status=status,
        actor="test",
    )


def regional_peer(port: int) -> PeerSettings:
    return PeerSettings(
        "regional",
        QR_AE,
        "127.0.0.1",
        port,
        frozenset({"echo", "find", "move", "get"}),
        purpose=PURPOSE,
    )


def route_to_regional() -> RouteSettings:
    return RouteSettings(
        "to-regional",
        (MatchCondition("calling_ae", "equals", (MODALITY_AE,)),),
        ("regional",),
        purpose=PURPOSE,
    )


def regional_settings(
    tmp_path: Path, db_url: str | None = None, *, first_peers: tuple[PeerSettings, ...] = ()
) -> Settings:
    """The test node's settings plus the purpose-bound peer ``regional`` and the route
    to it (``first_peers`` listed before the usual peers); SQLite by default."""
    settings = make_settings(tmp_path / "data", db_url or f"sqlite:///{tmp_path / 'index.db'}")
    return replace(
        settings,
        peers=(*first_peers, *settings.peers, regional_peer(free_port())),
        routes=(route_to_regional(),),
    )
