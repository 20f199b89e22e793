"""What routing needs from a dataset: route attribute values and the patient identity."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydicom.dataset import Dataset

from router.planner import PatientFacts

#: Patient identity attributes read from every dataset when routes are configured.
IDENTITY_KEYWORDS = (
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientSex",
)

#: The INS OIDs (NIR, NIA, test NIR, demo NIR) recognised in Other Patient IDs items.
INS_OIDS = frozenset(
    {
        "1.2.250.1.213.1.4.8",
        "1.2.250.1.213.1.4.9",
        "1.2.250.1.213.1.4.10",
        "1.2.250.1.213.1.4.11",
    }
)


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip().replace("\x00", "")


def _values(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        text = _text(value)
        return (text,) if text else ()
    return tuple(_text(v) for v in value)


def route_attributes(ds: Dataset, keywords: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """The values of ``keywords`` in ``ds`` as strings (multi-valued → several)."""
    attributes: dict[str, tuple[str, ...]] = {}
    for keyword in keywords:
        element = ds.get(keyword)
        if element is None or getattr(ds[keyword], "VR", "") == "SQ":
            continue
        attributes[keyword] = _values(element)
    return attributes


def _qualifier_uid(item: Dataset) -> str:
    seq = item.get("IssuerOfPatientIDQualifiersSequence")
    if seq:
        return _text(seq[0].get("UniversalEntityID"))
    return ""


def patient_facts(ds: Dataset, default_issuer: str) -> PatientFacts:
    """The identity a dataset carries: issuer from the dataset (Issuer of Patient ID,
    else its qualifiers' Universal Entity ID), else the sending peer's issuer; INS values
    from Other Patient IDs Sequence items whose universal entity ID is an INS OID."""
    issuer = _text(ds.get("IssuerOfPatientID")) or _qualifier_uid(ds) or default_issuer
    ins: list[tuple[str, str]] = []
    for item in ds.get("OtherPatientIDsSequence") or []:
        oid = _qualifier_uid(item)
        value = _text(item.get("PatientID"))
        if oid in INS_OIDS and value:
            ins.append((oid, value))
    return PatientFacts(
        issuer=issuer,
        patient_id=_text(ds.get("PatientID")),
        ins_values=tuple(ins),
        birth_date=_text(ds.get("PatientBirthDate")),
        sex=_text(ds.get("PatientSex")),
    )


def facts_summary(attributes: Mapping[str, tuple[str, ...]]) -> str:
    """A one-line rendering of route attributes (for `consentgate route test`)."""
    return ", ".join(f"{k}={'/'.join(v)}" for k, v in sorted(attributes.items()))
