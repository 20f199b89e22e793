"""Consent at the query/retrieve exits: which archived patients a purpose-bound peer sees.

A peer with ``purpose`` set only sees (C-FIND) and receives (C-MOVE, C-GET) instances of
patients the consent store resolves and whose decision for that purpose is *permit*.
Anything else (unknown patient, contradicting demographics, undecided, denied, an error)
is withheld. Nothing is cached between requests, so a withdrawal takes effect on the next
request.

Two checks: the archived patient row (what the index files the study under), and, for
each instance that is to leave, the identity its stored file carries, resolved exactly as
routing resolves it (issuer rules, INS, birth date and sex): an instance filed under a
consented patient's row or study while naming another patient (a reused Study Instance
UID, contradicting demographics or INS) is withheld, as routing holds it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread

from consent.decision import Outcome, Resolution
from dicom_node.archive.attributes import attributes_of, issuer_of_patient_id
from router.decisions import Decide
from router.facts import IDENTITY_KEYWORDS, patient_facts
from router.planner import PatientFacts, Resolve

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

    def __init__(
        self,
        resolve: ResolveArchived,
        decide: Decide,
        resolve_facts: Resolve,
    ) -> None:
        self._resolve = resolve
        self._decide = decide
        self._resolve_facts = resolve_facts

    def permits(
        self, purpose: str, issuer: str, patient_id: str, birth_date: str, sex: str
    ) -> bool:
        """Whether ``purpose`` permits this archived patient's data."""
        try:
            resolution = self._resolve(ArchivedPatient(issuer, patient_id, birth_date, sex))
            return self._permitted(resolution, purpose)
        except Exception as exc:  # fail closed
            LOG.error("consent check failed: %s", type(exc).__name__)
            return False

    def stored_identities(
        self, path: Path, default_issuers: Sequence[str]
    ) -> tuple[PatientFacts, ...]:
        """The patient identity an archived file carries, read as routing reads it: one
        identity when the file names its issuer, else one per issuer in
        ``default_issuers`` (each issuer that may have applied when it was stored; every
        one must be permitted). Raises when the file is unreadable."""
        dataset = dcmread(path, stop_before_pixels=True)
        attributes = attributes_of(dataset, IDENTITY_KEYWORDS)
        if issuer_of_patient_id(attributes):
            return (patient_facts(attributes, ""),)
        return tuple(patient_facts(attributes, issuer) for issuer in dict.fromkeys(default_issuers))

    def permits_identity(self, purpose: str, identity: PatientFacts) -> bool:
        """Whether ``purpose`` permits the data of the patient ``identity`` designates."""
        try:
            return self._permitted(self._resolve_facts(identity), purpose)
        except Exception as exc:  # fail closed
            LOG.error("consent check failed: %s", type(exc).__name__)
            return False

    def confirms(self, identity: PatientFacts) -> bool:
        """Whether ``identity`` designates one consent-store patient without any
        contradiction (resolution ``matched``), whatever the consent."""
        try:
            return self._resolve_facts(identity).status == "matched"
        except Exception as exc:  # fail closed
            LOG.error("patient resolution failed: %s", type(exc).__name__)
            return False

    def _permitted(self, resolution: Resolution, purpose: str) -> bool:
        if resolution.status != "matched" or resolution.patient_pk is None:
            return False
        return self._decide(resolution.patient_pk, purpose).outcome is Outcome.PERMIT
