"""The ``consentgate`` command line, as an operator uses it.

Most commands run in-process through click's CliRunner; ``serve`` runs as a real
subprocess (signals, exit code, HTTP endpoint) with DCMTK tools as the peers.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from cli.database import current_revision, head_revision, make_engine
from cli.main import cli
from tests.conftest import (
    CONSENTGATE_BIN,
    MODALITY_AE,
    NODE_AE,
    RunningNode,
    ServeProcess,
    free_port,
    indexed_instances,
    serve_setup,
    storescu_acknowledged,
    storescu_args,
    write_config,
)
from tests.corpus import CorpusFile, make_small_series
from tests.scu_support import associate

SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def invoke(config: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--config", str(config), *args])


def assert_one_line_error(result: Result, exit_code: int) -> str:
    """A user mistake: the given exit code, one line of output, no traceback."""
    assert result.exit_code == exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    output = result.output.strip()
    assert "Traceback" not in output
    assert len(output.splitlines()) == 1, output
    return output


def node_config(tmp_path: Path, db_url: str, **node: object) -> Path:
    """A configuration for a node with its own data directory."""
    return write_config(
        tmp_path / "consentgate.toml",
        tmp_path / "data",
        db_url,
        dicom_port=free_port(),
        http_port=free_port(),
        **node,
    )


def client_config(tmp_path: Path, running: RunningNode) -> Path:
    """A configuration sharing ``running``'s archive, whose own AE title is the modality
    the running node accepts, with the running node as peer ``gw`` and a closed port as
    peer ``dead``."""
    return write_config(
        tmp_path / "client.toml",
        running.settings.node.data_dir,
        running.settings.node.database_url,
        dicom_port=free_port(),
        http_port=free_port(),
        ae_title=MODALITY_AE,
        peers=[
            {"name": "gw", "ae_title": NODE_AE, "host": "127.0.0.1", "port": running.port},
            {"name": "dead", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port()},
        ],
    )


# -- init / db upgrade / status -------------------------------------------------------------


def test_init_creates_data_dir_and_schema_and_is_idempotent(tmp_path: Path, db_url: str) -> None:
    config = node_config(tmp_path, db_url)
    data = tmp_path / "data"
    assert not data.exists()

    first = invoke(config, "init")
    assert first.exit_code == 0, first.output
    assert (data / "archive").is_dir()
    assert (data / "tmp").is_dir()
    engine = make_engine(db_url)
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()
    assert f"schema {head_revision()}" in first.output

    # a staging file left by a crash is cleaned by the next init; archived files are kept
    (data / "tmp" / "leftover.part").write_bytes(b"partial")
    kept = data / "archive" / "ab" / "keep.dcm"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"kept")
    second = invoke(config, "init")
    assert second.exit_code == 0, second.output
    assert "removed 1 incomplete staging file" in second.output
    assert not (data / "tmp" / "leftover.part").exists()
    assert kept.read_bytes() == b"kept"
    third = invoke(config, "init")
    assert third.exit_code == 0, third.output
    assert "removed" not in third.output


def test_init_hides_the_database_password(tmp_path: Path) -> None:
    # an unreachable server: init fails in one line, and neither line shows the password
    url = f"postgresql+psycopg://cg:s3cr3t@127.0.0.1:{free_port()}/cg"
    result = invoke(node_config(tmp_path, url), "init")
    assert_one_line_error(result, 1)
    assert "s3cr3t" not in result.output


@SQLITE_ONLY
def test_db_upgrade_from_empty_then_already_current(tmp_path: Path, db_url: str) -> None:
    config = node_config(tmp_path, db_url)
    first = invoke(config, "db", "upgrade")
    assert first.exit_code == 0, first.output
    assert f"database upgraded from empty to {head_revision()}" in first.output
    second = invoke(config, "db", "upgrade")
    assert second.exit_code == 0, second.output
    assert f"database already at {head_revision()}" in second.output


@SQLITE_ONLY
def test_status_before_init_says_to_run_init_and_creates_nothing(
    tmp_path: Path, db_url: str
) -> None:
    result = invoke(node_config(tmp_path, db_url), "status")
    assert result.exit_code == 0, result.output
    assert "does not exist (run 'consentgate init')" in result.output
    assert "running: no" in result.output
    assert not (tmp_path / "data").exists()
    # an initialised database whose schema is behind says to upgrade
    assert invoke(node_config(tmp_path, db_url), "init").exit_code == 0
    with sqlite3.connect(tmp_path / "index.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0001'")
    result = invoke(node_config(tmp_path, db_url), "status")
    assert result.exit_code == 0, result.output
    assert "schema not current" in result.output


def test_status_and_studies_list_show_stored_instances(
    tmp_path: Path, running_node: RunningNode, corpus: list[CorpusFile]
) -> None:
    config = client_config(tmp_path, running_node)
    empty = invoke(config, "status")
    assert empty.exit_code == 0, empty.output
    assert "instances: 0" in empty.output

    # two studies of two patients
    chosen = [f for f in corpus if f.study_uid in {corpus[0].study_uid, corpus[-1].study_uid}]
    assert len({f.patient_id for f in chosen}) == 2
    sent = invoke(config, "send", *(str(f.path) for f in chosen), "--to", "gw")
    assert sent.exit_code == 0, sent.output

    status = invoke(config, "status")
    assert status.exit_code == 0, status.output
    counts = dict(
        re.findall(
            r"^(patients|studies|series|instances|bytes): (\d+)$", status.output, re.MULTILINE
        )
    )
    assert counts == {
        "patients": "2",
        "studies": "2",
        "series": str(len({f.series_uid for f in chosen})),
        "instances": str(len(chosen)),
        "bytes": counts["bytes"],
    }
    assert int(counts["bytes"]) > 0
    assert "running: no" in status.output  # nothing serves this config's HTTP port

    listed = invoke(config, "studies", "list")
    assert listed.exit_code == 0, listed.output
    for f in chosen:
        assert f.study_uid in listed.output
        assert f.patient_id in listed.output
    assert "2 of 2 studies" in listed.output

    one = invoke(config, "studies", "list", "--patient-id", corpus[0].patient_id)
    assert one.exit_code == 0, one.output
    assert corpus[0].study_uid in one.output
    assert corpus[-1].study_uid not in one.output
    assert "1 of 1 studies" in one.output


# -- echo / send ----------------------------------------------------------------------------


def test_echo_running_node_succeeds(tmp_path: Path, running_node: RunningNode) -> None:
    result = invoke(client_config(tmp_path, running_node), "echo", "gw")
    assert result.exit_code == 0, result.output
    assert "C-ECHO to gw" in result.output
    assert "success" in result.output


@SQLITE_ONLY
def test_echo_closed_port_is_one_line_exit_1(tmp_path: Path, running_node: RunningNode) -> None:
    # as a real process: the user's terminal must show one line, pynetdicom's log included
    config = client_config(tmp_path, running_node)
    proc = subprocess.run(
        [str(CONSENTGATE_BIN), "--config", str(config), "echo", "dead"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    output = (proc.stdout + proc.stderr).strip()
    assert "Traceback" not in output
    assert len(output.splitlines()) == 1, output
    assert "dead" in output


def test_unknown_peer_is_one_line_nonzero(tmp_path: Path, running_node: RunningNode) -> None:
    config = client_config(tmp_path, running_node)
    for args in (("echo", "nosuch"), ("send", str(tmp_path), "--to", "nosuch")):
        output = assert_one_line_error(invoke(config, *args), 1)
        assert "nosuch" in output
        assert "gw" in output  # the configured peers are listed


def test_send_directory_of_corpus(
    tmp_path: Path, running_node: RunningNode, corpus: list[CorpusFile]
) -> None:
    config = client_config(tmp_path, running_node)
    result = invoke(config, "send", str(corpus[0].path.parent), "--to", "gw")
    assert result.exit_code == 0, result.output
    assert f"sent {len(corpus)} of {len(corpus)} file(s) to gw" in result.output
    assert "0 failed, 0 skipped" in result.output
    indexed = indexed_instances(running_node.settings.node.database_url)
    assert set(indexed) == {f.sop_instance_uid for f in corpus}


def test_send_reports_non_dicom_file_and_exits_1(
    tmp_path: Path, running_node: RunningNode, corpus: list[CorpusFile]
) -> None:
    config = client_config(tmp_path, running_node)
    junk = tmp_path / "notes.txt"
    junk.write_text("not DICOM")
    result = invoke(config, "send", str(corpus[0].path), str(junk), "--to", "gw")
    assert result.exit_code == 1, result.output
    assert f"skipped {junk}" in result.output
    assert "sent 1 of 2 file(s)" in result.output
    assert set(indexed_instances(running_node.settings.node.database_url)) == {
        corpus[0].sop_instance_uid
    }


# -- configuration and schema problems -----------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [["init"], ["status"], ["serve"], ["echo", "x"], ["db", "upgrade"], ["studies", "list"]],
)
def test_bad_config_exit_2_names_the_key(tmp_path: Path, command: list[str]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[node]\ndicom_port = 99999\n")
    output = assert_one_line_error(invoke(config, *command), 2)
    assert "node.dicom_port" in output
    assert str(config) in output


def test_missing_config_file_exit_2(tmp_path: Path) -> None:
    output = assert_one_line_error(invoke(tmp_path / "absent.toml", "status"), 2)
    assert "absent.toml" in output


@SQLITE_ONLY
def test_serve_refuses_without_schema(tmp_path: Path, db_url: str) -> None:
    config = node_config(tmp_path, db_url)
    output = assert_one_line_error(invoke(config, "serve"), 1)
    assert "consentgate init" in output


@SQLITE_ONLY
def test_serve_refuses_busy_dicom_port(tmp_path: Path, db_url: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(
            tmp_path / "c.toml", tmp_path / "data", db_url, dicom_port=port, http_port=free_port()
        )
        assert invoke(config, "init").exit_code == 0
        output = assert_one_line_error(invoke(config, "serve"), 1)
    assert f"127.0.0.1:{port}" in output


# -- serve as a subprocess ----------------------------------------------------------------


@SQLITE_ONLY
def test_serve_healthz_metrics_and_sigint(
    tmp_path: Path, db_url: str, corpus: list[CorpusFile]
) -> None:
    config, dicom_port, http_port = serve_setup(tmp_path, db_url)
    files = [f for f in corpus if f.transfer_syntax_uid == "1.2.840.10008.1.2.1"][:3]
    assert len(files) == 3
    with ServeProcess(config, http_port, tmp_path / "serve.log") as serve:
        status, body = serve.healthz()
        assert status == 200
        health = json.loads(body)
        assert health["status"] == "ok"
        assert health["database"] == "ok"
        assert health["journal"] == "ok"
        assert health["archive_writer"] == "ok"

        running = invoke(config, "status")
        assert "running: yes" in running.output

        store = subprocess.run(
            storescu_args(dicom_port, *(f.path for f in files)),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert store.returncode == 0, store.stdout + store.stderr
        status, metrics = serve.http_get("/metrics")
        assert status == 200
        text = metrics.decode()
        assert 'consentgate_instances_received_total{outcome="stored"} 3.0' in text
        assert 'consentgate_associations_total{result="accepted"} 1.0' in text
        assert re.search(r"^consentgate_bytes_received_total (\d+\.\d+)", text, re.MULTILINE)
        assert serve.http_get("/nothing")[0] == 404

        serve.signal(signal.SIGINT)
        assert serve.wait(timeout=20) == 0
        log = serve.log()
    assert "Traceback" not in log
    assert "stopped" in log
    # INFO logs of a real node carry no patient data
    for f in files:
        for value in (f.patient_id, f.patient_name, f.birth_date):
            assert value not in log


@SQLITE_ONLY
def test_serve_sigterm_drains_in_flight_association(tmp_path: Path, db_url: str) -> None:
    """SIGTERM mid-transfer: no new association is accepted, the transfer in progress
    completes, the process exits 0, and every acknowledged instance is indexed."""
    series = make_small_series(tmp_path / "series", 200)
    config, dicom_port, http_port = serve_setup(tmp_path, db_url, shutdown_grace=30.0)
    with ServeProcess(config, http_port, tmp_path / "serve.log") as serve:
        # an association held open by us: the node must keep serving it while draining
        ae = AE(ae_title=MODALITY_AE)
        ae.add_requested_context(Verification)
        held = associate(ae, "127.0.0.1", dicom_port, ae_title=NODE_AE)
        assert held.is_established
        lines: list[str] = []
        sender = subprocess.Popen(
            storescu_args(dicom_port, tmp_path / "series", "+sd"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        reader = threading.Thread(target=lambda: lines.extend(sender.stdout or []), daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + 30
            while len(storescu_acknowledged("".join(lines))) < 20:
                assert time.monotonic() < deadline, "storescu made no progress"
                assert sender.poll() is None, "".join(lines)
                time.sleep(0.02)
            serve.signal(signal.SIGTERM)
            assert sender.poll() is None, "the transfer must still be in flight"

            refused_while_alive = False
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", dicom_port), timeout=1).close()
                except OSError:
                    refused_while_alive = serve.proc is not None and serve.proc.poll() is None
                    break
                time.sleep(0.05)
            sender.wait(timeout=60)
            reader.join(timeout=10)
            output = "".join(lines)
            acked = storescu_acknowledged(output)
            assert sender.returncode == 0, output[-2000:]
            assert len(acked) == len(series), "the in-flight transfer was cut off"
            assert refused_while_alive, "new connections must be refused while draining"
            echo = held.send_c_echo()
            assert echo and echo.Status == 0, "a held association is served until released"
            held.release()
            assert serve.wait(timeout=40) == 0
        finally:
            if sender.poll() is None:
                sender.kill()
                sender.wait(timeout=10)
            if held.is_established:
                held.abort()
    indexed = indexed_instances(db_url)
    missing = {p.stem for p in acked} - set(indexed)
    assert not missing, f"{len(missing)} acknowledged instance(s) not indexed"
    assert "Traceback" not in serve.log()


@SQLITE_ONLY
def test_serve_sigterm_aborts_a_stuck_association_after_the_grace_period(
    tmp_path: Path, db_url: str
) -> None:
    """shutdown_grace bounds the drain: an association still open when it expires is
    aborted (and counted in the log), the process exits 0 soon after."""
    config, dicom_port, http_port = serve_setup(
        tmp_path, db_url, shutdown_grace=2.0, network_timeout=120.0, dimse_timeout=120.0
    )
    with ServeProcess(config, http_port, tmp_path / "serve.log") as serve:
        ae = AE(ae_title=MODALITY_AE)
        ae.add_requested_context(Verification)
        held = associate(ae, "127.0.0.1", dicom_port, ae_title=NODE_AE)
        assert held.is_established
        try:
            started = time.monotonic()
            serve.signal(signal.SIGTERM)
            assert serve.wait(timeout=12) == 0
            elapsed = time.monotonic() - started
            assert 1.5 <= elapsed < 10, f"exited after {elapsed:.1f} s with a 2 s grace"
            assert "1 association(s) aborted" in serve.log()
            deadline = time.monotonic() + 5
            while held.is_established and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not held.is_established
        finally:
            if held.is_established:
                held.abort()


def test_console_script_is_installed() -> None:
    proc = subprocess.run(
        [str(CONSENTGATE_BIN), "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0
    for command in ("init", "serve", "status", "echo", "send", "studies", "db"):
        assert command in proc.stdout
    assert Path(sys.executable).parent == CONSENTGATE_BIN.parent
