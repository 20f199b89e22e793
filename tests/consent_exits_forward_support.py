"""Helpers of tests/test_consent_exits_forward.py: a node with purpose-bound and care-team
destinations, forwarders started on demand, and consent shortcuts."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from config.settings import MatchCondition, PeerSettings, RouteSettings, Settings
from router.forwarder import ForwarderOptions, ForwarderPool
from tests.conftest import (
    ISSUER,
    MODALITY_AE,
    RecordingScp,
    RunningNode,
    make_settings,
    start_node,
    wait_until,
)

FAST = ForwarderOptions(batch_size=8, poll_interval=0.1, idle_release=1.0, batch_linger=0.01)


def dest_peer(name: str, scp: RecordingScp, purpose: str = "") -> PeerSettings:
    return PeerSettings(
        name, scp.ae_title, "127.0.0.1", scp.port, frozenset({"echo"}), purpose=purpose
    )


def route(name: str, dest: str, purpose: str = "") -> RouteSettings:
    return RouteSettings(
        name,
        (MatchCondition("calling_ae", "equals", (MODALITY_AE,)),),
        (dest,),
        purpose=purpose,
    )


def settings_with(
    tmp_path: Path,
    db_url: str,
    peers: tuple[PeerSettings, ...],
    routes: tuple[RouteSettings, ...],
    retention: str = "keep",
) -> Settings:
    settings = make_settings(tmp_path / "data", db_url)
    return replace(
        settings,
        peers=(*settings.peers, *peers),
        routes=routes,
        router=replace(settings.router, retention=retention),
    )


@contextmanager
def running(settings: Settings) -> Iterator[RunningNode]:
    node = start_node(settings)
    try:
        yield node
    finally:
        node.stop()
        node.runtime.close()


@contextmanager
def forwarding(node: RunningNode, settings: Settings | None = None) -> Iterator[ForwarderPool]:
    pool = ForwarderPool(
        settings or node.settings,
        node.runtime.queue,
        node.runtime.files,
        node.runtime.consent.decide,
        FAST,
    )
    node.runtime.wakeups.subscribe(pool.wake)
    pool.start()
    try:
        yield pool
    finally:
        pool.stop()


def record(node: RunningNode, action: str, pid: str, purpose: str, issuer: str = ISSUER) -> int:
    method = getattr(node.runtime.consent, action)
    return int(method(issuer=issuer, patient_id=pid, purpose=purpose, channel="cli", actor="test"))


def settle(predicate: object, timeout: float = 3.0) -> bool:
    """Whether ``predicate`` became true within ``timeout`` (no failure when it did not)."""
    try:
        wait_until(predicate, timeout, "settle")
    except AssertionError:
        return False
    return True
