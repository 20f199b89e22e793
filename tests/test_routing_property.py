"""Property: whatever the patients, routes and consent changes, each destination receives
exactly the instances consent permits, each once, and nothing more.

Hypothesis draws, per example:

- which of five patients the consent store knows (registered, unknown, or registered with
  a contradicting birth date: a "mismatch");
- one to three routes: a match condition (none, Modality, PatientID glob/regex,
  calling_ae), one to three destinations (in-process pynetdicom storage SCPs), and a
  purpose: none, "alpha" (opt-in) or "beta" (opt-out);
- a sequence of steps: send an instance (DCMTK-free: a pynetdicom SCU, as the modality)
  or record a consent decision (grant, refuse, withdraw) between the sends.

A fresh node (NodeProcess: forwarders, in their own process, and consent
synchronisation) runs each example on a fresh database, SQLite and PostgreSQL. After
every step the test waits until the queue is quiet (nothing ready or being sent, no held
job whose consent has been decided), so the expected outcome is exact:

- a route without purpose delivers everything it matches;
- with a purpose, an unknown or mismatching patient's instances are held (never sent);
  otherwise the decision at arrival sends (permit), drops (deny) or holds (undecided) the
  instance, and a later decision sends (permit) or drops (deny) what is held;
- when several routes send to one destination, one job is made and a route with a
  purpose wins over one without (at most one purpose per destination is drawn).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pynetdicom import AE

from cli.database import make_engine, upgrade
from cli.node_process import NodeProcess
from config.settings import MatchCondition, PeerSettings, RouteSettings
from consent.decision import Outcome
from router.models import HoldReason, JobState
from tests.conftest import (
    FAST_FORWARD,
    FAST_RETRY,
    ISSUER,
    MODALITY_AE,
    PG_ADMIN_DSN,
    RecordingScp,
    make_settings,
    prepare_runtime,
    seed_purpose,
    wait_until,
    with_routes,
)
from tests.corpus import make_small_series
from tests.scu_support import associate

PATIENTS = [f"P-{n}" for n in range(5)]
DESTINATIONS = ["dest0", "dest1", "dest2"]
PURPOSES = {"alpha": "opt-in", "beta": "opt-out"}
CONDITIONS: list[tuple[MatchCondition, ...]] = [
    (),
    (MatchCondition("Modality", "equals", ("CT",)),),
    (MatchCondition("Modality", "one_of", ("MR", "OT")),),
    (MatchCondition("PatientID", "glob", ("P-[02]",)),),
    (MatchCondition("PatientID", "regex", ("[13]$",)),),
    (MatchCondition("calling_ae", "equals", (MODALITY_AE,)),),
    (MatchCondition("calling_ae", "equals", ("ELSEWHERE",)),),
    (
        MatchCondition("Modality", "equals", ("CT",)),
        MatchCondition("PatientID", "glob", ("P-[1-3]",)),
    ),
]


@dataclass(frozen=True)
class Item:
    """One instance of the pool: (patient, Modality, SOP Instance UID, file)."""

    patient: str
    modality: str
    uid: str
    path: Path


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> list[Item]:
    """Per patient: a CT instance and an MR instance (same header otherwise)."""
    base = tmp_path_factory.mktemp("pool")
    items = []
    for n, pid in enumerate(PATIENTS):
        files = make_small_series(base / pid, 2, patient_id=pid, seed=100 + n)
        ds = dcmread(files[1].path)
        ds.Modality = "MR"
        ds.save_as(files[1].path, enforce_file_format=True)
        items.append(Item(pid, "CT", files[0].sop_instance_uid, files[0].path))
        items.append(Item(pid, "MR", files[1].sop_instance_uid, files[1].path))
    return items


class FreshDatabases:
    """A migrated template database, copied for each example: a SQLite file, or a
    PostgreSQL database (``CREATE DATABASE ... TEMPLATE``)."""

    def __init__(self, backend: str, directory: Path) -> None:
        self.backend = backend
        self._template_file = directory / "template.db"
        self._template_name = f"cg_prop_tmpl_{uuid.uuid4().hex[:10]}"
        if backend == "sqlite":
            url = f"sqlite:///{self._template_file}"
        else:
            self._admin(f'CREATE DATABASE "{self._template_name}"')
            url = self._pg_url(self._template_name)
        engine = make_engine(url)
        try:
            upgrade(engine)
        finally:
            engine.dispose()

    @staticmethod
    def _admin(sql: str) -> None:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(sql)

    @staticmethod
    def _pg_url(name: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"

    def create(self, work: Path) -> str:
        """A fresh copy of the template; returns its URL."""
        if self.backend == "sqlite":
            shutil.copy(self._template_file, work / "index.db")
            return f"sqlite:///{work / 'index.db'}"
        name = f"cg_prop_{uuid.uuid4().hex[:12]}"
        self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{self._template_name}"')
        return self._pg_url(name)

    def drop(self, url: str) -> None:
        if self.backend == "postgres":
            name = url.rsplit("/", 1)[1]
            self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        if self.backend == "postgres":
            self._admin(f'DROP DATABASE IF EXISTS "{self._template_name}" WITH (FORCE)')


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def databases(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FreshDatabases]:
    """Fresh databases for the examples, on SQLite and on PostgreSQL."""
    fresh = FreshDatabases(str(request.param), tmp_path_factory.mktemp("template"))
    try:
        yield fresh
    finally:
        fresh.close()


@pytest.fixture(scope="module")
def destinations() -> Iterator[dict[str, RecordingScp]]:
    scps = {name: RecordingScp(f"DEST{n}").start() for n, name in enumerate(DESTINATIONS)}
    try:
        yield scps
    finally:
        for scp in scps.values():
            scp.stop()


# -- strategies ----------------------------------------------------------------------------


routes_strategy = st.lists(
    st.tuples(
        st.integers(0, len(CONDITIONS) - 1),
        st.sets(st.sampled_from(DESTINATIONS), min_size=1, max_size=3),
        st.sampled_from(["", "alpha", "beta"]),
    ),
    min_size=1,
    max_size=3,
)
step_strategy = st.one_of(
    st.tuples(st.just("send"), st.integers(0, 2 * len(PATIENTS) - 1)),
    st.tuples(
        st.just("consent"),
        st.sampled_from(PATIENTS),
        st.sampled_from(sorted(PURPOSES)),
        st.sampled_from(["grant", "refuse", "withdraw"]),
    ),
)


# -- the model -----------------------------------------------------------------------------


def _holds(cond: MatchCondition, item: Item) -> bool:
    value = {"Modality": item.modality, "PatientID": item.patient, "calling_ae": MODALITY_AE}[
        cond.keyword
    ]
    if cond.operator == "equals":
        return value == cond.values[0]
    if cond.operator == "one_of":
        return value in cond.values
    if cond.operator == "glob":
        return fnmatchcase(value, cond.values[0])
    return re.search(cond.values[0], value) is not None


def _targets(routes: list[RouteSettings], item: Item) -> dict[str, str]:
    """destination -> purpose required, for the routes matching ``item``."""
    targets: dict[str, str] = {}
    for route in routes:
        if all(_holds(c, item) for c in route.match):
            for dest in route.destinations:
                targets[dest] = targets.get(dest) or route.purpose
    return targets


class Model:
    """What each destination must have received."""

    def __init__(self, identity: dict[str, str]) -> None:
        self.identity = identity  # patient -> registered | unknown | mismatch
        self.decision: dict[tuple[str, str], str] = {}  # (patient, purpose) -> permit/deny
        self.pending: dict[tuple[str, str], list[tuple[str, str]]] = {}
        self.delivered: dict[str, list[str]] = {d: [] for d in DESTINATIONS}

    def outcome(self, patient: str, purpose: str) -> str:
        stored = self.decision.get((patient, purpose))
        if stored is not None:
            return stored
        return "permit" if PURPOSES[purpose] == "opt-out" else "undecided"

    def send(self, item: Item, targets: dict[str, str]) -> None:
        for dest, purpose in targets.items():
            if not purpose:
                self.delivered[dest].append(item.uid)
            elif self.identity[item.patient] != "registered":
                pass  # held for reconciliation, whatever the consent
            elif (outcome := self.outcome(item.patient, purpose)) == "permit":
                self.delivered[dest].append(item.uid)
            elif outcome == "undecided":
                self.pending.setdefault((item.patient, purpose), []).append((dest, item.uid))

    def consent(self, patient: str, purpose: str, decision: str) -> None:
        self.decision[(patient, purpose)] = decision
        held = self.pending.pop((patient, purpose), [])
        if decision == "permit":
            for dest, uid in held:
                self.delivered[dest].append(uid)


# -- the property ---------------------------------------------------------------------------


def _quiet(runtime: Any) -> bool:
    """Nothing ready or being sent, and every job held for consent still undecided."""
    for job in runtime.queue.list_jobs(limit=10_000):
        if job.state in (JobState.READY, JobState.SENDING, JobState.FAILED):
            return False
        if (
            job.state == JobState.HELD
            and job.hold_reason == HoldReason.CONSENT
            and runtime.consent.decide(job.patient_pk, job.purpose).outcome is not Outcome.UNDECIDED
        ):
            return False
    return True


def _send(host: str, port: int, item: Item) -> None:
    ae = AE(ae_title=MODALITY_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = associate(ae, host, port, ae_title="CONSENTGATE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(item.path)
        assert status and status.Status == 0x0000
    finally:
        assoc.release()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    identity=st.fixed_dictionaries(
        {p: st.sampled_from(["registered", "registered", "unknown", "mismatch"]) for p in PATIENTS}
    ),
    drawn_routes=routes_strategy,
    steps=st.lists(step_strategy, min_size=1, max_size=10),
)
def test_destinations_receive_exactly_the_permitted_instances(
    pool: list[Item],
    databases: FreshDatabases,
    destinations: dict[str, RecordingScp],
    identity: dict[str, str],
    drawn_routes: list[tuple[int, set[str], str]],
    steps: list[tuple[Any, ...]],
) -> None:
    routes = [
        RouteSettings(f"route{n}", CONDITIONS[c], tuple(sorted(dests)), purpose)
        for n, (c, dests, purpose) in enumerate(drawn_routes)
    ]
    for dest in DESTINATIONS:  # one purpose per destination at most (see the docstring)
        assume(len({r.purpose for r in routes if dest in r.destinations} - {""}) <= 1)
    for scp in destinations.values():
        scp.clear()

    work = Path(tempfile.mkdtemp(prefix="cg-prop-"))
    db_url = databases.create(work)
    peers = [
        PeerSettings(name, scp.ae_title, "127.0.0.1", scp.port, frozenset({"echo"}))
        for name, scp in destinations.items()
    ]
    settings_ = with_routes(make_settings(work / "data", db_url), routes, peers)
    runtime = prepare_runtime(settings_, FAST_RETRY)
    node: NodeProcess | None = None
    model = Model(identity)
    sent: set[int] = set()
    try:
        store = runtime.consent
        for code, purpose_model in PURPOSES.items():
            seed_purpose(store, code, purpose_model)
        for patient, kind in identity.items():
            if kind != "unknown":
                store.add_patient(
                    issuer=ISSUER,
                    patient_id=patient,
                    birth_name="PROPERTY",
                    first_name="TEST",
                    birth_date=date(1970, 1, 1) if kind == "registered" else date(1981, 2, 3),
                    sex="U",
                    actor="test",
                )
        node = NodeProcess(runtime, forwarder_options=FAST_FORWARD, sync_interval=0.1)
        host, port = node.start()
        for step in steps:
            if step[0] == "send":
                if step[1] in sent:
                    continue
                sent.add(step[1])
                item = pool[step[1]]
                _send(host, port, item)
                model.send(item, _targets(routes, item))
            else:
                _, patient, purpose, action = step
                if identity[patient] == "unknown":
                    continue
                kwargs = dict(
                    issuer=ISSUER, patient_id=patient, purpose=purpose, channel="cli", actor="t"
                )
                if action == "grant":
                    store.grant(**kwargs)
                    model.consent(patient, purpose, "permit")
                elif action == "refuse":
                    store.refuse(**kwargs)
                    model.consent(patient, purpose, "deny")
                elif model.outcome(patient, purpose) == "permit":
                    store.withdraw(**kwargs)
                    model.consent(patient, purpose, "deny")
                else:
                    continue  # nothing to withdraw
            wait_until(lambda: _quiet(runtime), 15, f"the queue to settle after {step}", 0.02)
        for name, scp in destinations.items():
            received = scp.uids()
            assert Counter(received) == Counter(model.delivered[name]), (
                f"{name}: unexpected {sorted(set(received) - set(model.delivered[name]))}, "
                f"missing {sorted(set(model.delivered[name]) - set(received))}, "
                f"duplicates {[u for u, n in Counter(received).items() if n > 1]}"
            )
    finally:
        if node is not None:
            node.stop(grace=1.0)
        runtime.close()
        databases.drop(db_url)
        shutil.rmtree(work, ignore_errors=True)
