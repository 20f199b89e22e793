"""The consent decision as the router sees it (implemented by the consent store)."""

from __future__ import annotations

from collections.abc import Callable

from consent.decision import Decision, Outcome

#: ``decide(patient_pk, purpose_code)``; must fail closed (never raise).
Decide = Callable[[int | None, str], Decision]

__all__ = ["Decide", "Decision", "Outcome"]
