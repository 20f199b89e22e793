"""Shared helpers of the benchmark scripts: tools, ports, processes, HTTP, statistics,
command line, results files and tables.

Everything here talks to 127.0.0.1 only, and every wait is bounded both in time and in
number of iterations.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Self

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
LOOPBACK = "127.0.0.1"

# The sender's calling AE title; consentgate's bench config declares it as a peer.
SENDER_AET = "STORESCU"


class BenchError(RuntimeError):
    """The benchmark cannot go on (tool missing, receiver did not start, ...)."""


class ToolMissingError(BenchError):
    """A required external program is not installed."""


# --------------------------------------------------------------------------- tools


def _is_dcmtk(path: str) -> bool:
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "dcmtk" in (out.stdout + out.stderr).lower()


def find_dcmtk_tool(name: str) -> str:
    """Path of the DCMTK program ``name`` (storescu, storescp, findscu, echoscu).

    pynetdicom installs console scripts with the same names into the virtualenv, so the
    Debian path is tried first and every candidate must identify itself as DCMTK.
    """
    candidates = [f"/usr/bin/{name}"]
    found = shutil.which(name)
    if found:
        candidates.append(found)
    for cand in candidates:
        if Path(cand).is_file() and os.access(cand, os.X_OK) and _is_dcmtk(cand):
            return cand
    raise ToolMissingError(
        f"DCMTK '{name}' not found (looked at {', '.join(candidates)}); "
        "install it with: apt-get install dcmtk"
    )


def find_orthanc() -> str:
    """Path of the Orthanc server binary (Debian package ``orthanc``)."""
    for cand in ("/usr/sbin/Orthanc", shutil.which("Orthanc") or ""):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    raise ToolMissingError(
        "Orthanc not found at /usr/sbin/Orthanc nor on PATH; install it with: "
        "apt-get install orthanc (the bench starts its own process, never the service)"
    )


def find_consentgate() -> str:
    """Path of the ``consentgate`` console script of the project's virtualenv."""
    cands = [
        Path(sys.executable).parent / "consentgate",
        REPO_ROOT / ".venv" / "bin" / "consentgate",
    ]
    for cand in cands:
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    raise ToolMissingError(
        "consentgate console script not found in the virtualenv; run "
        "'.venv/bin/pip install -e .' from the repository root"
    )


def tool_version(path: str) -> str:
    """First informative line of ``path --version`` (empty string if it cannot run)."""
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    for line in (out.stdout + out.stderr).splitlines():
        line = line.strip()
        if line:
            return line
    return ""


# --------------------------------------------------------------------------- ports / env


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (the kernel picks them: bind to 0)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
        ports = [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
    for port in ports:
        if port < 1024:
            raise BenchError(f"kernel handed out a low port {port}")
    return ports


def receiver_env() -> dict[str, str]:
    """Environment of the receivers: TCP_NODELAY=1 so only the sender's Nagle varies."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def sender_env(mode: str) -> dict[str, str]:
    """Environment of storescu for a sender mode (``nodelay`` or ``nagle``)."""
    env = dict(os.environ)
    if mode == "nodelay":
        env["TCP_NODELAY"] = "1"
    elif mode == "nagle":
        env.pop("TCP_NODELAY", None)
    else:
        raise ValueError(f"unknown sender mode {mode!r}")
    return env


# --------------------------------------------------------------------------- waiting


def wait_until(
    predicate: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    interval: float = 0.1,
    alive: Callable[[], None] | None = None,
) -> float:
    """Poll ``predicate`` until true; return the seconds waited.

    Bounded by ``timeout`` and by ``timeout / interval + 2`` iterations. ``alive`` is
    called on each iteration and should raise if the watched process died.
    """
    start = time.monotonic()
    deadline = start + timeout
    max_iter = math.ceil(timeout / interval) + 2
    for _ in range(max_iter):
        if alive is not None:
            alive()
        if predicate():
            return time.monotonic() - start
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")


# --------------------------------------------------------------------------- HTTP

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET ``url``; returns (status, body), status 0 if the connection failed."""
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), b""
    except (urllib.error.URLError, OSError, TimeoutError):
        return 0, b""


def http_get_json(url: str, timeout: float = 5.0) -> Any:
    """GET ``url`` and decode JSON; raises :class:`BenchError` unless status is 200."""
    status, body = http_get(url, timeout)
    if status != 200:
        raise BenchError(f"GET {url} returned status {status}")
    return json.loads(body)


# --------------------------------------------------------------------------- processes


class ManagedProcess:
    """A child process in its own session, logged to a file, always stopped on exit.

    Use as a context manager; :meth:`stop` sends SIGTERM to the child, waits up to
    ``grace`` seconds, then SIGKILLs the child's process group (the group id is the
    child's own pid, since it was started with ``start_new_session``).
    """

    def __init__(
        self,
        cmd: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        grace: float = 30.0,
    ) -> None:
        self.cmd = list(cmd)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.grace = grace
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the process (stdout and stderr go to ``log_path``)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            try:
                self.proc = subprocess.Popen(
                    self.cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    cwd=self.cwd,
                    start_new_session=True,
                )
            except OSError as exc:
                raise BenchError(f"cannot start {self.cmd[0]}: {exc}") from exc

    @property
    def pid(self) -> int:
        """Process id of the child."""
        if self.proc is None:
            raise BenchError("process not started")
        return self.proc.pid

    def check_alive(self) -> None:
        """Raise :class:`BenchError` (with the log tail) if the process has exited."""
        if self.proc is None:
            raise BenchError("process not started")
        rc = self.proc.poll()
        if rc is not None:
            raise BenchError(
                f"{Path(self.cmd[0]).name} exited early with status {rc}; "
                f"log {self.log_path}:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 25) -> str:
        """Last ``lines`` lines of the log file."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> int | None:
        """Stop the process (SIGTERM, bounded wait, then SIGKILL); return its status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
        # Reap anything the child left behind in its own group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.returncode


@dataclass(frozen=True)
class ToolRun:
    """Outcome of one timed run of an external tool."""

    returncode: int
    seconds: float
    stdout: str
    stderr: str
    timed_out: bool = False


def run_timed(cmd: Sequence[str], *, env: Mapping[str, str] | None, timeout: float) -> ToolRun:
    """Run ``cmd`` to completion; wall time from process start to exit (perf_counter).

    The child runs in its own session and its whole group is killed on timeout.
    """
    start = time.perf_counter()
    try:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
    except OSError as exc:
        raise BenchError(f"cannot start {cmd[0]}: {exc}") from exc
    try:
        out, err = proc.communicate(timeout=timeout)
        seconds = time.perf_counter() - start
        timed_out = False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        seconds = time.perf_counter() - start
        timed_out = True
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    return ToolRun(
        returncode=proc.returncode if not timed_out else -9,
        seconds=seconds,
        stdout=out.decode(errors="replace"),
        stderr=err.decode(errors="replace"),
        timed_out=timed_out,
    )


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into SystemExit so every ``finally`` stops its processes."""

    def _handler(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    old = {sig: signal.signal(sig, _handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- statistics


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds used so far by process ``pid`` and its descendants (all
    threads, ended ones included; children it has waited for, and the live ones), from
    ``/proc``; ``None`` where ``pid`` cannot be read."""
    stats = _proc_stats()
    if pid not in stats:
        return None
    ticks = 0
    todo = [pid]
    while todo:
        current = todo.pop()
        ticks += stats[current][1]
        todo.extend(child for child, (parent, _) in stats.items() if parent == current)
    return ticks / os.sysconf("SC_CLK_TCK")


def _proc_stats() -> dict[int, tuple[int, int]]:
    """For every readable process: (parent pid, CPU ticks of itself and its waited-for
    children)."""
    stats: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read()
            # fields after the command name (which may hold spaces) in parentheses
            fields = stat[stat.rindex(")") + 2 :].split()
            # ppid (field 4); utime, stime, cutime, cstime (fields 14 to 17)
            ticks = sum(int(f) for f in fields[11:15])
            stats[int(entry)] = (int(fields[1]), ticks)
        except (OSError, ValueError, IndexError):
            continue
    return stats


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return float(statistics.median(values))


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (``pct`` in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def git_revision() -> str:
    """Short description of the work tree's revision, or ``"unknown"``."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown (no commit)"


# --------------------------------------------------------------------------- command line


def new_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The argument parser of a benchmark script (its module docstring as description)."""
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def parse_csv(value: str, allowed: Sequence[str], what: str) -> list[str]:
    """A comma-separated option value, every item one of ``allowed`` (argparse ``type``)."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{what}: choose from {', '.join(allowed)}")
    return items


def add_csv_option(p: argparse.ArgumentParser, option: str, allowed: Sequence[str]) -> None:
    """``option``: a comma-separated subset of ``allowed``, all of them by default."""
    choices = list(allowed)
    p.add_argument(
        option,
        default=",".join(choices),
        type=lambda v: parse_csv(v, choices, option),
        help="comma-separated subset of: " + ", ".join(choices),
    )


def add_output_options(
    p: argparse.ArgumentParser, benchmark: str, *, tmpdir_help: str, keep_help: str
) -> None:
    """``--out``, ``--tmpdir`` and ``--keep-tmp``, common to every benchmark script."""
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"JSON results file (default bench/results/{benchmark}-<timestamp>.json)",
    )
    p.add_argument("--tmpdir", type=Path, default=None, help=tmpdir_help)
    p.add_argument("--keep-tmp", action="store_true", help=keep_help)


def run_main(body: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a script's body; map errors to exit statuses (2: bench error, 130: Ctrl-C)."""
    try:
        with terminate_on_sigterm():
            return body(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


#: Parent of the benchmarks' working directories unless ``--tmpdir`` names another.
DEFAULT_WORK_PARENT = BENCH_DIR / "work"


@contextlib.contextmanager
def work_tmpdir(parent: Path | None, prefix: str, *, keep: bool) -> Iterator[Path]:
    """A fresh temporary working directory, removed at the end unless ``keep``.

    Every receiver's files (and consentgate's database and journal) go there. By default
    it lies under ``bench/work/`` (git-ignored) rather than in the system's temporary
    directory: on this machine creating a file in ``/tmp`` has cost 40 times more system
    time than in the project's directory (ext4 inode allocation in crowded block
    groups), a cost every receiver pays per instance that says nothing about the
    receivers themselves. The cost measured in both places is printed and recorded
    (:func:`file_creation_probe`).
    """
    parent = parent if parent is not None else DEFAULT_WORK_PARENT
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield tmp
    finally:
        if keep:
            print(f"temporary files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _creation_cost(directory: Path, files: int) -> float:
    """Microseconds of wall time to create, write (10 kB) and close one file, as
    receivers store instances: spread over 16 subdirectories of a new directory."""
    probe = Path(tempfile.mkdtemp(prefix="fs-probe-", dir=directory))
    try:
        for sub in range(16):
            (probe / f"{sub:02x}").mkdir()
        payload = os.urandom(10 * 1024)
        start = time.perf_counter()
        for n in range(files):
            fd = os.open(probe / f"{n % 16:02x}" / f"{n:06d}.dcm", os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.write(fd, payload)
            finally:
                os.close(fd)
        return (time.perf_counter() - start) / files * 1e6
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def file_creation_probe(work_dir: Path, files: int = 400) -> dict[str, Any]:
    """What creating a file costs in the working directory and in the system's
    temporary directory; printed, and kept in the results document."""
    system_tmp = Path(tempfile.gettempdir())
    probe = {
        "work_dir": str(work_dir),
        "file_create_us": round(_creation_cost(work_dir, files), 1),
        "system_tmp": str(system_tmp),
        "system_tmp_file_create_us": round(_creation_cost(system_tmp, files), 1),
    }
    print(
        f"working directory {work_dir}: creating a 10 kB file takes "
        f"{probe['file_create_us']:.0f} us ({system_tmp}: "
        f"{probe['system_tmp_file_create_us']:.0f} us)",
        flush=True,
    )
    return probe


# --------------------------------------------------------------------------- results


def results_path(out: Path | None, benchmark: str) -> Path:
    """``out`` or the default ``bench/results/<benchmark>-<timestamp>.json``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return out or BENCH_DIR / "results" / f"{benchmark}-{stamp}.json"


def results_header(
    benchmark: str,
    args: argparse.Namespace,
    *,
    cpus: bool = False,
    file_system: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The first keys of every results document: what ran, when, where and how."""
    host: dict[str, Any] = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if cpus:
        host["cpus"] = os.cpu_count()
    if file_system is not None:
        host["file_system"] = dict(file_system)
    return {
        "benchmark": benchmark,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": host,
        "revision": git_revision(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }


def write_results(path: Path, doc: Mapping[str, Any]) -> None:
    """Write a results document as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- tables


def fmt_cell(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec`` (e.g. ``"8.2f"``), or a right-aligned ``-``."""
    width = int(spec.split(".")[0])
    return f"{'-':>{width}}" if value is None else format(value, spec)


def print_table_header(header: str, *, blank_line: bool = True) -> None:
    """A table's header line underlined with dashes (after an empty line)."""
    if blank_line:
        print()
    print(header)
    print("-" * len(header))


def print_block(lines: Sequence[str]) -> None:
    """``lines`` after an empty line; nothing at all if there are none."""
    if lines:
        print()
        print("\n".join(lines))
