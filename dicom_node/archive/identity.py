"""The patient identity a data set carries, as consent needs it, and its stored form.

Routing resolves each received instance's patient from this identity; the archive keeps
it with the instance (``archive_instance.identity``), so that query/retrieve decides
consent on each instance's own identity too, not only on the patient row the index files
it under (an instance can name another patient than its row: a reused Study Instance
UID, other demographics, another patient's INS).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from dicom_node.archive.attributes import ReceivedAttributes, issuer_of_patient_id, text_of

__all__ = [
    "IDENTITY_KEYWORDS",
    "INS_OIDS",
    "MAX_STORED",
    "UNSTORABLE",
    "PatientIdentity",
    "identity_of",
    "load_identity",
    "store_identity",
]

#: Patient identity attributes read from every data set.
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

#: Issuer of Patient ID texts that name an INS domain (REFERENCE: HL7 v2 carries
#: ``matricule^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.8&ISO^INS``).
_INS_ISSUER_NAMES = {
    "ASIP-SANTE-INS-NIR": "1.2.250.1.213.1.4.8",
    "ASIP-SANTE-INS-NIA": "1.2.250.1.213.1.4.9",
}

#: Length of the ``archive_instance.identity`` column.
MAX_STORED = 512

# separators of the stored form: control characters no DICOM text value may contain
_FIELD = "\x1f"
_ITEM = "\x1e"
_PAIR = "\x1d"


@dataclass(frozen=True)
class PatientIdentity:
    """The identity a data set carries, as the consent store needs it."""

    issuer: str
    patient_id: str
    ins_values: tuple[tuple[str, str], ...]  # (OID, matricule) from Other Patient IDs
    birth_date: str
    sex: str


def _ins_oid(item: Dataset) -> str:
    """The INS OID an Other Patient IDs item names, ``""`` when it names none: its
    qualifiers' Universal Entity ID, else its Issuer of Patient ID (an INS OID, or the
    text name of an INS domain). A sender that names the INS domain only in the text
    still designates the patient by INS: ignoring that item would let it contradict
    the Patient ID unseen."""
    seq = item.get("IssuerOfPatientIDQualifiersSequence")
    if seq:
        oid = text_of(seq[0].get("UniversalEntityID"))
        if oid in INS_OIDS:
            return oid
    issuer = text_of(item.get("IssuerOfPatientID"))
    if issuer in INS_OIDS:
        return issuer
    return _INS_ISSUER_NAMES.get(issuer.upper(), "")


def identity_of(attributes: ReceivedAttributes, default_issuer: str) -> PatientIdentity:
    """The identity a data set carries: issuer from the data set (Issuer of Patient ID,
    else its qualifiers' Universal Entity ID), else the sending peer's issuer; INS values
    from Other Patient IDs Sequence items that name an INS domain (:func:`_ins_oid`).
    ``attributes`` must hold :data:`IDENTITY_KEYWORDS`."""
    ins: list[tuple[str, str]] = []
    for item in attributes.items("OtherPatientIDsSequence"):
        oid = _ins_oid(item)
        value = text_of(item.get("PatientID"))
        if oid and value:
            ins.append((oid, value))
    return PatientIdentity(
        issuer=issuer_of_patient_id(attributes) or default_issuer,
        patient_id=attributes.text("PatientID"),
        ins_values=tuple(ins),
        birth_date=attributes.text("PatientBirthDate"),
        sex=attributes.text("PatientSex"),
    )


#: The stored form of an identity that has none (too long, or a value holding a
#: separator): it loads as nothing, so consent checks withhold the instance.
UNSTORABLE = ""


def store_identity(identity: PatientIdentity) -> str:
    """The stored form of ``identity``; :data:`UNSTORABLE` when it would not fit the
    column or a value holds a separator (no sender's mistake or trick may turn into a
    weaker check: such an instance is withheld from every purpose-bound peer)."""
    parts = (identity.issuer, identity.patient_id, identity.birth_date, identity.sex)
    pairs = [f"{oid}{_PAIR}{value}" for oid, value in identity.ins_values]
    values = (*parts, *(v for pair in identity.ins_values for v in pair))
    if any(sep in v for v in values for sep in (_FIELD, _ITEM, _PAIR)):
        return UNSTORABLE
    text = _FIELD.join((*parts, _ITEM.join(pairs)))
    return text if len(text) <= MAX_STORED else UNSTORABLE


def load_identity(text: str) -> PatientIdentity:
    """The identity of a stored form made by :func:`store_identity`.

    Raises
    ------
    ValueError
        ``text`` is not such a form (:data:`UNSTORABLE` included).
    """
    fields = text.split(_FIELD)
    if len(fields) != 5:
        raise ValueError("not a stored patient identity")
    issuer, patient_id, birth_date, sex, ins = fields
    pairs: list[tuple[str, str]] = []
    for item in ins.split(_ITEM) if ins else ():
        oid, sep, value = item.partition(_PAIR)
        if not sep:
            raise ValueError("not a stored patient identity")
        pairs.append((oid, value))
    return PatientIdentity(issuer, patient_id, tuple(pairs), birth_date, sex)
