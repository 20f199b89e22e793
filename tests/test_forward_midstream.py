"""A withdrawal in the middle of a stream: jobs already claimed by the forwarder (state
``sending``) are not sent, because consent is decided again immediately before each send.

The first instance is stored alone and the destination holds its C-STORE until the rest
of the series is stored, so that the forwarder's next claim takes every remaining job; it
holds the second C-STORE while the patient withdraws and the node applies the withdrawal.
Only the instances that were already on the wire may arrive.
"""

from __future__ import annotations

from pathlib import Path

from config.settings import PeerSettings, RouteSettings
from router.forwarder import DestinationWorker, new_owner
from router.models import JobState
from tests.conftest import (
    FAST_FORWARD,
    FAST_RETRY,
    ISSUER,
    MODALITY_AE,
    GatedScp,
    free_port,
    job_states,
    make_settings,
    prepare_runtime,
    seed_patient,
    seed_purpose,
    send_storescu,
    store_files,
    wait_until,
    with_routes,
)
from tests.corpus import make_small_series

PURPOSE = "alpha"


def test_withdrawal_stops_jobs_already_claimed(tmp_path: Path, db_url: str) -> None:
    from cli.node_process import NodeProcess

    series = make_small_series(tmp_path / "series", 8, patient_id="P-MID", seed=77)
    dest = GatedScp("MIDDEST", gates=2).start()
    settings = with_routes(
        make_settings(tmp_path / "data", db_url),
        [RouteSettings("regional", (), ("dest",), PURPOSE)],
        [PeerSettings("dest", dest.ae_title, "127.0.0.1", dest.port, frozenset({"echo"}))],
    )
    runtime = prepare_runtime(settings, FAST_RETRY)
    node: NodeProcess | None = None
    consent = dict(issuer=ISSUER, patient_id="P-MID", purpose=PURPOSE, channel="cli", actor="t")
    try:
        store = runtime.consent
        seed_purpose(store, PURPOSE)
        seed_patient(store, "P-MID")
        store.grant(**consent)
        node = NodeProcess(runtime, forwarder_options=FAST_FORWARD, sync_interval=0.1)
        host, port = node.start()
        # the first instance is stored alone and held at the destination while the rest
        # are stored: the forwarder's next claim takes all of them
        send_storescu(host, port, [series[0].path])
        assert dest.arrived[0].wait(15), "the forwarder never sent the first instance"
        send_storescu(host, port, [f.path for f in series[1:]])
        dest.release[0].set()
        assert dest.arrived[1].wait(15), "the forwarder never sent the second instance"
        claimed = [u for u, s in job_states(runtime).items() if s == JobState.SENDING.value]
        assert len(claimed) == len(series) - 1, "the rest are claimed in one batch"

        store.withdraw(**consent)
        # the node applies it: what is not claimed is dropped (claimed jobs stay sending)
        wait_until(
            lambda: JobState.READY.value not in job_states(runtime).values(),
            10,
            "the withdrawal to be applied",
        )
        dest.release[1].set()
        wait_until(
            lambda: JobState.SENDING.value not in job_states(runtime).values(),
            15,
            "the forwarder to finish its claimed jobs",
        )
        states = job_states(runtime)
        sent = dest.uids()
        # the first two were on the wire before the withdrawal; the six other claimed
        # jobs are decided again before their send, and dropped
        assert sent == [f.sop_instance_uid for f in series[:2]]
        assert {states.pop(uid) for uid in sent} == {JobState.DONE.value}
        assert set(states.values()) == {JobState.DROPPED.value}
        assert len(states) == len(series) - 2
    finally:
        dest.open_all()
        if node is not None:
            node.stop(grace=1.0)
        runtime.close()
        dest.stop()


def test_claimed_jobs_for_a_down_destination_are_dropped_once_consent_is_withdrawn(
    tmp_path: Path, db_url: str
) -> None:
    """The destination is down and the patient withdraws while the forwarder holds the
    jobs (so the node's reaction to the withdrawal found them ``sending`` and left them):
    the failed attempt drops them, instead of queueing them again until the destination
    answers."""
    series = make_small_series(tmp_path / "series", 4, patient_id="P-DOWN", seed=78)
    down = PeerSettings("dest", "DOWNDEST", "127.0.0.1", free_port(), frozenset({"echo"}))
    settings = with_routes(
        make_settings(tmp_path / "data", db_url),
        [RouteSettings("regional", (), ("dest",), PURPOSE)],
        [down],
    )
    runtime = prepare_runtime(settings, FAST_RETRY)
    consent = dict(issuer=ISSUER, patient_id="P-DOWN", purpose=PURPOSE, channel="cli", actor="t")
    forwarder: DestinationWorker | None = None
    try:
        seed_purpose(runtime.consent, PURPOSE)
        seed_patient(runtime.consent, "P-DOWN")
        runtime.consent.grant(**consent)
        store_files(runtime, series, MODALITY_AE, ISSUER)
        assert set(job_states(runtime).values()) == {JobState.READY.value}
        runtime.consent.withdraw(**consent)  # no consent sync runs: the jobs stay ready
        forwarder = DestinationWorker(
            settings.node,
            down,
            runtime.queue,
            runtime.files,
            runtime.consent.decide,
            FAST_FORWARD,
            new_owner(),
        )
        forwarder.start()
        wait_until(
            lambda: set(job_states(runtime).values()) == {JobState.DROPPED.value},
            10,
            "the withdrawn patient's jobs to be dropped at their failed attempt",
        )
        assert all(j.attempts == 0 for j in runtime.queue.list_jobs(destination="dest"))
    finally:
        if forwarder is not None:
            forwarder.stop()
            forwarder.join(10)
        runtime.close()
