"""Correcting what an archive patient row shows.

A patient row (issuer, Patient ID) shows the name and demographics of the instance that
created it, and before a purpose-bound peer sees it, the row is checked on that
instance's identity (:mod:`router.gate`). When that instance was wrong (another
person's INS or demographics under this Patient ID: held for reconciliation), the row
hides the patient's genuine studies from purpose-bound peers: it fails closed, and stays
so until an operator points it at a good instance. :func:`show_study_patient` makes the
row show one of a chosen study's own instances instead, after checking that this
instance names the row's patient and that the consent store confirms its identity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.archive.files import InstanceFiles
from dicom_node.archive.header import InstanceHeader, dataset_offset, read_header
from dicom_node.archive.identity import PatientIdentity, load_identity
from dicom_node.archive.models import Instance, Patient, Series, Study
from dicom_node.errors import InvalidInstance


class PatientRowError(ValueError):
    """The row cannot be pointed at that study (the message says why)."""


@dataclass(frozen=True)
class RowChange:
    """What :func:`show_study_patient` did."""

    patient_pk: int
    instance_pk: int
    changed: bool  # False: the row already showed an instance with that identity


def show_study_patient(
    sessions: sessionmaker[Session],
    files: InstanceFiles,
    study_uid: str,
    confirmed: Callable[[PatientIdentity], bool],
    on_change: Callable[[Session, RowChange], None] | None = None,
) -> RowChange:
    """Make the patient row of ``study_uid`` show the first instance of that study that
    names the row's patient (same issuer and Patient ID in its stored identity) and
    whose identity ``confirmed`` accepts (the consent store designates one patient by it,
    without contradiction), with that instance's name, birth date, sex and identity.
    ``on_change`` runs in the updating transaction (for its audit entry).

    Raises
    ------
    PatientRowError
        Unknown study; no instance of it names the row's patient with a stored and
        confirmed identity (instances stored before schema 0004, naming another patient
        through a reused Study Instance UID, or held for reconciliation); or the
        instance's file cannot be read.
    """
    with sessions() as session:
        found = session.execute(
            select(Patient.id, Patient.issuer, Patient.patient_id, Patient.identity)
            .join(Study, Study.patient_pk == Patient.id)
            .where(Study.study_instance_uid == study_uid)
        ).first()
        if found is None:
            raise PatientRowError(f"no archived study {study_uid}")
        patient_pk, issuer, patient_id, row_identity = found
        instances = session.execute(
            select(Instance.id, Instance.identity, Instance.path, Instance.size)
            .join(Series, Series.id == Instance.series_pk)
            .join(Study, Study.id == Series.study_pk)
            .where(Study.study_instance_uid == study_uid)
            .order_by(Instance.id)
        ).all()
    for instance_pk, text, path, size in instances:
        if not text:
            continue
        try:
            identity = load_identity(text)
        except ValueError:  # an identity too large to store: never shown through a row
            continue
        if identity.patient_id != patient_id or identity.issuer[:64] != issuer:
            continue
        if not confirmed(identity):
            continue
        header = _header_of(files, path, size)
        if header.patient_id != patient_id:
            continue
        if text == row_identity:
            return RowChange(patient_pk, instance_pk, changed=False)
        change = RowChange(patient_pk, instance_pk, changed=True)
        with sessions.begin() as session:
            if on_change is not None:
                on_change(session, change)
            session.execute(
                update(Patient)
                .where(Patient.id == patient_pk)
                .values(
                    patient_name=header.patient_name,
                    birth_date=header.birth_date,
                    sex=header.sex,
                    identity=text,
                )
            )
        return change
    raise PatientRowError(
        f"no instance of study {study_uid} names its patient row's patient with an identity "
        "the consent store confirms (held for reconciliation, naming another patient, or "
        "stored before schema 0004)"
    )


def _header_of(files: InstanceFiles, relative: str, size: int) -> InstanceHeader:
    try:
        data = files.absolute(relative, size=size).read_bytes()
    except OSError as exc:
        raise PatientRowError(
            f"cannot read an archived file ({exc.strerror or type(exc).__name__})"
        ) from None
    try:
        start = dataset_offset(data)
    except ValueError:
        raise PatientRowError("an archived file is not a DICOM Part 10 file") from None
    try:
        return read_header(data[:start], memoryview(data)[start:])
    except InvalidInstance as exc:
        raise PatientRowError(f"an archived file cannot be read: {exc}") from None
