"""Consent at the query/retrieve exits: a purpose-bound peer learns nothing of a patient
whose consent does not permit its purpose, neither the instances nor their attributes,
counts or existence.

Every test stores instances from the modality peer (issuer CHR-METZ) and queries or
retrieves with the DCMTK tools as the purpose-bound peer "regional" (AE REGIONALQR); the
consent store knows P-GRANTED (granted the purpose) and P-REFUSED (refused it). SQLite
and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import CTImageStorage

from tests.conftest import (
    ISSUER,
    MODALITY_AE,
    PACS_AE,
    RunningNode,
    run_tool,
    seed_purpose,
    start_node,
)
from tests.consent_exits_qr_support import findscu, getscu, movescu
from tests.identity_support import (
    PURPOSE,
    QR_AE,
    add_patient,
    make_ds,
    regional_settings,
    store,
)
from tests.scu_support import associate

SUCCESS = "Success"


@pytest.fixture
def node(tmp_path: Path, db_url: str) -> Iterator[RunningNode]:
    running = start_node(regional_settings(tmp_path, db_url))
    try:
        consent = running.runtime.consent
        seed_purpose(consent, PURPOSE)
        add_patient(running, "P-GRANTED")
        add_patient(running, "P-REFUSED", birth="1962-03-15", sex="F")
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


def _port(node: RunningNode, name: str) -> int:
    peer = node.settings.peer_by_name(name)
    assert peer is not None
    return peer.port


def _refused(**extra: str) -> Dataset:
    """An instance of the refused patient (her real demographics)."""
    ds = make_ds(
        "P-REFUSED",
        study_uid=extra.pop("study_uid", generate_uid()),
        series_uid=extra.pop("series_uid", None),
        name="SECRET^REFUSED",
        birth="19620315",
        sex="F",
    )
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, MultiValue | list):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


# -- what withheld data must not show ---------------------------------------------------------


def test_retrieve_status_does_not_tell_whether_withheld_data_exists(
    node: RunningNode, tmp_path: Path
) -> None:
    """C-MOVE and C-GET whose keys match only a refused patient's data (a wildcard on her
    name, a range on her birth date, her study description) answer with the same status
    and sub-operation counts as keys that match nothing. Otherwise the final status is a
    yes/no oracle: a purpose-bound peer reads her name letter by letter, her birth date by
    bisection, her study descriptions and how many instances she has.
    """
    refused = _refused(StudyDescription="PSYCHIATRIE")
    assert store(node, refused) == [0]
    regional_port = _port(node, "regional")

    # C-GET, Study Root, STUDY level: a wildcard on the patient's name
    name_hit = getscu(
        node, tmp_path, QR_AE, "-S", "QueryRetrieveLevel=STUDY", "PatientName=SECRET*"
    )
    name_miss = getscu(
        node, tmp_path, QR_AE, "-S", "QueryRetrieveLevel=STUDY", "PatientName=SECRES*"
    )
    # C-MOVE, Patient Root, PATIENT level: a range on the birth date of a known Patient ID
    keys = ("QueryRetrieveLevel=PATIENT", "PatientID=P-REFUSED")
    born_hit = movescu(
        node,
        tmp_path,
        QR_AE,
        QR_AE,
        regional_port,
        "-P",
        *keys,
        "PatientBirthDate=19620101-19621231",
    )
    born_miss = movescu(
        node,
        tmp_path,
        QR_AE,
        QR_AE,
        regional_port,
        "-P",
        *keys,
        "PatientBirthDate=19630101-19631231",
    )
    # C-GET on a study attribute
    desc_hit = getscu(
        node, tmp_path, QR_AE, "-S", "QueryRetrieveLevel=STUDY", "StudyDescription=PSY*"
    )
    desc_miss = getscu(
        node, tmp_path, QR_AE, "-S", "QueryRetrieveLevel=STUDY", "StudyDescription=CARDIO*"
    )
    for result in (name_hit, name_miss, born_hit, born_miss, desc_hit, desc_miss):
        assert not result.received  # nothing of hers is sent either way
    assert name_hit.seen_by_peer() == name_miss.seen_by_peer(), (
        f"leak: PatientName=SECRET* answers {name_hit.seen_by_peer()}, "
        f"SECRES* answers {name_miss.seen_by_peer()}"
    )
    assert born_hit.seen_by_peer() == born_miss.seen_by_peer(), (
        f"leak: birth date 1962 answers {born_hit.seen_by_peer()}, "
        f"1963 answers {born_miss.seen_by_peer()}"
    )
    assert desc_hit.seen_by_peer() == desc_miss.seen_by_peer(), (
        f"leak: StudyDescription=PSY* answers {desc_hit.seen_by_peer()}, "
        f"CARDIO* answers {desc_miss.seen_by_peer()}"
    )


def test_series_and_image_find_do_not_show_aggregates_of_a_withheld_instance(
    node: RunningNode, tmp_path: Path
) -> None:
    """A (P-GRANTED, CT) and B (P-REFUSED, MR) share a Study Instance UID. At SERIES and IMAGE
    level C-FIND shows no study aggregate that counts B (ModalitiesInStudy,
    NumberOfStudyRelatedSeries/Instances), and ModalitiesInStudy=MR as a matching key
    selects nothing. Otherwise A's rows tell the purpose-bound peer that the refused
    patient has an MR series in that study.
    """
    study = generate_uid()
    a = make_ds("P-GRANTED", study_uid=study)
    b = _refused(study_uid=study, Modality="MR")
    assert store(node, a, b) == [0, 0]
    aggregates = (
        "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    )
    series_rows = findscu(
        node,
        tmp_path,
        QR_AE,
        "-S",
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={study}",
        "SeriesInstanceUID",
        *aggregates,
    )
    image_rows = findscu(
        node,
        tmp_path,
        QR_AE,
        "-S",
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={study}",
        f"SeriesInstanceUID={a.SeriesInstanceUID}",
        "SOPInstanceUID",
        *aggregates,
    )
    mr_oracle = findscu(
        node,
        tmp_path,
        QR_AE,
        "-S",
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={study}",
        "ModalitiesInStudy=MR",
        "SeriesInstanceUID",
    )
    shown = [
        {k: _text(d, k) for k in aggregates}
        for d in series_rows + image_rows
        if "MR" in _text(d, "ModalitiesInStudy").split("\\")
        or _text(d, "NumberOfStudyRelatedSeries") not in ("", "1")
        or _text(d, "NumberOfStudyRelatedInstances") not in ("", "1")
    ]
    assert shown == [], f"leak: study aggregates counting the refused patient's B: {shown}"
    assert mr_oracle == [], "leak: ModalitiesInStudy=MR matches on B's series"


def test_image_find_does_not_show_series_attributes_set_by_a_withheld_instance(
    node: RunningNode, tmp_path: Path
) -> None:
    """B (P-REFUSED) creates a series ("PROTOCOLE VIH", PELVIS) in P-GRANTED's study, and C
    (P-GRANTED) is filed in that series. IMAGE-level C-FIND lists neither B nor series
    attributes B set (description, body part, the series' instance count), and
    SeriesDescription=PROTO* selects nothing. Otherwise C's row carries the refused
    patient's series description and body part to the purpose-bound peer.
    """
    study = generate_uid()
    series = generate_uid()
    a = make_ds("P-GRANTED", study_uid=study)
    b = _refused(
        study_uid=study,
        series_uid=series,
        SeriesDescription="PROTOCOLE VIH",
        BodyPartExamined="PELVIS",
    )
    c = make_ds("P-GRANTED", study_uid=study, series_uid=series)
    assert store(node, a, b, c) == [0, 0, 0]
    series_keys = ("SeriesDescription", "BodyPartExamined", "NumberOfSeriesRelatedInstances")
    rows = findscu(
        node,
        tmp_path,
        QR_AE,
        "-S",
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={study}",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        *series_keys,
    )
    listed = {_text(d, "SOPInstanceUID") for d in rows}
    assert b.SOPInstanceUID not in listed
    shown = [
        {k: _text(d, k) for k in series_keys}
        for d in rows
        if _text(d, "SeriesDescription") == "PROTOCOLE VIH"
        or _text(d, "BodyPartExamined") == "PELVIS"
        or _text(d, "NumberOfSeriesRelatedInstances") not in ("", "1")
    ]
    oracle = findscu(
        node,
        tmp_path,
        QR_AE,
        "-S",
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={study}",
        "SeriesDescription=PROTO*",
        "SOPInstanceUID",
    )
    assert shown == [], f"leak: series attributes of the refused patient's B: {shown}"
    assert oracle == [], "leak: SeriesDescription=PROTO* selects the series B created"


def test_series_find_does_not_show_study_attributes_set_by_another_person(
    node: RunningNode, tmp_path: Path
) -> None:
    """X has P-GRANTED's Patient ID but another birth date and sex (another person, withheld)
    and creates study S; C, a genuine P-GRANTED instance, is then filed in S. S is listed
    neither at STUDY level nor, through C's series, at SERIES level with X's description,
    accession number or date. Otherwise the study attributes of a person the checks
    withhold reach the purpose-bound peer.
    """
    a = make_ds("P-GRANTED", study_uid=generate_uid())  # creates P-GRANTED's patient row
    study = generate_uid()
    x = make_ds("P-GRANTED", study_uid=study, birth="19851231", sex="M")
    x.StudyDescription = "IVG DR X"
    x.AccessionNumber = "ACC-X-777"
    x.StudyDate = "20230505"
    c = make_ds("P-GRANTED", study_uid=study)
    assert store(node, a, x, c) == [0, 0, 0]
    study_keys = ("StudyDescription", "AccessionNumber", "StudyDate")
    assert (
        findscu(
            node,
            tmp_path,
            QR_AE,
            "-S",
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={study}",
            *study_keys,
        )
        == []
    )
    rows = findscu(
        node,
        tmp_path,
        QR_AE,
        "-S",
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={study}",
        "SeriesInstanceUID",
        *study_keys,
    )
    shown = [
        {k: _text(d, k) for k in study_keys}
        for d in rows
        if _text(d, "StudyDescription") == "IVG DR X"
        or _text(d, "AccessionNumber") == "ACC-X-777"
        or _text(d, "StudyDate") == "20230505"
    ]
    assert shown == [], f"leak: study attributes of X, another patient: {shown}"


def test_instance_is_counted_in_the_study_its_series_belongs_to(
    node: RunningNode, tmp_path: Path
) -> None:
    """C (P-REFUSED) names P-GRANTED's study X but the Series Instance UID of one of
    P-REFUSED's own series; the index's series cache has forgotten that series (as after a
    restart or on another node). C is filed and counted in that series' own study, so X,
    which the peer may see, still counts one instance. Otherwise X's count tells the
    purpose-bound peer that another patient's instance claims X.
    """
    study_x = generate_uid()
    a = make_ds("P-GRANTED", study_uid=study_x)
    b = _refused()
    assert store(node, a, b) == [0, 0]
    node.runtime.index.forget_parents()  # as after a restart or on another node
    c = _refused(study_uid=study_x, series_uid=str(b.SeriesInstanceUID))
    assert store(node, c) == [0]
    keys = ("NumberOfStudyRelatedInstances", "NumberOfStudyRelatedSeries", "ModalitiesInStudy")
    rows = findscu(
        node,
        tmp_path,
        QR_AE,
        "-S",
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={study_x}",
        *keys,
    )
    shown = [
        {k: _text(d, k) for k in keys}
        for d in rows
        if _text(d, "NumberOfStudyRelatedInstances") not in ("", "1")
    ]
    assert shown == [], f"leak: study X counts the refused patient's C: {shown}"


def _with_elements_after_pixel_data(ds: Dataset, path: Path, *elements: DataElement) -> Path:
    """A Part 10 file of ``ds`` followed, after its Pixel Data, by ``elements``."""
    ds.save_as(path, enforce_file_format=True)
    tail = DicomBytesIO()
    tail.is_little_endian = True
    tail.is_implicit_VR = False
    for element in elements:
        write_data_element(tail, element)
    with path.open("ab") as out:
        out.write(tail.getvalue())
    return path


def test_retrieve_sends_only_the_identity_that_was_checked(
    node: RunningNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instance labelled P-GRANTED whose data set goes on after Pixel Data with P-REFUSED's
    name, Patient ID, birth date and sex is either refused at storage, or a C-GET of its
    study sends no data set naming anyone but P-GRANTED. The node checks the identity it
    reads before Pixel Data; a reader of the whole file sees the later elements, so the
    refused patient's identity would leave under P-GRANTED's consent.
    """
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)  # raw bytes
    study = generate_uid()
    ds = make_ds("P-GRANTED", study_uid=study)
    path = _with_elements_after_pixel_data(
        ds,
        tmp_path / "crafted.dcm",
        DataElement(0x00100010, "PN", "SECRET^REFUSED"),
        DataElement(0x00100020, "LO", "P-REFUSED"),
        DataElement(0x00100030, "DA", "19620315"),
        DataElement(0x00100040, "CS", "F"),
    )
    ae = AE(ae_title=MODALITY_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = associate(ae, node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        stored = int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()
    if stored != 0x0000:
        return  # refused at storage: nothing can leave
    out = tmp_path / "got"
    out.mkdir()
    result = run_tool(
        "/usr/bin/getscu",
        "-v",
        "-aet",
        QR_AE,
        "-aec",
        node.ae_title,
        "-S",
        "-od",
        out,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study}",
        node.host,
        node.port,
    )
    received = [dcmread(p, stop_before_pixels=True) for p in out.iterdir()]
    leaked = [
        (str(r.PatientID), str(r.PatientName), str(r.PatientBirthDate))
        for r in received
        if str(r.PatientID) != "P-GRANTED" or "SECRET" in str(r.PatientName)
    ]
    assert leaked == [], f"leak: the purpose-bound peer received {leaked} ({result.returncode})"


# -- retrieve and query keys that target withheld data ---------------------------------------


def test_series_uid_reused_under_another_study_uid(node: RunningNode, tmp_path: Path) -> None:
    """B (P-REFUSED) names a study UID of its own but reuses the Series Instance UID of
    P-GRANTED's series, so the index files B in A's series and study. Retrieving A's study
    sends A alone with a plain Success (B is not counted, as if it did not exist); B is
    never sent by its study, series or SOP Instance UID; and C-FIND lists nothing of a
    study holding B at STUDY, SERIES or IMAGE level, so B's presence never shows.
    """
    study_a = generate_uid()
    a = make_ds("P-GRANTED", study_uid=study_a)
    b = _refused(series_uid=str(a.SeriesInstanceUID))
    study_c = generate_uid()
    c = make_ds("P-GRANTED", study_uid=study_c)  # a study of one permitted instance
    assert store(node, a, b, c) == [0, 0, 0]
    got = getscu(
        node, tmp_path, QR_AE, "-S", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_a}"
    )
    assert (got.status, got.received) == (SUCCESS, {a.SOPInstanceUID})
    alone = getscu(
        node, tmp_path, QR_AE, "-S", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_c}"
    )
    assert (alone.status, alone.received) == (SUCCESS, {c.SOPInstanceUID})
    assert got.seen_by_peer() == alone.seen_by_peer(), (
        f"leak: B is counted: {got.seen_by_peer()} for A's study, "
        f"{alone.seen_by_peer()} for a study of one instance"
    )
    for keys in (
        ("QueryRetrieveLevel=STUDY", f"StudyInstanceUID={b.StudyInstanceUID}"),
        ("QueryRetrieveLevel=SERIES", f"SeriesInstanceUID={a.SeriesInstanceUID}"),
        ("QueryRetrieveLevel=IMAGE", f"SOPInstanceUID={b.SOPInstanceUID}"),
    ):
        got = getscu(node, tmp_path, QR_AE, "-S", *keys)
        assert b.SOPInstanceUID not in got.received, keys
    for study in (study_a, str(b.StudyInstanceUID)):
        assert (
            findscu(
                node,
                tmp_path,
                QR_AE,
                "-S",
                "QueryRetrieveLevel=STUDY",
                f"StudyInstanceUID={study}",
                "PatientName",
            )
            == []
        )
    assert (
        findscu(
            node,
            tmp_path,
            QR_AE,
            "-S",
            "QueryRetrieveLevel=SERIES",
            f"SeriesInstanceUID={a.SeriesInstanceUID}",
        )
        == []
    )
    rows = findscu(
        node,
        tmp_path,
        QR_AE,
        "-S",
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={study_a}",
        "SOPInstanceUID",
        "PatientName",
    )
    assert all("SECRET" not in _text(d, "PatientName") for d in rows)
    assert rows == [], "leak: IMAGE level lists a study that holds B"


def test_purpose_bound_peer_moving_to_the_care_team_pacs(node: RunningNode, tmp_path: Path) -> None:
    """The purpose-bound peer asks for the refused patient's study to be moved to the care
    team's PACS (a destination without purpose): the requester's purpose still applies,
    so nothing is sent and the answer is the one for a study that does not exist (Success,
    no sub-operations); the consented study is moved. Otherwise a purpose-bound peer
    could route around its purpose, or learn from the status that the study exists.
    """
    a = make_ds("P-GRANTED", study_uid=generate_uid())
    b = _refused()
    assert store(node, a, b) == [0, 0]
    pacs_port = _port(node, "pacs")
    moved = movescu(
        node,
        tmp_path,
        QR_AE,
        PACS_AE,
        pacs_port,
        "-S",
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={b.StudyInstanceUID}",
    )
    unknown = movescu(
        node,
        tmp_path,
        QR_AE,
        PACS_AE,
        pacs_port,
        "-S",
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={generate_uid()}",
    )
    assert (moved.status, moved.received) == (SUCCESS, frozenset())
    assert moved.seen_by_peer() == unknown.seen_by_peer(), (
        f"leak: the refused study answers {moved.seen_by_peer()}, "
        f"an unknown one {unknown.seen_by_peer()}"
    )
    moved = movescu(
        node,
        tmp_path,
        QR_AE,
        PACS_AE,
        pacs_port,
        "-S",
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={a.StudyInstanceUID}",
    )
    assert (moved.status, moved.received) == (SUCCESS, {a.SOPInstanceUID})


def test_uid_lists_padding_and_wildcards_in_retrieve_keys(
    node: RunningNode, tmp_path: Path
) -> None:
    """UID lists mixing the refused patient's instance with a consented one, padded UIDs,
    and wildcards on Patient ID at every retrieve level send the consented instance only;
    C-FIND at PATIENT level with wildcards on the refused patient's name and ID, or a
    range on her birth date, lists nothing. Matching must never widen what the
    purpose-bound peer may see.
    """
    a = make_ds("P-GRANTED", study_uid=generate_uid())
    b = _refused()
    assert store(node, a, b) == [0, 0]
    for model, keys in (
        (
            "-S",
            ("QueryRetrieveLevel=IMAGE", f"SOPInstanceUID={b.SOPInstanceUID}\\{a.SOPInstanceUID}"),
        ),
        ("-S", ("QueryRetrieveLevel=IMAGE", f"SOPInstanceUID= {b.SOPInstanceUID} ")),
        (
            "-S",
            (
                "QueryRetrieveLevel=SERIES",
                f"SeriesInstanceUID={b.SeriesInstanceUID}\\{a.SeriesInstanceUID}",
            ),
        ),
        ("-P", ("QueryRetrieveLevel=PATIENT", "PatientID=P-*")),
        ("-P", ("QueryRetrieveLevel=PATIENT", "PatientID=")),
        ("-S", ("QueryRetrieveLevel=STUDY",)),
    ):
        got = getscu(node, tmp_path, QR_AE, model, *keys)
        assert b.SOPInstanceUID not in got.received, keys
    for keys in (
        ("PatientID", "PatientName=SECRET*"),
        ("PatientID=P-REF?SED",),
        ("PatientID=p-refused",),
        ("PatientID", "PatientBirthDate=19620101-19621231"),
        ("PatientID", "PatientSex=F"),
    ):
        rows = findscu(node, tmp_path, QR_AE, "-P", "QueryRetrieveLevel=PATIENT", *keys)
        assert rows == [], keys
