"""SQLAlchemy models of the consent store (tables ``consent_*``).

Tables and what may happen to their rows:

* ``consent_patient``, ``consent_patient_identifier``: a patient with strict identity
  traits and identifiers (IPP within an issuer, INS within its OID). Inserted only.
* ``consent_purpose``, ``consent_notice_version``: a purpose ("traitement") and the exact
  texts of its notice, one row per version with the SHA-256 of the UTF-8 text. Inserted only
  (a purpose is never deleted, its model never changes).
* ``consent_event``: the consent log, **append-only**. See :class:`ConsentEvent`.
* ``consent_state``: a cache of the log (the current decision per patient and purpose),
  written in the same transaction as each event and rebuildable from the log. It is the only
  consent table whose rows are replaced or deleted.
* ``consent_audit``: the hash-chained audit log, **append-only** (see :mod:`consent.audit`).

Every timestamp is stored timezone-aware and read back as an aware UTC ``datetime``
(:class:`UTCDateTime`), on SQLite as on PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    Date,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

IDENTITY_STATUSES = ("PROV", "RECUP", "VALI", "QUAL")
SEXES = ("F", "M", "U")
IDENTIFIER_KINDS = ("IPP", "INS-NIR", "INS-NIA")
PURPOSE_MODELS = ("opt-in", "opt-out")
DECISIONS = ("permit", "deny")
EVENT_STATUSES = ("active", "inactive", "entered-in-error")
EVENT_ACTIONS = ("grant", "refuse", "withdraw", "entered-in-error")
CHANNELS = ("desk", "remote", "paper", "cli", "api")
PERFORMERS = ("patient", "representative")


def _in(column: str, values: tuple[str, ...]) -> str:
    quoted = ", ".join(f"'{v}'" for v in values)
    return f"{column} IN ({quoted})"


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp, always returned as an aware UTC ``datetime``.

    SQLite keeps no offset, so naive values read back are UTC by construction: a naive
    value is refused on the way in.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: consent timestamps must be timezone-aware")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):  # pragma: no cover - driver contract
            raise TypeError(f"unexpected timestamp type {type(value).__name__}")
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class ConsentBase(DeclarativeBase):
    """Declarative base of the consent tables."""

    metadata = MetaData(naming_convention=NAMING)


class Patient(ConsentBase):
    """A patient and the strict traits of their identity.

    ``first_names`` holds the list of birth given names separated by single spaces (as the
    INS teleservice returns it); ``first_name`` is the first of them. ``search_text`` is an
    upper-case, accent-free copy of the names used by patient search.
    """

    __tablename__ = "consent_patient"
    __table_args__ = (
        CheckConstraint(_in("identity_status", IDENTITY_STATUSES), name="identity_status"),
        CheckConstraint(_in("sex", SEXES), name="sex"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    identity_status: Mapped[str] = mapped_column(String(5), default="PROV")
    birth_name: Mapped[str] = mapped_column(String(100))
    first_names: Mapped[str] = mapped_column(String(200))
    first_name: Mapped[str] = mapped_column(String(100))
    birth_date: Mapped[date] = mapped_column(Date)
    sex: Mapped[str] = mapped_column(String(1))
    birthplace_code: Mapped[str | None] = mapped_column(String(5), default=None)
    usage_name: Mapped[str | None] = mapped_column(String(100), default=None)
    email: Mapped[str | None] = mapped_column(String(254), default=None)
    phone: Mapped[str | None] = mapped_column(String(32), default=None)
    postal_address: Mapped[str | None] = mapped_column(Text, default=None)
    establishment: Mapped[str | None] = mapped_column(String(64), default=None)
    search_text: Mapped[str] = mapped_column(String(400), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class PatientIdentifier(ConsentBase):
    """An identifier of a patient: IPP within its issuer, or INS within its OID."""

    __tablename__ = "consent_patient_identifier"
    __table_args__ = (
        UniqueConstraint("system", "value", name="uq_consent_patient_identifier_key"),
        CheckConstraint(_in("kind", IDENTIFIER_KINDS), name="kind"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("consent_patient.id"), index=True)
    system: Mapped[str] = mapped_column(String(64))
    value: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(8))


class Purpose(ConsentBase):
    """A purpose ("traitement") patients consent to, with its consent model."""

    __tablename__ = "consent_purpose"
    __table_args__ = (CheckConstraint(_in("model", PURPOSE_MODELS), name="model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    reference: Mapped[str] = mapped_column(String(200), default="")
    model: Mapped[str] = mapped_column(String(8), default="opt-in")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class NoticeVersion(ConsentBase):
    """One version of a purpose's notice: the exact text shown and its SHA-256."""

    __tablename__ = "consent_notice_version"
    __table_args__ = (
        UniqueConstraint("purpose_pk", "version", name="uq_consent_notice_version_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    purpose_pk: Mapped[int] = mapped_column(ForeignKey("consent_purpose.id"))
    version: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ConsentEvent(ConsentBase):
    """One entry of the consent log. Rows are inserted, never updated or deleted.

    A *decision* row (``status='active'``, ``action`` grant / refuse / withdraw) records
    what the patient decided; ``supersedes_pk`` names the decision it replaces for the same
    patient and purpose, if any. A *retraction* row (``status='entered-in-error'``,
    ``action='entered-in-error'``) says that the decision named by ``supersedes_pk`` was
    recorded by mistake (wrong patient, wrong purpose); it repeats that decision's
    ``decision`` value and carries the reason in ``evidence``.

    The status a decision *has now* is derived from later rows, never written back:
    ``entered-in-error`` when a retraction names it, else ``active`` when it is the latest
    non-retracted decision of its patient and purpose, else ``inactive``. The stored
    ``status`` column only says what kind of row it is; ``inactive`` is never stored.
    """

    __tablename__ = "consent_event"
    __table_args__ = (
        CheckConstraint(_in("decision", DECISIONS), name="decision"),
        CheckConstraint(_in("status", EVENT_STATUSES), name="status"),
        CheckConstraint(_in("action", EVENT_ACTIONS), name="action"),
        CheckConstraint(_in("channel", CHANNELS), name="channel"),
        CheckConstraint(_in("performed_by", PERFORMERS), name="performed_by"),
        Index("ix_consent_event_patient_purpose", "patient_pk", "purpose_pk"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("consent_patient.id"))
    purpose_pk: Mapped[int] = mapped_column(ForeignKey("consent_purpose.id"))
    decision: Mapped[str] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(16), default="active")
    action: Mapped[str] = mapped_column(String(16))
    channel: Mapped[str] = mapped_column(String(8))
    recorded_by: Mapped[str] = mapped_column(String(128))
    performed_by: Mapped[str] = mapped_column(String(16), default="patient")
    representative_name: Mapped[str | None] = mapped_column(String(200), default=None)
    notice_version_pk: Mapped[int | None] = mapped_column(
        ForeignKey("consent_notice_version.id"), default=None
    )
    evidence: Mapped[str | None] = mapped_column(Text, default=None)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime())
    supersedes_pk: Mapped[int | None] = mapped_column(
        ForeignKey("consent_event.id"), default=None, index=True
    )


class ConsentState(ConsentBase):
    """Cache of the consent log: the current decision per (patient, purpose).

    Written in the same transaction as every event, so it never disagrees with the log; it
    holds nothing the log does not, and :meth:`consent.service.ConsentStore.rebuild_state`
    recomputes it from the log. A pair without a row has no current decision.
    """

    __tablename__ = "consent_state"
    __table_args__ = (CheckConstraint(_in("decision", DECISIONS), name="decision"),)

    patient_pk: Mapped[int] = mapped_column(ForeignKey("consent_patient.id"), primary_key=True)
    purpose_pk: Mapped[int] = mapped_column(ForeignKey("consent_purpose.id"), primary_key=True)
    decision: Mapped[str] = mapped_column(String(8))
    event_pk: Mapped[int] = mapped_column(ForeignKey("consent_event.id"))


class AuditEntry(ConsentBase):
    """One entry of the hash-chained audit log (append-only; see :mod:`consent.audit`)."""

    __tablename__ = "consent_audit"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(128))
    details: Mapped[str] = mapped_column(Text, default="{}")
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
