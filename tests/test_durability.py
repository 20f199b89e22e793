"""Durability: acknowledged instances through crashes, restarts and shared queues.

An instance the node acknowledged is neither lost nor overwritten by a journal replay
after a ``kill -9``; an instance retention deleted does not come back; a forward job is
delivered by the node whose archive has its file when several nodes share one queue.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
from pathlib import Path

from click.testing import CliRunner

from cli.main import cli
from cli.runtime import Ingest, build_runtime
from config.settings import load_settings
from dicom_node.archive.files import InstanceFiles
from tests.conftest import (
    ISSUER,
    MODALITY_AE,
    RecordingScp,
    ServeProcess,
    dataset_bytes,
    free_port,
    indexed_instances,
    modality_peer,
    prepare_runtime,
    send_storescu,
    serve_setup,
    store_files,
    wait_until,
    write_config,
)
from tests.corpus import make_small_series
from tests.durability_support import (
    FAST_ROUTER,
    delete_instance_rows,
    job_detail,
    job_rows,
    patient_add_args,
    rewritten_copy,
    router_table,
    segment_header_seq,
    store_then_kill_9,
)

PURPOSE = "regional-sharing"


def _journal_config(tmp_path: Path, db_url: str) -> Path:
    config = write_config(
        tmp_path / "cg.toml",
        tmp_path / "data",
        db_url,
        dicom_port=free_port(),
        http_port=free_port(),
        peers=[modality_peer(issuer=ISSUER)],
        journal_segment_mb=1,
    )
    prepare_runtime(load_settings(config)).close()
    return config


# -- journal segments reused after a clean restart ------------------------------------------


def test_a_reused_free_segment_does_not_replay_records_of_an_earlier_run(
    tmp_path: Path, db_url: str
) -> None:
    """A recycled free segment's records from an earlier run are never replayed.

    Journal segment sequences keep growing across runs, so the old records left in a
    reused segment (only its header is rewritten) do not pass as the new run's. Here X
    is stored, the node stops cleanly, X is deleted, sent again with other bytes and
    acknowledged, then ``kill -9``: the replay keeps the second version's bytes. Replaying
    the old record would overwrite an acknowledged instance with stale bytes.
    """
    config = _journal_config(tmp_path, db_url)
    data_dir = tmp_path / "data"
    series = make_small_series(tmp_path / "series", 3, patient_id="P-REUSE", seed=31)
    first, x, last = series
    x2 = dataclasses.replace(x, path=rewritten_copy(x, tmp_path / "v2"))
    assert dataset_bytes(x2.path) != dataset_bytes(x.path)

    # run 1: three instances stored, clean stop (every segment retired, nothing live)
    runtime = build_runtime(load_settings(config))
    ingest = Ingest(runtime)
    try:
        ingest.start()
        store_files(runtime, [first, x, last], MODALITY_AE)
    finally:
        ingest.stop()
        runtime.close()
    journal = data_dir / "journal"
    assert not list(journal.glob("seg-*.jnl"))
    # retention deletes X (index rows, then the file)
    relative = InstanceFiles.relative_path_for(x.sop_instance_uid)
    delete_instance_rows(db_url, x.sop_instance_uid)
    (data_dir / "archive" / relative).unlink()
    # the old seg-1 is the free file taken first (one of the two equally likely orders)
    (old,) = [p for p in journal.glob("free-*.jnl") if segment_header_seq(p) == 1]
    old.rename(journal / "free-000000000000.jnl")

    # run 2: X sent again with new bytes, acknowledged, then kill -9
    store_then_kill_9(config, [x2], MODALITY_AE)

    runtime = build_runtime(load_settings(config))
    ingest = Ingest(runtime)
    try:
        ingest.start()
        report = ingest.replay
        assert report is not None
        indexed = indexed_instances(db_url)
        assert indexed[x.sop_instance_uid] == relative
        intact = dataset_bytes(data_dir / "archive" / relative) == dataset_bytes(x2.path)
        assert intact, (
            "the acknowledged second version of X was overwritten by the first version's "
            f"record from the earlier run (replay saw {report.records} records, 1 written)"
        )
    finally:
        ingest.stop()
        runtime.close()


# -- retention, then kill -9 ----------------------------------------------------------------


def test_kill_9_after_retention_does_not_bring_deleted_instances_back(
    tmp_path: Path, db_url: str
) -> None:
    """Instances retention deleted stay deleted through a ``kill -9`` and a replay.

    Retention records each deletion in the ingest journal before deleting, so the replay
    does not take the instances' still-live records for commits a crash lost. Without it
    a refused patient's instances would be back in the archive and the index, visible to
    the care team's queries, and their jobs queued again.
    """
    pacs, regional = RecordingScp("PACS").start(), RecordingScp("REGIONAL").start()
    peers = [
        modality_peer(issuer=ISSUER),
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port},
        {"name": "regional", "ae_title": "REGIONAL", "host": "127.0.0.1", "port": regional.port},
    ]
    routes = [
        {"name": "care-team", "destinations": ["pacs"]},
        {"name": "regional", "destinations": ["regional"], "purpose": PURPOSE},
    ]
    config, dicom_port, http_port = serve_setup(tmp_path, db_url, routes=routes, peers=peers)
    with config.open("a", encoding="utf-8") as fh:
        fh.write(router_table(retention="delete-unneeded", **FAST_ROUTER))
    notice = tmp_path / "notice.txt"
    notice.write_text("Shared with the regional archive.\n", encoding="utf-8")
    runner = CliRunner()
    for args in (
        ["purpose", "add", PURPOSE, "--name", "Regional", "--notice", str(notice)],
        patient_add_args("P-RETAIN", ISSUER),
    ):
        result = runner.invoke(cli, ["--config", str(config), *args, "--by", "test"])
        assert result.exit_code == 0, (args, result.output)
    series = make_small_series(tmp_path / "series", 4, patient_id="P-RETAIN", seed=41)
    uids = {f.sop_instance_uid for f in series}
    first = ServeProcess(config, http_port, tmp_path / "serve1.log")
    second = ServeProcess(config, http_port, tmp_path / "serve2.log")
    try:
        first.start()
        send_storescu("127.0.0.1", dicom_port, [f.path for f in series])
        # the care team's PACS has them; the regional jobs wait for a decision
        wait_until(
            lambda: (
                {(d, s) for _, d, s, _ in job_rows(db_url)}
                == {("pacs", "done"), ("regional", "held")}
            ),
            30,
            "care-team jobs done, regional jobs held",
        )
        refuse = ["consent", "refuse", "--issuer", ISSUER, "--patient-id", "P-RETAIN"]
        result = runner.invoke(
            cli, ["--config", str(config), *refuse, "--purpose", PURPOSE, "--by", "test"]
        )
        assert result.exit_code == 0, result.output
        wait_until(
            lambda: not uids & set(indexed_instances(db_url)), 30, "retention to delete them"
        )
        archive = tmp_path / "data" / "archive"
        assert not [p for p in archive.rglob("*.dcm")], "retention removed the files"
        first.kill()  # kill -9, minutes or days after the deletion in real life

        second.start()  # replays the journal before it is ready
        back = uids & set(indexed_instances(db_url))
        files_back = [p for p in archive.rglob("*.dcm")]
        assert not back and not files_back, (
            f"{len(back)} instance(s) deleted by retention were indexed again by the "
            f"journal replay ({len(files_back)} file(s) back on disk)"
        )
    finally:
        first.kill()
        second.kill()
        pacs.stop()
        regional.stop()


# -- several nodes sharing one database (README: "several nodes can share one queue") -------


def _node_config(
    directory: Path, db_url: str, dest: RecordingScp, **router: object
) -> tuple[Path, int, int]:
    directory.mkdir()
    peers = [
        modality_peer(issuer=ISSUER),
        {"name": "dest", "ae_title": dest.ae_title, "host": "127.0.0.1", "port": dest.port},
    ]
    routes = [{"name": "care-team", "destinations": ["dest"]}]
    config, dicom_port, http_port = serve_setup(directory, db_url, routes=routes, peers=peers)
    with config.open("a", encoding="utf-8") as fh:
        fh.write(router_table(**{**FAST_ROUTER, **router}))
    return config, dicom_port, http_port


def test_a_node_sharing_the_queue_does_not_dead_letter_jobs_whose_file_it_lacks(
    tmp_path: Path, db_url: str
) -> None:
    """A node sharing the queue leaves alone the jobs whose file is in another archive.

    Each forward job records the archive (``<data_dir>/node-id``) holding its file, and
    only a node with that archive claims it. Here node A receives an instance while the
    destination is down and stops for a moment; node B, running, does not use up the
    job's attempts, and the instance is delivered once A is back. Otherwise an
    acknowledged instance would be dead-lettered and never delivered.
    """
    dest = RecordingScp("DEST")  # port chosen, not listening yet: the destination is down
    router = {"max_attempts": 4, "retry_base_delay": 1.0, "retry_max_delay": 1.0}
    config_a, port_a, http_a = _node_config(tmp_path / "a", db_url, dest, **router)
    # node B runs its forwarders as threads so that a job it wrongly claimed would fail
    # fast (a forwarder process first waits 10 s for the file)
    config_b, _, http_b = _node_config(tmp_path / "b", db_url, dest, forwarders="thread", **router)
    (instance,) = make_small_series(tmp_path / "series", 1, patient_id="P-NODES", seed=51)
    uid = instance.sop_instance_uid
    node_a = ServeProcess(config_a, http_a, tmp_path / "a.log")
    node_a_again = ServeProcess(config_a, http_a, tmp_path / "a2.log")
    node_b = ServeProcess(config_b, http_b, tmp_path / "b.log")
    try:
        node_a.start()
        send_storescu("127.0.0.1", port_a, [instance.path])
        wait_until(
            lambda: any(a >= 1 for _, _, a, _ in job_detail(db_url, uid)),
            15,
            "node A's first attempt while the destination is down",
        )
        node_a.signal(signal.SIGTERM)
        assert node_a.wait(30) == 0
        ((_, state, attempts, _),) = job_detail(db_url, uid)
        assert state == "ready" and attempts < 4, (state, attempts)

        dest.start()
        node_b.start()
        # bounded: B either leaves A's job alone, or uses up its attempts
        with contextlib.suppress(AssertionError):
            wait_until(lambda: job_detail(db_url, uid)[0][1] == "failed", 20, "B to dead-letter it")
        node_a_again.start()
        with contextlib.suppress(AssertionError):
            wait_until(lambda: uid in dest.uids(), 20, "the instance delivered")
        assert uid in dest.uids(), (
            "the instance node A acknowledged was never delivered; its job: "
            f"{job_detail(db_url, uid)}"
        )
    finally:
        node_a.kill()
        node_a_again.kill()
        node_b.kill()
        dest.stop()


# -- duplicates across a kill -9 ---------------------------------------------------------


def test_a_duplicate_with_other_bytes_after_kill_9_keeps_the_first_copy(
    tmp_path: Path, db_url: str
) -> None:
    """``on_duplicate = "keep"`` across a ``kill -9`` and a replay: the second version of
    a SOP Instance UID sent after the restart is acknowledged and discarded; the archive
    file stays byte-identical to the first, acknowledged one, and the care-team
    destination receives it once: a replay or a resend never replaces what was
    acknowledged and delivered."""
    dest = RecordingScp("DEST").start()
    config, dicom_port, http_port = _node_config(tmp_path / "n", db_url, dest)
    series = make_small_series(tmp_path / "series", 3, patient_id="P-DUP", seed=61)
    x = series[1]
    x2 = rewritten_copy(x, tmp_path / "v2")
    first = ServeProcess(config, http_port, tmp_path / "first.log")
    second = ServeProcess(config, http_port, tmp_path / "second.log")
    try:
        first.start()
        send_storescu("127.0.0.1", dicom_port, [f.path for f in series])
        wait_until(
            lambda: [s for _, _, s, _ in job_rows(db_url)] == ["done"] * 3,
            20,
            "the series delivered and recorded",
        )
        first.kill()
        second.start()
        send_storescu("127.0.0.1", dicom_port, [x2])
        indexed = indexed_instances(db_url)
        assert set(indexed) == {f.sop_instance_uid for f in series}
        stored = tmp_path / "n" / "data" / "archive" / indexed[x.sop_instance_uid]
        assert dataset_bytes(stored) == dataset_bytes(x.path)
        wait_until(lambda: {s for _, _, s, _ in job_rows(db_url)} == {"done"}, 20, "jobs settled")
        assert sorted(dest.uids()) == sorted(f.sop_instance_uid for f in series)
    finally:
        first.kill()
        second.kill()
        dest.stop()
