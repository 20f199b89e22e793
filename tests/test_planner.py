"""The planner turns an instance's attributes into forward jobs (unit level: resolution
and decision are functions handed to it, driven here with a controllable clock)."""

from __future__ import annotations

from collections.abc import Callable

from config.settings import MatchCondition, RouteSettings
from consent.decision import Decision, Outcome, Resolution
from router.models import HoldReason, JobState
from router.planner import PatientFacts, Planner
from router.routes import RouteTable

PATIENT = PatientFacts("CHR-METZ", "P1", (), "19700101", "F")
MATCHED = Resolution(42, "matched", "issuer and patient ID")
PERMIT = Decision(Outcome.PERMIT, "consent given")
DENY = Decision(Outcome.DENY, "consent refused or withdrawn")
UNDECIDED = Decision(Outcome.UNDECIDED, "no decision yet (opt-in purpose)")
ERROR = Decision(Outcome.DENY, "error: OperationalError")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def routes(*entries: RouteSettings) -> RouteTable:
    return RouteTable(entries)


CT = MatchCondition("Modality", "equals", ("CT",))
REGIONAL = RouteSettings("regional", (CT,), ("platform",), purpose="SHARE")
CARE_TEAM = RouteSettings("pacs", (), ("pacs",))


def planner(
    table: RouteTable,
    answers: list[Decision],
    resolution: Resolution = MATCHED,
    clock: Clock | None = None,
) -> tuple[Planner, list[tuple[int | None, str]], list[PatientFacts]]:
    """A planner whose decide() returns ``answers`` in turn (recording its calls)."""
    decided: list[tuple[int | None, str]] = []
    resolved: list[PatientFacts] = []

    def decide(patient_pk: int | None, purpose: str) -> Decision:
        decided.append((patient_pk, purpose))
        return answers[min(len(decided), len(answers)) - 1]

    def resolve(facts: PatientFacts) -> Resolution:
        resolved.append(facts)
        return resolution

    resolver: Callable[[PatientFacts], Resolution] = resolve
    return Planner(table, resolver, decide, clock or Clock()), decided, resolved


def states(plan_jobs: tuple[object, ...]) -> dict[str, tuple[JobState, str]]:
    return {j.destination: (j.state, j.hold_reason) for j in plan_jobs}  # type: ignore[attr-defined]


def test_care_team_route_needs_no_consent() -> None:
    p, decided, resolved = planner(routes(CARE_TEAM), [DENY])
    plan = p.plan({"Modality": ("CT",)}, "CT01", PATIENT)
    assert states(plan.jobs) == {"pacs": (JobState.READY, "")}
    assert decided == [] and resolved == []


def test_decision_sets_the_job_state() -> None:
    expected = {
        PERMIT: (JobState.READY, ""),
        DENY: (JobState.DROPPED, ""),
        UNDECIDED: (JobState.HELD, HoldReason.CONSENT.value),
        ERROR: (JobState.HELD, HoldReason.CONSENT.value),  # an error never drops data
    }
    for answer, state in expected.items():
        p, _, _ = planner(routes(REGIONAL), [answer])
        plan = p.plan({"Modality": ("CT",)}, "CT01", PATIENT)
        assert states(plan.jobs) == {"platform": state}, answer


def test_unknown_patient_is_held_for_reconciliation_without_deciding() -> None:
    p, decided, _ = planner(routes(REGIONAL), [PERMIT], Resolution(None, "unknown", "no match"))
    plan = p.plan({"Modality": ("CT",)}, "CT01", PATIENT)
    assert states(plan.jobs) == {"platform": (JobState.HELD, HoldReason.RECONCILIATION.value)}
    assert decided == []


def test_route_with_purpose_wins_for_a_shared_destination() -> None:
    both = routes(
        RouteSettings("plain", (), ("platform",)),
        RouteSettings("consented", (), ("platform",), purpose="SHARE"),
    )
    p, decided, _ = planner(both, [UNDECIDED])
    plan = p.plan({"Modality": ("MR",)}, "MR01", PATIENT)
    assert states(plan.jobs) == {"platform": (JobState.HELD, HoldReason.CONSENT.value)}
    assert decided == [(42, "SHARE")]


def test_a_permit_is_reused_briefly_and_only_a_permit() -> None:
    clock = Clock()
    p, decided, resolved = planner(routes(REGIONAL), [PERMIT, DENY, PERMIT], clock=clock)
    attrs = {"Modality": ("CT",)}
    assert states(p.plan(attrs, "CT01", PATIENT).jobs)["platform"][0] is JobState.READY
    clock.now += 1.0
    # within the reuse window: ready without asking (the forwarder decides before sending)
    assert states(p.plan(attrs, "CT01", PATIENT).jobs)["platform"][0] is JobState.READY
    assert len(decided) == 1
    assert len(resolved) == 1  # the matched resolution is reused too
    clock.now += 1.5
    # the window has passed: asked again, and now it is a refusal
    assert states(p.plan(attrs, "CT01", PATIENT).jobs)["platform"][0] is JobState.DROPPED
    assert len(decided) == 2
    # a refusal is never reused: the next instance asks again
    assert states(p.plan(attrs, "CT01", PATIENT).jobs)["platform"][0] is JobState.READY
    assert len(decided) == 3


def test_non_permits_are_always_decided_fresh() -> None:
    p, decided, _ = planner(routes(REGIONAL), [UNDECIDED, UNDECIDED, PERMIT])
    attrs = {"Modality": ("CT",)}
    for _ in range(2):
        assert states(p.plan(attrs, "CT01", PATIENT).jobs)["platform"][0] is JobState.HELD
    assert states(p.plan(attrs, "CT01", PATIENT).jobs)["platform"][0] is JobState.READY
    assert len(decided) == 3


def test_unmatched_resolutions_are_not_reused() -> None:
    p, _, resolved = planner(routes(REGIONAL), [PERMIT], Resolution(None, "unknown", "no match"))
    for _ in range(3):
        p.plan({"Modality": ("CT",)}, "CT01", PATIENT)
    assert len(resolved) == 3
