"""What routing needs from a dataset: route attribute values and the patient identity."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from pydicom.dataset import Dataset

from dicom_node.archive.attributes import ReceivedAttributes, issuer_of_patient_id, text_of
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


def route_attributes(
    attributes: ReceivedAttributes, keywords: Iterable[str]
) -> dict[str, tuple[str, ...]]:
    """The values of ``keywords`` as strings (multi-valued → several; sequences and
    absent attributes left out)."""
    found: dict[str, tuple[str, ...]] = {}
    for keyword in keywords:
        values = attributes.values(keyword)
        if values is not None:
            found[keyword] = values
    return found


def _qualifier_uid(item: Dataset) -> str:
    seq = item.get("IssuerOfPatientIDQualifiersSequence")
    if seq:
        return text_of(seq[0].get("UniversalEntityID"))
    return ""


def patient_facts(attributes: ReceivedAttributes, default_issuer: str) -> PatientFacts:
    """The identity a dataset carries: issuer from the dataset (Issuer of Patient ID,
    else its qualifiers' Universal Entity ID), else the sending peer's issuer; INS values
    from Other Patient IDs Sequence items whose universal entity ID is an INS OID."""
    issuer = issuer_of_patient_id(attributes) or default_issuer
    ins: list[tuple[str, str]] = []
    for item in attributes.items("OtherPatientIDsSequence"):
        oid = _qualifier_uid(item)
        value = text_of(item.get("PatientID"))
        if oid in INS_OIDS and value:
            ins.append((oid, value))
    return PatientFacts(
        issuer=issuer,
        patient_id=attributes.text("PatientID"),
        ins_values=tuple(ins),
        birth_date=attributes.text("PatientBirthDate"),
        sex=attributes.text("PatientSex"),
    )


def facts_summary(attributes: Mapping[str, tuple[str, ...]]) -> str:
    """A one-line rendering of route attributes (for `consentgate route test`)."""
    return ", ".join(f"{k}={'/'.join(v)}" for k, v in sorted(attributes.items()))
