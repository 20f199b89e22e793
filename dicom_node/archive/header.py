"""Build the Part 10 file header for received bytes and read the index attributes.

Only the header is parsed (``stop_before_pixels``); pixel data is never decoded here.
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from dicom_node.errors import InvalidInstance
from dicom_node.uids import is_valid_uid

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1517.1"
IMPLEMENTATION_VERSION = "CONSENTGATE_01"

_PREAMBLE = b"\x00" * 128 + b"DICM"

#: Attributes the index needs, read without touching the pixel data.
INDEX_KEYWORDS = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "SeriesDate",
    "SeriesTime",
    "InstanceNumber",
    "NumberOfFrames",
)


@dataclass(frozen=True)
class InstanceHeader:
    """The attributes of one instance that the index stores."""

    sop_class_uid: str
    sop_instance_uid: str
    patient_id: str
    issuer: str
    patient_name: str
    birth_date: str
    sex: str
    study_instance_uid: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    study_description: str
    referring_physician_name: str
    series_instance_uid: str
    modality: str
    series_number: str
    series_description: str
    body_part_examined: str
    series_date: str
    series_time: str
    instance_number: str
    number_of_frames: int


def file_meta_bytes(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str
) -> bytes:
    """Encode the preamble, ``DICM`` prefix and File Meta Information group."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae
    buffer = BytesIO()
    buffer.write(_PREAMBLE)
    write_file_meta_info(buffer, meta, enforce_standard=True)  # type: ignore[arg-type]
    return buffer.getvalue()


def read_header(meta: bytes, dataset: bytes | bytearray | memoryview) -> InstanceHeader:
    """Parse the index attributes of an encoded dataset.

    Raises
    ------
    InvalidInstance
        The bytes cannot be parsed, or a required UID is missing or unsafe.
    """
    try:
        ds = dcmread(
            BytesIO(meta + bytes(dataset)),
            stop_before_pixels=True,
            specific_tags=list(INDEX_KEYWORDS),
        )
        header = _to_header(ds)
    except InvalidInstance:
        raise
    except (
        InvalidDicomError,
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        OverflowError,
        IndexError,
        AttributeError,
        NotImplementedError,
        LookupError,
    ) as exc:
        raise InvalidInstance(f"dataset cannot be parsed ({type(exc).__name__})") from None
    return header


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    text = str(value).strip().replace("\x00", "")
    return text[:limit]


def _to_header(ds: Dataset) -> InstanceHeader:
    uids = {}
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = ds.get(keyword)
        text = str(value).strip().rstrip("\x00") if value is not None else ""
        if not is_valid_uid(text):
            raise InvalidInstance(f"{keyword} is missing or not a valid UID", status=0xC212)
        uids[keyword] = text
    frames_raw = ds.get("NumberOfFrames", 1)
    try:
        frames = max(1, int(frames_raw or 1))
    except (TypeError, ValueError):
        frames = 1
    return InstanceHeader(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        patient_id=_text(ds, "PatientID", 64),
        issuer=_text(ds, "IssuerOfPatientID", 64),
        patient_name=_text(ds, "PatientName", 324),
        birth_date=_text(ds, "PatientBirthDate", 8),
        sex=_text(ds, "PatientSex", 16),
        study_instance_uid=uids["StudyInstanceUID"],
        study_date=_text(ds, "StudyDate", 8),
        study_time=_text(ds, "StudyTime", 16),
        accession_number=_text(ds, "AccessionNumber", 16),
        study_id=_text(ds, "StudyID", 16),
        study_description=_text(ds, "StudyDescription", 64),
        referring_physician_name=_text(ds, "ReferringPhysicianName", 324),
        series_instance_uid=uids["SeriesInstanceUID"],
        modality=_text(ds, "Modality", 16),
        series_number=_text(ds, "SeriesNumber", 12),
        series_description=_text(ds, "SeriesDescription", 64),
        body_part_examined=_text(ds, "BodyPartExamined", 16),
        series_date=_text(ds, "SeriesDate", 8),
        series_time=_text(ds, "SeriesTime", 16),
        instance_number=_text(ds, "InstanceNumber", 12),
        number_of_frames=frames,
    )
