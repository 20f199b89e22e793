"""End to end: consent decides what a real destination PACS (our own Orthanc) receives.

1. A node (in-process NodeProcess) routes CT/MR to the peer "regional" (Orthanc) under an
   opt-in purpose. Three patients send a study each through DCMTK storescu: the granted
   one's instances reach Orthanc, the refused one's are dropped, the never-asked one's are
   held; a grant recorded by the CLI in another process releases them within 10 s; a
   withdrawal (CLI) while a study is queued for a destination that is down drops it, and
   nothing of it arrives once the destination is back.
2. A real ``consentgate serve`` process queues 200 instances (plus a refused patient's)
   while the destination is down; Orthanc is started on the configured port; the node is
   killed with SIGKILL mid-forward and restarted: every permitted instance ends in Orthanc
   exactly once, nothing else does, and no job is left behind.

Both run on SQLite and PostgreSQL. Orthanc keeps a re-sent instance once (same SOP
Instance UID), so "exactly once" is checked as: the UID list has no duplicate, equals the
expected set, and CountInstances equals its size.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from click.testing import CliRunner

from cli.main import cli
from cli.node_process import NodeProcess
from config.settings import MatchCondition, PeerSettings, RouteSettings
from router.forwarder import ForwarderOptions
from router.models import JobState
from router.queue import RetryPolicy
from tests.conftest import (
    FAST_FORWARD,
    FAST_RETRY,
    ISSUER,
    OrthancServer,
    TunedServeProcess,
    consentgate_cli,
    free_port,
    job_states,
    make_settings,
    modality_peer,
    prepare_runtime,
    process_gone,
    seed_patient,
    seed_purpose,
    send_storescu,
    toml_routes,
    wait_until,
    with_routes,
    write_config,
)
from tests.corpus import make_small_series

PURPOSE = "regional-sharing"


def _uids(files: list) -> set[str]:
    return {f.sop_instance_uid for f in files}


def _orthanc_holds(orthanc: OrthancServer, expected: set[str]) -> None:
    """Orthanc holds exactly ``expected``, each instance once."""
    uids = orthanc.sop_instance_uids()
    duplicates = [uid for uid, n in Counter(uids).items() if n > 1]
    assert not duplicates, f"Orthanc holds duplicates: {duplicates}"
    assert set(uids) == expected, (
        f"{len(set(uids) - expected)} unexpected, {len(expected - set(uids))} missing"
    )
    assert orthanc.count() == len(expected)


def test_consent_decides_what_reaches_orthanc(tmp_path: Path, db_url: str) -> None:
    granted = make_small_series(tmp_path / "g1", 4, patient_id="P-GRANTED", seed=1)
    refused = make_small_series(tmp_path / "r1", 4, patient_id="P-REFUSED", seed=2)
    never = make_small_series(tmp_path / "n1", 4, patient_id="P-NEVER", seed=3)
    granted_2 = make_small_series(tmp_path / "g2", 4, patient_id="P-GRANTED", seed=4)
    never_2 = make_small_series(tmp_path / "n2", 3, patient_id="P-NEVER", seed=5)
    assert granted[0].study_uid != granted_2[0].study_uid

    orthanc = OrthancServer(tmp_path / "orthanc")
    data_dir = tmp_path / "data"
    regional = PeerSettings(
        "regional", orthanc.ae_title, "127.0.0.1", orthanc.dicom_port, frozenset({"echo"})
    )
    route = RouteSettings(
        "imaging-to-regional",
        (MatchCondition("Modality", "one_of", ("CT", "MR")),),
        ("regional",),
        PURPOSE,
    )
    settings = with_routes(make_settings(data_dir, db_url), [route], [regional])
    # the configuration hospital IT's CLI uses: same database
    config = write_config(
        tmp_path / "cg.toml", data_dir, db_url, dicom_port=free_port(), http_port=free_port()
    )
    runtime = prepare_runtime(settings, FAST_RETRY)
    seed_purpose(runtime.consent, PURPOSE)
    for pid in ("P-GRANTED", "P-REFUSED", "P-NEVER"):
        seed_patient(runtime.consent, pid)
    runtime.consent.grant(
        issuer=ISSUER, patient_id="P-GRANTED", purpose=PURPOSE, channel="desk", actor="t"
    )
    runtime.consent.refuse(
        issuer=ISSUER, patient_id="P-REFUSED", purpose=PURPOSE, channel="desk", actor="t"
    )
    node = NodeProcess(runtime, forwarder_options=FAST_FORWARD, sync_interval=0.2)
    try:
        orthanc.start()
        host, port = node.start()

        # 1. three patients, one study each, from the modality
        send_storescu(host, port, [f.path for f in granted + refused + never])
        states = wait_until(
            lambda: (
                (s := job_states(runtime))
                and all(s[u] == JobState.DONE for u in _uids(granted))
                and s
            ),
            15,
            "the granted patient's jobs to be done",
        )
        assert {states[u] for u in _uids(refused)} == {JobState.DROPPED}
        assert {states[u] for u in _uids(never)} == {JobState.HELD}
        _orthanc_holds(orthanc, _uids(granted))

        # 2. hospital IT grants the never-asked patient with the CLI (another process)
        result = consentgate_cli(
            config,
            "consent",
            "grant",
            "--issuer",
            ISSUER,
            "--patient-id",
            "P-NEVER",
            "--purpose",
            PURPOSE,
            "--by",
            "it-desk",
        )
        assert result.returncode == 0, result.stderr
        assert "now permit" in result.stdout
        wait_until(
            lambda: _uids(never) <= set(orthanc.sop_instance_uids()),
            10,
            "the newly granted patient's study in Orthanc",
        )
        _orthanc_holds(orthanc, _uids(granted + never))

        # 3. a second study of the granted patient queues while Orthanc is down ...
        orthanc.stop()
        send_storescu(host, port, [f.path for f in granted_2])
        wait_until(
            lambda: (
                all(
                    j.attempts >= 1
                    for j in runtime.queue.list_jobs(destination="regional", limit=1000)
                    if j.state in (JobState.READY, JobState.SENDING)
                )
                and {job_states(runtime)[u] for u in _uids(granted_2)}
                <= {JobState.READY, JobState.SENDING}
            ),
            10,
            "the queued study to fail at least one attempt",
        )
        # ... the patient withdraws: nothing not yet sent may leave
        result = consentgate_cli(
            config,
            "consent",
            "withdraw",
            "--issuer",
            ISSUER,
            "--patient-id",
            "P-GRANTED",
            "--purpose",
            PURPOSE,
            "--by",
            "it-desk",
        )
        assert result.returncode == 0, result.stderr
        wait_until(
            lambda: {job_states(runtime)[u] for u in _uids(granted_2)} == {JobState.DROPPED},
            10,
            "the withdrawn patient's pending jobs to be dropped",
        )
        orthanc.start()
        # the path works again: a further study of a permitted patient arrives ...
        send_storescu(host, port, [f.path for f in never_2])
        wait_until(
            lambda: {job_states(runtime)[u] for u in _uids(never_2)} == {JobState.DONE},
            15,
            "a permitted study delivered after the destination came back",
        )
        # ... the jobs it queued behind are done, and the withdrawn study never came
        states = job_states(runtime)
        assert {states[u] for u in _uids(granted_2)} == {JobState.DROPPED}
        assert not [
            (j.id, j.state, j.last_error)
            for j in runtime.queue.list_jobs(limit=1000)
            if j.state in (JobState.READY, JobState.SENDING, JobState.FAILED)
        ]
        _orthanc_holds(orthanc, _uids(granted + never + never_2))
        # what was sent before the withdrawal stays sent (it cannot be recalled)
        assert {states[u] for u in _uids(granted)} == {JobState.DONE}
    finally:
        try:
            node.stop(grace=2.0)
            runtime.close()
        finally:
            orthanc.kill()


# -- destination down, then kill -9 mid-forward --------------------------------------------

QUEUED = 200
KILL_AT = 40


def test_destination_down_then_kill_9_mid_forward(tmp_path: Path, db_url: str) -> None:
    granted = make_small_series(tmp_path / "g", QUEUED, patient_id="P-GRANTED", seed=11)
    refused = make_small_series(tmp_path / "r", 10, patient_id="P-REFUSED", seed=12)
    orthanc = OrthancServer(tmp_path / "orthanc")  # ports chosen; not started yet
    data_dir = tmp_path / "data"
    dicom_port, http_port = free_port(), free_port()
    peers = [
        modality_peer(issuer=ISSUER),
        {
            "name": "regional",
            "ae_title": orthanc.ae_title,
            "host": "127.0.0.1",
            "port": orthanc.dicom_port,
            "services": ["echo"],
        },
    ]
    config = write_config(
        tmp_path / "cg.toml",
        data_dir,
        db_url,
        dicom_port=dicom_port,
        http_port=http_port,
        peers=peers,
    )
    with config.open("a", encoding="utf-8") as fh:
        fh.write(toml_routes([{"name": "all", "destinations": ["regional"], "purpose": PURPOSE}]))
    notice = tmp_path / "notice.txt"
    notice.write_text("Your images are shared with the regional archive.\n", encoding="utf-8")
    runner = CliRunner()
    for args in (
        ["init"],
        ["purpose", "add", PURPOSE, "--name", "Regional sharing", "--notice", str(notice)],
        *(
            [
                "patient",
                "add",
                "--issuer",
                ISSUER,
                "--patient-id",
                pid,
                "--birth-name",
                "TEST",
                "--first-name",
                "TEST",
                "--birth-date",
                "1970-01-01",
                "--sex",
                "U",
            ]
            for pid in ("P-GRANTED", "P-REFUSED")
        ),
        ["consent", "grant", "--issuer", ISSUER, "--patient-id", "P-GRANTED", "--purpose", PURPOSE],
        [
            "consent",
            "refuse",
            "--issuer",
            ISSUER,
            "--patient-id",
            "P-REFUSED",
            "--purpose",
            PURPOSE,
        ],
    ):
        by = [] if args == ["init"] else ["--by", "test"]
        result = runner.invoke(cli, ["--config", str(config), *args, *by])
        assert result.exit_code == 0, (args, result.output)

    # no configuration key tunes the retry policy or the lease: a fast one is injected
    policy = RetryPolicy(max_attempts=1000, base_delay=0.2, max_delay=1.0, lease_seconds=2.0)
    options = ForwarderOptions(batch_size=32, poll_interval=0.1, idle_release=1.0)
    logs = tmp_path / "serve.log"
    first = TunedServeProcess(config, http_port, logs, policy, options)
    second = TunedServeProcess(config, http_port, logs, policy, options)
    try:
        first.start()
        # 1. everything is received and queued while the destination is down
        send_storescu("127.0.0.1", dicom_port, [f.path for f in granted + refused])
        db_runtime = prepare_runtime(make_settings(tmp_path / "unused", db_url))
        try:
            states = job_states(db_runtime)
            assert {states[u] for u in _uids(refused)} == {JobState.DROPPED}
            assert {states[u] for u in _uids(granted)} <= {JobState.READY, JobState.SENDING}
            wait_until(
                lambda: any(j.attempts for j in db_runtime.queue.list_jobs(limit=QUEUED)),
                10,
                "a failed attempt while the destination is down",
            )
            # 2. the destination comes back on the configured port; kill -9 mid-forward
            orthanc.start()
            at_kill = wait_until(
                lambda: (n := orthanc.count()) >= KILL_AT and n, 30, "forwarding to start", 0.01
            )
            forwarder_processes = first.children()
            assert len(forwarder_processes) == 1, "the forwarders run in their own process"
            first.kill()
            # the forwarder process does not outlive its node: it ends its current send,
            # puts its claimed jobs back and exits
            wait_until(
                lambda: all(process_gone(p) for p in forwarder_processes),
                20,
                "the killed node's forwarder process to exit",
            )
            after_kill = orthanc.count()
            assert at_kill < QUEUED and after_kill < QUEUED, "forwarding ended before the kill"
            states = job_states(db_runtime)
            assert sum(s == JobState.DONE for s in states.values()) < QUEUED

            # 3. restart: the rest is delivered, claimed leases included, once each
            second.start()
            wait_until(
                lambda: (
                    orthanc.count() >= QUEUED
                    and all(job_states(db_runtime)[u] == JobState.DONE for u in _uids(granted))
                ),
                60,
                "every permitted instance delivered after the restart",
                0.2,
            )
            # nothing else can arrive: no job is open any more
            states = job_states(db_runtime)
            assert Counter(states.values()) == {JobState.DONE: QUEUED, JobState.DROPPED: 10}
            _orthanc_holds(orthanc, _uids(granted))
        finally:
            db_runtime.close()
    finally:
        first.kill()
        second.kill()
        orthanc.kill()
