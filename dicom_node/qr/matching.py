"""Translate a C-FIND/C-MOVE/C-GET identifier into an index query (PS3.4 C.2.2.2).

Supported matching: single value, wildcards ``*``/``?`` (not on UIDs, dates or times),
date and time ranges, UID lists, universal matching (empty value) and return keys.
Attributes the index does not hold are returned empty.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import ColumnElement, Select, and_, func, literal, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from dicom_node.archive.models import Instance, Patient, Series, Study
from dicom_node.errors import NodeError


class Level(Enum):
    """Query/retrieve levels, ordered from the top of the hierarchy."""

    PATIENT = 0
    STUDY = 1
    SERIES = 2
    IMAGE = 3


class Root(Enum):
    """Information models: Patient Root or Study Root."""

    PATIENT = "patient"
    STUDY = "study"


class IdentifierError(NodeError):
    """The identifier does not fit the SOP class (0xA900)."""

    status = 0xA900


@dataclass(frozen=True)
class _Attr:
    level: Level
    column: InstrumentedAttribute[Any] | None
    vr: str


_ATTRS: dict[str, _Attr] = {
    "PatientID": _Attr(Level.PATIENT, Patient.patient_id, "LO"),
    "IssuerOfPatientID": _Attr(Level.PATIENT, Patient.issuer, "LO"),
    "PatientName": _Attr(Level.PATIENT, Patient.patient_name, "PN"),
    "PatientBirthDate": _Attr(Level.PATIENT, Patient.birth_date, "DA"),
    "PatientSex": _Attr(Level.PATIENT, Patient.sex, "CS"),
    "StudyInstanceUID": _Attr(Level.STUDY, Study.study_instance_uid, "UI"),
    "StudyDate": _Attr(Level.STUDY, Study.study_date, "DA"),
    "StudyTime": _Attr(Level.STUDY, Study.study_time, "TM"),
    "AccessionNumber": _Attr(Level.STUDY, Study.accession_number, "SH"),
    "StudyID": _Attr(Level.STUDY, Study.study_id, "SH"),
    "StudyDescription": _Attr(Level.STUDY, Study.study_description, "LO"),
    "ReferringPhysicianName": _Attr(Level.STUDY, Study.referring_physician_name, "PN"),
    "ModalitiesInStudy": _Attr(Level.STUDY, Study.modalities, "CS*"),
    "NumberOfStudyRelatedSeries": _Attr(Level.STUDY, Study.number_of_series, "IS"),
    "NumberOfStudyRelatedInstances": _Attr(Level.STUDY, Study.number_of_instances, "IS"),
    "SeriesInstanceUID": _Attr(Level.SERIES, Series.series_instance_uid, "UI"),
    "Modality": _Attr(Level.SERIES, Series.modality, "CS"),
    "SeriesNumber": _Attr(Level.SERIES, Series.series_number, "IS"),
    "SeriesDescription": _Attr(Level.SERIES, Series.series_description, "LO"),
    "BodyPartExamined": _Attr(Level.SERIES, Series.body_part_examined, "CS"),
    "SeriesDate": _Attr(Level.SERIES, Series.series_date, "DA"),
    "SeriesTime": _Attr(Level.SERIES, Series.series_time, "TM"),
    "NumberOfSeriesRelatedInstances": _Attr(Level.SERIES, Series.number_of_instances, "IS"),
    "SOPInstanceUID": _Attr(Level.IMAGE, Instance.sop_instance_uid, "UI"),
    "SOPClassUID": _Attr(Level.IMAGE, Instance.sop_class_uid, "UI"),
    "InstanceNumber": _Attr(Level.IMAGE, Instance.instance_number, "IS"),
    "NumberOfFrames": _Attr(Level.IMAGE, Instance.number_of_frames, "IS"),
}
_COUNTS_RETURN_ONLY = {
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
    "NumberOfSeriesRelatedInstances",
    "NumberOfFrames",
}
_NOT_KEYS = {
    "QueryRetrieveLevel",
    "SpecificCharacterSet",
    "RetrieveAETitle",
    "TimezoneOffsetFromUTC",
}


@dataclass(frozen=True)
class Query:
    """A parsed identifier: the level, the filters and the keys to return."""

    level: Level
    statement: Select[Any]
    return_keys: tuple[str, ...]


def parse_level(identifier: Dataset, root: Root) -> Level:
    """Read and check ``QueryRetrieveLevel`` against the information model."""
    raw = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    try:
        level = Level[raw]
    except KeyError:
        raise IdentifierError(f"QueryRetrieveLevel '{raw[:16]}' is not valid") from None
    if root is Root.STUDY and level is Level.PATIENT:
        raise IdentifierError("PATIENT level is not part of the Study Root model")
    return level


def build_query(identifier: Dataset, root: Root, *, for_retrieve: bool = False) -> Query:
    """Build the index query for ``identifier``.

    Raises
    ------
    IdentifierError
        Invalid level or an element that cannot be read.
    """
    level = parse_level(identifier, root)
    conditions: list[ColumnElement[bool]] = []
    return_keys: list[str] = []
    for element in identifier:
        keyword = element.keyword or keyword_for_tag(element.tag)
        if not keyword or keyword in _NOT_KEYS:
            continue
        if not for_retrieve:
            return_keys.append(keyword)
        attr = _ATTRS.get(keyword)
        if attr is None or attr.column is None or attr.level.value > level.value:
            continue
        if element.VR == "SQ" or keyword in _COUNTS_RETURN_ONLY:
            continue
        condition = _condition(attr, element.value)
        if condition is not None:
            conditions.append(condition)
    # a retrieve always resolves down to instances; conditions stay at the query level
    statement = _statement(Level.IMAGE if for_retrieve else level, conditions)
    return Query(level, statement, tuple(return_keys))


def _statement(level: Level, conditions: Sequence[ColumnElement[bool]]) -> Select[Any]:
    stmt: Select[Any]
    if level is Level.PATIENT:
        stmt = select(Patient)
    elif level is Level.STUDY:
        stmt = select(Study, Patient).join(Patient, Study.patient_pk == Patient.id)
    elif level is Level.SERIES:
        stmt = (
            select(Series, Study, Patient)
            .join(Study, Series.study_pk == Study.id)
            .join(Patient, Study.patient_pk == Patient.id)
        )
    else:
        stmt = (
            select(Instance, Series, Study, Patient)
            .join(Series, Instance.series_pk == Series.id)
            .join(Study, Series.study_pk == Study.id)
            .join(Patient, Study.patient_pk == Patient.id)
        )
    if conditions:
        stmt = stmt.where(and_(*conditions))
    order = {
        Level.PATIENT: Patient.id,
        Level.STUDY: Study.id,
        Level.SERIES: Series.id,
        Level.IMAGE: Instance.id,
    }[level]
    return stmt.order_by(order)


def _values(raw: Any) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, MultiValue | list | tuple):
        return [str(v).strip() for v in raw]
    text = str(raw).strip()
    if "\\" in text:
        return [v.strip() for v in text.split("\\")]
    return [text] if text else []


def _condition(attr: _Attr, raw: Any) -> ColumnElement[bool] | None:
    column = attr.column
    assert column is not None
    values = [v for v in _values(raw) if v != ""]
    if not values:
        return None  # universal matching
    if attr.vr == "UI":
        return column.in_(values) if len(values) > 1 else column == values[0]
    if attr.vr in ("DA", "TM"):
        parts = [_range(column, v, attr.vr) for v in values]
        return or_(*parts) if len(parts) > 1 else parts[0]
    if attr.vr == "CS*":
        return or_(*(_multi_value_contains(column, v) for v in values))
    parts = [_text_match(column, v, attr.vr) for v in values]
    return or_(*parts) if len(parts) > 1 else parts[0]


def _range(column: InstrumentedAttribute[Any], value: str, vr: str) -> ColumnElement[bool]:
    if "-" not in value:
        if vr == "TM":
            return column.like(_escape_like(value) + "%", escape="\\")
        return column == value
    low, _, high = value.partition("-")
    low, high = low.strip(), high.strip()
    parts: list[ColumnElement[bool]] = [column != ""]
    if low:
        parts.append(column >= low)
    if high:
        # times: "1200" covers 12:00:00.999999; pad the upper bound
        parts.append(column <= (high + "99.999999"[len(high) - 4 :] if vr == "TM" else high))
    return and_(*parts)


def _multi_value_contains(column: InstrumentedAttribute[Any], value: str) -> ColumnElement[bool]:
    if "*" in value or "?" in value:
        pattern = _wildcard_to_like(value)
        return or_(
            column.like(pattern, escape="\\"),
            column.like(pattern + "\\\\%", escape="\\"),
            column.like("%\\\\" + pattern, escape="\\"),
            column.like("%\\\\" + pattern + "\\\\%", escape="\\"),
        )
    esc = _escape_like(value)
    return or_(
        column == value,
        column.like(esc + "\\\\%", escape="\\"),
        column.like("%\\\\" + esc, escape="\\"),
        column.like("%\\\\" + esc + "\\\\%", escape="\\"),
    )


def _text_match(column: InstrumentedAttribute[Any], value: str, vr: str) -> ColumnElement[bool]:
    wildcard = "*" in value or "?" in value
    if vr == "PN":
        # person names match case-insensitively (PS3.4 C.2.2.2.1 leaves this to the SCP);
        # the database lowers both sides: Python's lower() folds non-ASCII letters that
        # SQLite's lower() leaves alone, so "LEFÈVRE" would not match itself otherwise
        target: Any = func.lower(column)
        if wildcard:
            pattern = func.lower(literal(_wildcard_to_like(value)))
            return target.like(pattern, escape="\\")  # type: ignore[no-any-return]
        return target == func.lower(literal(value))  # type: ignore[no-any-return]
    if wildcard:
        return column.like(_wildcard_to_like(value), escape="\\")
    return column == value


def _escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _wildcard_to_like(value: str) -> str:
    return _escape_like(value).replace("*", "%").replace("?", "_")


def iter_matches(session: Session, query: Query, *, chunk: int = 500) -> Iterator[Any]:
    """Stream the rows of ``query`` in chunks (bounded memory)."""
    result = session.execute(query.statement.execution_options(yield_per=chunk))
    yield from result


def response_identifier(
    row: Any, query: Query, *, retrieve_ae: str, charset_needed: bool = True
) -> Dataset:
    """Build one C-FIND response identifier from a result row."""
    objects: dict[Any, Any] = {
        type(obj): obj for obj in (row if isinstance(row, tuple) else tuple(row))
    }
    ds = Dataset()
    ds.QueryRetrieveLevel = query.level.name
    non_ascii = False
    for keyword in query.return_keys:
        attr = _ATTRS.get(keyword)
        value: Any = ""
        if keyword == "RetrieveAETitle":
            value = retrieve_ae
        elif attr is not None and attr.column is not None and attr.level.value <= query.level.value:
            owner = objects.get(attr.column.class_)
            if owner is not None:
                value = getattr(owner, attr.column.key)
                if keyword in ("ModalitiesInStudy",) and value:
                    value = value.split("\\")
                elif attr.vr == "IS":
                    value = str(value) if value not in (None, "") else ""
        if isinstance(value, str) and not value.isascii():
            non_ascii = True
        try:
            setattr(ds, keyword, value)
        except (TypeError, ValueError):
            setattr(ds, keyword, "")
    if "RetrieveAETitle" not in ds:
        ds.RetrieveAETitle = retrieve_ae
    if non_ascii and charset_needed:
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds
