"""SQLAlchemy models of the archive index (patient / study / series / instance).

Columns hold the attributes query/retrieve matches on. String columns store the DICOM
value as received (leading/trailing spaces stripped); an absent attribute is ``""``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class ArchiveBase(DeclarativeBase):
    """Declarative base of the archive tables."""

    metadata = MetaData(naming_convention=NAMING)


class Patient(ArchiveBase):
    """A patient as named by the sender: Patient ID within its issuer."""

    __tablename__ = "archive_patient"
    __table_args__ = (UniqueConstraint("issuer", "patient_id", name="uq_archive_patient_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    issuer: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    birth_date: Mapped[str] = mapped_column(String(8), default="")
    sex: Mapped[str] = mapped_column(String(16), default="")
    # the stored identity (dicom_node.archive.identity) of the instance that created the
    # row, whose name and demographics the row shows; NULL: created before schema 0005
    identity: Mapped[str | None] = mapped_column(String(512), nullable=True)

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(ArchiveBase):
    """One study; ``modalities`` is a backslash-separated set kept up to date on insert."""

    __tablename__ = "archive_study"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("archive_patient.id"), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_date: Mapped[str] = mapped_column(String(8), default="", index=True)
    study_time: Mapped[str] = mapped_column(String(16), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="", index=True)
    study_id: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    referring_physician_name: Mapped[str] = mapped_column(String(324), default="")
    modalities: Mapped[str] = mapped_column(String(128), default="")
    number_of_series: Mapped[int] = mapped_column(Integer, default=0)
    number_of_instances: Mapped[int] = mapped_column(Integer, default=0)

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(ArchiveBase):
    """One series of a study."""

    __tablename__ = "archive_series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("archive_study.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str] = mapped_column(String(16), default="", index=True)
    series_number: Mapped[str] = mapped_column(String(12), default="")
    series_description: Mapped[str] = mapped_column(String(64), default="")
    body_part_examined: Mapped[str] = mapped_column(String(16), default="")
    series_date: Mapped[str] = mapped_column(String(8), default="")
    series_time: Mapped[str] = mapped_column(String(16), default="")
    number_of_instances: Mapped[int] = mapped_column(Integer, default=0)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(ArchiveBase):
    """One stored SOP instance and where its bytes are."""

    __tablename__ = "archive_instance"
    __table_args__ = (Index("ix_archive_instance_received", "received_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("archive_series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64), index=True)
    instance_number: Mapped[str] = mapped_column(String(12), default="")
    number_of_frames: Mapped[int] = mapped_column(Integer, default=1)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(String(255))
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # the patient identity the instance carries (dicom_node.archive.identity), for the
    # consent checks of query/retrieve; NULL: stored before schema 0004 (the checks read
    # the file)
    identity: Mapped[str | None] = mapped_column(String(512), nullable=True)

    series: Mapped[Series] = relationship(back_populates="instances")
