"""The consent decision as the router sees it (implemented by the consent store)."""

from __future__ import annotations

from collections.abc import Callable

from consent.decision import Decision, Outcome

#: ``decide(patient_pk, purpose_code)``; must fail closed (never raise).
Decide = Callable[[int | None, str], Decision]


def failed(decision: Decision) -> bool:
    """Whether a DENY came from an error while deciding rather than from the patient.

    Such a job is held (nothing leaves, and the periodic sweep decides again) instead of
    being dropped for good.
    """
    return decision.outcome is Outcome.DENY and decision.reason.startswith("error")


__all__ = ["Decide", "Decision", "Outcome", "failed"]
