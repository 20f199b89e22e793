"""Query/retrieve against the running node, loaded with the corpus by storescu:
C-FIND with findscu and pynetdicom, C-MOVE with movescu to a DCMTK storescp acting as the
peer "pacs", C-GET with getscu and pynetdicom.

Expected results are computed from the corpus (its metadata and the files' headers), never
hard-coded. Every test runs on SQLite and on PostgreSQL (``running_node`` is parametrised).
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from tests.conftest import PACS_AE, RunningNode, run_tool, storescu
from tests.corpus import CorpusFile, make_small_series
from tests.scu_support import associate

PATIENT_ROOT = PatientRootQueryRetrieveInformationModelFind
STUDY_ROOT = StudyRootQueryRetrieveInformationModelFind
UNCOMPRESSED = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
PEER_ISSUER = "CHR-METZ"  # issuer of the "modality" peer, for instances without one


# -- expected values, from the corpus ------------------------------------------------------


@dataclass(frozen=True)
class StudyTruth:
    uid: str
    patient_id: str
    issuer: str
    patient_name: str
    birth_date: str
    sex: str
    date: str
    time: str
    accession: str
    description: str
    study_id: str
    referring: str
    modalities: frozenset[str]
    series: frozenset[str]
    instances: frozenset[str]


@dataclass(frozen=True)
class Truth:
    files: list[CorpusFile]
    studies: dict[str, StudyTruth]
    headers: dict[str, Dataset]  # by SOP Instance UID

    def series_of(self, series_uid: str) -> list[CorpusFile]:
        return [f for f in self.files if f.series_uid == series_uid]


@pytest.fixture(scope="module")
def truth(corpus: list[CorpusFile]) -> Truth:
    headers = {f.sop_instance_uid: dcmread(f.path, stop_before_pixels=True) for f in corpus}
    by_study: dict[str, list[CorpusFile]] = defaultdict(list)
    for f in corpus:
        by_study[f.study_uid].append(f)
    studies = {}
    for uid, files in by_study.items():
        first, h = files[0], headers[files[0].sop_instance_uid]
        studies[uid] = StudyTruth(
            uid=uid,
            patient_id=first.patient_id,
            issuer=first.issuer or PEER_ISSUER,
            patient_name=first.patient_name,
            birth_date=first.birth_date,
            sex=first.sex,
            date=first.study_date,
            time=str(h.StudyTime),
            accession=first.accession_number,
            description=str(h.StudyDescription),
            study_id=str(h.StudyID),
            referring=str(h.ReferringPhysicianName),
            modalities=frozenset(f.modality for f in files),
            series=frozenset(f.series_uid for f in files),
            instances=frozenset(f.sop_instance_uid for f in files),
        )
    return Truth(list(corpus), studies, headers)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def loaded_node(running_node: RunningNode, corpus: list[CorpusFile], tmp_path: Path) -> RunningNode:
    """The running node holding the whole corpus (sent by storescu)."""
    result = storescu(running_node, corpus, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert running_node.runtime.index.counts()["instances"] == len(corpus)
    return running_node


@dataclass
class StoreScp:
    """A DCMTK storescp listening as the peer "pacs" (AE QRSCU, the configured port)."""

    process: subprocess.Popen[str]
    directory: Path

    def received(self) -> dict[str, Path]:
        """Received files by SOP Instance UID."""
        return {
            str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
            for p in self.directory.iterdir()
            if p.is_file()
        }

    def clear(self) -> None:
        for p in self.directory.iterdir():
            p.unlink()


def _wait_listening(process: subprocess.Popen[str], port: int, timeout: float = 10.0) -> None:
    """Wait until ``process`` accepts TCP connections on ``port`` (or exits, or times out)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            pass
        try:
            process.wait(timeout=0.02)  # returns only if the process died
        except subprocess.TimeoutExpired:
            pass
        else:
            raise RuntimeError(f"storescp exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"storescp not listening on {port} after {timeout} s")


@pytest.fixture
def pacs_scp(running_node: RunningNode, tmp_path: Path) -> Iterator[StoreScp]:
    pacs = running_node.settings.peer_by_name("pacs")
    assert pacs is not None and pacs.ae_title == PACS_AE
    directory = tmp_path / "pacs"
    directory.mkdir()
    process = subprocess.Popen(
        [
            "storescp",
            "-aet",
            PACS_AE,
            "+xa",
            "-ta",
            "10",
            "-ts",
            "20",
            "-od",
            str(directory),
            str(pacs.port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_listening(process, pacs.port)
        yield StoreScp(process, directory)
    finally:
        process.terminate()
        try:
            process.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate(timeout=5)


# -- pynetdicom SCU helpers ---------------------------------------------------------------


def _qr_association(running: RunningNode, *contexts: str) -> Association:
    ae = AE(ae_title=PACS_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    for context in contexts:
        ae.add_requested_context(context)
    assoc = associate(ae, running.host, running.port, ae_title=running.ae_title)
    assert assoc.is_established
    return assoc


def _find(assoc: Association, model: str, level: str, **keys: Any) -> tuple[list[Dataset], int]:
    """Send one C-FIND; returns the pending identifiers and the final status."""
    query = Dataset()
    query.QueryRetrieveLevel = level
    if any(isinstance(v, str) and not v.isascii() for v in keys.values()):
        query.SpecificCharacterSet = "ISO_IR 192"
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    matches, final = [], None
    for status, identifier in assoc.send_c_find(query, model):
        assert "Status" in status, "no C-FIND response"
        if status.Status in (0xFF00, 0xFF01):
            matches.append(identifier)
        else:
            final = int(status.Status)
    assert final is not None
    return matches, final


def _pixel_data(path: Path) -> bytes:
    return bytes(dcmread(path).PixelData)


# -- C-FIND: matching -------------------------------------------------------------------------


def _between(low: str, high: str) -> Callable[[str], bool]:
    return lambda v: v != "" and (not low or v >= low) and (not high or v <= high)


def _time_between(low: str, high: str) -> Callable[[str], bool]:
    # HHMMSS strings; an upper bound "1600" covers 16:00:59
    lo, hi = low + "000000"[len(low) :], high + "595959"[len(high) :]
    return lambda v: (not low or v[:6] >= lo) and (not high or v[:6] <= hi)


def _multi(value: Any) -> list[str]:
    """A multi-valued element's values, as a list."""
    if value in (None, ""):
        return []
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


def test_find_study_level_matching(loaded_node: RunningNode, truth: Truth, db_url: str) -> None:
    """Single value, wildcards, ranges, lists, universal matching, PN rules, combined keys;
    each expected set is derived from the corpus."""
    studies = list(truth.studies.values())
    some = sorted(studies, key=lambda s: s.date)
    acc = some[3].accession
    two_uids = [some[0].uid, some[-1].uid]
    lefevre = next(s for s in studies if not s.patient_name.isascii() and "^É" in s.patient_name)
    martin = next(s for s in studies if s.patient_name.startswith("MARTIN^"))
    cases: list[tuple[str, dict[str, Any], Callable[[StudyTruth], bool]]] = [
        ("single value", {"AccessionNumber": acc}, lambda s: s.accession == acc),
        ("wildcard *", {"PatientID": "MTZ*"}, lambda s: fnmatchcase(s.patient_id, "MTZ*")),
        (
            "wildcard ?",
            {"AccessionNumber": "RMS1?B0*"},
            lambda s: fnmatchcase(s.accession, "RMS1?B0*"),
        ),
        (
            "wildcard ? only",
            {"PatientID": martin.patient_id[:-2] + "??"},
            lambda s: fnmatchcase(s.patient_id, martin.patient_id[:-2] + "??"),
        ),
        ("universal", {"PatientID": ""}, lambda s: True),
        ("universal *", {"AccessionNumber": "*"}, lambda s: True),
        ("single date", {"StudyDate": some[2].date}, lambda s: s.date == some[2].date),
        (
            "date range",
            {"StudyDate": "20180101-20201231"},
            lambda s: _between("20180101", "20201231")(s.date),
        ),
        (
            "date range open start",
            {"StudyDate": "-20161231"},
            lambda s: _between("", "20161231")(s.date),
        ),
        (
            "date range open end",
            {"StudyDate": "20200101-"},
            lambda s: _between("20200101", "")(s.date),
        ),
        (
            "time range",
            {"StudyTime": "080000-100000"},
            lambda s: _time_between("080000", "100000")(s.time),
        ),
        (
            "time range HHMM",
            {"StudyTime": "1400-1600"},
            lambda s: _time_between("1400", "1600")(s.time),
        ),
        (
            "time range open start",
            {"StudyTime": "-0800"},
            lambda s: _time_between("", "0800")(s.time),
        ),
        ("UID list", {"StudyInstanceUID": two_uids}, lambda s: s.uid in two_uids),
        ("modality in study", {"ModalitiesInStudy": "US"}, lambda s: "US" in s.modalities),
        (
            "modalities list",
            {"ModalitiesInStudy": ["CR", "MR"]},
            lambda s: bool({"CR", "MR"} & s.modalities),
        ),
        (
            "PN case-insensitive",
            {"PatientName": martin.patient_name.lower()},
            lambda s: s.patient_name == martin.patient_name,
        ),
        (
            "PN case-insensitive wildcard",
            {"PatientName": "dup*"},
            lambda s: s.patient_name.startswith("DUP"),
        ),
        (
            "PN non-ASCII exact",
            {"PatientName": lefevre.patient_name},
            lambda s: s.patient_name == lefevre.patient_name,
        ),
        (
            "PN non-ASCII wildcard",
            {"PatientName": "*^ÉLO*"},
            lambda s: fnmatchcase(s.patient_name, "*^ÉLO*"),
        ),
        ("issuer", {"IssuerOfPatientID": "CHU-REIMS"}, lambda s: s.issuer == "CHU-REIMS"),
        (
            "peer issuer for instances without one",
            {"IssuerOfPatientID": PEER_ISSUER},
            lambda s: s.issuer == PEER_ISSUER,
        ),
        ("patient sex", {"PatientSex": "F"}, lambda s: s.sex == "F"),
        (
            "combined keys",
            {"PatientID": "RMS*", "StudyDate": "20180101-"},
            lambda s: s.patient_id.startswith("RMS") and s.date >= "20180101",
        ),
        ("no match", {"AccessionNumber": "NOPE*"}, lambda s: False),
    ]
    if db_url.startswith("postgresql"):
        # SQLite's lower() folds ASCII letters only: non-ASCII case folding is PostgreSQL's
        cases.append(
            (
                "PN non-ASCII case-insensitive",
                {"PatientName": "lefèvre^élodie"},
                lambda s: s.patient_name == lefevre.patient_name,
            )
        )

    assoc = _qr_association(loaded_node, STUDY_ROOT)
    failures = []
    try:
        for label, keys, wanted in cases:
            expected = {s.uid for s in studies if wanted(s)}
            if label != "no match":
                assert expected, f"case {label!r} selects nothing in the corpus"
            if not label.startswith("universal"):
                assert len(expected) < len(studies), f"case {label!r} selects every study"
            matches, final = _find(assoc, STUDY_ROOT, "STUDY", **{"StudyInstanceUID": "", **keys})
            got = [str(m.StudyInstanceUID) for m in matches]
            if final != 0x0000 or sorted(got) != sorted(expected):
                failures.append(
                    f"{label} {keys}: status 0x{final:04X}, got {len(got)} "
                    f"{sorted(got)}, expected {len(expected)} {sorted(expected)}"
                )
    finally:
        assoc.release()
    assert not failures, "\n".join(failures)


def test_find_patient_series_image_levels(loaded_node: RunningNode, truth: Truth) -> None:
    files = truth.files
    assoc = _qr_association(loaded_node, PATIENT_ROOT, STUDY_ROOT)
    try:
        # PATIENT level (Patient Root): birth date range, one row per patient
        matches, final = _find(
            assoc,
            PATIENT_ROOT,
            "PATIENT",
            PatientID="",
            PatientBirthDate="19500101-19701231",
            PatientName="",
        )
        assert final == 0x0000
        expected = {
            (f.patient_id, f.patient_name)
            for f in files
            if "19500101" <= f.birth_date <= "19701231"
        }
        assert sorted((str(m.PatientID), str(m.PatientName)) for m in matches) == sorted(expected)

        # SERIES level (Study Root): one study's series, with instance counts
        study = max(truth.studies.values(), key=lambda s: len(s.series))
        assert len(study.series) > 1
        matches, final = _find(
            assoc,
            STUDY_ROOT,
            "SERIES",
            StudyInstanceUID=study.uid,
            SeriesInstanceUID="",
            Modality="",
            NumberOfSeriesRelatedInstances="",
        )
        assert final == 0x0000
        got = {
            str(m.SeriesInstanceUID): (str(m.Modality), int(m.NumberOfSeriesRelatedInstances))
            for m in matches
        }
        assert got == {
            uid: (truth.series_of(uid)[0].modality, len(truth.series_of(uid)))
            for uid in study.series
        }
        # SERIES level across studies: modality
        matches, final = _find(assoc, STUDY_ROOT, "SERIES", SeriesInstanceUID="", Modality="CT")
        assert final == 0x0000
        assert sorted(str(m.SeriesInstanceUID) for m in matches) == sorted(
            {f.series_uid for f in files if f.modality == "CT"}
        )

        # IMAGE level: one series' instances, with the number of frames
        series_uid = max(
            {f.series_uid for f in files},
            key=lambda u: sum(f.number_of_frames for f in truth.series_of(u)),
        )
        in_series = truth.series_of(series_uid)
        assert any(f.number_of_frames > 1 for f in in_series)
        matches, final = _find(
            assoc,
            STUDY_ROOT,
            "IMAGE",
            StudyInstanceUID=in_series[0].study_uid,
            SeriesInstanceUID=series_uid,
            SOPInstanceUID="",
            SOPClassUID="",
            NumberOfFrames="",
        )
        assert final == 0x0000
        assert {
            str(m.SOPInstanceUID): (str(m.SOPClassUID), int(m.NumberOfFrames)) for m in matches
        } == {f.sop_instance_uid: (f.sop_class_uid, f.number_of_frames) for f in in_series}
        # IMAGE level (Patient Root): UID list across patients
        picked = [files[0].sop_instance_uid, files[-1].sop_instance_uid]
        matches, final = _find(assoc, PATIENT_ROOT, "IMAGE", SOPInstanceUID=picked)
        assert final == 0x0000
        assert sorted(str(m.SOPInstanceUID) for m in matches) == sorted(picked)
    finally:
        assoc.release()


def test_find_return_keys(loaded_node: RunningNode, truth: Truth) -> None:
    keys = (
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
        "StudyDescription",
        "ReferringPhysicianName",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "InstitutionName",
    )
    assoc = _qr_association(loaded_node, STUDY_ROOT)
    try:
        matches, final = _find(
            assoc, STUDY_ROOT, "STUDY", StudyInstanceUID="", **dict.fromkeys(keys, "")
        )
    finally:
        assoc.release()
    assert final == 0x0000
    assert len(matches) == len(truth.studies)
    for m in matches:
        s = truth.studies[str(m.StudyInstanceUID)]
        where = f"study {s.accession}"
        returned = {e.keyword for e in m}
        assert set(keys) | {"StudyInstanceUID", "QueryRetrieveLevel"} <= returned, where
        assert returned <= set(keys) | {
            "StudyInstanceUID",
            "QueryRetrieveLevel",
            "RetrieveAETitle",
            "SpecificCharacterSet",
        }, where
        assert m.QueryRetrieveLevel == "STUDY"
        assert m.RetrieveAETitle == loaded_node.ae_title
        assert str(m.PatientName) == s.patient_name, where
        assert m.PatientID == s.patient_id, where
        assert m.IssuerOfPatientID == s.issuer, where
        assert m.PatientBirthDate == s.birth_date, where
        assert m.PatientSex == s.sex, where
        assert m.StudyDate == s.date, where
        assert m.StudyTime == s.time, where
        assert m.AccessionNumber == s.accession, where
        assert m.StudyID == s.study_id, where
        assert m.StudyDescription == s.description, where
        assert str(m.ReferringPhysicianName) == s.referring, where
        assert sorted(_multi(m.ModalitiesInStudy)) == sorted(s.modalities), where
        assert int(m.NumberOfStudyRelatedSeries) == len(s.series), where
        assert int(m.NumberOfStudyRelatedInstances) == len(s.instances), where
        assert m.InstitutionName == "", where  # not indexed: returned empty
        non_ascii = any(not str(v).isascii() for v in (s.patient_name, s.description, s.referring))
        if non_ascii:
            assert m.SpecificCharacterSet == "ISO_IR 192", where


def test_find_invalid_levels_fail(loaded_node: RunningNode, truth: Truth) -> None:
    assoc = _qr_association(loaded_node, PATIENT_ROOT, STUDY_ROOT)
    try:
        # unknown level, PATIENT level in the Study Root model, no level at all
        assert _find(assoc, PATIENT_ROOT, "FOO", PatientID="") == ([], 0xA900)
        assert _find(assoc, STUDY_ROOT, "PATIENT", PatientID="") == ([], 0xA900)
        assert _find(assoc, STUDY_ROOT, "", StudyInstanceUID="") == ([], 0xA900)
        # the same query is valid in the Patient Root model
        matches, final = _find(assoc, PATIENT_ROOT, "PATIENT", PatientID="")
        assert final == 0x0000
        assert len(matches) == len({f.patient_id for f in truth.files})
    finally:
        assoc.release()
    # findscu sees the same failure
    for model, level in (("-P", "FOO"), ("-S", "PATIENT")):
        result = run_tool(
            "findscu",
            "-d",
            "-aet",
            PACS_AE,
            "-aec",
            loaded_node.ae_title,
            model,
            "-k",
            f"QueryRetrieveLevel={level}",
            "-k",
            "PatientID",
            loaded_node.host,
            loaded_node.port,
        )
        output = result.stdout + result.stderr
        assert "Received Final Find Response" in output
        assert "DIMSE Status                  : 0xa900" in output, output[-2000:]
        assert "Received Find Response 1" not in output


# -- C-FIND with findscu ----------------------------------------------------------------------


def _findscu(running: RunningNode, out: Path, model: str, *keys: str) -> list[Dataset]:
    out.mkdir()
    args: list[str] = []
    for key in keys:
        args += ["-k", key]
    result = run_tool(
        "findscu",
        "-v",
        "-X",
        "-od",
        out,
        "-aet",
        PACS_AE,
        "-aec",
        running.ae_title,
        model,
        *args,
        running.host,
        running.port,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Received Final Find Response (Success)" in output, output[-2000:]
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_findscu_all_levels(loaded_node: RunningNode, truth: Truth, tmp_path: Path) -> None:
    files = truth.files
    # PATIENT level, Patient Root, non-ASCII name sent in UTF-8
    lefevre = next(f for f in files if "ÉLODIE" in f.patient_name)
    found = _findscu(
        loaded_node,
        tmp_path / "p",
        "-P",
        "QueryRetrieveLevel=PATIENT",
        "SpecificCharacterSet=ISO_IR 192",
        f"PatientName={lefevre.patient_name}",
        "PatientID",
        "PatientBirthDate",
    )
    assert len(found) == 1
    assert found[0].SpecificCharacterSet == "ISO_IR 192"
    assert str(found[0].PatientName) == lefevre.patient_name
    assert (found[0].PatientID, found[0].PatientBirthDate) == (
        lefevre.patient_id,
        lefevre.birth_date,
    )

    # STUDY level, Patient Root: one patient's studies with counts
    patient = max(
        {f.patient_id for f in files},
        key=lambda p: len({f.study_uid for f in files if f.patient_id == p}),
    )
    found = _findscu(
        loaded_node,
        tmp_path / "s",
        "-P",
        "QueryRetrieveLevel=STUDY",
        f"PatientID={patient}",
        "StudyInstanceUID",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedInstances",
    )
    expected = {
        s.uid: (sorted(s.modalities), len(s.instances))
        for s in truth.studies.values()
        if s.patient_id == patient
    }
    assert len(expected) > 1
    assert {
        str(d.StudyInstanceUID): (
            sorted(_multi(d.ModalitiesInStudy)),
            int(d.NumberOfStudyRelatedInstances),
        )
        for d in found
    } == expected

    # STUDY level, Study Root: date range
    found = _findscu(
        loaded_node,
        tmp_path / "sr",
        "-S",
        "QueryRetrieveLevel=STUDY",
        "StudyDate=20180101-20201231",
        "StudyInstanceUID",
        "AccessionNumber",
    )
    assert sorted(str(d.AccessionNumber) for d in found) == sorted(
        s.accession for s in truth.studies.values() if "20180101" <= s.date <= "20201231"
    )

    # SERIES level, Study Root
    study = max(truth.studies.values(), key=lambda s: len(s.series))
    found = _findscu(
        loaded_node,
        tmp_path / "se",
        "-S",
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={study.uid}",
        "SeriesInstanceUID",
        "Modality",
        "NumberOfSeriesRelatedInstances",
    )
    assert {str(d.SeriesInstanceUID): int(d.NumberOfSeriesRelatedInstances) for d in found} == {
        uid: len(truth.series_of(uid)) for uid in study.series
    }

    # IMAGE level, Study Root, wildcard-free UID keys
    series_uid = next(iter(study.series))
    found = _findscu(
        loaded_node,
        tmp_path / "i",
        "-S",
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={study.uid}",
        f"SeriesInstanceUID={series_uid}",
        "SOPInstanceUID",
        "SOPClassUID",
    )
    assert sorted((str(d.SOPInstanceUID), str(d.SOPClassUID)) for d in found) == sorted(
        (f.sop_instance_uid, f.sop_class_uid) for f in truth.series_of(series_uid)
    )


# -- C-MOVE -----------------------------------------------------------------------------------


def _movescu(running: RunningNode, destination: str, model: str, *keys: str) -> tuple[int, str]:
    args: list[str] = []
    for key in keys:
        args += ["-k", key]
    result = run_tool(
        "movescu",
        "-d",
        "-aet",
        PACS_AE,
        "-aem",
        destination,
        "-aec",
        running.ae_title,
        model,
        *args,
        running.host,
        running.port,
    )
    return result.returncode, result.stdout + result.stderr


def test_move_study_series_image_to_storescp(
    loaded_node: RunningNode, pacs_scp: StoreScp, truth: Truth
) -> None:
    files = {f.sop_instance_uid: f for f in truth.files}
    # the study with the most transfer syntaxes, a multi-frame series, two single images
    study = max(
        truth.studies.values(),
        key=lambda s: len({files[i].transfer_syntax_uid for i in s.instances}),
    )
    series_uid = next(f.series_uid for f in truth.files if f.number_of_frames > 1)
    images = [truth.files[1].sop_instance_uid, truth.files[-2].sop_instance_uid]
    patient = truth.files[0].patient_id
    cases = [
        ("STUDY", "-S", [f"StudyInstanceUID={study.uid}"], set(study.instances)),
        (
            "SERIES",
            "-S",
            [
                f"StudyInstanceUID={truth.series_of(series_uid)[0].study_uid}",
                f"SeriesInstanceUID={series_uid}",
            ],
            {f.sop_instance_uid for f in truth.series_of(series_uid)},
        ),
        ("IMAGE", "-S", ["SOPInstanceUID=" + "\\".join(images)], set(images)),
        (
            "PATIENT",
            "-P",
            [f"PatientID={patient}"],
            {f.sop_instance_uid for f in truth.files if f.patient_id == patient},
        ),
        ("STUDY", "-S", ["StudyInstanceUID=2.25.1"], set()),  # nothing matches: success
    ]
    assert len({files[i].transfer_syntax_uid for i in study.instances}) >= 3
    for level, model, keys, expected in cases:
        pacs_scp.clear()
        code, output = _movescu(loaded_node, PACS_AE, model, f"QueryRetrieveLevel={level}", *keys)
        assert code == 0, f"{level}: movescu failed\n{output[-3000:]}"
        assert "DIMSE Status                  : 0x0000: Success" in output, level
        received = pacs_scp.received()
        assert set(received) == expected, f"{level}: received the wrong instances"
        for uid, path in received.items():
            source = files[uid]
            assert _pixel_data(path) == _pixel_data(source.path), f"{level}: {uid}"
            if source.transfer_syntax_uid not in UNCOMPRESSED:
                # sent as stored: compressed instances keep their syntax
                assert (
                    dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
                    == source.transfer_syntax_uid
                ), f"{level}: {uid}"
    assert loaded_node.runtime.registry.get_sample_value(
        "consentgate_instances_sent_total", {"service": "move"}
    ) == sum(len(c[3]) for c in cases)


def test_move_to_unknown_destination_fails(
    loaded_node: RunningNode, pacs_scp: StoreScp, truth: Truth
) -> None:
    study = next(iter(truth.studies.values()))
    code, output = _movescu(
        loaded_node, "NOT-A-PEER", "-S", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study.uid}"
    )
    assert code != 0, output[-2000:]
    assert "DIMSE Status                  : 0xa801" in output, output[-2000:]
    assert pacs_scp.received() == {}


# -- C-GET ------------------------------------------------------------------------------------


def test_getscu_retrieves_a_study(loaded_node: RunningNode, truth: Truth, tmp_path: Path) -> None:
    # getscu negotiates one syntax per SOP class: a study stored uncompressed
    study = next(
        s
        for s in truth.studies.values()
        if all(
            f.transfer_syntax_uid in UNCOMPRESSED
            for f in truth.files
            if f.sop_instance_uid in s.instances
        )
    )
    out = tmp_path / "get"
    out.mkdir()
    result = run_tool(
        "getscu",
        "-v",
        "-aet",
        PACS_AE,
        "-aec",
        loaded_node.ae_title,
        "-S",
        "-od",
        out,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study.uid}",
        loaded_node.host,
        loaded_node.port,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Received C-GET Response (Success)" in output, output[-3000:]
    received = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in out.iterdir()}
    assert set(received) == set(study.instances)
    sources = {f.sop_instance_uid: f.path for f in truth.files}
    for uid, path in received.items():
        assert _pixel_data(path) == _pixel_data(sources[uid]), uid


def _get_association(
    loaded_node: RunningNode, in_study: list[CorpusFile], on_store: Callable[[Any], int]
) -> Association:
    """A C-GET requestor association for a study's SOP classes and syntaxes (SCP role)."""
    ae = AE(ae_title=PACS_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    pairs = sorted({(f.sop_class_uid, f.transfer_syntax_uid) for f in in_study})
    for sop_class, syntax in pairs:
        ae.add_requested_context(sop_class, [syntax])
    roles = [build_role(c, scp_role=True) for c in {c for c, _ in pairs}]
    assoc = associate(
        ae,
        loaded_node.host,
        loaded_node.port,
        ae_title=loaded_node.ae_title,
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    return assoc


def test_get_mixed_syntax_study_with_pynetdicom(loaded_node: RunningNode, truth: Truth) -> None:
    files = {f.sop_instance_uid: f for f in truth.files}
    study = max(
        truth.studies.values(),
        key=lambda s: len({files[i].transfer_syntax_uid for i in s.instances}),
    )
    in_study = [files[i] for i in study.instances]
    received: dict[str, Dataset] = {}

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received[str(ds.SOPInstanceUID)] = ds
        return 0x0000

    assoc = _get_association(loaded_node, in_study, on_store)
    query = _study_query(study.uid)
    try:
        responses = list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    final = responses[-1][0]
    assert final.Status == 0x0000
    assert final.NumberOfFailedSuboperations == 0
    assert final.NumberOfCompletedSuboperations == len(in_study)
    assert set(received) == set(study.instances)
    for f in in_study:
        ds = received[f.sop_instance_uid]
        assert ds.file_meta.TransferSyntaxUID == f.transfer_syntax_uid
        assert bytes(ds.PixelData) == _pixel_data(f.path), f.path.name


def _study_query(study_uid: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    return query


def _assert_cancelled_after_one(
    responses: list[Any], on_store: _CancelOnFirstStore, total: int
) -> None:
    """The retrieve ended with Cancel after its first sub-operation, nothing sent since."""
    final = responses[-1][0]
    assert final.Status == 0xFE00
    assert len(on_store.received) == 1, "nothing is sent after the cancel"
    assert final.NumberOfCompletedSuboperations == 1
    assert final.NumberOfRemainingSuboperations == total - 1


class _CancelOnFirstStore:
    """A C-STORE handler that records each instance and, while handling the first, has
    ``requestor`` send C-CANCEL for the retrieve ``message_id`` of ``model``; it answers
    that first C-STORE ``pause`` seconds later."""

    def __init__(self, model: str, message_id: int, pause: float = 0.0) -> None:
        self.model = model
        self.message_id = message_id
        self.pause = pause
        self.requestor: Association | None = None
        self.received: list[str] = []

    def __call__(self, event: evt.Event) -> int:
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        if len(self.received) == 1 and self.requestor is not None:
            context = next(
                cx for cx in self.requestor.accepted_contexts if cx.abstract_syntax == self.model
            )
            self.requestor.send_c_cancel(self.message_id, context.context_id)
            time.sleep(self.pause)
        return 0x0000


def _stored_series(running: RunningNode, tmp_path: Path, count: int) -> list[CorpusFile]:
    """One series of ``count`` small instances, stored in the node by storescu."""
    files = make_small_series(tmp_path / "series", count, patient_id="FINDCANCEL")
    sent = storescu(running, files, tmp_path)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    return files


def test_find_cancelled_by_the_requestor_stops_with_fe00(
    running_node: RunningNode, tmp_path: Path
) -> None:
    """C-CANCEL during a C-FIND: the node stops matching and answers Cancel (0xFE00).

    One series of 600 instances, queried at IMAGE level: the requestor sends C-CANCEL as
    soon as it has the first pending response. The node answers each match in its own
    response, a fraction of a millisecond each: it reads the cancel long before the
    last match, and it queues at most a few responses ahead of the connection. (Before
    the DUL reactor looked at the connection between two responses it sent, the cancel
    stayed unread: all 600 matches and a success status, on PostgreSQL. Before the
    handler waited for room in the send queue, up to 446 matches went out after it.)
    """
    files = _stored_series(running_node, tmp_path, 600)
    model = StudyRootQueryRetrieveInformationModelFind
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = files[0].study_uid
    query.SeriesInstanceUID = files[0].series_uid
    query.SOPInstanceUID = ""
    message_id = 11
    pending, final = 0, None
    assoc = _qr_association(running_node, model)
    try:
        for status, _identifier in assoc.send_c_find(query, model, msg_id=message_id):
            assert "Status" in status, "no C-FIND response"
            if status.Status in (0xFF00, 0xFF01):
                pending += 1
                if pending == 1:
                    context = next(
                        cx for cx in assoc.accepted_contexts if cx.abstract_syntax == model
                    )
                    assoc.send_c_cancel(message_id, context.context_id)
            else:
                final = int(status.Status)
    finally:
        assoc.release()
    assert final == 0xFE00, f"final status 0x{final or 0:04X} after {pending} matches"
    assert 1 <= pending < len(files) // 10, f"{pending} matches sent after the cancel"


def test_findscu_cancel_stops_the_matches(running_node: RunningNode, tmp_path: Path) -> None:
    """DCMTK findscu ``--cancel 1`` on a series of 600 instances: the node answers Cancel
    (0xFE00) after a few more matches, not the whole series."""
    files = _stored_series(running_node, tmp_path, 600)
    out = tmp_path / "responses"
    out.mkdir()
    result = run_tool(
        "findscu",
        "-v",
        "-S",
        "-X",
        "-od",
        out,
        "--cancel",
        "1",
        "-aet",
        PACS_AE,
        "-aec",
        running_node.ae_title,
        "-k",
        "QueryRetrieveLevel=IMAGE",
        "-k",
        f"StudyInstanceUID={files[0].study_uid}",
        "-k",
        f"SeriesInstanceUID={files[0].series_uid}",
        "-k",
        "SOPInstanceUID",
        running_node.host,
        running_node.port,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-2000:]
    assert "Sending Cancel Request" in output, output[-2000:]
    assert "Received Final Find Response (Cancel" in output, output[-2000:]
    matches = list(out.glob("rsp*.dcm"))
    assert 1 <= len(matches) < len(files) // 10, f"{len(matches)} matches sent after the cancel"


def test_get_cancelled_by_the_requestor_stops_with_fe00(
    loaded_node: RunningNode, truth: Truth
) -> None:
    """C-CANCEL during a C-GET: the node stops sending and answers Cancel (0xFE00).

    The requestor sends C-CANCEL while it handles the first sub-operation, before its
    C-STORE response: the node reads the cancel before it goes on to the next instance.
    """
    files = {f.sop_instance_uid: f for f in truth.files}
    study = max(truth.studies.values(), key=lambda s: len(s.instances))
    assert len(study.instances) >= 3
    in_study = [files[i] for i in study.instances]
    message_id = 7
    on_store = _CancelOnFirstStore(StudyRootQueryRetrieveInformationModelGet, message_id)
    assoc = _get_association(loaded_node, in_study, on_store)
    on_store.requestor = assoc
    query = _study_query(study.uid)
    try:
        responses = list(
            assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet, msg_id=message_id)
        )
    finally:
        assoc.release()
    _assert_cancelled_after_one(responses, on_store, len(in_study))


def test_move_cancelled_by_the_requestor_stops_with_fe00(
    loaded_node: RunningNode, truth: Truth
) -> None:
    """C-CANCEL during a C-MOVE: the node stops sending and answers Cancel (0xFE00).

    The move destination (a pynetdicom SCP on the "pacs" peer's port) has the requestor
    send C-CANCEL while it handles the first sub-operation, and answers that C-STORE
    200 ms later: the node has read the cancel (on the other association) by then.
    """
    study = max(truth.studies.values(), key=lambda s: len(s.instances))
    assert len(study.instances) >= 3
    pacs = loaded_node.settings.peer_by_name("pacs")
    assert pacs is not None
    message_id = 9
    # the cancel travels on the other association: answer the C-STORE once it is read
    on_store = _CancelOnFirstStore(StudyRootQueryRetrieveInformationModelMove, message_id, 0.2)

    destination = AE(ae_title=PACS_AE)
    for context in AllStoragePresentationContexts:
        destination.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    server = destination.start_server(
        ("127.0.0.1", pacs.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    requestor = AE(ae_title=PACS_AE)
    requestor.acse_timeout = requestor.dimse_timeout = requestor.network_timeout = 15
    requestor.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    try:
        assoc = associate(
            requestor, loaded_node.host, loaded_node.port, ae_title=loaded_node.ae_title
        )
        assert assoc.is_established
        on_store.requestor = assoc
        query = _study_query(study.uid)
        try:
            responses = list(
                assoc.send_c_move(
                    query, PACS_AE, StudyRootQueryRetrieveInformationModelMove, msg_id=message_id
                )
            )
        finally:
            assoc.release()
    finally:
        server.shutdown()
    _assert_cancelled_after_one(responses, on_store, len(study.instances))
