"""The forwarders in their own process (``[router] forwarders = "process"``, the default).

The serving process supervises the child: a forwarder process that dies is replaced, its
claimed jobs go back to the queue at once (no waiting for the lease), nothing is lost,
and ``/healthz`` answers 503 (over HTTP) until the new one runs. A node that stops
(``NodeProcess.stop``, or ``consentgate serve`` on SIGTERM) takes its forwarder process
with it, and the child ignores the signals a terminal or a service manager sends to the
whole process group. A reader in another process waits for an archive file to reach
its indexed size. (That the child also ends when its node is killed with SIGKILL is
checked in test_routing_e2e's kill -9 test.)
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from cli.forward_process import ForwarderProcess
from cli.node_process import NodeProcess
from cli.ops_http import OpsServer
from config.settings import PeerSettings, RouteSettings, Settings
from dicom_node.archive.files import InstanceFiles
from router.models import JobState
from tests.conftest import (
    FAST_FORWARD,
    FAST_RETRY,
    GatedScp,
    RecordingScp,
    ServeProcess,
    job_states,
    make_settings,
    modality_peer,
    prepare_runtime,
    process_gone,
    send_storescu,
    serve_setup,
    wait_until,
    with_routes,
)
from tests.corpus import make_small_series


def care_team_settings(tmp_path: Path, db_url: str, dest: RecordingScp) -> Settings:
    """A node whose one route (no purpose) sends everything to ``dest``."""
    return with_routes(
        make_settings(tmp_path / "data", db_url),
        [RouteSettings("care-team", (), ("dest",), "")],
        [PeerSettings("dest", dest.ae_title, "127.0.0.1", dest.port, frozenset({"echo"}))],
    )


def healthz(port: int) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as rsp:
            return int(rsp.status), json.loads(rsp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())


def test_killed_forwarder_process_is_replaced_and_loses_nothing(
    tmp_path: Path, db_url: str
) -> None:
    series = make_small_series(tmp_path / "series", 8, patient_id="P-PROC", seed=5)
    sent = {f.sop_instance_uid for f in series}
    dest = GatedScp("PROCDEST", gates=1).start()
    settings = care_team_settings(tmp_path, db_url, dest)
    assert settings.router.forwarders == "process"  # the default
    runtime = prepare_runtime(settings, FAST_RETRY)
    node = NodeProcess(runtime, forwarder_options=FAST_FORWARD)
    ops = OpsServer(runtime, "127.0.0.1", 0, node)
    pids: list[int | None] = []
    try:
        host, port = node.start()
        ops.start()
        forwarders = node.forwarders
        assert isinstance(forwarders, ForwarderProcess)
        status, checks = healthz(ops.port)
        assert (status, checks["forwarders"]) == (200, "ok")
        first_pid = forwarders.pid
        assert first_pid is not None and first_pid != os.getpid()
        pids.append(first_pid)

        # the destination holds the first C-STORE: the child has claimed jobs when killed
        send_storescu(host, port, [f.path for f in series])
        assert dest.arrived[0].wait(15), "the forwarder process never sent"
        assert JobState.SENDING.value in job_states(runtime).values()
        os.kill(first_pid, signal.SIGKILL)

        status, checks = wait_until(
            lambda: (h := healthz(ops.port))[0] == 503 and h, 5, "/healthz to report it"
        )
        assert checks["status"] == "error"
        assert checks["forwarders"].startswith("error: forwarder process not running")
        # its leases are released at once (the lease here is 30 s): nothing is sending
        wait_until(
            lambda: JobState.SENDING.value not in job_states(runtime).values(),
            5,
            "the dead forwarder process's leases to be released",
        )

        dest.open_all()
        wait_until(lambda: healthz(ops.port)[0] == 200, 15, "a new forwarder process")
        assert forwarders.pid not in (None, first_pid)
        pids.append(forwarders.pid)
        assert process_gone(first_pid)
        wait_until(
            lambda: set(job_states(runtime).values()) == {JobState.DONE.value},
            15,
            "every job sent by the new forwarder process",
        )
        assert set(dest.uids()) == sent  # the in-flight one may have arrived twice
        assert forwarders.starts == 2
    finally:
        dest.open_all()
        ops.stop()
        node.stop(grace=1.0)
        runtime.close()
        dest.stop()
    # the node's stop took its forwarder process with it
    assert len(pids) == 2 and all(p is not None and process_gone(p) for p in pids)


def test_stopping_the_node_stops_its_forwarder_process(tmp_path: Path, db_url: str) -> None:
    dest = GatedScp("PROCDEST", gates=0).start()
    runtime = prepare_runtime(care_team_settings(tmp_path, db_url, dest), FAST_RETRY)
    node = NodeProcess(runtime, forwarder_options=FAST_FORWARD)
    try:
        node.start()
        assert isinstance(node.forwarders, ForwarderProcess)
        pid = node.forwarders.pid
        assert pid is not None and not process_gone(pid)
        assert node.health()["forwarders"] == "ok"
        node.stop(grace=1.0)
        assert process_gone(pid)
        assert node.health()["forwarders"].startswith("error")  # stopped: nothing runs
    finally:
        runtime.close()
        dest.stop()


def test_a_reader_in_another_process_waits_for_the_whole_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_writev = os.writev

    def slow_writev(fd: int, buffers: list[memoryview]) -> int:
        # one buffer per call, each after a pause: the file exists, half-written, for a
        # while
        time.sleep(0.2)
        return real_writev(fd, buffers[:1])

    monkeypatch.setattr(os, "writev", slow_writev)
    writer = InstanceFiles(tmp_path / "data")
    writer.prepare()
    reader = InstanceFiles(tmp_path / "data", written_by_another_process=True)
    relative = InstanceFiles.relative_path_for("1.2.3.4")
    payload = [b"x" * 70_000, b"y" * 70_000]
    whole = b"".join(payload)

    thread = threading.Thread(target=writer.write_unsynced, args=(relative, payload))
    thread.start()
    try:
        # the indexed size tells the reader when the file is whole
        path = reader.absolute(relative, wait=10, size=len(whole))
        assert path.read_bytes() == whole  # never a partial file
    finally:
        thread.join()
    # a file nobody writes, and one that stays short: a bounded wait, then a clear error
    started = time.monotonic()
    with pytest.raises(OSError) as raised:
        reader.absolute(InstanceFiles.relative_path_for("9.9.9"), wait=0.3, size=10)
    assert raised.value.errno == errno.ENOENT
    assert 0.3 <= time.monotonic() - started < 5
    with pytest.raises(OSError) as raised:
        reader.absolute(relative, wait=0.3, size=len(whole) + 1)
    assert raised.value.errno == errno.EBUSY


def test_serve_stops_its_forwarder_process_on_sigterm_which_the_child_ignores(
    tmp_path: Path, db_url: str
) -> None:
    dest = RecordingScp("SERVEDEST").start()
    config, dicom_port, http_port = serve_setup(
        tmp_path,
        db_url,
        routes=[{"name": "care-team", "destinations": ["dest"]}],
        peers=[
            modality_peer(),
            {
                "name": "dest",
                "ae_title": dest.ae_title,
                "host": "127.0.0.1",
                "port": dest.port,
                "services": ["echo"],
            },
        ],
    )
    serve = ServeProcess(config, http_port, tmp_path / "serve.log")
    series = make_small_series(tmp_path / "series", 3, patient_id="P-SERVE", seed=9)
    try:
        serve.start()
        status, body = serve.healthz()
        assert status == 200 and json.loads(body)["forwarders"] == "ok"
        (child,) = serve.children()
        # a signal meant for the whole process group (a terminal's Ctrl-C, a service
        # manager) must not stop the child before its node: it ignores it
        os.kill(child, signal.SIGTERM)
        os.kill(child, signal.SIGINT)
        send_storescu("127.0.0.1", dicom_port, [f.path for f in series])
        wait_until(
            lambda: set(dest.uids()) == {f.sop_instance_uid for f in series},
            15,
            "the forwarder process to send after the signals",
        )
        assert not process_gone(child)
        serve.signal(signal.SIGTERM)
        assert serve.wait(30) == 0
        wait_until(lambda: process_gone(child), 10, "the forwarder process to exit")
        log = serve.log()
        assert "Traceback" not in log and "exited unexpectedly" not in log
    finally:
        serve.kill()
        dest.stop()


def test_a_forwarder_process_that_cannot_be_started_is_retried(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import cli.forward_process as forward_process

    monkeypatch.setattr(forward_process, "_RESTART_DELAYS", (0.1,) * 6)
    dest = RecordingScp("RETRYDEST").start()
    runtime = prepare_runtime(care_team_settings(tmp_path, db_url, dest), FAST_RETRY)
    node = NodeProcess(runtime, forwarder_options=FAST_FORWARD)
    real_popen = subprocess.Popen
    failures: list[int] = []

    def failing_once(*args: Any, **kwargs: Any) -> Any:
        if not failures:
            failures.append(1)
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        return real_popen(*args, **kwargs)

    try:
        node.start()
        forwarders = node.forwarders
        assert isinstance(forwarders, ForwarderProcess)
        first_pid = forwarders.pid
        assert first_pid is not None
        monkeypatch.setattr(subprocess, "Popen", failing_once)
        os.kill(first_pid, signal.SIGKILL)
        wait_until(
            lambda: forwarders.pid not in (None, first_pid) and node.health()["forwarders"] == "ok",
            15,
            "a forwarder process after a failed start",
        )
        assert failures == [1]
        assert "cannot start the forwarder process" in caplog.text
    finally:
        monkeypatch.setattr(subprocess, "Popen", real_popen)
        node.stop(grace=1.0)
        runtime.close()
        dest.stop()
