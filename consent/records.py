"""Recording consent decisions: the append-only consent log and its state cache.

``consent_event`` is append-only: nothing is updated in place or deleted. A withdrawal is a
new ``deny`` event (action ``withdraw``) superseding the ``permit``; a decision recorded by
mistake is retracted by a new row with status ``entered-in-error`` naming it (see
:class:`consent.models.ConsentEvent`). ``consent_state`` caches the current decision per
patient and purpose, written in the same transaction as each event and rebuildable from
the log with :meth:`ConsentRecorder.rebuild_state`.

Each change is one write transaction (:meth:`consent.context.StoreContext.write`) holding
its event, the state cache and its audit entry; listeners are notified after the commit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from sqlalchemy import delete, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from consent.context import StoreContext, require_actor
from consent.decision import ConsentChange, Outcome, decision_from_state
from consent.errors import InvalidIdentity, InvalidRequest, InvalidTransition, UnknownEvent
from consent.feed import ChangeFeed
from consent.identity import clean_text
from consent.integrity import decisions_from_log, event_digest, retracted_events
from consent.models import (
    CHANNELS,
    DECISIONS,
    PERFORMERS,
    ConsentEvent,
    ConsentState,
    NoticeVersion,
    Purpose,
)
from consent.patients import require_patient
from consent.purposes import find_notice, latest_notice, require_purpose


def _evidence_text(evidence: str | Mapping[str, Any] | None) -> str | None:
    if evidence is None:
        return None
    if isinstance(evidence, str):
        return evidence
    return json.dumps(dict(evidence), sort_keys=True, ensure_ascii=False)


class ConsentRecorder:
    """Appends grants, refusals, withdrawals and retractions to the consent log.

    Parameters
    ----------
    context : StoreContext
    feed : ChangeFeed
        Notified of each change once committed.
    """

    def __init__(self, context: StoreContext, feed: ChangeFeed) -> None:
        self._context = context
        self._feed = feed

    def record_consent(
        self,
        *,
        issuer: str,
        patient_id: str,
        purpose: str,
        decision: Literal["permit", "deny"],
        channel: str,
        actor: str,
        performed_by: str = "patient",
        representative_name: str | None = None,
        evidence: str | Mapping[str, Any] | None = None,
        notice_version: int | None = None,
    ) -> int:
        """Append a decision to the consent log and return the event id.

        A ``deny`` while the patient's current decision is ``permit`` is recorded as a
        withdrawal (action ``withdraw``), otherwise as a refusal; a ``permit`` as a grant.

        Parameters
        ----------
        issuer, patient_id : str
            The patient's IPP.
        purpose : str
            Purpose code.
        decision : {"permit", "deny"}
        channel : {"desk", "remote", "paper", "cli", "api"}
        actor : str
            Who records it (operator or system user).
        performed_by : {"patient", "representative"}
        representative_name : str, optional
            Required when ``performed_by`` is ``representative``.
        evidence : str or mapping, optional
            Proof (free text or JSON object: scanned form id, solicitation id...).
        notice_version : int, optional
            The notice version shown to the patient (default: the latest). A ``permit``
            needs one: a purpose without a notice cannot be consented to.

        Raises
        ------
        UnknownPatient, UnknownPurpose
        InvalidRequest
            A bad decision, channel, performer, or a missing representative name.
        InvalidTransition
            A permit on a purpose without a notice, or an unknown notice version.
        """
        return self._record(
            issuer=issuer,
            patient_id=patient_id,
            purpose=purpose,
            decision=decision,
            channel=channel,
            actor=actor,
            performed_by=performed_by,
            representative_name=representative_name,
            evidence=evidence,
            notice_version=notice_version,
            withdrawal=False,
        )

    def grant(
        self,
        *,
        issuer: str,
        patient_id: str,
        purpose: str,
        channel: str,
        actor: str,
        performed_by: str = "patient",
        representative_name: str | None = None,
        evidence: str | Mapping[str, Any] | None = None,
        notice_version: int | None = None,
    ) -> int:
        """Record a permit; see :meth:`record_consent`."""
        return self.record_consent(
            issuer=issuer,
            patient_id=patient_id,
            purpose=purpose,
            decision="permit",
            channel=channel,
            actor=actor,
            performed_by=performed_by,
            representative_name=representative_name,
            evidence=evidence,
            notice_version=notice_version,
        )

    def refuse(
        self,
        *,
        issuer: str,
        patient_id: str,
        purpose: str,
        channel: str,
        actor: str,
        performed_by: str = "patient",
        representative_name: str | None = None,
        evidence: str | Mapping[str, Any] | None = None,
        notice_version: int | None = None,
    ) -> int:
        """Record a deny (a withdrawal when the current decision is permit); see
        :meth:`record_consent`."""
        return self.record_consent(
            issuer=issuer,
            patient_id=patient_id,
            purpose=purpose,
            decision="deny",
            channel=channel,
            actor=actor,
            performed_by=performed_by,
            representative_name=representative_name,
            evidence=evidence,
            notice_version=notice_version,
        )

    def withdraw(
        self,
        *,
        issuer: str,
        patient_id: str,
        purpose: str,
        channel: str,
        actor: str,
        performed_by: str = "patient",
        representative_name: str | None = None,
        evidence: str | Mapping[str, Any] | None = None,
    ) -> int:
        """Record the withdrawal of a permit (a ``deny`` event, action ``withdraw``).

        Raises
        ------
        InvalidTransition
            The patient's current outcome for the purpose is not ``PERMIT`` (nothing to
            withdraw). For an opt-out purpose without any event, withdrawing records the
            patient's opposition.
        """
        return self._record(
            issuer=issuer,
            patient_id=patient_id,
            purpose=purpose,
            decision="deny",
            channel=channel,
            actor=actor,
            performed_by=performed_by,
            representative_name=representative_name,
            evidence=evidence,
            notice_version=None,
            withdrawal=True,
        )

    def _record(
        self,
        *,
        issuer: str,
        patient_id: str,
        purpose: str,
        decision: str,
        channel: str,
        actor: str,
        performed_by: str,
        representative_name: str | None,
        evidence: str | Mapping[str, Any] | None,
        notice_version: int | None,
        withdrawal: bool,
    ) -> int:
        actor = require_actor(actor)
        if decision not in DECISIONS:
            raise InvalidRequest("decision must be permit or deny")
        if channel not in CHANNELS:
            raise InvalidRequest(f"channel must be one of {', '.join(CHANNELS)}")
        if performed_by not in PERFORMERS:
            raise InvalidRequest("performed_by must be patient or representative")
        try:
            representative = clean_text(representative_name, "representative's name", 200)
        except InvalidIdentity as exc:
            raise InvalidRequest(str(exc)) from None
        if performed_by == "representative" and representative is None:
            raise InvalidRequest("a representative's name is required")
        if performed_by == "patient":
            representative = None
        evidence_text = _evidence_text(evidence)
        with self._context.write() as session:
            purpose_row = require_purpose(session, purpose)
            patient_pk = require_patient(session, issuer, patient_id)
            state = session.execute(
                select(ConsentState.decision, ConsentState.event_pk).where(
                    ConsentState.patient_pk == patient_pk,
                    ConsentState.purpose_pk == purpose_row.id,
                )
            ).first()
            current = decision_from_state(state[0] if state else None, purpose_row.model)
            if withdrawal and current.outcome is not Outcome.PERMIT:
                raise InvalidTransition(
                    f"nothing to withdraw: the current decision for '{purpose}' is "
                    f"{current.outcome.value} ({current.reason})"
                )
            notice = self._notice_for(session, purpose_row, decision, notice_version)
            if decision == "permit":
                action = "grant"
            elif withdrawal or (state is not None and state[0] == "permit"):
                action = "withdraw"
            else:
                action = "refuse"
            event = ConsentEvent(
                patient_pk=patient_pk,
                purpose_pk=purpose_row.id,
                decision=decision,
                status="active",
                action=action,
                channel=channel,
                recorded_by=actor,
                performed_by=performed_by,
                representative_name=representative,
                notice_version_pk=notice.id if notice else None,
                evidence=evidence_text,
                recorded_at=self._context.now(),
                supersedes_pk=state[1] if state else None,
            )
            session.add(event)
            session.flush()
            self._set_state(session, patient_pk, purpose_row.id, decision, event.id)
            self._context.audit(
                session,
                actor,
                f"consent.{action}",
                f"event:{event.id}",
                {
                    "patient": patient_pk,
                    "purpose": purpose,
                    "decision": decision,
                    "channel": channel,
                    "performed_by": performed_by,
                    "notice_version": notice.version if notice else None,
                    "digest": event_digest(event),
                },
            )
            change = ConsentChange(
                patient_pk,
                purpose,
                decision_from_state(decision, purpose_row.model).outcome,
                event.id,
            )
        self._feed.notify([change])
        return change.event_id

    @staticmethod
    def _notice_for(
        session: Session, purpose: Purpose, decision: str, version: int | None
    ) -> NoticeVersion | None:
        if version is not None:
            notice = find_notice(session, purpose.id, version)
            if notice is None:
                raise InvalidTransition(f"purpose '{purpose.code}' has no notice version {version}")
            return notice
        notice = latest_notice(session, purpose.id)
        if notice is None and decision == "permit":
            raise InvalidTransition(
                f"purpose '{purpose.code}' has no notice: a consent must refer to the notice "
                "shown (add one with 'consentgate purpose notice')"
            )
        return notice

    def _set_state(
        self, session: Session, patient_pk: int, purpose_pk: int, decision: str, event_pk: int
    ) -> None:
        values = {
            "patient_pk": patient_pk,
            "purpose_pk": purpose_pk,
            "decision": decision,
            "event_pk": event_pk,
        }
        if self._context.engine.dialect.name == "postgresql":
            pg_stmt = postgresql.insert(ConsentState).values(values)
            session.execute(
                pg_stmt.on_conflict_do_update(
                    index_elements=["patient_pk", "purpose_pk"],
                    set_={"decision": decision, "event_pk": event_pk},
                )
            )
        else:
            lite_stmt = sqlite.insert(ConsentState).values(values)
            session.execute(
                lite_stmt.on_conflict_do_update(
                    index_elements=["patient_pk", "purpose_pk"],
                    set_={"decision": decision, "event_pk": event_pk},
                )
            )

    def mark_entered_in_error(
        self, event_id: int, *, actor: str, reason: str, channel: str = "cli"
    ) -> int:
        """Retract a decision recorded by mistake; return the id of the retraction row.

        Nothing is changed in place: a new row (status ``entered-in-error``) names the
        wrong event, and the current decision of that patient and purpose falls back to the
        latest decision not retracted (or to none).

        Raises
        ------
        UnknownEvent
        InvalidTransition
            The event is itself a retraction, or is already retracted.
        InvalidRequest
            Empty reason or bad channel.
        """
        actor = require_actor(actor)
        reason = " ".join(reason.split())
        if not reason:
            raise InvalidRequest("a reason is required")
        if channel not in CHANNELS:
            raise InvalidRequest(f"channel must be one of {', '.join(CHANNELS)}")
        with self._context.write() as session:
            event = session.get(ConsentEvent, event_id)
            if event is None:
                raise UnknownEvent(f"unknown consent event {event_id}")
            if event.status != "active":
                raise InvalidTransition(f"event {event_id} is itself a retraction")
            already = session.scalar(
                select(ConsentEvent.id).where(
                    ConsentEvent.status == "entered-in-error",
                    ConsentEvent.supersedes_pk == event_id,
                )
            )
            if already is not None:
                raise InvalidTransition(f"event {event_id} is already marked entered-in-error")
            marker = ConsentEvent(
                patient_pk=event.patient_pk,
                purpose_pk=event.purpose_pk,
                decision=event.decision,
                status="entered-in-error",
                action="entered-in-error",
                channel=channel,
                recorded_by=actor,
                performed_by=event.performed_by,
                representative_name=None,
                notice_version_pk=None,
                evidence=json.dumps({"reason": reason}, ensure_ascii=False),
                recorded_at=self._context.now(),
                supersedes_pk=event_id,
            )
            session.add(marker)
            session.flush()
            decision = self._recompute_state(session, event.patient_pk, event.purpose_pk)
            purpose = session.get_one(Purpose, event.purpose_pk)
            self._context.audit(
                session,
                actor,
                "consent.entered-in-error",
                f"event:{event_id}",
                {
                    "patient": event.patient_pk,
                    "purpose": purpose.code,
                    "marker": marker.id,
                    "digest": event_digest(marker),
                },
            )
            change = ConsentChange(
                event.patient_pk,
                purpose.code,
                decision_from_state(decision, purpose.model).outcome,
                marker.id,
            )
        self._feed.notify([change])
        return change.event_id

    def _recompute_state(self, session: Session, patient_pk: int, purpose_pk: int) -> str | None:
        latest = session.execute(
            select(ConsentEvent.id, ConsentEvent.decision)
            .where(
                ConsentEvent.patient_pk == patient_pk,
                ConsentEvent.purpose_pk == purpose_pk,
                ConsentEvent.status == "active",
                ConsentEvent.id.not_in(retracted_events()),
            )
            .order_by(ConsentEvent.id.desc())
            .limit(1)
        ).first()
        if latest is None:
            session.execute(
                delete(ConsentState).where(
                    ConsentState.patient_pk == patient_pk, ConsentState.purpose_pk == purpose_pk
                )
            )
            return None
        self._set_state(session, patient_pk, purpose_pk, latest[1], latest[0])
        return str(latest[1])

    def rebuild_state(self, *, actor: str = "system") -> int:
        """Recompute the ``consent_state`` cache from the consent log; return its row count.

        The cache is always written with the events, so this is a repair tool (after a
        restore, or to check the cache: the count and content must not change).
        """
        actor = require_actor(actor)
        with self._context.write() as session:
            latest = decisions_from_log(session)
            session.execute(delete(ConsentState))
            values = [
                {"patient_pk": k[0], "purpose_pk": k[1], "event_pk": v[0], "decision": v[1]}
                for k, v in latest.items()
            ]
            for start in range(0, len(values), 5000):
                session.execute(insert(ConsentState), values[start : start + 5000])
            self._context.audit(
                session, actor, "consent.rebuild-state", "consent_state", {"rows": len(values)}
            )
        return len(values)
