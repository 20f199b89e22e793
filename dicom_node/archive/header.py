"""Build the Part 10 file header for received bytes and read the index attributes.

Only the header is parsed (``stop_before_pixels``); pixel data is never decoded here.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from dicom_node.archive.attributes import (
    ReceivedAttributes,
    attributes_of,
    split_values,
    text_of,
)
from dicom_node.errors import InvalidInstance
from dicom_node.uids import is_valid_uid

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1517.1"
IMPLEMENTATION_VERSION = "CONSENTGATE_01"

_PREAMBLE = b"\x00" * 128 + b"DICM"
#: What pydicom raises on bytes it cannot read.
_PYDICOM_ERRORS = (
    InvalidDicomError,
    BytesLengthException,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    OverflowError,
    IndexError,
    AttributeError,
    NotImplementedError,
    LookupError,
)

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


def _meta_element(element: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    return struct.pack("<HH2sH", 2, element, vr, len(value)) + value


def _fast_file_meta_bytes(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str
) -> bytes | None:
    """The same bytes as pydicom's ``write_file_meta_info`` for plain ASCII values
    (explicit VR little endian), built directly: pydicom took ~0.5 ms per instance."""
    values = (sop_class_uid, sop_instance_uid, transfer_syntax_uid, source_ae)
    if not all(v.isascii() and v.isprintable() and v == v.strip() for v in values):
        return None
    body = b"".join(
        (
            b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01",
            _meta_element(0x0002, b"UI", sop_class_uid.encode(), b"\x00"),
            _meta_element(0x0003, b"UI", sop_instance_uid.encode(), b"\x00"),
            _meta_element(0x0010, b"UI", transfer_syntax_uid.encode(), b"\x00"),
            _meta_element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode(), b"\x00"),
            _meta_element(0x0013, b"SH", IMPLEMENTATION_VERSION.encode(), b" "),
            _meta_element(0x0016, b"AE", source_ae.encode(), b" ") if source_ae else b"",
        )
    )
    return _PREAMBLE + struct.pack("<HH2sHL", 2, 0, b"UL", 4, len(body)) + body


def file_meta_bytes(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str
) -> bytes:
    """Encode the preamble, ``DICM`` prefix and File Meta Information group."""
    fast = _fast_file_meta_bytes(sop_class_uid, sop_instance_uid, transfer_syntax_uid, source_ae)
    if fast is not None:
        return fast
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


def dataset_offset(part10: bytes | bytearray | memoryview) -> int:
    """Where the data set starts in a Part 10 file (after the preamble, "DICM" and the
    File Meta Information group, whose length element comes first); ``part10`` needs
    only its first 144 bytes. Raises ValueError when it is not a Part 10 file."""
    if len(part10) < len(_PREAMBLE) + 12 or bytes(part10[128:132]) != b"DICM":
        raise ValueError("not a DICOM Part 10 file")
    return len(_PREAMBLE) + 12 + int.from_bytes(part10[140:144], "little")


def read_header(meta: bytes, dataset: bytes | bytearray | memoryview) -> InstanceHeader:
    """Parse the index attributes of an encoded dataset (see :func:`parse_header`)."""
    return parse_header(meta, dataset)[0]


def parse_header(
    meta: bytes,
    dataset: bytes | bytearray | memoryview,
    extra_keywords: Iterable[str] = (),
) -> tuple[InstanceHeader, Dataset]:
    """Parse the index attributes, plus ``extra_keywords``, of an encoded dataset.

    ``dataset`` may stop before the Pixel Data element (see :func:`check_complete`).
    Returns the header and the partial dataset that was read (for routing).

    Raises
    ------
    InvalidInstance
        The bytes cannot be parsed, or a required UID is missing or unsafe.
    """
    tags: list[str] = list(INDEX_KEYWORDS)
    tags.extend(k for k in extra_keywords if k not in INDEX_KEYWORDS)
    try:
        ds = dcmread(BytesIO(meta + bytes(dataset)), stop_before_pixels=True, specific_tags=tags)
        header = _to_header(ds)
        for element in ds:  # every value converted now: a malformed one is refused here
            _ = element.value
    except InvalidInstance:
        raise
    except _PYDICOM_ERRORS as exc:
        raise InvalidInstance(f"dataset cannot be parsed ({type(exc).__name__})") from None
    return header, ds


_DEFLATED = "1.2.840.10008.1.2.1.99"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_IMPLICIT = "1.2.840.10008.1.2"
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)


def check_complete(dataset: bytes | bytearray | memoryview, transfer_syntax_uid: str) -> int:
    """Refuse a dataset whose last element, item or sequence is cut short.

    pydicom reads a truncated value without complaint (and the header is read with
    ``stop_before_pixels``), so a truncated C-STORE would be archived as a broken file.
    Only element headers are walked; values are skipped.

    Returns
    -------
    int
        The offset of the top-level Pixel Data element (the length when there is none):
        everything the index needs lies before it.

    Raises
    ------
    InvalidInstance
        The encoding ends inside an element, or an undefined length is never closed.
    """
    return scan_dataset(dataset, transfer_syntax_uid).header_end


@dataclass(frozen=True)
class ScannedDataset:
    """What one walk over a received data set found (see :func:`scan_dataset`)."""

    header_end: int
    #: the index header and the routing elements, or ``None``: read with pydicom
    fast: tuple[InstanceHeader, ReceivedAttributes] | None


def scan_dataset(
    dataset: bytes | bytearray | memoryview,
    transfer_syntax_uid: str,
    extra: frozenset[int] | None = None,
) -> ScannedDataset:
    """Check that the data set is complete and, in the same walk over its top-level
    elements, read the index attributes and cut out the ``extra`` elements.

    The completeness check is :func:`check_complete`'s. With ``extra`` given (even
    empty), the header is read as :func:`fast_header` describes, or ``fast`` is ``None``
    when the encoding is one the fast reader leaves to pydicom.

    Raises
    ------
    InvalidInstance
        The data set is truncated or malformed, or a required UID is missing or invalid.
    """
    data = memoryview(dataset).cast("B")
    deflated = transfer_syntax_uid == _DEFLATED
    if deflated:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            data = memoryview(inflater.decompress(data) + inflater.flush())
        except zlib.error:
            raise InvalidInstance("deflated dataset cannot be inflated") from None
        if not inflater.eof:
            raise InvalidInstance("deflated dataset is truncated")
    little = transfer_syntax_uid != _BIG_ENDIAN
    implicit = transfer_syntax_uid == _IMPLICIT
    guessed = False
    if not implicit and len(data) >= 6 and not bytes(data[4:6]).isalpha():
        implicit = guessed = True  # pydicom reads such datasets as implicit VR too
    collect = None
    if (
        extra is not None
        and not guessed
        and (transfer_syntax_uid == _IMPLICIT or transfer_syntax_uid in _EXPLICIT_LE)
    ):
        collect = _Collected(extra)
    end = len(data)
    try:
        pos, pixel_at = _scan(data, end, little=little, implicit=implicit, collect=collect)
    except struct.error:
        pos, pixel_at = -1, end
    if pos != end:
        raise InvalidInstance("dataset is truncated or malformed")
    # the header ends where Pixel Data starts (deflated: the offset is in the inflated
    # stream, so the whole dataset is the header)
    header_end = len(dataset) if deflated else pixel_at
    fast = None
    if collect is not None and collect.usable:
        fast = _fast_result(data, collect, implicit)
    return ScannedDataset(header_end, fast)


class _Collected:
    """The index values and routing spans gathered while walking the top level."""

    __slots__ = ("extra", "found", "last", "previous", "spans", "usable")

    def __init__(self, extra: frozenset[int]) -> None:
        self.extra = extra
        self.found: dict[str, bytes] = {}
        # (tag, VR as encoded or b"", element start, value start, element end)
        self.spans: list[tuple[int, bytes, int, int, int]] = []
        # nothing past Pixel Data is read (pydicom reads the header with
        # stop_before_pixels)
        self.last = min(max(_LAST_FIELD, max(extra, default=0)), _PIXEL_DATA - 1)
        self.previous = -1
        self.usable = True


def _scan(
    data: memoryview, end: int, *, little: bool, implicit: bool, collect: _Collected | None
) -> tuple[int, int]:
    """Walk the top-level elements; returns (the offset after the last one, or -1 when
    the encoding is cut short; the offset of Pixel Data, or ``end``)."""
    order = "<" if little else ">"
    tag_format, long_format, short_format = order + "HH", order + "I", order + "H"
    unpack = struct.unpack_from
    pixel_at = end
    pos = 0
    previous = -1
    while pos < end:
        if end - pos < 8 and not any(data[pos:end]):
            return end, pixel_at  # a few bytes of trailing NUL padding: pydicom ignores them
        start = pos
        group, elem = unpack(tag_format, data, pos)
        tag = group << 16 | elem
        if tag <= previous:
            # PS3.5 7.1: ascending tags, each at most once. A repeated or out-of-order
            # element (say a second Patient ID after Pixel Data, which the header read
            # never sees) would make a reader of the whole file see another patient
            # than the one indexed and checked
            raise InvalidInstance("data set elements are out of order or repeated")
        previous = tag
        if tag == _PIXEL_DATA and pixel_at == end:
            pixel_at = pos
        if group == 0xFFFE:  # item / delimitation items carry no VR
            (length,) = unpack(long_format, data, pos + 4)
            pos += 8
            if length != _UNDEFINED:
                pos += length
            if collect is not None:
                collect.usable = False
            continue
        # the element header, decoded inline: this loop runs for every element of every
        # received instance (a call to _element() per element cost a fifth of the walk)
        vr = b""
        if implicit:
            (length,) = unpack(long_format, data, pos + 4)
            pos += 8
        else:
            vr = bytes(data[pos + 4 : pos + 6])
            if vr in _LONG_VRS:
                (length,) = unpack(long_format, data, pos + 8)
                pos += 12
            else:
                (length,) = unpack(short_format, data, pos + 6)
                pos += 8
        value_at = pos
        if length != _UNDEFINED:
            pos += length
        else:
            pos = _past_undefined(data, pos, end, vr, little, implicit)
            if pos < 0:
                return -1, pixel_at
        if tag in _IDENTITY_SEQUENCES:
            _check_sequence(data, value_at, min(pos, end), vr, little=little, implicit=implicit)
        if collect is not None and collect.usable and tag <= collect.last:
            if tag <= collect.previous:
                collect.usable = False  # out of order: pydicom's rules
                continue
            collect.previous = tag
            field = _FIELDS.get(tag)
            if field is not None:
                if length == _UNDEFINED or (vr and vr != field[1]) or pos > end:
                    collect.usable = False  # an unexpected encoding: pydicom's rules
                    continue
                collect.found[field[0]] = bytes(data[value_at:pos])
            if tag in collect.extra or (tag == _CHARSET_TAG and collect.extra):
                collect.spans.append((tag, vr, start, value_at, pos))
    return (-1 if pos > end else pos), pixel_at


def _element(
    data: memoryview, pos: int, end: int, order: str, little: bool, implicit: bool
) -> tuple[bytes, int, int, int]:
    """The element starting at ``pos`` (not an item): its VR as encoded (``b""`` when
    implicit), value length, value offset and end offset (-1 when cut short); an
    undefined length is followed to its sequence delimiter."""
    vr = b""
    if implicit:
        (length,) = struct.unpack_from(order + "I", data, pos + 4)
        pos += 8
    else:
        vr = bytes(data[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from(order + "I", data, pos + 8)
            pos += 12
        else:
            (length,) = struct.unpack_from(order + "H", data, pos + 6)
            pos += 8
    if length != _UNDEFINED:
        return vr, length, pos, pos + length
    return vr, length, pos, _past_undefined(data, pos, end, vr, little, implicit)


def _past_undefined(
    data: memoryview, pos: int, end: int, vr: bytes, little: bool, implicit: bool
) -> int:
    """The end of an undefined-length value starting at ``pos`` (a sequence,
    encapsulated pixel data, or UN holding implicit VR LE content), or -1."""
    return _walk_items(
        data,
        pos,
        end,
        little=little if vr != b"UN" else True,
        implicit=implicit or vr == b"UN",
    )


def _walk_item(
    data: memoryview, pos: int, end: int, *, little: bool, implicit: bool, ordered: bool = False
) -> int:
    """Skip the elements of an undefined-length item from ``pos``; returns the offset
    after its delimiter, or -1 when the encoding is cut short. ``ordered``: an item of
    an identity sequence, checked as :func:`_check_sequence` says (other sequences are
    not: out-of-order private items are seen in the field, and pydicom reads them)."""
    order = "<" if little else ">"
    previous = -1
    while pos < end:
        group, elem = struct.unpack_from(order + "HH", data, pos)
        if group == 0xFFFE:  # item / delimitation items carry no VR
            (length,) = struct.unpack_from(order + "I", data, pos + 4)
            pos += 8
            if elem == 0xE00D:
                return pos
            if length != _UNDEFINED:
                pos += length
            continue
        if not ordered:
            pos = _element(data, pos, end, order, little, implicit)[3]
            if pos < 0:
                return -1
            continue
        previous, pos = _ordered_element(data, pos, end, previous, little=little, implicit=implicit)
        if pos < 0:
            return -1
    return -1


#: Sequences the patient identity is read from (Other Patient IDs, Issuer of Patient ID
#: Qualifiers): their items are checked for order whatever their length encoding.
_IDENTITY_SEQUENCES = frozenset({0x00101002, 0x00100024})


def _check_sequence(
    data: memoryview, pos: int, end: int, vr: bytes, *, little: bool, implicit: bool
) -> None:
    """Check that every item of the sequence value ``data[pos:end]`` (up to its delimiter
    when of undefined length) holds its elements in ascending order, each once, and so
    do the identity sequences nested in them.

    Raises
    ------
    InvalidInstance
        An item repeats an element or holds them out of order.
    """
    if vr == b"UN":
        little, implicit = True, True
    order = "<" if little else ">"
    while pos + 8 <= end:
        group, elem, length = struct.unpack_from(order + "HHI", data, pos)
        pos += 8
        if (group, elem) != (0xFFFE, 0xE000):
            return  # the sequence delimiter, or malformed (the walk reports that)
        if length == _UNDEFINED:
            pos = _walk_item(data, pos, end, little=little, implicit=implicit, ordered=True)
            if pos < 0:
                return
            continue
        item_end = min(pos + length, end)
        previous = -1
        while pos + 8 <= item_end:
            previous, pos = _ordered_element(
                data, pos, item_end, previous, little=little, implicit=implicit
            )
            if pos < 0:
                return
        pos = item_end


def _ordered_element(
    data: memoryview, pos: int, end: int, previous: int, *, little: bool, implicit: bool
) -> tuple[int, int]:
    """The element at ``pos`` of an identity sequence's item, whose previous element had
    the tag ``previous``: returns its tag and the offset after it (-1 when cut short),
    having checked its nested identity sequences.

    Raises
    ------
    InvalidInstance
        Its tag is not above ``previous``.
    """
    order = "<" if little else ">"
    group, elem = struct.unpack_from(order + "HH", data, pos)
    tag = group << 16 | elem
    if tag <= previous:
        raise InvalidInstance("sequence item elements are out of order or repeated")
    vr, _, value_at, after = _element(data, pos, end, order, little, implicit)
    if after >= 0 and tag in _IDENTITY_SEQUENCES:
        _check_sequence(data, value_at, after, vr, little=little, implicit=implicit)
    return tag, after


def _walk_items(data: memoryview, pos: int, end: int, *, little: bool, implicit: bool) -> int:
    """Skip the items of an undefined-length value up to its sequence delimiter."""
    order = "<" if little else ">"
    while pos + 8 <= end:
        group, elem, length = struct.unpack_from(order + "HHI", data, pos)
        pos += 8
        if (group, elem) == (0xFFFE, 0xE0DD):
            return pos
        if (group, elem) != (0xFFFE, 0xE000):
            return -1
        if length == _UNDEFINED:
            pos = _walk_item(data, pos, end, little=little, implicit=implicit)
            if pos < 0:
                return -1
        else:
            pos += length
    return -1


# -- fast header read ---------------------------------------------------------------------

_EXPLICIT_LE = frozenset(
    {
        "1.2.840.10008.1.2.1",  # explicit VR little endian
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.5",
    }
)

#: (tag -> (field, VR, length limit)) of the attributes the index reads.
_FIELDS: dict[int, tuple[str, bytes, int]] = {
    0x00080005: ("charset", b"CS", 0),
    0x00080016: ("sop_class_uid", b"UI", 0),
    0x00080018: ("sop_instance_uid", b"UI", 0),
    0x00080020: ("study_date", b"DA", 8),
    0x00080021: ("series_date", b"DA", 8),
    0x00080030: ("study_time", b"TM", 16),
    0x00080031: ("series_time", b"TM", 16),
    0x00080050: ("accession_number", b"SH", 16),
    0x00080060: ("modality", b"CS", 16),
    0x00080090: ("referring_physician_name", b"PN", 324),
    0x00081030: ("study_description", b"LO", 64),
    0x0008103E: ("series_description", b"LO", 64),
    0x00100010: ("patient_name", b"PN", 324),
    0x00100020: ("patient_id", b"LO", 64),
    0x00100021: ("issuer", b"LO", 64),
    0x00100030: ("birth_date", b"DA", 8),
    0x00100040: ("sex", b"CS", 16),
    0x00180015: ("body_part_examined", b"CS", 16),
    0x0020000D: ("study_instance_uid", b"UI", 0),
    0x0020000E: ("series_instance_uid", b"UI", 0),
    0x00200010: ("study_id", b"SH", 16),
    0x00200011: ("series_number", b"IS", 12),
    0x00200013: ("instance_number", b"IS", 12),
    0x00280008: ("number_of_frames", b"IS", 0),
}
_LAST_FIELD = max(_FIELDS)
_CHARSET_TAG = 0x00080005
#: Text VRs read without pydicom for routing: values split on backslashes...
_SPLIT_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "PN", "SH", "TM", "UC", "UI"})
#: ...and single-valued ones (pydicom does not split them)
_WHOLE_TEXT_VRS = frozenset({"LT", "ST", "UT", "UR"})
_NO_ATTRIBUTES = ReceivedAttributes({}, {})
_PIXEL_DATA = 0x7FE00010
_UID_FIELDS = ("sop_class_uid", "sop_instance_uid", "study_instance_uid", "series_instance_uid")
#: Specific character sets whose single-byte or UTF-8 decoding is a plain codec.
_CODECS = {"": "ascii", "ISO_IR 6": "ascii", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}
_TEXT_VRS = frozenset({b"CS", b"DA", b"TM", b"SH", b"LO", b"PN", b"UI", b"IS"})


def extra_tags(keywords: Iterable[str]) -> frozenset[int]:
    """The tags of attribute keywords (unknown keywords are left out)."""
    tags = (tag_for_keyword(k) for k in keywords)
    return frozenset(t for t in tags if t is not None)


def fast_header(
    dataset: bytes | bytearray | memoryview,
    transfer_syntax_uid: str,
    extra: frozenset[int] = frozenset(),
) -> tuple[InstanceHeader, ReceivedAttributes] | None:
    """The index attributes read straight from the encoded top-level elements, and the
    attributes whose tags are in ``extra`` (what routing reads: any keyword, sequences
    included).

    Handles the common case (little endian, explicit or implicit VR, single-valued
    plain values in ASCII, Latin-1 or UTF-8) and returns ``None`` for anything else,
    which :func:`parse_header` (pydicom) then reads: both give identical headers. Of
    the ``extra`` elements, plain text values are decoded here with the data set's
    character set; sequences, numbers and binary values are cut out of the encoding
    and decoded by pydicom, so that everything reads as
    :func:`~dicom_node.archive.attributes.attributes_of` reads :func:`parse_header`'s
    dataset.

    Raises
    ------
    InvalidInstance
        The data set is truncated or malformed, or a required UID is missing or invalid
        (as :func:`parse_header` would).
    """
    return scan_dataset(dataset, transfer_syntax_uid, extra).fast


def _fast_result(
    data: memoryview, collected: _Collected, implicit: bool
) -> tuple[InstanceHeader, ReceivedAttributes] | None:
    """The header (and routing elements) from what :func:`_scan` gathered, or ``None``."""
    raw = dict(collected.found)
    charset_raw = raw.pop("charset", b"")
    if not charset_raw.isascii() or b"\\" in charset_raw:
        return None
    codec = _CODECS.get(charset_raw.decode("ascii").strip(" \x00"))
    if codec is None:
        return None
    values: dict[str, str] = {}
    for field, value in raw.items():
        if b"\\" in value or b"\x1b" in value:
            return None  # multi-valued or code extensions: pydicom's rules
        try:
            values[field] = value.decode(codec)
        except UnicodeDecodeError:
            return None
    for field in _UID_FIELDS:
        text = values.get(field, "").strip().rstrip("\x00")
        if not text.isascii() or not is_valid_uid(text):
            return None  # pydicom raises the same InvalidInstance, with its wording
        values[field] = text
    frames = 1
    frames_text = values.pop("number_of_frames", "").strip(" \x00")
    if frames_text:
        if not _is_int(frames_text):
            return None
        frames = max(1, int(frames_text))
    for field in ("series_number", "instance_number"):
        number = values.get(field, "").strip(" \x00")
        if number and not _is_int(number):
            return None
    texts = {
        name: _limited(values.get(name, ""), vr, limit)
        for name, vr, limit in _FIELDS.values()
        if limit
    }
    header = InstanceHeader(
        sop_class_uid=values["sop_class_uid"],
        sop_instance_uid=values["sop_instance_uid"],
        study_instance_uid=values["study_instance_uid"],
        series_instance_uid=values["series_instance_uid"],
        number_of_frames=frames,
        **texts,
    )
    if not collected.extra:
        return header, _NO_ATTRIBUTES
    try:
        return header, _read_extras(data, collected, implicit, codec)
    except (UnicodeDecodeError, *_PYDICOM_ERRORS):
        return None  # parse_header reads it (and says what is wrong)


def _read_extras(
    data: memoryview, collected: _Collected, implicit: bool, codec: str
) -> ReceivedAttributes:
    """The routing elements gathered by :func:`_scan`: plain text values decoded here
    (as pydicom decodes them: :func:`dicom_node.archive.attributes.attributes_of`), the
    others (sequences, numbers, binary values) by pydicom, from their encoded bytes."""
    texts: dict[str, tuple[str, ...]] = {}
    for_pydicom: list[tuple[int, int]] = []
    charset_span: tuple[int, int] | None = None
    keywords: list[str] = []
    for tag, vr, start, value_at, stop in collected.spans:
        if tag not in collected.extra:  # the Specific Character Set, for pydicom
            charset_span = (start, stop)
            continue
        keyword = keyword_for_tag(tag)
        value = bytes(data[value_at:stop])
        name = vr.decode("ascii") if vr else dictionary_VR(tag)
        if name in _SPLIT_TEXT_VRS and b"\x1b" not in value:
            texts[keyword] = split_values(value.decode(codec))
        elif name in _WHOLE_TEXT_VRS and b"\x1b" not in value:
            text = text_of(value.decode(codec))
            texts[keyword] = (text,) if text else ()
        else:
            for_pydicom.append((start, stop))
            keywords.append(keyword)
    if not for_pydicom:
        return ReceivedAttributes(texts, {})
    spans = ([charset_span] if charset_span else []) + for_pydicom
    encoded = b"".join(data[start:stop] for start, stop in spans)
    ds = read_dataset(BytesIO(encoded), is_implicit_VR=implicit, is_little_endian=True)
    # every value is converted now: a malformed one fails here, as in parse_header
    for element in ds:
        _ = element.value
    decoded = attributes_of(ds, keywords)
    texts.update(decoded.texts())
    return ReceivedAttributes(
        texts, {k: decoded.items(k) for k in keywords if decoded.items(k) or k in ds}
    )


def _is_int(text: str) -> bool:
    digits = text[1:] if text[:1] in "+-" else text
    return digits.isascii() and digits.isdigit() and len(text) <= 12


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    vr = b"DA" if keyword.endswith("Date") else b""
    return _limited(str(value), vr, limit)


def _limited(value: str, vr: bytes, limit: int) -> str:
    """An index column's text: trimmed and cut to ``limit``; a date (DA) is ``YYYYMMDD``
    or nothing (``YYYY.MM.DD`` of old senders, and ``YYYY-MM-DD``, are read as dates;
    anything else is not cut into a wrong one, which no date range would match)."""
    text = value.strip().replace("\x00", "")
    if vr != b"DA":
        return text[:limit]
    if len(text) == 10 and text[4] == text[7] and text[4] in ".-":
        text = text[:4] + text[5:7] + text[8:]
    return text if len(text) == 8 and text.isascii() and text.isdigit() else ""


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
