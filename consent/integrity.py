"""Check the consent records against the audit log (``consentgate audit verify``).

The hash chain (:mod:`consent.audit`) shows an audit entry edited, inserted or removed.
The consent records themselves live in other tables, which anyone able to write to the
database could edit without touching the chain. Each of them is written in the same
transaction as an audit entry that describes it, so the chain vouches for them:

* every consent event (a decision, or a retraction marker) has its audit entry, and
  the event agrees with it: patient, purpose, decision, channel, performer, notice
  version and, for entries written since the event digest was added, every column
  (:func:`event_digest`). An edited event, or one whose audit entry was removed (the
  tail of the chain cut off included), is reported;
* every notice text still has the SHA-256 recorded with it, and the one its audit entry
  recorded (an edited text is reported);
* the decision cache (``consent_state``) equals the decisions the event log gives (an
  edited cache would change what ``decide()`` answers).

The audit entries of other kinds (query/retrieve accesses, retention) have no record of
their own to compare with: only a chain head kept elsewhere shows their removal.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import UTC
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from consent.audit import canonical_json
from consent.models import (
    AuditEntry,
    ConsentEvent,
    ConsentState,
    NoticeVersion,
    Purpose,
)

#: problems reported at most (the first ones, in table order)
_MAX_PROBLEMS = 20


def event_digest(event: ConsentEvent) -> str:
    """The SHA-256 of every column of a consent event, recorded in its audit entry."""
    recorded = event.recorded_at
    if recorded.tzinfo is None:
        recorded = recorded.replace(tzinfo=UTC)
    body = canonical_json(
        {
            "id": event.id,
            "patient_pk": event.patient_pk,
            "purpose_pk": event.purpose_pk,
            "decision": event.decision,
            "status": event.status,
            "action": event.action,
            "channel": event.channel,
            "recorded_by": event.recorded_by,
            "performed_by": event.performed_by,
            "representative_name": event.representative_name,
            "notice_version_pk": event.notice_version_pk,
            "evidence": event.evidence,
            "recorded_at": recorded.astimezone(UTC).isoformat(timespec="microseconds"),
            "supersedes_pk": event.supersedes_pk,
        }
    )
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def check_consent_records(session: Session) -> list[str]:
    """The disagreements between the consent records and the audit log (at most 20,
    one line each; empty when everything agrees). Only reads."""
    problems: list[str] = []
    for problem in _problems(session):
        problems.append(problem)
        if len(problems) >= _MAX_PROBLEMS:
            break
    return problems


def _problems(session: Session) -> Iterator[str]:
    yield from _event_problems(session)
    yield from _notice_problems(session)
    yield from _state_problems(session)


def _audit_details(session: Session, prefix: str) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """``target -> [(action, details)]`` of the audit entries whose target starts with
    ``prefix``."""
    found: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    rows = session.execute(
        select(AuditEntry.target, AuditEntry.action, AuditEntry.details)
        .where(AuditEntry.target.startswith(prefix))
        .order_by(AuditEntry.seq)
    )
    for target, action, details in rows:
        try:
            parsed = json.loads(details)
        except ValueError:
            parsed = {}
        found.setdefault(target, []).append((action, parsed if isinstance(parsed, dict) else {}))
    return found


def _event_problems(session: Session) -> Iterator[str]:
    audited = _audit_details(session, "event:")
    purposes = dict(session.execute(select(Purpose.id, Purpose.code)).tuples().all())
    notices = dict(session.execute(select(NoticeVersion.id, NoticeVersion.version)).tuples().all())
    for event in session.scalars(select(ConsentEvent).order_by(ConsentEvent.id)):
        if event.status == "entered-in-error":
            # a retraction is audited under the event it names, with its own id
            entries = [
                d
                for action, d in audited.get(f"event:{event.supersedes_pk}", [])
                if action == "consent.entered-in-error" and d.get("marker") == event.id
            ]
            expected: dict[str, Any] = {
                "patient": event.patient_pk,
                "purpose": purposes.get(event.purpose_pk),
            }
        else:
            entries = [
                d
                for action, d in audited.get(f"event:{event.id}", [])
                if action == f"consent.{event.action}"
            ]
            expected = {
                "patient": event.patient_pk,
                "purpose": purposes.get(event.purpose_pk),
                "decision": event.decision,
                "channel": event.channel,
                "performed_by": event.performed_by,
                "notice_version": notices.get(event.notice_version_pk)
                if event.notice_version_pk is not None
                else None,
            }
        if not entries:
            yield f"consent event {event.id} has no audit entry (removed, or the event added)"
            continue
        details = entries[-1]
        wrong = sorted(k for k, v in expected.items() if details.get(k) != v)
        if "digest" in details and details["digest"] != event_digest(event):
            wrong.append("digest")
        if wrong:
            yield (
                f"consent event {event.id} differs from its audit entry ({', '.join(wrong)}): "
                "edited after it was recorded"
            )


def _notice_problems(session: Session) -> Iterator[str]:
    audited = _audit_details(session, "purpose:")
    codes = dict(session.execute(select(Purpose.id, Purpose.code)).tuples().all())
    for notice in session.scalars(select(NoticeVersion).order_by(NoticeVersion.id)):
        code = codes.get(notice.purpose_pk, "?")
        actual = hashlib.sha256(notice.text.encode("utf-8")).hexdigest()
        if actual != notice.sha256:
            yield f"notice {code} v{notice.version}: its text no longer has its SHA-256"
            continue
        recorded = [
            d.get("notice_sha256")
            for action, d in audited.get(f"purpose:{code}", [])
            if action in ("purpose.add", "notice.add") and d.get("notice_version") == notice.version
        ]
        if not recorded:
            yield f"notice {code} v{notice.version} has no audit entry"
        elif recorded[-1] != actual:
            yield f"notice {code} v{notice.version}: text differs from the one audited"


def retracted_events() -> Select[tuple[int | None]]:
    """The ids of the events a retraction (entered-in-error) names."""
    return select(ConsentEvent.supersedes_pk).where(
        ConsentEvent.status == "entered-in-error", ConsentEvent.supersedes_pk.is_not(None)
    )


def decisions_from_log(session: Session) -> dict[tuple[int, int], tuple[int, str]]:
    """``(patient_pk, purpose_pk) -> (event_pk, decision)``: the latest active event not
    retracted (marked entered-in-error) of each pair, what the decision cache holds."""
    rows = session.execute(
        select(
            ConsentEvent.patient_pk, ConsentEvent.purpose_pk, ConsentEvent.id, ConsentEvent.decision
        )
        .where(ConsentEvent.status == "active", ConsentEvent.id.not_in(retracted_events()))
        .order_by(ConsentEvent.id)
    )
    return {(patient, purpose): (event, decision) for patient, purpose, event, decision in rows}


def _state_problems(session: Session) -> Iterator[str]:
    latest = decisions_from_log(session)
    cached = {
        (p, q): (e, d)
        for p, q, e, d in session.execute(
            select(
                ConsentState.patient_pk,
                ConsentState.purpose_pk,
                ConsentState.event_pk,
                ConsentState.decision,
            )
        )
    }
    for key in sorted(set(latest) | set(cached)):
        if latest.get(key) != cached.get(key):
            yield (
                f"decision cache of patient {key[0]}, purpose {key[1]} differs from the "
                "consent log (edited: 'consentgate consent rebuild-state' recomputes it)"
            )
