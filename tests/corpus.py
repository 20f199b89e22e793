"""Synthetic DICOM corpus generator for integration tests and benchmarks.

Every value (UIDs, dates, pixel content) is derived deterministically from a seed, so two
runs with the same seed produce the same instances.  Three entry points are provided:

* :func:`make_corpus` -- a small mixed corpus (several patients, studies, modalities and
  transfer syntaxes) covering the gateway's functional acceptance criteria;
* :func:`make_ct_series` -- a large uncompressed CT series for throughput benchmarks;
* :func:`make_small_series` -- many ~10 kB instances for per-instance overhead benchmarks.

Compressed transfer syntaxes are produced either by pydicom itself (RLE Lossless, JPEG 2000
through pylibjpeg-openjpeg, Deflated Explicit VR Little Endian) or by the DCMTK command line
tools ``dcmcjpeg`` (JPEG Baseline, Extended, Lossless) and ``dcmcjpls`` (JPEG-LS Lossless).

Command line::

    python -m tests.corpus mixed|ct|small OUT_DIR [--count N] [--seed S]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    JPEG2000,
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
)

__all__ = [
    "CorpusFile",
    "make_corpus",
    "make_ct_series",
    "make_small_series",
    "write_instance",
]

IMPLEMENTATION_CLASS_UID = "2.25.170374915412371935464713526133428871466"
IMPLEMENTATION_VERSION_NAME = "CGATE_CORPUS_1"

INS_ISSUER = "ASIP-SANTE-INS-NIR"
INS_UNIVERSAL_ENTITY_ID = "1.2.250.1.213.1.4.10"

# Transfer syntaxes that DCMTK has to produce, with the command line that does it.
_DCMTK_ENCODERS: dict[str, list[str]] = {
    JPEGBaseline8Bit: ["dcmcjpeg", "+eb", "+un"],
    JPEGExtended12Bit: ["dcmcjpeg", "+ee", "+un"],
    JPEGLossless: ["dcmcjpeg", "+el", "+un"],
    JPEGLosslessSV1: ["dcmcjpeg", "+e1", "+un"],
    JPEGLSLossless: ["dcmcjpls", "+el", "+un"],
}
_NATIVE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
_PYDICOM_ENCODED = (RLELossless, JPEG2000Lossless, JPEG2000)


@dataclass(frozen=True)
class CorpusFile:
    """Description of one generated DICOM Part 10 file.

    Every field holds exactly the value written in the file.
    """

    path: Path
    patient_id: str
    issuer: str
    patient_name: str
    birth_date: str
    sex: str
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str
    study_date: str
    accession_number: str
    number_of_frames: int


# --------------------------------------------------------------------------------------------
# Internal description of patients, studies and series
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Patient:
    patient_id: str
    issuer: str
    name: str
    birth_date: str
    sex: str
    charset: str  # "" means default repertoire (no Specific Character Set)
    ins_nir13: str = ""  # 13 first digits of the INS matricule, "" for none
    size_m: float = 1.70
    weight_kg: float = 70.0


@dataclass(frozen=True)
class _Study:
    key: str
    date: str
    time: str
    accession: str
    description: str
    referring: str
    institution: str


@dataclass(frozen=True)
class _SeriesPlan:
    modality: str
    number: int
    description: str
    body_part: str
    # One entry per instance: (transfer syntax, number of frames, photometric interpretation)
    instances: tuple[tuple[str, int, str], ...]


@dataclass(frozen=True)
class _Context:
    """Identifiers shared by all instances of one series."""

    seed: int
    patient: _Patient
    study: _Study
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    series: _SeriesPlan


def _digest(seed: int, parts: Sequence[object]) -> bytes:
    text = "\x1f".join(["consentgate-corpus", str(seed), *(str(p) for p in parts)])
    return hashlib.sha256(text.encode("utf-8")).digest()


def _uid(seed: int, *parts: object) -> str:
    """Return a deterministic ``2.25.`` UID derived from ``seed`` and ``parts``.

    The 128 first bits of a SHA-256 digest are shaped into a version 4 / variant 1 UUID
    (as ``2.25`` UIDs should be) and written as a decimal integer: at most 44 characters.
    Note that ``pydicom.uid.generate_uid(prefix=None)`` ignores its entropy sources and
    is random, hence this helper.
    """
    value = int.from_bytes(_digest(seed, parts)[:16], "big")
    value = (value & ~(0xF << 76)) | (0x4 << 76)  # version 4
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return f"2.25.{value}"


def _ins_matricule(nir13: str) -> str:
    """Return the 15-digit NIR (13 digits + 2-digit control key)."""
    key = 97 - int(nir13) % 97
    return f"{nir13}{key:02d}"


def _age(birth_date: str, on_date: str) -> str:
    years = int(on_date[:4]) - int(birth_date[:4])
    if on_date[4:] < birth_date[4:]:
        years -= 1
    return f"{max(years, 0):03d}Y"


def _rng(seed: int, *parts: object) -> np.random.Generator:
    """Return a generator seeded from ``seed`` and a stable digest of ``parts``."""
    words = np.frombuffer(_digest(seed, ("rng", *parts)), dtype="<u4")
    return np.random.default_rng([int(w) for w in words])


# --------------------------------------------------------------------------------------------
# Pixel data
# --------------------------------------------------------------------------------------------


def _coords(rows: int, columns: int) -> tuple[np.ndarray, np.ndarray]:
    y = np.linspace(-1.0, 1.0, rows, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, columns, dtype=np.float32)[None, :]
    return y, x


def _body_phantom(
    rng: np.random.Generator, rows: int, columns: int, max_value: int, phase: float
) -> np.ndarray:
    """Grey-level phantom: gradient background, an elliptic body, inner structures, noise."""
    y, x = _coords(rows, columns)
    img = np.zeros((rows, columns), dtype=np.float32)
    img += 0.05 * max_value * (x + 1.0)  # gentle gradient
    body = (x / 0.85) ** 2 + (y / 0.7) ** 2 <= 1.0
    img = np.where(body, 0.45 * max_value, img)
    for k in range(3):
        cx = 0.4 * np.cos(phase + 2.1 * k)
        cy = 0.3 * np.sin(phase + 2.1 * k)
        radius = 0.12 + 0.04 * k + 0.03 * np.sin(phase * (k + 1))
        blob = (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
        img = np.where(blob & body, (0.2 + 0.3 * k) * max_value, img)
    img += rng.normal(0.0, 0.015 * max_value, size=(rows, columns)).astype(np.float32)
    return np.clip(img, 0, max_value).astype(np.uint16)


def _us_frames(
    rng: np.random.Generator, rows: int, columns: int, frames: int, rgb: bool
) -> np.ndarray:
    """8-bit ultrasound-like sector images, optionally with a colour Doppler blob."""
    y, x = _coords(rows, columns)
    yy = (y + 1.0) / 2.0  # 0 at the top (probe), 1 at the bottom
    angle = np.arctan2(x, yy + 0.05)
    depth = np.sqrt(x**2 + (yy + 0.05) ** 2)
    sector = (np.abs(angle) < 0.7) & (depth < 1.0)
    out = []
    for f in range(frames):
        speckle = rng.rayleigh(0.25, size=(rows, columns)).astype(np.float32)
        ring = 0.5 + 0.5 * np.cos(12.0 * depth - 0.6 * f)
        grey = np.where(sector, np.clip(90.0 * speckle * (0.6 + 0.4 * ring), 0, 255), 0)
        if not rgb:
            out.append(grey.astype(np.uint8))
            continue
        frame = np.repeat(grey[:, :, None], 3, axis=2)
        blob = (x - 0.1 * np.sin(f)) ** 2 + (yy - 0.5) ** 2 < 0.02
        frame[blob] = (200.0, 40.0 + 20.0 * f, 30.0)
        frame[:6, :, :] = (0.0, 120.0, 200.0)  # annotation banner
        out.append(frame.astype(np.uint8))
    return np.stack(out) if frames > 1 else out[0]


# --------------------------------------------------------------------------------------------
# Dataset construction
# --------------------------------------------------------------------------------------------


def _base_dataset(
    ctx: _Context, sop_class_uid: str, sop_instance_uid: str, instance_number: int
) -> Dataset:
    """Patient, General Study, General Series, Equipment, General Image and SOP Common."""
    patient, study, series = ctx.patient, ctx.study, ctx.series
    content_time = f"{study.time[:4]}{(int(study.time[4:6]) + instance_number) % 60:02d}"
    ds = Dataset()
    if patient.charset:
        ds.SpecificCharacterSet = patient.charset
    ds.ImageType = {
        "CT": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "MR": ["ORIGINAL", "PRIMARY", "OTHER"],
    }.get(series.modality, ["ORIGINAL", "PRIMARY"])
    ds.InstanceCreationDate = study.date
    ds.InstanceCreationTime = content_time
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = study.date
    ds.SeriesDate = study.date
    ds.AcquisitionDate = study.date
    ds.ContentDate = study.date
    ds.StudyTime = study.time
    ds.SeriesTime = study.time
    ds.AcquisitionTime = content_time
    ds.ContentTime = content_time
    ds.AccessionNumber = study.accession
    ds.Modality = series.modality
    ds.Manufacturer = "ConsentGate Synthetic"
    ds.InstitutionName = study.institution
    ds.ReferringPhysicianName = study.referring
    ds.StationName = f"{series.modality}01"
    ds.StudyDescription = study.description
    ds.SeriesDescription = series.description
    ds.ManufacturerModelName = f"Synth-{series.modality}"
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    if patient.issuer:
        ds.IssuerOfPatientID = patient.issuer
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    if patient.ins_nir13:
        qualifier = Dataset()
        qualifier.UniversalEntityID = INS_UNIVERSAL_ENTITY_ID
        qualifier.UniversalEntityIDType = "ISO"
        ins = Dataset()
        ins.PatientID = _ins_matricule(patient.ins_nir13)
        ins.IssuerOfPatientID = INS_ISSUER
        ins.TypeOfPatientID = "TEXT"
        ins.IssuerOfPatientIDQualifiersSequence = DicomSequence([qualifier])
        ds.OtherPatientIDsSequence = DicomSequence([ins])
    ds.PatientAge = _age(patient.birth_date, study.date)
    ds.PatientSize = f"{patient.size_m:.2f}"
    ds.PatientWeight = f"{patient.weight_kg:.1f}"
    ds.BodyPartExamined = series.body_part
    if series.body_part == "KNEE":  # paired structure: Laterality is required
        ds.Laterality = "R"
    ds.SoftwareVersions = "1.0"
    ds.StudyInstanceUID = ctx.study_uid
    ds.SeriesInstanceUID = ctx.series_uid
    ds.StudyID = study.accession[-4:]
    ds.SeriesNumber = series.number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    return ds


def _set_mono_pixels(ds: Dataset, pixels: np.ndarray, bits_stored: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[-2]), int(pixels.shape[-1])
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype("<u2").tobytes()


def _ct_dataset(
    ctx: _Context, sop_instance_uid: str, index: int, pixels: np.ndarray, slice_thickness: float
) -> Dataset:
    """CT Image Storage dataset with a full CT header (index is 0-based)."""
    rows, columns = pixels.shape
    ds = _base_dataset(ctx, CTImageStorage, sop_instance_uid, index + 1)
    ds.InstitutionAddress = "1 Allee du Chateau, 57000 Metz"
    ds.InstitutionalDepartmentName = "Imagerie medicale"
    ds.PerformingPhysicianName = "BERNARD^THOMAS"
    ds.OperatorsName = "GIRARD^LEA"
    ds.ProtocolName = ctx.series.description
    ds.ScanOptions = "HELICAL MODE"
    ds.SliceThickness = f"{slice_thickness:g}"
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.DeviceSerialNumber = "SN-0042"
    ds.DateOfLastCalibration = ctx.study.date
    ds.ReconstructionDiameter = "360"
    ds.DistanceSourceToDetector = "1085.6"
    ds.DistanceSourceToPatient = "595"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "152"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = 220
    ds.Exposure = 110
    ds.FilterType = "BODY FILTER"
    ds.GeneratorPower = 26
    ds.FocalSpots = "1.2"
    ds.ConvolutionKernel = "STANDARD"
    ds.PatientPosition = "FFS"
    ds.RevolutionTime = 0.5
    ds.SingleCollimationWidth = 0.625
    ds.TotalCollimationWidth = 40.0
    ds.TableSpeed = 78.75
    ds.TableFeedPerRotation = 39.375
    ds.SpiralPitchFactor = 0.984375
    ds.CTDIvol = 8.42
    phantom = Dataset()
    phantom.CodeValue = "113691"
    phantom.CodingSchemeDesignator = "DCM"
    phantom.CodeMeaning = "IEC Body Dosimetry Phantom"
    ds.CTDIPhantomTypeCodeSequence = DicomSequence([phantom])
    z = -100.0 - index * slice_thickness
    ds.ImagePositionPatient = [-180.0, -180.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = ctx.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{z:g}"
    ds.PixelSpacing = [f"{360.0 / rows:.6g}", f"{360.0 / columns:.6g}"]
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.WindowCenterWidthExplanation = "WINDOW1"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.PerformedProcedureStepStartDate = ctx.study.date
    ds.PerformedProcedureStepStartTime = ctx.study.time
    ds.PerformedProcedureStepID = ctx.study.accession[-6:]
    ds.PerformedProcedureStepDescription = ctx.study.description
    request = Dataset()
    request.RequestedProcedureID = ctx.study.accession
    request.ScheduledProcedureStepID = ctx.study.accession[-6:]
    request.RequestedProcedureDescription = ctx.study.description
    ds.RequestAttributesSequence = DicomSequence([request])
    ds.PatientIdentityRemoved = "NO"
    _set_mono_pixels(ds, pixels, 12)
    return ds


def _mr_dataset(ctx: _Context, sop_instance_uid: str, index: int, pixels: np.ndarray) -> Dataset:
    rows, columns = pixels.shape
    ds = _base_dataset(ctx, MRImageStorage, sop_instance_uid, index + 1)
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "SK"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = "tse2d1_15"
    ds.AngioFlag = "N"
    ds.SliceThickness = "4"
    ds.RepetitionTime = "4000"
    ds.EchoTime = "98"
    ds.NumberOfAverages = "2"
    ds.ImagingFrequency = "63.68"
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = "1.5"
    ds.SpacingBetweenSlices = "4.8"
    ds.EchoTrainLength = "15"
    ds.FlipAngle = "150"
    ds.PatientPosition = "HFS"
    z = -20.0 + index * 4.8
    ds.ImagePositionPatient = [-115.0, -115.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = ctx.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{z:g}"
    ds.PixelSpacing = [f"{230.0 / rows:.6g}", f"{230.0 / columns:.6g}"]
    ds.WindowCenter = "600"
    ds.WindowWidth = "1200"
    ds.LossyImageCompression = "00"
    _set_mono_pixels(ds, pixels, 12)
    return ds


def _cr_dataset(ctx: _Context, sop_instance_uid: str, index: int, pixels: np.ndarray) -> Dataset:
    rows, columns = pixels.shape
    ds = _base_dataset(ctx, ComputedRadiographyImageStorage, sop_instance_uid, index + 1)
    ds.ViewPosition = "PA" if index % 2 == 0 else "LL"
    ds.PatientOrientation = ["L", "F"] if index % 2 == 0 else ["P", "F"]
    ds.KVP = "125"
    ds.DistanceSourceToDetector = "1800"
    ds.ExposureTime = "10"
    ds.XRayTubeCurrent = 320
    ds.Exposure = 3
    ds.ImagerPixelSpacing = [f"{430.0 / rows:.6g}", f"{430.0 / columns:.6g}"]
    ds.PlateID = f"PLATE{index + 1:03d}"
    ds.WindowCenter = "2048"
    ds.WindowWidth = "4096"
    ds.LossyImageCompression = "00"
    _set_mono_pixels(ds, pixels, 12)
    return ds


def _us_dataset(ctx: _Context, sop_instance_uid: str, index: int, pixels: np.ndarray) -> Dataset:
    rgb = pixels.shape[-1] == 3
    frames = int(pixels.shape[0]) if pixels.ndim == (4 if rgb else 3) else 1
    sop_class = UltrasoundMultiFrameImageStorage if frames > 1 else UltrasoundImageStorage
    ds = _base_dataset(ctx, sop_class, sop_instance_uid, index + 1)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL", "0001"]
    ds.PatientOrientation = ""
    ds.TransducerData = "C5-2"
    ds.ProcessingFunction = "OB"
    ds.LossyImageCompression = "00"
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
    if rgb:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.FrameIncrementPointer = 0x00181063  # Frame Time
        ds.FrameTime = "40"
        ds.CineRate = 25
        ds.RecommendedDisplayFrameRate = 25
    ds.Rows = int(pixels.shape[-3] if rgb else pixels.shape[-2])
    ds.Columns = int(pixels.shape[-2] if rgb else pixels.shape[-1])
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    return ds


# --------------------------------------------------------------------------------------------
# Writing and encoding
# --------------------------------------------------------------------------------------------


def write_instance(path: Path, ds: Dataset) -> None:
    """Write ``ds`` to ``path`` as a DICOM Part 10 file.

    The 128-byte preamble and the File Meta Information are always written.  Missing file
    meta elements are filled in from the dataset; the transfer syntax is taken from
    ``ds.file_meta.TransferSyntaxUID`` and defaults to Explicit VR Little Endian.  Deflated
    Explicit VR Little Endian is written deflated.  Parent directories are created.

    Parameters
    ----------
    path : Path
        Destination file; overwritten when it exists.
    ds : Dataset
        Dataset holding at least SOP Class UID and SOP Instance UID.  Its ``file_meta`` is
        created or completed in place.

    Returns
    -------
    None
    """
    meta = ds.file_meta if isinstance(getattr(ds, "file_meta", None), Dataset) else None
    if meta is None:
        meta = FileMetaDataset()
    elif not isinstance(meta, FileMetaDataset):
        meta = FileMetaDataset(meta)
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "ImplementationClassUID" not in meta:
        meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def _run_dcmtk(command: list[str], src: Path, dst: Path) -> None:
    tool = command[0]
    if shutil.which(tool) is None:
        raise RuntimeError(f"DCMTK tool {tool!r} is required to build the corpus (apt dcmtk)")
    result = subprocess.run(
        [*command, str(src), str(dst)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed on {src}: {result.stderr.strip()}")


def _encode_and_write(path: Path, ds: Dataset, transfer_syntax: str) -> None:
    """Write ``ds`` encoded with ``transfer_syntax`` (pydicom or DCMTK)."""
    if transfer_syntax in _NATIVE_SYNTAXES:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
        write_instance(path, ds)
    elif transfer_syntax in _PYDICOM_ENCODED:
        j2k_cr: list[float] | None = None
        if transfer_syntax == JPEG2000:
            j2k_cr = [10.0]  # lossy, compression ratio 10:1
            ds.LossyImageCompression = "01"
            ds.LossyImageCompressionRatio = "10"
            ds.LossyImageCompressionMethod = "ISO_15444_1"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.compress(transfer_syntax, generate_instance_uid=False, j2k_cr=j2k_cr)
        write_instance(path, ds)
    elif transfer_syntax in _DCMTK_ENCODERS:
        src = path.with_name(f".{path.name}.src")
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        write_instance(src, ds)
        try:
            _run_dcmtk(_DCMTK_ENCODERS[transfer_syntax], src, path)
        finally:
            src.unlink(missing_ok=True)
    else:
        raise ValueError(f"unsupported transfer syntax {transfer_syntax}")


def _record(path: Path, ctx: _Context, ds: Dataset, transfer_syntax: str) -> CorpusFile:
    return CorpusFile(
        path=path,
        patient_id=ctx.patient.patient_id,
        issuer=ctx.patient.issuer,
        patient_name=ctx.patient.name,
        birth_date=ctx.patient.birth_date,
        sex=ctx.patient.sex,
        study_uid=ctx.study_uid,
        series_uid=ctx.series_uid,
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax_uid=str(transfer_syntax),
        modality=ctx.series.modality,
        study_date=ctx.study.date,
        accession_number=ctx.study.accession,
        number_of_frames=int(ds.get("NumberOfFrames", 1)),
    )


# --------------------------------------------------------------------------------------------
# Mixed corpus
# --------------------------------------------------------------------------------------------

_REFERRING = "MOREAU^PHILIPPE^^DR"

_PATIENTS: dict[str, _Patient] = {
    "dupont": _Patient(
        "MTZ0012345", "CHR-METZ", "DUPONT^MARIE", "19560314", "F", "",
        ins_nir13="2560357463123", size_m=1.62, weight_kg=64.0,
    ),
    "martin": _Patient(
        "RMS4402187", "CHU-REIMS", "MARTIN^JEAN-PIERRE", "19480722", "M", "ISO_IR 100",
        size_m=1.76, weight_kg=82.5,
    ),
    "lefevre": _Patient(
        "RMS4409931", "CHU-REIMS", "LEFÈVRE^ÉLODIE", "19900130", "F", "ISO_IR 192",
        ins_nir13="2900151454087", size_m=1.68, weight_kg=61.0,
    ),
    "petit": _Patient(
        "EXT000771", "", "PETIT^LUC", "20010805", "M", "", size_m=1.81, weight_kg=77.0,
    ),
    "francois": _Patient(
        "MTZ0077120", "CHR-METZ", "FRANÇOIS^NOËL", "19671225", "M", "ISO_IR 100",
        size_m=1.72, weight_kg=90.0,
    ),
    "rousseau": _Patient(
        "RMS4415502", "CHU-REIMS", "ROUSSEAU^CAMILLE", "19851009", "O", "ISO_IR 100",
        size_m=1.70, weight_kg=66.0,
    ),
}  # fmt: skip

_METZ = "CHR Metz-Thionville"
_REIMS = "CHU de Reims"

# patient key -> list of (study, [series plans])
_E, _I, _D = ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian
_M2, _RGB = "MONOCHROME2", "RGB"

_PLAN: dict[str, list[tuple[_Study, list[_SeriesPlan]]]] = {
    "dupont": [
        (
            _Study("dupont-ct", "20160512", "093512", "MTZ16A00123",
                   "CT THORAX SANS INJECTION", _REFERRING, _METZ),
            [_SeriesPlan("CT", 2, "Thorax 1.25 mm", "CHEST",
                         ((_E, 1, _M2), (_E, 1, _M2), (_I, 1, _M2), (JPEGLosslessSV1, 1, _M2)))],
        ),
        (
            _Study("dupont-mr", "20211103", "141007", "MTZ21A04410",
                   "IRM CEREBRALE", "KLEIN^SOPHIE^^DR", _METZ),
            [_SeriesPlan("MR", 3, "T2 TSE axial", "HEAD",
                         ((JPEG2000Lossless, 1, _M2), (JPEG2000, 1, _M2), (_E, 1, _M2)))],
        ),
    ],
    "martin": [
        (
            _Study("martin-cr", "20180220", "081455", "RMS18B00987",
                   "RADIOGRAPHIE THORAX FACE PROFIL", _REFERRING, _REIMS),
            [_SeriesPlan("CR", 1, "Thorax", "CHEST",
                         ((JPEGExtended12Bit, 1, _M2), (JPEGLossless, 1, _M2), (_D, 1, _M2)))],
        ),
        (
            _Study("martin-ct", "20230615", "160230", "RMS23B07781",
                   "TDM ABDOMINO-PELVIENNE", "DUBOIS^ANNE^^DR", _REIMS),
            [
                _SeriesPlan("CT", 2, "Abdomen portal", "ABDOMEN",
                            ((JPEGLSLossless, 1, _M2), (RLELossless, 1, _M2), (_E, 1, _M2))),
                _SeriesPlan("CT", 3, "Abdomen tardif", "ABDOMEN", ((_D, 1, _M2), (_I, 1, _M2))),
            ],
        ),
    ],
    "lefevre": [
        (
            _Study("lefevre-us", "20190909", "103300", "RMS19B02240",
                   "ÉCHOGRAPHIE OBSTÉTRICALE T2", "LAURENT^ÉMILIE^^DR", _REIMS),
            [
                _SeriesPlan("US", 1, "Biométries", "ABDOMEN",
                            ((JPEGBaseline8Bit, 1, _RGB), (_E, 1, _M2), (_I, 1, _RGB))),
                _SeriesPlan("US", 2, "Ciné", "ABDOMEN",
                            ((_E, 5, _RGB), (JPEGBaseline8Bit, 5, _RGB), (RLELossless, 5, _RGB),
                             (_D, 4, _M2))),
            ],
        ),
    ],
    "petit": [
        (
            _Study("petit-cr", "20150327", "174512", "EXT15C00045",
                   "RADIOGRAPHIE GENOU DROIT", _REFERRING, _METZ),
            [_SeriesPlan("CR", 1, "Genou droit", "KNEE", ((_E, 1, _M2), (_I, 1, _M2)))],
        ),
        (
            _Study("petit-mr", "20240110", "112040", "EXT24C00912",
                   "IRM GENOU DROIT", _REFERRING, _METZ),
            [_SeriesPlan("MR", 4, "PD FS sagittal", "KNEE",
                         ((RLELossless, 1, _M2), (JPEGLSLossless, 1, _M2), (_D, 1, _M2)))],
        ),
    ],
    "francois": [
        (
            _Study("francois-ct", "20200218", "073015", "MTZ20A01977",
                   "SCANNER CÉRÉBRAL", "NOËL^FRANÇOISE^^DR", _METZ),
            [_SeriesPlan("CT", 1, "Crâne 5 mm", "HEAD",
                         ((_I, 1, _M2), (JPEG2000Lossless, 1, _M2), (JPEGLosslessSV1, 1, _M2)))],
        ),
        (
            _Study("francois-us", "20220704", "090000", "MTZ22A05512",
                   "ECHOGRAPHIE ABDOMINALE", _REFERRING, _METZ),
            [_SeriesPlan("US", 1, "Abdomen", "ABDOMEN",
                         ((JPEGBaseline8Bit, 1, _M2), (JPEGLSLossless, 3, _M2)))],
        ),
    ],
    "rousseau": [
        (
            _Study("rousseau-mr", "20171121", "150545", "RMS17B03321",
                   "IRM RACHIS LOMBAIRE", "DUBOIS^ANNE^^DR", _REIMS),
            [_SeriesPlan("MR", 2, "T1 sagittal", "LSPINE",
                         ((_E, 1, _M2), (_I, 1, _M2), (JPEG2000Lossless, 1, _M2)))],
        ),
    ],
}  # fmt: skip

_MIXED_SIZE = {"CT": 128, "MR": 96, "CR": 112, "US": 80}


def _mixed_instance(
    ctx: _Context, index: int, frames: int, photometric: str, sop_uid: str
) -> Dataset:
    modality = ctx.series.modality
    size = _MIXED_SIZE[modality]
    rng = _rng(ctx.seed, "pixels", sop_uid)
    phase = 0.7 * index + ctx.series.number
    if modality == "CT":
        # stored values 0..4095 with intercept -1024: body ~ +40 HU
        return _ct_dataset(ctx, sop_uid, index, _body_phantom(rng, size, size, 4095, phase), 1.25)
    if modality == "MR":
        return _mr_dataset(ctx, sop_uid, index, _body_phantom(rng, size, size, 2000, phase))
    if modality == "CR":
        rows, columns = size, size - 16
        return _cr_dataset(ctx, sop_uid, index, _body_phantom(rng, rows, columns, 4095, phase))
    if modality == "US":
        pixels = _us_frames(rng, size, size + 16, frames, rgb=photometric == "RGB")
        return _us_dataset(ctx, sop_uid, index, pixels)
    raise ValueError(modality)


def make_corpus(out_dir: Path, *, seed: int = 0) -> list[CorpusFile]:
    """Build the small mixed corpus used by functional tests.

    Six patients (five with an Issuer of Patient ID, one without, two with an INS
    identifier in Other Patient IDs Sequence, names in ASCII, ISO_IR 100 and ISO_IR 192),
    ten studies spread over 2015-2024, modalities CT, MR, CR and US (single and
    multi-frame), and the transfer syntaxes Explicit and Implicit VR Little Endian,
    Deflated Explicit VR Little Endian, RLE Lossless, JPEG Baseline, JPEG Extended,
    JPEG Lossless (process 14 and SV1), JPEG-LS Lossless and JPEG 2000 (lossless and lossy).
    Images are 64 to 128 pixels wide.

    Parameters
    ----------
    out_dir : Path
        Directory receiving one ``<SOP Instance UID>.dcm`` file per instance; created if
        needed.
    seed : int, optional
        Seed from which all UIDs and pixel values are derived, by default 0.

    Returns
    -------
    list[CorpusFile]
        One entry per written file, in a stable order.

    Raises
    ------
    RuntimeError
        If a DCMTK encoder (``dcmcjpeg``, ``dcmcjpls``) is missing or fails.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[CorpusFile] = []
    for patient_key, studies in _PLAN.items():
        patient = _PATIENTS[patient_key]
        for study, series_plans in studies:
            study_uid = _uid(seed, "study", study.key)
            frame_of_reference_uid = _uid(seed, "for", study.key)
            for plan in series_plans:
                ctx = _Context(
                    seed=seed,
                    patient=patient,
                    study=study,
                    study_uid=study_uid,
                    series_uid=_uid(seed, "series", study.key, plan.number),
                    frame_of_reference_uid=frame_of_reference_uid,
                    series=plan,
                )
                for index, (syntax, frames, photometric) in enumerate(plan.instances):
                    sop_uid = _uid(seed, "instance", study.key, plan.number, index)
                    ds = _mixed_instance(ctx, index, frames, photometric, sop_uid)
                    path = out_dir / f"{sop_uid}.dcm"
                    _encode_and_write(path, ds, syntax)
                    files.append(_record(path, ctx, ds, syntax))
    return files


# --------------------------------------------------------------------------------------------
# Benchmark series
# --------------------------------------------------------------------------------------------


def _bench_series(
    out_dir: Path,
    count: int,
    *,
    rows: int,
    columns: int,
    patient_id: str,
    seed: int,
    kind: str,
) -> list[CorpusFile]:
    if count < 0:
        raise ValueError("count must be >= 0")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    patient = _Patient(
        patient_id, "CHR-METZ", f"BENCH^{kind.upper()}", "19700101", "O", "ISO_IR 100"
    )
    key = f"bench-{kind}-{patient_id}"
    study = _Study(
        key,
        "20220315",
        "101500",
        f"B{kind[:2].upper()}{seed % 10**8:08d}",
        "CT THORAX-ABDOMEN-PELVIS" if kind == "ct" else "CT LOW DOSE",
        _REFERRING,
        _METZ,
    )
    plan = _SeriesPlan("CT", 1, f"Benchmark {kind}", "CHEST", ())
    ctx = _Context(
        seed=seed,
        patient=patient,
        study=study,
        study_uid=_uid(seed, "study", key),
        series_uid=_uid(seed, "series", key),
        frame_of_reference_uid=_uid(seed, "for", key),
        series=plan,
    )
    # One phantom and one noise field per series; slices differ by shifted noise and a
    # slice-dependent structure so that no two instances carry identical pixel data.
    rng = _rng(seed, "bench", key, rows, columns)
    base = _body_phantom(rng, rows, columns, 4095, 0.0).astype(np.int32)
    noise = rng.integers(-30, 31, size=(rows, columns), dtype=np.int32)
    y, x = _coords(rows, columns)
    files: list[CorpusFile] = []
    for index in range(count):
        shift = int(rng.integers(0, rows * columns))
        radius = 0.08 + 0.06 * abs(np.sin(index / 17.0))
        marker = ((x + 0.3) ** 2 + (y - 0.1) ** 2 <= radius**2) * 600
        pixels = base + np.roll(noise, shift) + marker
        pixels = np.clip(pixels, 0, 4095).astype(np.uint16)
        sop_uid = _uid(seed, "instance", key, index)
        ds = _ct_dataset(ctx, sop_uid, index, pixels, 1.0 if kind == "ct" else 5.0)
        path = out_dir / f"{sop_uid}.dcm"
        _encode_and_write(path, ds, ExplicitVRLittleEndian)
        files.append(_record(path, ctx, ds, ExplicitVRLittleEndian))
    return files


def make_ct_series(
    out_dir: Path,
    count: int,
    *,
    rows: int = 512,
    columns: int = 512,
    patient_id: str = "BENCHCT",
    seed: int = 0,
) -> list[CorpusFile]:
    """Write an uncompressed CT series for throughput benchmarks.

    All instances belong to one patient (Issuer of Patient ID ``CHR-METZ``), one study and
    one series, use Explicit VR Little Endian and carry a full CT header (about 100
    attributes).  At 512 x 512, 12 bits stored in 16, each file is about 0.53 MB.

    Parameters
    ----------
    out_dir : Path
        Directory receiving one ``<SOP Instance UID>.dcm`` file per instance; created if
        needed.
    count : int
        Number of instances (slices).
    rows, columns : int, optional
        Image matrix, by default 512 x 512.
    patient_id : str, optional
        Patient ID written in every instance, by default ``"BENCHCT"``.  The study and
        series UIDs depend on it, so different patient IDs give different studies.
    seed : int, optional
        Seed from which UIDs and pixel values are derived, by default 0.

    Returns
    -------
    list[CorpusFile]
        One entry per file, ordered by Instance Number.
    """
    return _bench_series(
        out_dir, count, rows=rows, columns=columns, patient_id=patient_id, seed=seed, kind="ct"
    )


def make_small_series(
    out_dir: Path, count: int, *, patient_id: str = "BENCHSMALL", seed: int = 0
) -> list[CorpusFile]:
    """Write a series of small (about 10 kB) CT instances for per-instance overhead benchmarks.

    The instances are 64 x 64, 16 bits allocated, Explicit VR Little Endian, with the same
    full CT header as :func:`make_ct_series`; one patient, one study, one series.

    Parameters
    ----------
    out_dir : Path
        Directory receiving one ``<SOP Instance UID>.dcm`` file per instance; created if
        needed.
    count : int
        Number of instances.
    patient_id : str, optional
        Patient ID written in every instance, by default ``"BENCHSMALL"``.
    seed : int, optional
        Seed from which UIDs and pixel values are derived, by default 0.

    Returns
    -------
    list[CorpusFile]
        One entry per file, ordered by Instance Number.
    """
    return _bench_series(
        out_dir, count, rows=64, columns=64, patient_id=patient_id, seed=seed, kind="small"
    )


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: ``python -m tests.corpus mixed|ct|small OUT_DIR``.

    Parameters
    ----------
    argv : Sequence[str] or None, optional
        Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns
    -------
    int
        Process exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m tests.corpus", description="Write a synthetic DICOM corpus."
    )
    parser.add_argument("kind", choices=("mixed", "ct", "small"))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--count", type=int, default=100, help="instances for ct/small (default 100)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.kind == "mixed":
        files = make_corpus(args.out_dir, seed=args.seed)
    elif args.kind == "ct":
        files = make_ct_series(args.out_dir, args.count, seed=args.seed)
    else:
        files = make_small_series(args.out_dir, args.count, seed=args.seed)
    total = sum(f.path.stat().st_size for f in files)
    print(f"{args.kind}: wrote {len(files)} files, {total} bytes to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
