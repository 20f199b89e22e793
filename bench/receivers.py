"""C-STORE receivers under test: DCMTK storescp, Orthanc and consentgate.

Each receiver is started fresh, in its own empty working directory, for every timed run,
so every run starts clean; it is always stopped in a ``finally``/``with`` block.
"""

from __future__ import annotations

import abc
import json
import re
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from bench.common import (
    LOOPBACK,
    REPO_ROOT,
    SENDER_AET,
    BenchError,
    ManagedProcess,
    find_consentgate,
    find_dcmtk_tool,
    find_orthanc,
    free_ports,
    http_get,
    http_get_json,
    receiver_env,
    tool_version,
    wait_until,
)

START_TIMEOUT = 30.0


class RunningReceiver(abc.ABC):
    """A started receiver: where to send, and how many instances it holds."""

    def __init__(self, ae_title: str, port: int, proc: ManagedProcess) -> None:
        self.ae_title = ae_title
        self.port = port
        self.proc = proc

    @abc.abstractmethod
    def count_instances(self) -> int:
        """Number of instances the receiver has stored so far."""

    count_source = ""

    def final_count(self) -> tuple[int, str]:
        """A last, possibly slower, count and how it was obtained (after polling ended)."""
        return self.count_instances(), self.count_source


class Receiver(abc.ABC):
    """Factory of fresh :class:`RunningReceiver` instances."""

    name: str = ""
    ae_title: str = ""

    @abc.abstractmethod
    def check_available(self) -> None:
        """Raise :class:`~bench.common.ToolMissingError` if the receiver cannot run."""

    @abc.abstractmethod
    def version(self) -> str:
        """Version string for the results file."""

    @abc.abstractmethod
    @contextmanager
    def launch(self, workdir: Path) -> Iterator[RunningReceiver]:
        """Start a clean receiver in ``workdir`` (empty), yield it, stop it afterwards."""


def _echo_ok(echoscu: str, ae_title: str, port: int) -> bool:
    try:
        out = subprocess.run(
            [
                echoscu,
                "-aet",
                SENDER_AET,
                "-aec",
                ae_title,
                "-to",
                "2",
                "-ta",
                "5",
                LOOPBACK,
                str(port),
            ],
            capture_output=True,
            timeout=15,
            check=False,
            env=receiver_env(),
        )
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0


def wait_http_ok(proc: ManagedProcess, url: str, what: str) -> None:
    """Wait (bounded) until ``url`` answers 200 while ``proc`` stays alive."""
    wait_until(
        lambda: http_get(url)[0] == 200,
        timeout=START_TIMEOUT,
        what=what,
        interval=0.1,
        alive=proc.check_alive,
    )


def wait_echo_ok(proc: ManagedProcess, echoscu: str, ae_title: str, port: int, name: str) -> None:
    """Wait (bounded) until the receiver ``name`` answers C-ECHO while ``proc`` stays alive."""
    wait_until(
        lambda: _echo_ok(echoscu, ae_title, port),
        timeout=START_TIMEOUT,
        what=f"{name} to answer C-ECHO",
        interval=0.1,
        alive=proc.check_alive,
    )


# --------------------------------------------------------------------------- storescp


class _StoreScpRunning(RunningReceiver):
    count_source = "files in storescp -od directory"

    def __init__(self, port: int, proc: ManagedProcess, out_dir: Path) -> None:
        super().__init__(StoreScp.ae_title, port, proc)
        self.out_dir = out_dir

    def count_instances(self) -> int:
        return sum(1 for p in self.out_dir.rglob("*") if p.is_file())


class StoreScp(Receiver):
    """DCMTK storescp, single process, writing every instance as a file (Debian defaults).

    storescp 3.6.7 has no bind-address option: it listens on all interfaces on a random
    high port for the length of one run; all traffic is sent to 127.0.0.1.
    """

    name = "storescp"
    ae_title = "STORESCP"

    def check_available(self) -> None:
        find_dcmtk_tool("storescp")
        find_dcmtk_tool("echoscu")

    def version(self) -> str:
        return tool_version(find_dcmtk_tool("storescp"))

    @contextmanager
    def launch(self, workdir: Path) -> Iterator[RunningReceiver]:
        storescp = find_dcmtk_tool("storescp")
        echoscu = find_dcmtk_tool("echoscu")
        out_dir = workdir / "storescp-out"
        out_dir.mkdir(parents=True)
        (port,) = free_ports(1)
        cmd = [storescp, "-aet", self.ae_title, "-od", str(out_dir), "+xa", "-dhl", str(port)]
        with ManagedProcess(
            cmd, log_path=workdir / "storescp.log", env=receiver_env(), grace=15
        ) as proc:
            wait_echo_ok(proc, echoscu, self.ae_title, port, "storescp")
            # The readiness C-ECHO must not leave files behind.
            if any(out_dir.iterdir()):
                raise BenchError(f"storescp output directory {out_dir} not empty at start")
            yield _StoreScpRunning(port, proc, out_dir)


# --------------------------------------------------------------------------- Orthanc


class _OrthancRunning(RunningReceiver):
    count_source = "Orthanc GET /statistics CountInstances"

    def __init__(self, port: int, proc: ManagedProcess, http_port: int) -> None:
        super().__init__(Orthanc.ae_title, port, proc)
        self.http_port = http_port

    def count_instances(self) -> int:
        stats = http_get_json(f"http://{LOOPBACK}:{self.http_port}/statistics")
        return int(stats["CountInstances"])


class Orthanc(Receiver):
    """Our own Orthanc process (never the system service) with a throw-away SQLite index.

    Orthanc 1.10.1 has no option to bind to one address: with ``RemoteAccessAllowed``
    false its HTTP server only answers loopback clients; the DICOM port listens on all
    interfaces on a random high port for the length of one run. Everything not set here
    keeps Orthanc's defaults (notably ``SyncStorageArea: true``, ``MaximumPduLength:
    16384``), as the reference figures were measured with them.
    """

    name = "orthanc"
    ae_title = "ORTHANC"

    def __init__(
        self,
        *,
        lua_scripts: Sequence[Path] = (),
        modalities: Mapping[str, list[object]] | None = None,
    ) -> None:
        # Both are empty for the store benchmark; the forward benchmark adds a Lua
        # auto-routing script and its destination modality.
        self.lua_scripts = [str(p) for p in lua_scripts]
        self.modalities = dict(modalities or {})

    def check_available(self) -> None:
        find_orthanc()
        find_dcmtk_tool("echoscu")

    def version(self) -> str:
        return tool_version(find_orthanc())

    @contextmanager
    def launch(self, workdir: Path) -> Iterator[RunningReceiver]:
        orthanc = find_orthanc()
        echoscu = find_dcmtk_tool("echoscu")
        http_port, dicom_port = free_ports(2)
        config = {
            "Name": "consentgate-bench",
            "StorageDirectory": str(workdir / "orthanc-storage"),
            "IndexDirectory": str(workdir / "orthanc-index"),
            "StorageCompression": False,
            "Plugins": [],
            "LuaScripts": list(self.lua_scripts),
            "HttpServerEnabled": True,
            "HttpPort": http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {"bench-sender": [SENDER_AET, LOOPBACK, 104], **self.modalities},
            "SaveJobs": False,
        }
        cfg_path = workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        with ManagedProcess(
            [orthanc, str(cfg_path)],
            log_path=workdir / "orthanc.log",
            env=receiver_env(),
            cwd=workdir,
            grace=30,
        ) as proc:
            wait_http_ok(proc, f"http://{LOOPBACK}:{http_port}/statistics", "Orthanc /statistics")
            wait_echo_ok(proc, echoscu, self.ae_title, dicom_port, "Orthanc")
            running = _OrthancRunning(dicom_port, proc, http_port)
            if running.count_instances() != 0:
                raise BenchError("fresh Orthanc does not start empty")
            yield running


# --------------------------------------------------------------------------- consentgate

_INSTANCES_RE = re.compile(r"^\s*instances?\s*[:=]\s*(\d+)\b", re.IGNORECASE)


def consentgate_toml(
    *,
    dicom_port: int,
    http_port: int,
    data_dir: Path,
    extra_peers: str = "",
    sender_issuer: str = "",
) -> str:
    """The bench's consentgate configuration (see bench/README.md)."""
    return (
        "[node]\n"
        'ae_title = "CONSENTGATE"\n'
        f'dicom_host = "{LOOPBACK}"\n'
        f"dicom_port = {dicom_port}\n"
        f"http_port = {http_port}\n"
        f"data_dir = {json.dumps(str(data_dir))}\n"
        "max_pdu = 1048576\n"
        "\n"
        "[[peers]]\n"
        'name = "bench-sender"\n'
        f'ae_title = "{SENDER_AET}"\n'
        f'host = "{LOOPBACK}"\n'
        "port = 104\n"
        'services = ["echo", "store"]\n'
        + (f"issuer = {json.dumps(sender_issuer)}\n" if sender_issuer else "")
        + extra_peers
    )


def consentgate_cli(
    consentgate: str, config: Path, *args: str, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run ``consentgate --config CONFIG ARGS`` from the repository root, output captured.

    Raises what :func:`subprocess.run` raises (``OSError``, ``TimeoutExpired``); the
    exit status is the caller's to judge.
    """
    return subprocess.run(
        [consentgate, "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO_ROOT,
    )


@contextmanager
def serve_consentgate(consentgate: str, config: Path, log_path: Path) -> Iterator[ManagedProcess]:
    """``consentgate serve`` with the bench's process settings (stopped at the end)."""
    cmd = [consentgate, "--config", str(config), "serve"]
    with ManagedProcess(
        cmd, log_path=log_path, env=receiver_env(), cwd=REPO_ROOT, grace=40
    ) as proc:
        yield proc


def consentgate_status_count(consentgate: str, config: Path) -> int | None:
    """Instance count printed by ``consentgate status`` (parsed loosely), if any."""
    try:
        out = consentgate_cli(consentgate, config, "status", timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    for line in out.stdout.splitlines():
        match = _INSTANCES_RE.search(line)
        if match:
            return int(match.group(1))
    return None


class _ConsentgateRunning(RunningReceiver):
    def __init__(
        self, port: int, proc: ManagedProcess, data_dir: Path, consentgate: str, config: Path
    ) -> None:
        super().__init__(Consentgate.ae_title, port, proc)
        self.archive = data_dir / "archive"
        self.consentgate = consentgate
        self.config = config

    def count_instances(self) -> int:
        if not self.archive.is_dir():
            return 0
        return sum(1 for _ in self.archive.rglob("*.dcm"))

    def final_count(self) -> tuple[int, str]:
        files = self.count_instances()
        status = consentgate_status_count(self.consentgate, self.config)
        if status is not None and status != files:
            return status, f"'consentgate status' (archive/*.dcm files: {files})"
        return files, "archive/*.dcm files"


class Consentgate(Receiver):
    """``consentgate init`` then ``consentgate serve`` with a throw-away data directory.

    The index is SQLite inside the data directory (the configuration's default).
    """

    name = "consentgate"
    ae_title = "CONSENTGATE"

    def __init__(
        self,
        *,
        extra_toml: str = "",
        sender_issuer: str = "",
        before_serve: Callable[[str, Path], None] | None = None,
    ) -> None:
        # All empty for the store benchmark. ``extra_toml`` is appended to the
        # configuration (more [[peers]], [[routes]]); ``sender_issuer`` sets the sender
        # peer's ``issuer``; ``before_serve(consentgate, config_path)`` runs after
        # ``consentgate init`` and before ``serve`` (e.g. to record consents).
        self.extra_toml = extra_toml
        self.sender_issuer = sender_issuer
        self.before_serve = before_serve

    def check_available(self) -> None:
        find_consentgate()
        find_dcmtk_tool("echoscu")

    def version(self) -> str:
        return "consentgate (work tree)"

    @contextmanager
    def launch(self, workdir: Path) -> Iterator[RunningReceiver]:
        consentgate = find_consentgate()
        echoscu = find_dcmtk_tool("echoscu")
        dicom_port, http_port = free_ports(2)
        data_dir = workdir / "cg-data"
        cfg_path = workdir / "consentgate.toml"
        cfg_path.write_text(
            consentgate_toml(
                dicom_port=dicom_port,
                http_port=http_port,
                data_dir=data_dir,
                extra_peers=self.extra_toml,
                sender_issuer=self.sender_issuer,
            ),
            encoding="utf-8",
        )
        init = consentgate_cli(consentgate, cfg_path, "init", timeout=120)
        if init.returncode != 0:
            raise BenchError(
                f"'consentgate init' exited with status {init.returncode}:\n"
                + "\n".join((init.stdout + init.stderr).splitlines()[-10:])
            )
        if self.before_serve is not None:
            self.before_serve(consentgate, cfg_path)
        with serve_consentgate(consentgate, cfg_path, workdir / "consentgate.log") as proc:
            wait_http_ok(proc, f"http://{LOOPBACK}:{http_port}/healthz", "consentgate /healthz")
            wait_echo_ok(proc, echoscu, self.ae_title, dicom_port, "consentgate")
            running = _ConsentgateRunning(dicom_port, proc, data_dir, consentgate, cfg_path)
            if running.count_instances() != 0:
                raise BenchError("fresh consentgate does not start empty")
            yield running


RECEIVERS: dict[str, type[Receiver]] = {
    StoreScp.name: StoreScp,
    Orthanc.name: Orthanc,
    Consentgate.name: Consentgate,
}
