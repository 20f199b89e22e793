"""What routing needs from a dataset: route attribute values and the patient identity."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from dicom_node.archive import identity as archive_identity
from dicom_node.archive.attributes import ReceivedAttributes

#: the identity attributes and how an identity is read: one definition, the archive's
#: (it keeps each instance's identity for the consent checks of query/retrieve)
IDENTITY_KEYWORDS = archive_identity.IDENTITY_KEYWORDS
INS_OIDS = archive_identity.INS_OIDS
patient_facts = archive_identity.identity_of


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


def facts_summary(attributes: Mapping[str, tuple[str, ...]]) -> str:
    """A one-line rendering of route attributes (for `consentgate route test`)."""
    return ", ".join(f"{k}={'/'.join(v)}" for k, v in sorted(attributes.items()))
