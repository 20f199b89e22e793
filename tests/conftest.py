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
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from cli.database import upgrade
from cli.main import cli
from cli.runtime import Ingest, Runtime, build_node, build_runtime
from config.settings import NodeSettings, PeerSettings, RouteSettings, Settings
from consent.service import ConsentStore
from dicom_node.server import DicomNode
from router.forwarder import ForwarderOptions
from router.queue import RetryPolicy
from tests.corpus import CorpusFile, make_corpus

PG_ADMIN_DSN = os.environ.get(
    "CONSENTGATE_TEST_PG", "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
)
NODE_AE = "CONSENTGATE"
MODALITY_AE = "STORESCU"
PACS_AE = "QRSCU"
#: Journal segment size of test nodes. A node creates its active segment and a spare,
#: each written full of zeros, and leaves two free segments behind: with the production
#: default (64 MiB) every test node wrote and left 128 MiB, about 20 GB per run of the
#: suite, and three kept runs filled this machine's disk. The test instances (up to
#: 0.5 MB) still go through the journal; the journal tests choose their own sizes.
TEST_JOURNAL_SEGMENT_MB = 4


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
        journal_segment_mb=TEST_JOURNAL_SEGMENT_MB,
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
    ingest: Ingest

    @property
    def ae_title(self) -> str:
        return self.settings.node.ae_title

    def stop(self, grace: float = 2.0) -> None:
        """Stop the node, then make the journalled files durable and free the journal."""
        try:
            self.node.stop(grace=grace)
        finally:
            self.ingest.stop()


def start_node(settings: Settings) -> RunningNode:
    """Initialise the database and archive, then start the DICOM node."""
    runtime = build_runtime(settings)
    upgrade(runtime.engine)
    ingest = Ingest(runtime)
    ingest.start()
    node = build_node(runtime)
    try:
        host, port = node.start()
    except BaseException:
        ingest.stop()
        raise
    return RunningNode(settings, runtime, node, host, port, ingest)


@pytest.fixture
def running_node(tmp_path: Path, db_url: str) -> Iterator[RunningNode]:
    """A node on a free port, backed by ``db_url`` (SQLite and PostgreSQL)."""
    running = start_node(make_settings(tmp_path / "data", db_url))
    try:
        yield running
    finally:
        running.stop()
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


def store_files(
    runtime: Runtime, files: Iterable[CorpusFile], calling_ae: str, default_issuer: str = ""
) -> None:
    """Receive ``files`` through the archive's real store path, as from ``calling_ae``."""
    for f in files:
        runtime.archive.store(
            dataset_bytes(f.path),
            transfer_syntax_uid=f.transfer_syntax_uid,
            command_sop_class_uid=f.sop_class_uid,
            command_sop_instance_uid=f.sop_instance_uid,
            calling_ae=calling_ae,
            default_issuer=default_issuer,
        )


def storescu_args(port: int, *paths: object) -> list[str]:
    """A verbose DCMTK storescu command line from the modality to the node on ``port``."""
    return [
        "storescu",
        "-v",
        "-aet",
        MODALITY_AE,
        "-aec",
        NODE_AE,
        "-to",
        "10",
        "-ta",
        "10",
        "-td",
        "30",
        "127.0.0.1",
        str(port),
        *(str(p) for p in paths),
    ]


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


def modality_peer(**extra: object) -> dict[str, object]:
    """The ``[[peers]]`` entry of DCMTK storescu (AE title STORESCU) as a modality."""
    return {
        "name": "modality",
        "ae_title": MODALITY_AE,
        "host": "127.0.0.1",
        "port": 104,
        "services": ["echo", "store"],
        **extra,
    }


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
        "journal_segment_mb": TEST_JOURNAL_SEGMENT_MB,
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


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def process_gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie not reaped yet counts as exited)."""
    fields = _proc_stat(pid)
    return fields is None or fields[0] == "Z"


def child_pids(parent: int) -> list[int]:
    """The live processes whose parent is ``parent``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _proc_stat(int(entry))
            if fields is not None and fields[0] != "Z" and fields[1] == str(parent):
                found.append(int(entry))
    return found


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

    def children(self) -> list[int]:
        """Process ids of the node's live child processes (its forwarder process)."""
        assert self.proc is not None
        return child_pids(self.proc.pid)

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


# -- routing and consent tests: destinations, polling, seeding, the CLI in a subprocess ------

ORTHANC_BIN = Path("/usr/sbin/Orthanc")
ISSUER = "CHR-METZ"  # the issuer tests.corpus.make_small_series writes in every instance


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout``
    seconds pass (AssertionError naming ``what``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def port_listening(port: int) -> bool:
    """Whether something accepts TCP connections on loopback ``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
    except OSError:
        return False
    return True


class OrthancServer:
    """Our own Orthanc process (never the system service): its own JSON configuration,
    storage and index directories in ``work_dir``, loopback HTTP, no authentication,
    accepting C-STORE from anyone. ``stop()`` then ``start()`` restarts it on the same ports
    with the same storage."""

    def __init__(
        self,
        work_dir: Path,
        ae_title: str = "REGIONAL",
        dicom_port: int | None = None,
        http_port: int | None = None,
    ) -> None:
        self.work_dir = work_dir
        self.ae_title = ae_title
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        work_dir.mkdir(parents=True, exist_ok=True)
        self.config = work_dir / "orthanc.json"
        self.config.write_text(
            json.dumps(
                {
                    "Name": "consentgate-test",
                    "StorageDirectory": str(work_dir / "storage"),
                    "IndexDirectory": str(work_dir / "index"),
                    "StorageCompression": False,
                    "Plugins": [],
                    "LuaScripts": [],
                    "HttpServerEnabled": True,
                    "HttpPort": self.http_port,
                    "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": False,
                    "OrthancExplorerEnabled": False,
                    "WebDavEnabled": False,
                    "DicomServerEnabled": True,
                    "DicomAet": ae_title,
                    "DicomPort": self.dicom_port,
                    "DicomCheckCalledAet": False,
                    "DicomAlwaysAllowEcho": True,
                    "DicomAlwaysAllowStore": True,
                    "SaveJobs": False,
                }
            ),
            encoding="utf-8",
        )
        self.log_path = work_dir / "orthanc.log"

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.kill()

    def start(self, timeout: float = 30.0) -> OrthancServer:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(ORTHANC_BIN), str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.work_dir,
                # DCMTK inside Orthanc reads TCP_NODELAY: without it each small response
                # waits for Nagle + delayed ACK (~10 instances/s instead of hundreds)
                env={**os.environ, "TCP_NODELAY": "1"},
            )
        try:
            wait_until(
                lambda: self._alive() and self.get("/statistics") is not None,
                timeout,
                "Orthanc's REST API",
            )
            wait_until(lambda: self._alive() and port_listening(self.dicom_port), timeout, "DICOM")
        except AssertionError:
            self.stop()
            raise AssertionError(f"Orthanc did not start:\n{self.log()[-3000:]}") from None
        return self

    def _alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"Orthanc exited:\n{self.log()[-3000:]}")
        return True

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit within 15 s; always reaped."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL (end of test: nothing of its storage is needed any more); reaped."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def get(self, path: str) -> Any:
        """GET a REST resource as JSON (None when nothing answers)."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.http_port}{path}", timeout=10
            ) as r:
                return json.loads(r.read())
        except OSError:
            return None

    def count(self) -> int:
        """CountInstances from GET /statistics."""
        stats = self.get("/statistics")
        assert stats is not None, "Orthanc does not answer"
        return int(stats["CountInstances"])

    def sop_instance_uids(self) -> list[str]:
        """The SOP Instance UID of every stored instance (GET /instances?expand)."""
        instances = self.get("/instances?expand")
        assert instances is not None, "Orthanc does not answer"
        return [str(i["MainDicomTags"]["SOPInstanceUID"]) for i in instances]

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


class RecordingScp:
    """A pynetdicom storage SCP on loopback (a light forward destination) that records the
    SOP Instance UID of every C-STORE it acknowledges, duplicates included."""

    def __init__(self, ae_title: str, port: int | None = None) -> None:
        self.ae_title = ae_title
        self.port = port or free_port()
        self.received: list[str] = []
        self._lock = threading.Lock()
        self._server: Any = None

    def _on_store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            self.received.append(uid)
        return 0x0000

    def start(self) -> RecordingScp:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def uids(self) -> list[str]:
        with self._lock:
            return list(self.received)

    def clear(self) -> None:
        with self._lock:
            self.received.clear()


class GatedScp(RecordingScp):
    """A recording storage SCP that holds each of its first C-STOREs until released."""

    def __init__(self, ae_title: str, gates: int) -> None:
        super().__init__(ae_title)
        self.arrived = [threading.Event() for _ in range(gates)]
        self.release = [threading.Event() for _ in range(gates)]
        self._count = 0

    def _on_store(self, event: Any) -> int:
        n, self._count = self._count, self._count + 1
        if n < len(self.arrived):
            self.arrived[n].set()
            self.release[n].wait(30)
        return super()._on_store(event)

    def open_all(self) -> None:
        for gate in self.release:
            gate.set()


def with_routes(
    settings: Settings,
    routes: list[RouteSettings],
    peers: list[PeerSettings] | None = None,
) -> Settings:
    """``settings`` plus extra ``peers`` and the given routes."""
    return replace(settings, peers=settings.peers + tuple(peers or ()), routes=tuple(routes))


def prepare_runtime(settings: Settings, policy: RetryPolicy | None = None) -> Runtime:
    """Build the runtime, create the archive and the schema; optionally a test retry
    policy for the forward queue (shared by the planner, forwarders and consent sync)."""
    runtime = build_runtime(settings)
    runtime.files.prepare()
    upgrade(runtime.engine)
    if policy is not None:
        runtime.queue.policy = policy
    return runtime


FAST_RETRY = RetryPolicy(max_attempts=1000, base_delay=0.2, max_delay=1.0, lease_seconds=30.0)
FAST_FORWARD = ForwarderOptions(batch_size=64, poll_interval=0.1, idle_release=1.0)


def seed_purpose(store: ConsentStore, code: str, model: str = "opt-in") -> None:
    """A purpose with its notice (a permit needs one)."""
    store.add_purpose(
        code, f"Test purpose {code}", model=model, notice_text=f"Notice of {code}.", actor="test"
    )


def seed_patient(
    store: ConsentStore, patient_id: str, birth_date: str = "1970-01-01", sex: str = "U"
) -> int:
    """A consent-store patient matching tests.corpus.make_small_series(patient_id=...)
    instances (issuer CHR-METZ, born 1970-01-01; DICOM sex O is compatible with U)."""
    from datetime import date

    return store.add_patient(
        issuer=ISSUER,
        patient_id=patient_id,
        birth_name=f"NAME{patient_id}".replace("-", ""),
        first_name="TEST",
        birth_date=date.fromisoformat(birth_date),
        sex=sex,
        actor="test",
    )


def job_states(runtime: Runtime, destination: str | None = None) -> dict[str, str]:
    """SOP Instance UID -> state of its forward job (one destination, or all when there is
    only one job per instance)."""
    from sqlalchemy import select

    from dicom_node.archive.models import Instance
    from router.models import ForwardJob

    stmt = select(Instance.sop_instance_uid, ForwardJob.state).join(
        Instance, Instance.id == ForwardJob.instance_pk
    )
    if destination is not None:
        stmt = stmt.where(ForwardJob.destination == destination)
    with runtime.sessions() as session:
        return {uid: state for uid, state in session.execute(stmt)}


def send_storescu(
    host: str,
    port: int,
    files: list[Path],
    called_ae: str = NODE_AE,
    calling_ae: str = MODALITY_AE,
) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu (uncompressed files, one association, TCP_NODELAY=1); fails the
    test unless every file was acknowledged."""
    result = run_tool(
        "env",
        "TCP_NODELAY=1",
        "/usr/bin/storescu",
        "-aet",
        calling_ae,
        "-aec",
        called_ae,
        "-to",
        "10",
        "-ta",
        "10",
        "-td",
        "30",
        host,
        port,
        *files,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def consentgate_cli(
    config: Path, *args: object, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """``consentgate --config CONFIG ARGS...`` in its own process (as hospital IT runs it)."""
    return run_tool(CONSENTGATE_BIN, "--config", config, *args, timeout=timeout)


def toml_routes(routes: list[dict[str, Any]]) -> str:
    """``[[routes]]`` tables in TOML; ``match`` values: a string, a list of strings, or a
    one-key dict such as ``{"glob": "P*"}``."""
    lines: list[str] = []
    for route in routes:
        lines += ["", "[[routes]]"]
        for key in ("name", "destinations", "purpose"):
            if key in route:
                lines.append(f"{key} = {json.dumps(route[key])}")
        match = route.get("match") or {}
        if match:
            lines.append("[routes.match]")
            for keyword, value in match.items():
                if isinstance(value, dict):
                    ((op, operand),) = value.items()
                    lines.append(f"{keyword} = {{ {op} = {json.dumps(operand)} }}")
                else:
                    lines.append(f"{keyword} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def serve_setup(
    tmp_path: Path,
    db_url: str,
    *,
    routes: list[dict[str, Any]] | None = None,
    **node: object,
) -> tuple[Path, int, int]:
    """A configuration for ``consentgate serve`` on free loopback ports (``node``: peers
    and node keys, as :func:`write_config`; ``routes``: as :func:`toml_routes`), and an
    initialised database; returns (config, DICOM port, HTTP port)."""
    dicom_port, http_port = free_port(), free_port()
    config = write_config(
        tmp_path / "serve.toml",
        tmp_path / "data",
        db_url,
        dicom_port=dicom_port,
        http_port=http_port,
        **node,
    )
    if routes:
        with config.open("a", encoding="utf-8") as fh:
            fh.write(toml_routes(routes))
    init = CliRunner().invoke(cli, ["--config", str(config), "init"])
    assert init.exit_code == 0, init.output
    return config, dicom_port, http_port


#: Run by TunedServeProcess: ``consentgate serve`` with the retry policy and forwarder
#: options taken from $CG_TEST_RETRY / $CG_TEST_FORWARD (JSON); the configuration file has
#: no keys for them.
class TunedServeProcess(ServeProcess):
    """``consentgate serve`` (the real command) with a fast retry policy, lease and
    forwarder tuning, set through the configuration's ``[router]`` table."""

    def __init__(
        self,
        config: Path,
        http_port: int,
        log_path: Path,
        policy: RetryPolicy,
        options: ForwarderOptions,
    ) -> None:
        super().__init__(config, http_port, log_path)
        text = config.read_text()
        if "[router]" not in text:
            config.write_text(
                text
                + "\n[router]\n"
                + f"max_attempts = {policy.max_attempts}\n"
                + f"retry_base_delay = {policy.base_delay}\n"
                + f"retry_max_delay = {policy.max_delay}\n"
                + f"lease_seconds = {policy.lease_seconds}\n"
                + f"batch_size = {options.batch_size}\n"
                + f"poll_interval = {options.poll_interval}\n"
                + f"idle_release = {options.idle_release}\n"
            )
