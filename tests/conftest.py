"""Shared fixtures: databases (SQLite and the local PostgreSQL), a running node, a corpus.

Every test that takes ``db_url`` runs twice: on SQLite and on PostgreSQL
(127.0.0.1:5432, trust auth; each test gets a fresh database, dropped afterwards).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import psycopg
import pytest

from cli.database import upgrade
from cli.runtime import Runtime, build_node, build_runtime
from config.settings import NodeSettings, PeerSettings, Settings
from dicom_node.server import DicomNode
from tests.corpus import CorpusFile, make_corpus

PG_ADMIN_DSN = os.environ.get(
    "CONSENTGATE_TEST_PG", "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
)
NODE_AE = "CONSENTGATE"
MODALITY_AE = "STORESCU"
PACS_AE = "QRSCU"


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session", autouse=True)
def _dcmtk_present() -> None:
    """The DCMTK tools are part of the test setup; a missing one is a setup failure."""
    for tool in ("echoscu", "storescu", "findscu", "movescu", "getscu", "storescp", "dcmdump"):
        if shutil.which(tool) is None:
            pytest.exit(f"{tool} not found: run ./scripts/test.sh (it installs DCMTK)", 3)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test."""
    name = f"cg_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The database URL of this test, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.db'}"
    return str(request.getfixturevalue("pg_url"))


def make_settings(data_dir: Path, db_url: str, **node_overrides: object) -> Settings:
    """Settings for a test node on a free loopback port with the standard test peers."""
    node = NodeSettings(
        ae_title=NODE_AE,
        dicom_host="127.0.0.1",
        dicom_port=free_port(),
        http_port=0,
        data_dir=data_dir,
        database_url=db_url,
        shutdown_grace=5.0,
    )
    node = replace(node, **node_overrides)  # type: ignore[arg-type]
    peers = (
        PeerSettings(
            "modality",
            MODALITY_AE,
            "127.0.0.1",
            104,
            frozenset({"echo", "store"}),
            issuer="CHR-METZ",
        ),
        PeerSettings(
            "pacs", PACS_AE, "127.0.0.1", free_port(), frozenset({"echo", "find", "move", "get"})
        ),
    )
    return Settings(node=node, peers=peers, source="<tests>")


@dataclass
class RunningNode:
    """A node started in-process for a test."""

    settings: Settings
    runtime: Runtime
    node: DicomNode
    host: str
    port: int

    @property
    def ae_title(self) -> str:
        return self.settings.node.ae_title


def start_node(settings: Settings) -> RunningNode:
    """Initialise the database and archive, then start the DICOM node."""
    runtime = build_runtime(settings)
    runtime.files.prepare()
    upgrade(runtime.engine)
    node = build_node(runtime)
    host, port = node.start()
    return RunningNode(settings, runtime, node, host, port)


@pytest.fixture
def running_node(tmp_path: Path, db_url: str) -> Iterator[RunningNode]:
    """A node on a free port, backed by ``db_url`` (SQLite and PostgreSQL)."""
    running = start_node(make_settings(tmp_path / "data", db_url))
    try:
        yield running
    finally:
        running.node.stop(grace=2.0)
        running.runtime.close()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[CorpusFile]:
    """The mixed synthetic corpus (built once per session; treat it as read-only)."""
    return make_corpus(tmp_path_factory.mktemp("corpus"))


# -- DCMTK helpers shared by the service, archive and query/retrieve tests -----------------

TOOL_TIMEOUT = 60.0


def run_tool(*args: object, timeout: float = TOOL_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK command line tool to completion (bounded), capturing its output."""
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False
    )


def storescu_profile(directory: Path, files: list[CorpusFile]) -> Path:
    """A storescu configuration (profile ``Corpus``) proposing every SOP class of
    ``files`` once per transfer syntax used, so each file is sent in its own syntax."""
    pairs = sorted({(f.sop_class_uid, f.transfer_syntax_uid) for f in files})
    syntaxes = sorted({ts for _, ts in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(syntaxes):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Corpus]"]
    for n, (sop_class, ts) in enumerate(pairs, 1):
        lines.append(f"PresentationContext{n} = {sop_class}\\TS{syntaxes.index(ts)}")
    lines += ["[[Profiles]]", "[Corpus]", "PresentationContexts = Corpus"]
    path = directory / "storescu-corpus.cfg"
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return path


def storescu(
    running: RunningNode, files: list[CorpusFile], work_dir: Path, calling_ae: str = MODALITY_AE
) -> subprocess.CompletedProcess[str]:
    """Send ``files`` to the node with DCMTK storescu, each in its own transfer syntax."""
    profile = storescu_profile(work_dir, files)
    return run_tool(
        "storescu",
        "-aet",
        calling_ae,
        "-aec",
        running.ae_title,
        "-xf",
        profile,
        "Corpus",
        "-to",
        "10",
        "-ta",
        "10",
        "-td",
        "30",
        running.host,
        running.port,
        *(f.path for f in files),
    )


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file after its preamble and File Meta Information group,
    i.e. the data set exactly as encoded in the file's transfer syntax."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM", f"{path} is not a DICOM Part 10 file"
    # (0002,0000) UL, explicit VR little endian: tag 4 + VR 2 + length 2 + value 4
    assert raw[132:138] == b"\x02\x00\x00\x00UL", f"{path}: no File Meta group length"
    group_length = int.from_bytes(raw[140:144], "little")
    return raw[144 + group_length :]


# -- `consentgate serve` as a subprocess (CLI and crash tests) ------------------------------

CONSENTGATE_BIN = Path(sys.executable).with_name("consentgate")


def write_config(
    path: Path,
    data_dir: Path,
    db_url: str,
    *,
    dicom_port: int,
    http_port: int,
    peers: list[dict[str, object]] | None = None,
    **node: object,
) -> Path:
    """Write a consentgate.toml for a node on loopback; default peers: the modality
    (echo, store) and the PACS (echo, find, move, get) of :func:`make_settings`."""
    values: dict[str, object] = {
        "ae_title": NODE_AE,
        "dicom_host": "127.0.0.1",
        "dicom_port": dicom_port,
        "http_host": "127.0.0.1",
        "http_port": http_port,
        "data_dir": str(data_dir),
        "database_url": db_url,
        "shutdown_grace": 10.0,
        **node,
    }
    if peers is None:
        peers = [
            {
                "name": "modality",
                "ae_title": MODALITY_AE,
                "host": "127.0.0.1",
                "port": 104,
                "services": ["echo", "store"],
            },
            {
                "name": "pacs",
                "ae_title": PACS_AE,
                "host": "127.0.0.1",
                "port": free_port(),
                "services": ["echo", "find", "move", "get"],
            },
        ]
    lines = ["[node]", *(f"{k} = {json.dumps(v)}" for k, v in values.items())]
    for peer in peers:
        lines += ["", "[[peers]]", *(f"{k} = {json.dumps(v)}" for k, v in peer.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class ServeProcess:
    """``consentgate --config CONFIG serve`` in a subprocess, killed on exit whatever happens.

    Its stdout and stderr go to ``log_path``.
    """

    def __init__(self, config: Path, http_port: int, log_path: Path) -> None:
        self.config = config
        self.http_port = http_port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.kill()

    def start(self, ready_timeout: float = 30.0) -> ServeProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(CONSENTGATE_BIN), "--config", str(self.config), "serve"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.log()}")
            if self.healthz()[0] == 200:
                return self
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"serve not ready after {ready_timeout} s:\n{self.log()}")

    def healthz(self) -> tuple[int, bytes]:
        """Status and body of GET /healthz (0 when nothing answers)."""
        return self.http_get("/healthz")

    def http_get(self, path: str) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as rsp:
                return int(rsp.status), bytes(rsp.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read()
        except OSError:
            return 0, b""

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait (bounded) for the process to exit; kills it and fails on timeout."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"serve still running after {timeout} s:\n{self.log()}") from None

    def kill(self) -> None:
        """SIGKILL (kill -9) if still running, and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def storescu_acknowledged(output: str) -> list[Path]:
    """The files ``storescu -v`` reports as stored (a Success or Warning response to the
    C-STORE of the file announced by the preceding "Sending file:" line)."""
    acked: list[Path] = []
    current: Path | None = None
    for line in output.splitlines():
        if "Sending file: " in line:
            current = Path(line.split("Sending file: ", 1)[1].strip())
        elif "Received Store Response (" in line and current is not None:
            if "(Success" in line or "(Warning" in line:
                acked.append(current)
            current = None
    return acked


def indexed_instances(db_url: str) -> dict[str, str]:
    """SOP Instance UID -> archive-relative path of every indexed instance (read directly
    from the database, with a short-lived engine)."""
    from sqlalchemy import create_engine, select

    from dicom_node.archive.models import Instance

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(Instance.sop_instance_uid, Instance.path)).all()
    finally:
        engine.dispose()
    return {uid: path for uid, path in rows}
