"""The attributes routing reads from a received data set, as text values and sequences.

Routes match on attribute values and the router resolves the patient from identity
attributes (some of them sequences). The archive hands it a :class:`ReceivedAttributes`
rather than a pydicom dataset: on the store path the plain text elements are decoded
straight from the received bytes (:mod:`dicom_node.archive.header`), and pydicom only
decodes the rest (sequences, binary and numeric values); :func:`attributes_of` reads the
same from a pydicom dataset, the reference the fast reading is tested against.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

__all__ = [
    "ReceivedAttributes",
    "attributes_of",
    "issuer_of_patient_id",
    "split_values",
    "text_of",
]


class ReceivedAttributes:
    """Values of selected attributes of one data set.

    Parameters
    ----------
    texts
        Keyword -> the element's values as text (several for a multi-valued element,
        none for an empty one). Absent elements have no entry.
    sequences
        Keyword -> the items of a sequence element, as pydicom datasets.
    """

    __slots__ = ("_sequences", "_texts")

    def __init__(
        self,
        texts: Mapping[str, tuple[str, ...]],
        sequences: Mapping[str, Sequence[Dataset]],
    ) -> None:
        self._texts = dict(texts)
        self._sequences = dict(sequences)

    def values(self, keyword: str) -> tuple[str, ...] | None:
        """The values of a non-sequence element; ``None`` when absent (or a sequence)."""
        return self._texts.get(keyword)

    def text(self, keyword: str) -> str:
        """The value of a single-valued element (values joined with ``\\``), or ``""``."""
        values = self._texts.get(keyword)
        return "\\".join(values) if values else ""

    def items(self, keyword: str) -> Sequence[Dataset]:
        """The items of a sequence element (none when absent)."""
        return self._sequences.get(keyword, ())

    def texts(self) -> dict[str, tuple[str, ...]]:
        """Every non-sequence element read, by keyword."""
        return dict(self._texts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ReceivedAttributes):
            return NotImplemented
        return self._texts == other._texts and {
            k: [i.to_json_dict() for i in v] for k, v in self._sequences.items() if v
        } == {k: [i.to_json_dict() for i in v] for k, v in other._sequences.items() if v}

    def __repr__(self) -> str:
        return f"ReceivedAttributes({sorted(self._texts)}, {sorted(self._sequences)})"


def text_of(value: Any) -> str:
    """One value as text, stripped of surrounding spaces and NUL padding."""
    return "" if value is None else str(value).strip().replace("\x00", "")


def issuer_of_patient_id(attributes: ReceivedAttributes) -> str:
    """The issuer a data set names for its Patient ID: Issuer of Patient ID, else the
    Universal Entity ID of its qualifiers (``""`` when neither). Routing, the archive's
    patient key and the consent checks of query/retrieve all use this one rule."""
    qualifiers = attributes.items("IssuerOfPatientIDQualifiersSequence")
    return attributes.text("IssuerOfPatientID") or (
        text_of(qualifiers[0].get("UniversalEntityID")) if qualifiers else ""
    )


def split_values(text: str) -> tuple[str, ...]:
    """The values of an element's decoded text: one per backslash-separated part, an
    empty tuple for an empty single value."""
    if "\\" not in text:
        value = text.strip().replace("\x00", "")
        return (value,) if value else ()
    return tuple(part.strip().replace("\x00", "") for part in text.split("\\"))


def attributes_of(ds: Dataset, keywords: Iterable[str]) -> ReceivedAttributes:
    """The attributes ``keywords`` of a pydicom dataset (absent ones are left out)."""
    texts: dict[str, tuple[str, ...]] = {}
    sequences: dict[str, Sequence[Dataset]] = {}
    for keyword in keywords:
        if keyword not in ds:
            continue
        element = ds[keyword]
        value = element.value
        if element.VR == "SQ":
            sequences[keyword] = list(value or ())
        elif value is None:
            continue
        elif isinstance(value, MultiValue | list | tuple):
            texts[keyword] = tuple(text_of(v) for v in value)
        else:  # one value (a PersonName is iterable, but one value)
            text = text_of(value)
            texts[keyword] = (text,) if text else ()
    return ReceivedAttributes(texts, sequences)
