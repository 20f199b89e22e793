"""Reading the consent log back: a patient's history, and its FHIR R4 export.

Each event is shown with its effective status, derived from the rows after it: a
decision is ``active`` while it is the latest one not retracted for its purpose,
``inactive`` once superseded, ``entered-in-error`` once retracted (or when it is itself a
retraction). The mapping of an entry to a FHIR ``Consent`` is in :mod:`consent.fhir`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from consent.fhir import consent_resource, fhir_datetime
from consent.identity import INS_KINDS
from consent.models import ConsentEvent, NoticeVersion, Patient, PatientIdentifier, Purpose
from consent.patients import require_patient
from consent.purposes import require_purpose


@dataclass(frozen=True)
class RetractedWindow:
    """The time during which a decision later retracted (entered-in-error) was the
    patient's current decision for its purpose.

    ``start`` is when the decision was recorded; ``end`` when the next decision that still
    stands was recorded for the same patient and purpose (``None``: none since; the
    window is open, so that a drop committed late by a node that had read the refusal
    before its retraction still counts).
    """

    event_id: int
    patient_pk: int
    purpose: str
    decision: str
    start: datetime
    end: datetime | None
    # the decision in force just before it (the latest earlier one still standing), if any
    previous: str | None = None


class ConsentHistory:
    """Answers ``history``, ``export_fhir`` and ``retracted_window``."""

    def __init__(self, read_sessions: sessionmaker[Session]) -> None:
        self._read_sessions = read_sessions

    def history(
        self, issuer: str, patient_id: str, purpose: str | None = None
    ) -> list[dict[str, Any]]:
        """The consent log of a patient (optionally one purpose), oldest first.

        Each entry: ``id``, ``purpose``, ``action`` (grant / refuse / withdraw /
        entered-in-error), ``decision``, ``status`` (the row's kind: ``active`` or
        ``entered-in-error``), ``effective_status`` (``active``, ``inactive`` or
        ``entered-in-error``, derived from later rows), ``channel``, ``recorded_by``,
        ``performed_by``, ``representative_name``, ``notice_version``, ``notice_sha256``,
        ``evidence``, ``recorded_at`` (ISO 8601 UTC), ``supersedes``.

        Raises
        ------
        UnknownPatient, UnknownPurpose
        """
        with self._read_sessions() as session:
            pk = require_patient(session, issuer, patient_id)
            return self._history(session, pk, purpose)

    @staticmethod
    def _history(session: Session, patient_pk: int, purpose: str | None) -> list[dict[str, Any]]:
        stmt = (
            select(ConsentEvent, Purpose.code, NoticeVersion.version, NoticeVersion.sha256)
            .join(Purpose, Purpose.id == ConsentEvent.purpose_pk)
            .outerjoin(NoticeVersion, NoticeVersion.id == ConsentEvent.notice_version_pk)
            .where(ConsentEvent.patient_pk == patient_pk)
            .order_by(ConsentEvent.id)
        )
        if purpose is not None:
            stmt = stmt.where(ConsentEvent.purpose_pk == require_purpose(session, purpose).id)
        rows = session.execute(stmt).all()
        retracted = {e.supersedes_pk for e, *_ in rows if e.status == "entered-in-error"}
        current: dict[int, int] = {}
        for event, *_ in rows:
            if event.status == "active" and event.id not in retracted:
                current[event.purpose_pk] = event.id
        entries = []
        for event, code, version, sha256 in rows:
            if event.status != "active" or event.id in retracted:
                effective = "entered-in-error"
            elif current.get(event.purpose_pk) == event.id:
                effective = "active"
            else:
                effective = "inactive"
            entries.append(
                {
                    "id": event.id,
                    "purpose": code,
                    "action": event.action,
                    "decision": event.decision,
                    "status": event.status,
                    "effective_status": effective,
                    "channel": event.channel,
                    "recorded_by": event.recorded_by,
                    "performed_by": event.performed_by,
                    "representative_name": event.representative_name,
                    "notice_version": version,
                    "notice_sha256": sha256,
                    "evidence": event.evidence,
                    "recorded_at": fhir_datetime(event.recorded_at),
                    "supersedes": event.supersedes_pk,
                }
            )
        return entries

    def retracted_window(self, event_id: int) -> RetractedWindow | None:
        """When the retracted decision ``event_id`` was in force, or ``None`` if that event
        is unknown, is a retraction itself, or is not retracted."""
        with self._read_sessions() as session:
            event = session.get(ConsentEvent, event_id)
            if event is None or event.status != "active":
                return None
            rows = session.execute(
                select(
                    ConsentEvent.id,
                    ConsentEvent.status,
                    ConsentEvent.supersedes_pk,
                    ConsentEvent.decision,
                )
                .where(
                    ConsentEvent.patient_pk == event.patient_pk,
                    ConsentEvent.purpose_pk == event.purpose_pk,
                )
                .order_by(ConsentEvent.id)
            ).all()
            retracted = {sup for _, status, sup, _ in rows if status == "entered-in-error"}
            if event_id not in retracted:
                return None
            standing = [
                (pk, decision)
                for pk, status, _, decision in rows
                if status == "active" and pk not in retracted
            ]
            following = next((pk for pk, _ in standing if pk > event_id), None)
            previous = next(
                (decision for pk, decision in reversed(standing) if pk < event_id), None
            )
            end = None
            if following is not None:
                end = session.get_one(ConsentEvent, following).recorded_at
            purpose = session.get_one(Purpose, event.purpose_pk)
            return RetractedWindow(
                event_id,
                event.patient_pk,
                purpose.code,
                event.decision,
                event.recorded_at,
                end,
                previous,
            )

    def export_fhir(self, issuer: str, patient_id: str) -> list[dict[str, Any]]:
        """The patient's consent decisions as FHIR R4 ``Consent`` resources (JSON-ready).

        One resource per decision, oldest first; see :mod:`consent.fhir` for the mapping.
        The patient is named by their INS once their identity is ``QUAL``, else by the IPP.

        Raises
        ------
        UnknownPatient
        """
        with self._read_sessions() as session:
            pk = require_patient(session, issuer, patient_id)
            patient = session.get_one(Patient, pk)
            system, value = issuer.strip(), patient_id.strip()
            if patient.identity_status == "QUAL":
                ins = session.execute(
                    select(PatientIdentifier.system, PatientIdentifier.value)
                    .where(
                        PatientIdentifier.patient_pk == pk,
                        PatientIdentifier.kind.in_(INS_KINDS),
                    )
                    .order_by(PatientIdentifier.id)
                ).first()
                if ins is not None:
                    system, value = ins[0], ins[1]
            purposes = {p.code: p for p in session.scalars(select(Purpose)).all()}
            return [
                consent_resource(
                    event=event,
                    patient_system=system,
                    patient_value=value,
                    purpose_code=event["purpose"],
                    purpose_name=purposes[event["purpose"]].name,
                    purpose_model=purposes[event["purpose"]].model,
                    establishment=patient.establishment,
                )
                for event in self._history(session, pk, None)
                if event["status"] == "active"
            ]
