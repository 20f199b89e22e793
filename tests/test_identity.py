"""The stored form of an instance's patient identity (archive_instance.identity)."""

from __future__ import annotations

import pytest

from dicom_node.archive.identity import (
    MAX_STORED,
    UNSTORABLE,
    PatientIdentity,
    load_identity,
    store_identity,
)

NIR = "1.2.250.1.213.1.4.8"


@pytest.mark.parametrize(
    "identity",
    [
        PatientIdentity("CHR-METZ", "IPP001", (), "19850512", "F"),
        PatientIdentity("", "", (), "", ""),
        PatientIdentity("1.2.250.1.71.4.2.1", "A\\B", ((NIR, "285057512345646"),), "", "M"),
        PatientIdentity("X", "Y", ((NIR, "1"), (NIR, "2"), ("1.2.3", "")), "1970", "O"),
    ],
)
def test_round_trip(identity: PatientIdentity) -> None:
    text = store_identity(identity)
    assert text is not None and len(text) <= MAX_STORED
    assert load_identity(text) == identity


def test_what_cannot_be_stored_loads_as_nothing() -> None:
    """Too long, or a value holding a separator: a marker that no check accepts."""
    for identity in (
        PatientIdentity("I", "P" * MAX_STORED, (), "", ""),
        PatientIdentity("I", "P\x1fQ", (), "", ""),
        PatientIdentity("I", "P", ((NIR, "1\x1e2"),), "", ""),
    ):
        assert store_identity(identity) == UNSTORABLE
        with pytest.raises(ValueError):
            load_identity(UNSTORABLE)


@pytest.mark.parametrize(
    "text", ["", "a\x1fb", "a\x1fb\x1fc\x1fd\x1fe\x1ff", "a\x1fb\x1fc\x1fd\x1fnopair"]
)
def test_not_a_stored_identity(text: str) -> None:
    with pytest.raises(ValueError):
        load_identity(text)
