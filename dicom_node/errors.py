"""Exceptions of the DICOM node.

::

    NodeError
    ├── InvalidInstance      the dataset cannot be accepted (maps to a failure status)
    └── StorageFailure       the archive could not store it (out of resources)

Handlers turn these into DIMSE statuses; they never reach pynetdicom as exceptions.
"""

from __future__ import annotations


class NodeError(Exception):
    """Base of the DICOM node's errors; ``status`` is the DIMSE status to answer."""

    status: int = 0xC000

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class InvalidInstance(NodeError):
    """The received dataset is malformed, inconsistent or names hostile UIDs."""

    status = 0xC210


class StorageFailure(NodeError):
    """Writing the file or the index failed; nothing was acknowledged."""

    status = 0xA700
