"""Tests of the synthetic DICOM corpus generator (tests/corpus.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    JPEG2000,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
)

from tests.corpus import CorpusFile, make_corpus, make_ct_series, make_small_series

REPO_ROOT = Path(__file__).resolve().parents[1]
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

SOP_CLASSES = {
    "CT": {CTImageStorage},
    "MR": {MRImageStorage},
    "CR": {ComputedRadiographyImageStorage},
    "US": {UltrasoundImageStorage, UltrasoundMultiFrameImageStorage},
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[CorpusFile]:
    return make_corpus(tmp_path_factory.mktemp("mixed"), seed=0)


def _assert_matches_file(cf: CorpusFile) -> pydicom.Dataset:
    ds = pydicom.dcmread(cf.path)
    assert ds.file_meta.TransferSyntaxUID == cf.transfer_syntax_uid
    assert ds.file_meta.MediaStorageSOPInstanceUID == cf.sop_instance_uid
    assert ds.file_meta.MediaStorageSOPClassUID == cf.sop_class_uid
    assert ds.PatientID == cf.patient_id
    assert ds.get("IssuerOfPatientID", "") == cf.issuer
    assert str(ds.PatientName) == cf.patient_name
    assert ds.PatientBirthDate == cf.birth_date
    assert ds.PatientSex == cf.sex
    assert ds.StudyInstanceUID == cf.study_uid
    assert ds.SeriesInstanceUID == cf.series_uid
    assert ds.SOPInstanceUID == cf.sop_instance_uid
    assert ds.SOPClassUID == cf.sop_class_uid
    assert ds.Modality == cf.modality
    assert ds.StudyDate == cf.study_date
    assert ds.AccessionNumber == cf.accession_number
    assert int(ds.get("NumberOfFrames", 1)) == cf.number_of_frames
    return ds


def test_corpus_size_and_files(corpus: list[CorpusFile]) -> None:
    assert 25 <= len(corpus) <= 45
    paths = [cf.path for cf in corpus]
    assert len(set(paths)) == len(paths)
    directory = paths[0].parent
    assert sorted(directory.iterdir()) == sorted(paths)  # no leftover temporary files
    for path in paths:
        with path.open("rb") as fh:
            head = fh.read(132)
        assert head[128:132] == b"DICM"


def test_patients_studies_and_issuers(corpus: list[CorpusFile]) -> None:
    studies: dict[str, set[str]] = defaultdict(set)
    issuers: dict[str, set[str]] = defaultdict(set)
    for cf in corpus:
        studies[cf.patient_id].add(cf.study_uid)
        issuers[cf.patient_id].add(cf.issuer)
    assert len(studies) >= 4
    assert all(1 <= len(s) <= 2 for s in studies.values())
    assert all(len(i) == 1 for i in issuers.values())
    all_issuers = {cf.issuer for cf in corpus}
    assert {"CHR-METZ", "CHU-REIMS", ""} <= all_issuers
    assert {cf.sex for cf in corpus} <= {"F", "M", "O"}
    years = {int(cf.study_date[:4]) for cf in corpus}
    assert max(years) - min(years) >= 5
    assert len({cf.accession_number for cf in corpus}) == len({cf.study_uid for cf in corpus})


def test_ins_in_other_patient_ids(corpus: list[CorpusFile]) -> None:
    found = set()
    for cf in corpus:
        ds = pydicom.dcmread(cf.path, stop_before_pixels=True)
        for item in ds.get("OtherPatientIDsSequence", []):
            if item.IssuerOfPatientID != "ASIP-SANTE-INS-NIR":
                continue
            nir = item.PatientID
            assert re.fullmatch(r"[12][0-9]{14}", nir)
            assert int(nir[13:]) == 97 - int(nir[:13]) % 97
            (qualifier,) = item.IssuerOfPatientIDQualifiersSequence
            assert qualifier.UniversalEntityID == "1.2.250.1.213.1.4.10"
            assert qualifier.UniversalEntityIDType == "ISO"
            found.add(cf.patient_id)
    assert found


def test_character_sets(corpus: list[CorpusFile]) -> None:
    charsets = set()
    for cf in corpus:
        if cf.patient_name.isascii():
            continue
        ds = pydicom.dcmread(cf.path, stop_before_pixels=True)
        assert ds.SpecificCharacterSet in ("ISO_IR 100", "ISO_IR 192")
        charsets.add(ds.SpecificCharacterSet)
    assert charsets == {"ISO_IR 100", "ISO_IR 192"}
    assert "LEFÈVRE^ÉLODIE" in {cf.patient_name for cf in corpus}
    assert "DUPONT^MARIE" in {cf.patient_name for cf in corpus}


def test_modalities_and_sop_classes(corpus: list[CorpusFile]) -> None:
    assert {cf.modality for cf in corpus} >= {"CT", "MR", "US", "CR"}
    for cf in corpus:
        assert cf.sop_class_uid in SOP_CLASSES[cf.modality]
    assert {cf.sop_class_uid for cf in corpus if cf.modality == "US"} == SOP_CLASSES["US"]


def test_transfer_syntaxes(corpus: list[CorpusFile]) -> None:
    required = {
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        JPEGBaseline8Bit,
        JPEGLosslessSV1,
        JPEGLSLossless,
        RLELossless,
    }
    present = {cf.transfer_syntax_uid for cf in corpus}
    assert required <= present
    assert present & {JPEG2000Lossless, JPEG2000}


def test_multiframe(corpus: list[CorpusFile]) -> None:
    multi = [cf for cf in corpus if cf.number_of_frames > 1]
    assert multi
    assert all(cf.sop_class_uid == UltrasoundMultiFrameImageStorage for cf in multi)
    assert {cf.transfer_syntax_uid for cf in multi} - {
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
    }


def test_fields_and_pixels(corpus: list[CorpusFile]) -> None:
    for cf in corpus:
        ds = _assert_matches_file(cf)
        arr = ds.pixel_array
        shape: tuple[int, ...] = (ds.Rows, ds.Columns)
        if ds.SamplesPerPixel > 1:
            shape = (*shape, ds.SamplesPerPixel)
        if cf.number_of_frames > 1:
            shape = (cf.number_of_frames, *shape)
        assert arr.shape == shape, cf.path
        assert 64 <= ds.Rows <= 128 and 64 <= ds.Columns <= 128
        assert arr.max() > arr.min()


def test_uids_valid(corpus: list[CorpusFile]) -> None:
    for cf in corpus:
        for uid in (cf.study_uid, cf.series_uid, cf.sop_instance_uid):
            assert len(uid) <= 64 and UID_RE.match(uid), uid
    assert len({cf.sop_instance_uid for cf in corpus}) == len(corpus)


@pytest.mark.skipif(shutil.which("dcmdump") is None, reason="DCMTK dcmdump not installed")
def test_dcmdump_accepts_every_file(corpus: list[CorpusFile]) -> None:
    for cf in corpus:
        result = subprocess.run(["dcmdump", "-q", str(cf.path)], capture_output=True, check=False)
        assert result.returncode == 0, (cf.path, result.stderr)
        assert not result.stderr, (cf.path, result.stderr)


def test_determinism(corpus: list[CorpusFile], tmp_path: Path) -> None:
    again = make_corpus(tmp_path / "again", seed=0)
    assert [cf.sop_instance_uid for cf in again] == [cf.sop_instance_uid for cf in corpus]
    for a, b in zip(corpus, again, strict=True):
        assert a.path.read_bytes() == b.path.read_bytes(), a.path.name
    other = make_ct_series(tmp_path / "other", 2, rows=64, columns=64, seed=1)
    assert (
        other[0].study_uid != make_ct_series(tmp_path / "o2", 2, rows=64, columns=64)[0].study_uid
    )


def test_other_seed_changes_uids(corpus: list[CorpusFile], tmp_path: Path) -> None:
    other = make_corpus(tmp_path, seed=1)
    assert not {cf.sop_instance_uid for cf in other} & {cf.sop_instance_uid for cf in corpus}
    assert [cf.patient_id for cf in other] == [cf.patient_id for cf in corpus]


def test_ct_series(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "ct", 3)
    again = make_ct_series(tmp_path / "ct2", 3)
    assert [f.sop_instance_uid for f in files] == [f.sop_instance_uid for f in again]
    assert len({f.study_uid for f in files}) == 1
    assert len({f.series_uid for f in files}) == 1
    assert len({f.sop_instance_uid for f in files}) == 3
    for number, cf in enumerate(files, start=1):
        assert cf.patient_id == "BENCHCT"
        assert cf.sop_class_uid == CTImageStorage
        assert cf.transfer_syntax_uid == ExplicitVRLittleEndian
        assert 450_000 <= cf.path.stat().st_size <= 600_000
        ds = _assert_matches_file(cf)
        assert ds.InstanceNumber == number
        assert (ds.Rows, ds.Columns, ds.BitsAllocated) == (512, 512, 16)
        assert len(ds) >= 80
        assert ds.pixel_array.shape == (512, 512)
    other = make_ct_series(tmp_path / "ct3", 1, rows=64, columns=64, patient_id="OTHER")
    assert other[0].patient_id == "OTHER"
    assert other[0].study_uid != files[0].study_uid


def test_small_series(tmp_path: Path) -> None:
    files = make_small_series(tmp_path, 5)
    assert len({f.series_uid for f in files}) == 1
    for cf in files:
        assert cf.patient_id == "BENCHSMALL"
        assert cf.transfer_syntax_uid == ExplicitVRLittleEndian
        assert 5_000 <= cf.path.stat().st_size <= 20_000
        assert _assert_matches_file(cf).pixel_array.shape == (64, 64)


def test_command_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.corpus",
            "small",
            str(tmp_path),
            "--count",
            "4",
            "--seed",
            "3",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    total = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert "4 files" in lines[0] and str(total) in lines[0]
    assert len(list(tmp_path.glob("*.dcm"))) == 4
