"""Consent at the query/retrieve exits: which archived patients a purpose-bound peer sees.

A peer with ``purpose`` set only sees (C-FIND) and receives (C-MOVE, C-GET) instances of
patients the consent store resolves and whose decision for that purpose is *permit*.
Anything else (unknown patient, contradicting demographics, undecided, denied, an error)
is withheld. Nothing is cached between requests, so a withdrawal takes effect on the next
request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from consent.decision import Outcome, Resolution
from router.decisions import Decide

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchivedPatient:
    """The patient attributes of an archived study, as indexed."""

    issuer: str
    patient_id: str
    birth_date: str
    sex: str


ResolveArchived = Callable[[ArchivedPatient], Resolution]


class AccessGate:
    """Answers "may this purpose see this archived patient?" and fails closed."""

    def __init__(self, resolve: ResolveArchived, decide: Decide) -> None:
        self._resolve = resolve
        self._decide = decide

    def permits(
        self, purpose: str, issuer: str, patient_id: str, birth_date: str, sex: str
    ) -> bool:
        """Whether ``purpose`` permits this archived patient's data."""
        try:
            resolution = self._resolve(ArchivedPatient(issuer, patient_id, birth_date, sex))
            if resolution.status != "matched" or resolution.patient_pk is None:
                return False
            return self._decide(resolution.patient_pk, purpose).outcome is Outcome.PERMIT
        except Exception as exc:  # fail closed
            LOG.error("consent check failed: %s", type(exc).__name__)
            return False
