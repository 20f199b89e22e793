"""Keep the forward queue in step with consent decisions.

A consent change releases the held jobs of that patient and purpose (permit) or drops
every not-yet-sent one (deny, withdrawal). Changes made in this process arrive through the
consent store's listeners; changes made by another process (the CLI, another node) are
picked up by polling the consent event log. A periodic sweep re-decides every held job,
so a missed notification (a crash between commit and reaction) is repaired.

A refusal retracted as entered-in-error puts back the jobs it dropped
(:func:`restore_after_retraction`, called by whoever records the retraction).

After a refusal or withdrawal has dropped jobs, the retention policy (``[router]
retention``, :mod:`router.retention`) may delete the local copies no job needs any more.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from consent.decision import ConsentChange, Outcome, refusal_in_force
from consent.history import RetractedWindow
from router.decisions import Decide, failed
from router.models import ForwardJob, HoldReason, JobState
from router.queue import CONSENT_DROP_PREFIX, JobQueue
from router.retention import Retention

LOG = logging.getLogger(__name__)


class ConsentSync:
    """Applies consent changes to the queue."""

    def __init__(
        self,
        queue: JobQueue,
        sessions: sessionmaker[Session],
        decide: Decide,
        changes_since: Callable[[int], list[ConsentChange]],
        last_event_id: Callable[[], int],
        wake: Callable[[], None] = lambda: None,
        retention: Retention | None = None,
        audit: Callable[..., object] | None = None,
    ) -> None:
        self._queue = queue
        self._audit = audit
        self._retention = retention
        self._sessions = sessions
        self._decide = decide
        self._changes_since = changes_since
        self._cursor = last_event_id()
        self._wake = wake

    def apply(self, change: ConsentChange) -> int:
        """React to one change; returns the number of jobs affected."""
        if change.outcome is Outcome.PERMIT:
            count = self._queue.release_for_consent(change.patient_pk, change.purpose_code)
            if count:
                self._trace("routing.consent-release", change, count)
                self._wake()
            return count
        if change.outcome is Outcome.DENY:
            reason = f"{CONSENT_DROP_PREFIX}: refused or withdrawn"
            # only while the refusal still holds: a poll acts on a change read a moment
            # ago, and a grant may have committed since (with new, permitted jobs)
            count = self._queue.drop_for_consent(
                change.patient_pk,
                change.purpose_code,
                reason,
                still=refusal_in_force(change.patient_pk, change.purpose_code),
            )
            if count:
                self._trace("routing.consent-drop", change, count)
            if self._retention is not None:
                _apply_retention(self._retention, change, reason)
            return count
        return 0

    def _trace(self, action: str, change: ConsentChange, jobs: int) -> None:
        """Audit what a consent change did to the queue (the change itself is audited
        where it was recorded)."""
        if self._audit is None:
            return
        try:
            self._audit(
                actor="router",
                action=action,
                target=f"patient:{change.patient_pk}",
                details={"purpose": change.purpose_code, "jobs": jobs, "event": change.event_id},
            )
        except Exception as exc:  # the queue change stands; the failure is reported
            LOG.error("audit of a consent change applied failed: %s", type(exc).__name__)

    def poll(self) -> int:
        """Apply the changes recorded since the last poll (by any process)."""
        changes = self._changes_since(self._cursor)
        affected = 0
        for change in changes:
            affected += self.apply(change)
            self._cursor = max(self._cursor, change.event_id)
        return affected

    def sweep(self) -> int:
        """Re-decide every job held for consent (repairs missed notifications)."""
        with self._sessions() as session:
            pairs = session.execute(
                select(ForwardJob.patient_pk, ForwardJob.purpose)
                .where(
                    ForwardJob.state == JobState.HELD.value,
                    ForwardJob.hold_reason == HoldReason.CONSENT.value,
                    ForwardJob.patient_pk.is_not(None),
                )
                .distinct()
            ).all()
        affected = 0
        for patient_pk, purpose in pairs:
            if patient_pk is None:
                continue
            decision = self._decide(patient_pk, purpose)
            if decision.outcome is not Outcome.UNDECIDED and not failed(decision):
                affected += self.apply(ConsentChange(patient_pk, purpose, decision.outcome))
        return affected


class Restore(StrEnum):
    """What :func:`restore_after_retraction` did."""

    RELEASED = "released"  # the jobs the refusal dropped are ready to send again
    HELD = "held"  # they are held again: the patient has not decided (opt-in purpose)
    NOT_A_REFUSAL = "not a refusal"  # the retracted decision was a permit: nothing dropped
    STILL_REFUSED = "still refused"  # the current decision is a refusal: they stay dropped
    REFUSED_BEFORE = "refused before"  # the decision before it was a refusal: it dropped them
    DECISION_FAILED = "decision failed"  # could not decide (database error): try again


def restore_after_retraction(
    queue: JobQueue, decide: Decide, window: RetractedWindow
) -> tuple[Restore, int]:
    """A refusal retracted as entered-in-error: put back what it dropped.

    The jobs it dropped while it was the current decision (``window``) are held for
    consent again, then released at once when the decision now permits; they stay held
    when it is undecided. Nothing is restored when the decision in force before it was a
    refusal too (it would have dropped them anyway, whatever was decided later), while
    the patient's current decision is a refusal, nor when the retracted decision was a
    permit. Returns what was done and the number of jobs restored. Running it again
    restores nothing more (those jobs are no longer dropped). A copy that the retention
    policy deleted after the mistaken refusal is gone with its jobs: it can only be sent
    again.
    """
    if window.decision != "deny":
        return Restore.NOT_A_REFUSAL, 0
    if window.previous == "deny":
        # without the mistake, the refusal before it would have dropped them as well
        return Restore.REFUSED_BEFORE, 0
    decision = decide(window.patient_pk, window.purpose)
    if failed(decision):
        return Restore.DECISION_FAILED, 0
    if decision.outcome is Outcome.DENY:
        return Restore.STILL_REFUSED, 0
    count = queue.restore_consent_drops(window.patient_pk, window.purpose, window.start, window.end)
    if decision.outcome is not Outcome.PERMIT:
        return Restore.HELD, count
    if count:
        queue.release_for_consent(window.patient_pk, window.purpose)
    return Restore.RELEASED, count


def _apply_retention(retention: Retention, change: ConsentChange, reason: str) -> None:
    """Delete the local copies the refusal left unneeded (per the policy). A failure keeps
    them and never stops consent changes from reaching the queue; the next refusal or
    withdrawal applied for this patient and purpose tries again."""
    try:
        retention.after_consent_drop(change.patient_pk, change.purpose_code, reason)
    except Exception as exc:
        LOG.error("retention after a consent refusal failed: %s", type(exc).__name__)
