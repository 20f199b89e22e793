"""Plan the forward jobs of a newly received instance.

For every matching route and destination:

- a route without ``purpose`` (the care team's own systems) needs no consent: ready;
- a route with a purpose needs the patient resolved in the consent store: unknown
  patient or contradicting demographics → held for reconciliation; otherwise the
  decision function says permit → ready, undecided → held for consent, deny → dropped.

When several matching routes name the same destination, one job is made: a route that
requires a purpose wins over one that does not (fail closed).

The instances of a series carry the same patient: a matched resolution and a PERMIT are
reused for two seconds. A reused permit only makes a job ready; the forwarder decides
again from the database immediately before sending it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from consent.decision import Resolution
from dicom_node.archive.identity import PatientIdentity
from router.decisions import Decide, Decision, Outcome, failed
from router.models import HoldReason, JobState
from router.queue import CONSENT_DROP_PREFIX, JobSpec
from router.routes import RouteTable

#: The identity a dataset carries, as the consent store needs it.
PatientFacts = PatientIdentity


Resolve = Callable[[PatientFacts], Resolution]


#: seconds a successful patient resolution is reused
_RESOLUTION_TTL = 2.0
#: seconds a PERMIT decided while planning is reused for the next instances of the same
#: patient and purpose. Only a permit: it makes a job ready, and the forwarder decides
#: again, from the database, immediately before sending it; a refusal or an undecided
#: state is always read fresh (it would drop or hold the job on a stale answer).
_PERMIT_TTL = 2.0


_STILL_PERMITTED = Decision(Outcome.PERMIT, "permitted (decided again before sending)")


@dataclass(frozen=True)
class Plan:
    """The jobs to create and what was decided, for one instance."""

    jobs: tuple[JobSpec, ...]
    resolution: Resolution | None


class Planner:
    """Turns an instance's attributes into forward jobs."""

    def __init__(
        self,
        routes: RouteTable,
        resolve: Resolve,
        decide: Decide,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.routes = routes
        self._resolve = resolve
        self._decide = decide
        self._clock = clock
        # identity facts -> (time, resolution): the instances of a series carry the same
        # identity; only matches are remembered, briefly (an unknown patient added a
        # moment later must not stay held for reconciliation)
        self._resolved: dict[PatientFacts, tuple[float, Resolution]] = {}
        # (patient, purpose) -> time of a PERMIT (see _PERMIT_TTL)
        self._permitted: dict[tuple[int, str], float] = {}

    def keywords(self) -> frozenset[str]:
        """Attribute keywords the routes need read from each dataset."""
        return self.routes.keywords()

    def plan(
        self,
        attributes: Mapping[str, Sequence[str]],
        calling_ae: str,
        patient: PatientFacts,
    ) -> Plan:
        matched = self.routes.matching(attributes, calling_ae)
        if not matched:
            return Plan((), None)
        chosen: dict[str, tuple[str, str]] = {}  # destination -> (route, purpose)
        for route in matched:
            for dest in route.destinations:
                current = chosen.get(dest)
                if current is None or (not current[1] and route.purpose):
                    chosen[dest] = (route.name, route.purpose)
        resolution: Resolution | None = None
        if any(purpose for _, purpose in chosen.values()):
            resolution = self._resolution(patient)
        decisions: dict[str, tuple[JobState, str, str]] = {}
        jobs = []
        for dest, (route_name, purpose) in chosen.items():
            patient_pk = resolution.patient_pk if resolution else None
            if not purpose:
                state, hold, note = JobState.READY, "", ""
            elif resolution is None or resolution.status != "matched":
                reason = resolution.reason if resolution else "unresolved"
                status = resolution.status if resolution else "unknown"
                state, hold = JobState.HELD, HoldReason.RECONCILIATION.value
                note = f"patient {status}: {reason}"
            else:
                if purpose not in decisions:
                    decision = self._decision(patient_pk, purpose)
                    if decision.outcome is Outcome.PERMIT:
                        decisions[purpose] = (JobState.READY, "", "")
                    elif decision.outcome is Outcome.DENY and not failed(decision):
                        decisions[purpose] = (
                            JobState.DROPPED,
                            "",
                            f"{CONSENT_DROP_PREFIX}: {decision.reason}",
                        )
                    else:
                        decisions[purpose] = (
                            JobState.HELD,
                            HoldReason.CONSENT.value,
                            f"{CONSENT_DROP_PREFIX}: {decision.reason}",
                        )
                state, hold, note = decisions[purpose]
            jobs.append(JobSpec(dest, route_name, purpose, patient_pk, state, hold, note))
        return Plan(tuple(jobs), resolution)

    def _decision(self, patient_pk: int | None, purpose: str) -> Decision:
        if patient_pk is None:
            return self._decide(patient_pk, purpose)
        now = self._clock()
        since = self._permitted.get((patient_pk, purpose))
        if since is not None and now - since < _PERMIT_TTL:
            return _STILL_PERMITTED
        decision = self._decide(patient_pk, purpose)
        if decision.outcome is Outcome.PERMIT:
            if len(self._permitted) >= 1024:
                self._permitted.clear()
            self._permitted[(patient_pk, purpose)] = now
        else:
            self._permitted.pop((patient_pk, purpose), None)
        return decision

    def _resolution(self, patient: PatientFacts) -> Resolution:
        now = self._clock()
        cached = self._resolved.get(patient)
        if cached is not None and now - cached[0] < _RESOLUTION_TTL:
            return cached[1]
        try:
            resolution = self._resolve(patient)
        except Exception as exc:  # fail closed: treat as unresolved
            return Resolution(None, "unknown", f"error: {type(exc).__name__}")
        if resolution.status == "matched":
            if len(self._resolved) >= 1024:
                self._resolved.clear()
            self._resolved[patient] = (now, resolution)
        return resolution
