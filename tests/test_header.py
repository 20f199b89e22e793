"""The fast header reader gives exactly what pydicom reads.

The archive reads the index attributes straight from the received bytes and hands
pydicom only the few elements routing needs (:func:`dicom_node.archive.header.fast_header`);
pydicom reads the whole header when the fast reader declines. Both must agree, on the
index row and on everything routing decides with (route attribute values, patient
identity), or a route would match differently depending on how a file was encoded.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicom_node.archive.attributes import attributes_of
from dicom_node.archive.header import (
    check_complete,
    extra_tags,
    fast_header,
    file_meta_bytes,
    parse_header,
    scan_dataset,
)
from dicom_node.errors import InvalidInstance
from router.facts import IDENTITY_KEYWORDS, patient_facts, route_attributes
from tests.corpus import CorpusFile

#: What routes in the tests and in hospital configurations match on, besides identity.
ROUTE_KEYWORDS = frozenset(
    {
        "Modality",
        "StationName",
        "InstitutionName",
        "ImageType",
        "BodyPartExamined",
        "Rows",
        "PixelSpacing",
        "SeriesNumber",
        "ReferringPhysicianName",
        "OperatorsName",
        "PatientAge",
        "ImageComments",
        "AcquisitionDate",
    }
)
KEYWORDS = ROUTE_KEYWORDS | frozenset(IDENTITY_KEYWORDS)
INS_OID = "1.2.250.1.213.1.4.8"


def _split(path: Path) -> tuple[str, bytes]:
    """Transfer syntax and data set bytes of a Part 10 file."""
    ds = dcmread(path, stop_before_pixels=False)
    raw = path.read_bytes()
    meta_length = int.from_bytes(raw[140:144], "little")
    return str(ds.file_meta.TransferSyntaxUID), raw[144 + meta_length :]


def _both(data: bytes, syntax: str, sop_class: str, sop_instance: str) -> tuple[object, object]:
    """(fast, pydicom) readings: header, route attributes and patient facts."""
    end = check_complete(data, syntax)
    fast = fast_header(data, syntax, extra_tags(KEYWORDS))
    meta = file_meta_bytes(sop_class, sop_instance, syntax, "MODALITY")
    slow_header, slow_ds = parse_header(meta, memoryview(data)[:end], KEYWORDS)
    read = attributes_of(slow_ds, KEYWORDS)
    slow = (
        slow_header,
        route_attributes(read, ROUTE_KEYWORDS),
        patient_facts(read, "PEER-ISSUER"),
        read,
    )
    if fast is None:
        return None, slow
    header, attrs = fast
    return (
        header,
        route_attributes(attrs, ROUTE_KEYWORDS),
        patient_facts(attrs, "PEER-ISSUER"),
        attrs,
    ), slow


def test_corpus_files_read_the_same_both_ways(corpus: list[CorpusFile]) -> None:
    fast_reads = 0
    for item in corpus:
        syntax, data = _split(item.path)
        fast, slow = _both(data, syntax, item.sop_class_uid, item.sop_instance_uid)
        if fast is not None:
            fast_reads += 1
            assert fast == slow, item.path.name
    # the corpus is mostly little endian: the fast reader must have taken most files
    assert fast_reads >= len(corpus) * 2 // 3


_NAME_CHARS = string.ascii_letters + "éèàçÉÖß -'"
names = st.text(_NAME_CHARS, min_size=1, max_size=20).map(str.strip).filter(bool)
plain = st.text(string.ascii_uppercase + string.digits + "_", min_size=1, max_size=16)


@st.composite
def datasets(draw: st.DrawFn) -> tuple[Dataset, bool]:
    """A CT header with what routing reads drawn at random, and whether it is implicit."""
    ds = Dataset()
    charset = draw(st.sampled_from([None, "ISO_IR 100", "ISO_IR 192"]))
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.3.4." + str(draw(st.integers(1, 10**9)))
    ds.StudyInstanceUID = "1.2.3.5.1"
    ds.SeriesInstanceUID = "1.2.3.6.1"
    ds.Modality = draw(st.sampled_from(["CT", "MR", "US"]))
    if draw(st.booleans()):
        ds.ImageType = draw(st.lists(plain, min_size=1, max_size=4))
    if draw(st.booleans()):
        ds.StationName = draw(plain)
    if draw(st.booleans()):
        ds.InstitutionName = draw(names) if charset else draw(plain)
    ds.PatientName = draw(names) if charset else draw(plain)
    ds.PatientID = draw(plain)
    if draw(st.booleans()):
        ds.IssuerOfPatientID = draw(plain)
    if draw(st.booleans()):
        qualifier = Dataset()
        qualifier.UniversalEntityID = "1.2.250.1.71.4.2.7"
        qualifier.UniversalEntityIDType = "ISO"
        ds.IssuerOfPatientIDQualifiersSequence = Sequence([qualifier])
    ds.PatientBirthDate = draw(st.sampled_from(["", "19700101", "20011231"]))
    ds.PatientSex = draw(st.sampled_from(["", "F", "M", "O"]))
    items = []
    for _ in range(draw(st.integers(0, 2))):
        item = Dataset()
        item.PatientID = draw(st.text(string.digits, min_size=13, max_size=15))
        item.IssuerOfPatientID = draw(st.sampled_from(["ASIP-SANTE-INS-NIR", "CHR-METZ"]))
        qualifiers = Dataset()
        qualifiers.UniversalEntityID = draw(st.sampled_from([INS_OID, "1.2.3"]))
        qualifiers.UniversalEntityIDType = "ISO"
        item.IssuerOfPatientIDQualifiersSequence = Sequence([qualifiers])
        items.append(item)
    if items:
        ds.OtherPatientIDsSequence = Sequence(items)
    if draw(st.booleans()):
        person = draw(names) if charset else draw(plain)
        ds.ReferringPhysicianName = draw(
            st.sampled_from([person, f"{person}^JEAN", f"{person}^JEAN=^^", ""])
        )
    if draw(st.booleans()):
        ds.OperatorsName = draw(st.lists(plain, min_size=1, max_size=3))
    if draw(st.booleans()):
        ds.PatientAge = draw(st.sampled_from(["045Y", "003M", ""]))
    if draw(st.booleans()):
        ds.ImageComments = draw(st.sampled_from(["a\\b c", " lead and trail ", ""]))
    if draw(st.booleans()):
        ds.AcquisitionDate = draw(st.sampled_from(["20240229", "", "20240101 "]))
    ds.SeriesNumber = draw(st.integers(0, 999))
    ds.BodyPartExamined = draw(st.sampled_from(["HEAD", "CHEST", "ABDOMEN"]))
    ds.Rows = draw(st.integers(1, 4096))
    if draw(st.booleans()):
        ds.PixelSpacing = [draw(st.sampled_from(["0.5", "0.703125", "1"])), "0.5"]
    undefined = draw(st.booleans())
    for element in ds.iterall():
        if element.VR == "SQ":
            element.is_undefined_length = undefined
    return ds, draw(st.booleans())


@pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")  # received as such
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datasets())
def test_random_headers_read_the_same_both_ways(drawn: tuple[Dataset, bool]) -> None:
    ds, implicit = drawn
    syntax = str(ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian)
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = implicit
    write_dataset(buffer, ds)
    data = buffer.getvalue()
    fast, slow = _both(data, syntax, str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    assert fast is not None, "the fast reader declined a plain little endian header"
    assert fast == slow
    # and what routing reads is what was written
    _header, attributes, facts, _read = fast  # type: ignore[misc]
    assert attributes["Modality"] == (ds.Modality,)
    expected_ins = tuple(
        (INS_OID, str(item.PatientID))
        for item in ds.get("OtherPatientIDsSequence", [])
        # the INS domain named by the qualifiers' OID, or else by the issuer's text
        if item.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID == INS_OID
        or item.IssuerOfPatientID == "ASIP-SANTE-INS-NIR"
    )
    assert facts.ins_values == expected_ins
    if ds.get("ReferringPhysicianName"):
        # one person name is one value (pydicom's PersonName iterates over characters)
        assert attributes["ReferringPhysicianName"] == (str(ds.ReferringPhysicianName),)
    if "ImageType" in ds:
        image_type = ds.ImageType
        multiple = isinstance(image_type, MultiValue)
        assert attributes["ImageType"] == (tuple(image_type) if multiple else (image_type,))


def _minimal(implicit: bool = False, **attributes: str) -> bytes:
    """A CT header with its UIDs and ``attributes``, encoded little endian."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.StudyInstanceUID = "1.2.3.5.1"
    ds.SeriesInstanceUID = "1.2.3.6.1"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    raw = DicomBytesIO()
    raw.is_little_endian, raw.is_implicit_VR = True, implicit
    write_dataset(raw, ds)
    return bytes(raw.getvalue())


def test_without_routing_keywords_no_dataset_is_decoded() -> None:
    data = _minimal(PatientID="P1")
    syntax = str(ExplicitVRLittleEndian)
    result = fast_header(data, syntax)
    assert result is not None
    header, extra = result
    assert header.patient_id == "P1"
    assert extra.texts() == {}


@pytest.mark.parametrize("implicit", [False, True])
def test_unusual_routing_element_falls_back_to_pydicom(implicit: bool) -> None:
    """A routing element whose value pydicom cannot convert: the fast reader declines,
    and pydicom's reading refuses the data set (it cannot be understood)."""
    # Rows (0028,0010) is US: 2 bytes; give it 3 (pydicom cannot unpack it)
    rows = b"\x28\x00\x10\x00" + (b"\x03\x00\x00\x00" if implicit else b"US\x03\x00")
    data = _minimal(implicit, Modality="CT") + rows + b"\x01\x02\x03\x00"
    syntax = str(ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian)
    assert fast_header(data, syntax, extra_tags({"Rows"})) is None
    meta = file_meta_bytes(CTImageStorage, "1.2.3.4.5", syntax, "MODALITY")
    with pytest.raises(InvalidInstance):  # refused with 0xC210, not a processing failure
        parse_header(meta, data, {"Rows"})


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element with a short length."""
    return (
        (tag >> 16).to_bytes(2, "little")
        + (tag & 0xFFFF).to_bytes(2, "little")
        + vr
        + len(value).to_bytes(2, "little")
        + value
    )


def _item(body: bytes) -> bytes:
    return b"\xfe\xff\x00\xe0" + len(body).to_bytes(4, "little") + body


def _sequence(tag: int, *items: bytes) -> bytes:
    value = b"".join(items)
    return (
        (tag >> 16).to_bytes(2, "little")
        + (tag & 0xFFFF).to_bytes(2, "little")
        + b"SQ\x00\x00"
        + len(value).to_bytes(4, "little")
        + value
    )


@pytest.mark.parametrize("implicit", [False, True])
def test_repeated_or_out_of_order_top_level_element_is_refused(implicit: bool) -> None:
    """PS3.5 7.1: a second Patient ID after the others (here after Pixel Data, where the
    header read stops) would show another patient to a reader of the whole file than the
    one indexed and checked."""
    syntax = str(ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian)
    data = _minimal(implicit, PatientID="P-GRANTED")
    scan_dataset(data, syntax, frozenset())  # in order: accepted
    tail = Dataset()
    tail.PatientID = "P-REFUSED"
    raw = DicomBytesIO()
    raw.is_little_endian, raw.is_implicit_VR = True, implicit
    write_dataset(raw, tail)
    with pytest.raises(InvalidInstance, match="out of order or repeated"):
        scan_dataset(data + bytes(raw.getvalue()), syntax, frozenset())


def _around(middle: bytes) -> bytes:
    """A CT header (explicit VR LE) with the encoded ``middle`` placed in tag order
    between its SOP UIDs (group 0008) and its study and series UIDs (group 0020)."""
    before, after = Dataset(), Dataset()
    before.SOPClassUID = CTImageStorage
    before.SOPInstanceUID = "1.2.3.4.5"
    after.StudyInstanceUID = "1.2.3.5.1"
    after.SeriesInstanceUID = "1.2.3.6.1"
    parts = []
    for ds in (before, after):
        raw = DicomBytesIO()
        raw.is_little_endian, raw.is_implicit_VR = True, False
        write_dataset(raw, ds)
        parts.append(bytes(raw.getvalue()))
    return parts[0] + middle + parts[1]


def test_identity_sequence_items_must_be_in_order_other_sequences_need_not() -> None:
    """A repeated Patient ID inside an Other Patient IDs item (defined lengths) is
    refused: readers disagree on which one counts. The same disorder inside another
    sequence is left alone (seen in private sequences in the field; pydicom reads it)."""
    syntax = str(ExplicitVRLittleEndian)
    twice = _element(0x00100020, b"LO", b"NIR1") + _element(0x00100020, b"LO", b"NIR2")
    with pytest.raises(InvalidInstance, match="sequence item"):
        scan_dataset(_around(_sequence(0x00101002, _item(twice))), syntax, frozenset())
    once = _element(0x00100020, b"LO", b"NIR1") + _element(0x00100021, b"LO", b"X ")
    scan_dataset(_around(_sequence(0x00101002, _item(once))), syntax, frozenset())
    # Referenced Image Sequence (0008,1140) holding the same disorder: accepted
    scan_dataset(_around(_sequence(0x00081140, _item(twice))), syntax, frozenset())


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA:UserWarning")
@pytest.mark.parametrize(
    ("written", "indexed"),
    [
        ("19551122", "19551122"),
        ("1955.11.22", "19551122"),
        ("1955-11-22", "19551122"),
        ("1955-11", ""),
        ("22/11/1955", ""),
        ("", ""),
    ],
)
def test_a_date_is_indexed_whole_or_not_at_all(written: str, indexed: str) -> None:
    """A birth date is indexed as YYYYMMDD (the old dotted form and the ISO form read as
    dates), or left empty: cut to eight characters, '1955-11-22' became '1955-11-',
    which no date range matches and which showed in C-FIND answers."""
    data = _minimal(PatientBirthDate=written, StudyDate=written)
    syntax = str(ExplicitVRLittleEndian)
    fast = fast_header(data, syntax)
    assert fast is not None
    meta = file_meta_bytes(CTImageStorage, "1.2.3.4.5", syntax, "MODALITY")
    slow, _ = parse_header(meta, data)
    for header in (fast[0], slow):
        assert (header.birth_date, header.study_date) == (indexed, indexed)
