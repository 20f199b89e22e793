"""Forwarding end to end: DCMTK storescu -> router -> DCMTK storescp, over loopback.

Usage (from the repository root)::

    .venv/bin/python -m bench.run_forward [--ct N] [--small N] [--repeats R] [--out FILE]
    .venv/bin/python -m bench.run_forward --quick        # --ct 200 --small 500 --repeats 1

Routers compared, each forwarding every instance it receives to a DCMTK storescp (the
final destination):

* ``consentgate``: ``consentgate serve`` with one ``[[routes]]`` entry to the storescp
  peer and no purpose (care-team route: no consent check);
* ``consentgate-consent``: the same route carrying the opt-in purpose ``FWD``; the corpus
  patient is registered and has granted ``FWD`` (CLI, before ``serve``), so every
  instance is forwarded after a consent check;
* ``orthanc``: Orthanc with a Lua ``OnStoredInstance`` callback calling
  ``SendToModality(instanceId, 'dest')``.

For every corpus and repeat, each router and its storescp are started fresh and empty;
one storescu process sends the whole corpus over one association (TCP_NODELAY=1). The
time measured runs from storescu's start to the moment the last instance is present in
storescp's output directory (polled). Then the bench waits until the router has nothing
left to send, checks that storescp received every SOP Instance UID exactly once (file
names carry the UID; storescp logs "already exists, overwriting" for a duplicate), and
for consentgate records ``consentgate queue stats``.

This is a benchmark, not a test: nothing here is part of the pytest suite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    LOOPBACK,
    BenchError,
    add_csv_option,
    add_output_options,
    file_creation_probe,
    find_dcmtk_tool,
    fmt_cell,
    http_get_json,
    median,
    new_parser,
    print_block,
    print_table_header,
    process_cpu_seconds,
    results_header,
    results_path,
    run_main,
    sender_env,
    tool_version,
    wait_until,
    work_tmpdir,
    write_results,
)
from bench.receivers import (
    Consentgate,
    Orthanc,
    Receiver,
    RunningReceiver,
    StoreScp,
    consentgate_cli,
)
from bench.run_store import Corpus, build_corpora, storescu_command

SYSTEMS = ("direct", "consentgate", "consentgate-consent", "orthanc")
#: storescu straight into storescp, no router: how fast the same transfer goes without
#: a hop; a router's end-to-end time cannot be shorter (it is received and sent again)
DIRECT = "direct"
CORPORA = ("ct", "small")
PURPOSE = "FWD"
DEST_PEER = "dest"

# Targets (issue): consentgate >= 4x Orthanc on CT, >= 8x on small; consent < 10 % cost.
TARGET_VS_ORTHANC = {"ct": 4.0, "small": 8.0}
TARGET_CONSENT_OVERHEAD = 0.10

LUA_SCRIPT = """\
-- consentgate bench: auto-route every stored instance to the modality 'dest'.
function OnStoredInstance(instanceId, tags, metadata, origin)
  SendToModality(instanceId, 'dest')
end
"""

_DUPLICATE_RE = re.compile(r"already exists, overwriting", re.IGNORECASE)
# storescp's default file names: <modality prefix>.<SOP Instance UID>
_STORESCP_NAME_RE = re.compile(r"^[A-Za-z]{1,4}\.(\d[\d.]*)$")


# --------------------------------------------------------------------------- corpus facts


@dataclass(frozen=True)
class PatientFacts:
    """Patient attributes read from one corpus file (for the consent store)."""

    patient_id: str
    issuer: str
    birth_name: str
    first_name: str
    birth_date: str  # YYYY-MM-DD
    sex: str  # f, m or u
    modality: str


def read_patient(path: Path) -> PatientFacts:
    """Read the patient of a corpus file with pydicom."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    name = str(ds.get("PatientName", "") or "")
    family, _, given = name.partition("^")
    raw_date = str(ds.get("PatientBirthDate", "") or "")
    if not re.fullmatch(r"\d{8}", raw_date):
        raise BenchError(f"{path}: PatientBirthDate {raw_date!r} is not YYYYMMDD")
    sex = str(ds.get("PatientSex", "") or "").upper()
    return PatientFacts(
        patient_id=str(ds.PatientID),
        issuer=str(ds.get("IssuerOfPatientID", "") or ""),
        birth_name=family or "BENCH",
        first_name=given.split("^")[0] or "BENCH",
        birth_date=f"{raw_date[:4]}-{raw_date[4:6]}-{raw_date[6:]}",
        sex={"F": "f", "M": "m"}.get(sex, "u"),  # DICOM "O"/empty -> u(nknown)
        modality=str(ds.get("Modality", "") or ""),
    )


def read_sop_uids(files: Sequence[Path]) -> list[str]:
    """SOP Instance UIDs of the corpus files, in order."""
    import pydicom

    return [
        str(
            pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).get(
                "SOPInstanceUID", ""
            )
        )
        for f in files
    ]


# --------------------------------------------------------------------------- routers


def _cli(consentgate: str, config: Path, *args: str, timeout: float = 120.0) -> str:
    """Run ``consentgate --config CONFIG ARGS``; return stdout, raise on failure."""
    try:
        out = consentgate_cli(consentgate, config, *args, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"'consentgate {' '.join(args)}' timed out after {timeout:.0f} s") from exc
    if out.returncode != 0:
        tail = "\n".join((out.stdout + out.stderr).splitlines()[-10:])
        raise BenchError(f"'consentgate {' '.join(args)}' exited with {out.returncode}:\n{tail}")
    return out.stdout


def consentgate_route_toml(dest_port: int, purpose: str, modality: str) -> str:
    """The destination peer and the route of the forward benchmark."""
    text = (
        "\n[[peers]]\n"
        f'name = "{DEST_PEER}"\n'
        f'ae_title = "{StoreScp.ae_title}"\n'
        f'host = "{LOOPBACK}"\n'
        f"port = {dest_port}\n"
        "services = []\n"
        "\n[[routes]]\n"
        'name = "to-dest"\n'
        f'destinations = ["{DEST_PEER}"]\n'
    )
    if purpose:
        text += f'purpose = "{purpose}"\n'
    if modality:
        text += f"[routes.match]\nModality = [{json.dumps(modality)}]\n"
    return text


def grant_consent(
    patients: Sequence[PatientFacts], default_issuer: str, workdir: Path
) -> Callable[[str, Path], None]:
    """``before_serve`` hook: purpose FWD (opt-in), the patients, and their consent."""

    def hook(consentgate: str, config: Path) -> None:
        notice = workdir / "fwd-notice.txt"
        notice.write_text("Benchmark notice: images are forwarded.\n", encoding="utf-8")
        _cli(
            consentgate,
            config,
            "purpose",
            "add",
            PURPOSE,
            "--name",
            "bench",
            "--model",
            "opt-in",
            "--notice",
            str(notice),
            "--by",
            "bench",
        )
        seen: set[tuple[str, str]] = set()
        for p in patients:
            issuer = p.issuer or default_issuer
            if (issuer, p.patient_id) in seen:
                continue
            seen.add((issuer, p.patient_id))
            _cli(
                consentgate,
                config,
                "patient",
                "add",
                "--issuer",
                issuer,
                "--patient-id",
                p.patient_id,
                "--birth-name",
                p.birth_name,
                "--first-name",
                p.first_name,
                "--birth-date",
                p.birth_date,
                "--sex",
                p.sex,
                "--by",
                "bench",
            )
            _cli(
                consentgate,
                config,
                "consent",
                "grant",
                "--issuer",
                issuer,
                "--patient-id",
                p.patient_id,
                "--purpose",
                PURPOSE,
                "--by",
                "bench",
            )

    return hook


def make_router(
    system: str,
    dest_port: int,
    patients: Sequence[PatientFacts],
    workdir: Path,
    lua_path: Path,
) -> Receiver:
    """A fresh router of kind ``system`` forwarding to storescp on ``dest_port``."""
    modalities = sorted({p.modality for p in patients})
    modality = modalities[0] if len(modalities) == 1 else ""
    if system == "orthanc":
        return Orthanc(
            lua_scripts=[lua_path],
            modalities={DEST_PEER: [StoreScp.ae_title, LOOPBACK, dest_port]},
        )
    if system == "consentgate":
        return Consentgate(extra_toml=consentgate_route_toml(dest_port, "", modality))
    if system == "consentgate-consent":
        # Files without an Issuer of Patient ID get one from the sender peer.
        sender_issuer = "" if all(p.issuer for p in patients) else "BENCH"
        return Consentgate(
            extra_toml=consentgate_route_toml(dest_port, PURPOSE, modality),
            sender_issuer=sender_issuer,
            before_serve=grant_consent(patients, sender_issuer, workdir),
        )
    raise ValueError(system)


# --------------------------------------------------------------------------- router state


def parse_queue_stats(text: str) -> dict[str, dict[str, int]]:
    """``consentgate queue stats`` output -> {destination: {state: count}}."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or lines[0].strip() == "queue is empty":
        return {}
    header = lines[0].split()
    if not header or header[0] != "DESTINATION":
        raise BenchError(f"unexpected 'queue stats' output:\n{text}")
    states = header[1:]
    result = {}
    for line in lines[1:]:
        parts = line.split()
        if len(parts) != len(states) + 1:
            raise BenchError(f"unexpected 'queue stats' line: {line!r}")
        result[parts[0]] = {s: int(v) for s, v in zip(states, parts[1:], strict=True)}
    return result


def consentgate_pending(stats: dict[str, dict[str, int]]) -> int:
    """Jobs that may still be sent (ready or sending)."""
    return sum(c.get("ready", 0) + c.get("sending", 0) for c in stats.values())


def orthanc_active_jobs(http_port: int) -> int:
    """Orthanc jobs not finished yet (Pending, Running, Retry, Paused)."""
    jobs = http_get_json(f"http://{LOOPBACK}:{http_port}/jobs?expand", timeout=10.0)
    return sum(1 for j in jobs if j.get("State") in ("Pending", "Running", "Retry", "Paused"))


def orthanc_failed_jobs(http_port: int) -> int:
    """Orthanc jobs in state Failure (among those Orthanc still lists)."""
    jobs = http_get_json(f"http://{LOOPBACK}:{http_port}/jobs?expand", timeout=10.0)
    return sum(1 for j in jobs if j.get("State") == "Failure")


# --------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    """One timed forward of one corpus through one fresh router."""

    system: str
    corpus: str
    label: str
    repeat: int
    instances: int
    bytes: int
    seconds: float | None = None  # storescu start -> last instance in storescp's dir
    mtime_seconds: float | None = None  # storescu start -> newest file mtime in the dir
    ingest_seconds: float | None = None  # storescu start -> storescu exit
    drain_seconds: float | None = None  # storescu exit -> last instance at storescp
    # CPU seconds the router process used from storescu's start until its queue was empty
    router_cpu_seconds: float | None = None
    received_files: int | None = None
    distinct_uids: int | None = None
    missing: int | None = None
    unexpected: int | None = None
    duplicates: int | None = None
    duplicate_lines: list[str] = field(default_factory=list)  # storescp's warnings
    router_stored: int | None = None
    queue_stats: str = ""
    queue_list: str = ""
    orthanc_failed_jobs: int | None = None
    router_exit_status: int | None = None  # after SIGTERM at the end of the run
    router_shutdown_problem: str = ""  # traceback at shutdown (does not fail the run)
    ok: bool = False
    error: str = ""
    log_excerpt: str = ""


def _count_files(directory: Path) -> int:
    with os.scandir(directory) as it:
        return sum(1 for e in it if e.is_file(follow_symlinks=False))


@contextmanager
def _started(
    cmd: Sequence[str], env: dict[str, str], log: Any
) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        list(cmd),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


def time_forward(
    storescu: str,
    rx: RunningReceiver,
    corpus: Corpus,
    out_dir: Path,
    workdir: Path,
    *,
    timeout: float,
    result: RunResult,
) -> None:
    """Run storescu against ``rx``; poll ``out_dir`` until it holds the whole corpus."""
    cmd = storescu_command(storescu, rx.ae_title, rx.port, corpus)
    os.sync()  # earlier runs' dirty pages must not be written back during this one
    storescu_log = workdir / "storescu.log"
    poll_interval = 0.02
    max_iter = int(timeout / poll_interval) + 10
    wall0 = time.time()
    t0 = time.perf_counter()
    exit_at: float | None = None
    done_at: float | None = None
    rc: int | None = None
    with open(storescu_log, "wb") as log, _started(cmd, sender_env("nodelay"), log) as proc:
        for _ in range(max_iter):
            now = time.perf_counter()
            if exit_at is None and proc.poll() is not None:
                exit_at = now
                rc = proc.returncode
            if _count_files(out_dir) >= corpus.count:
                done_at = time.perf_counter()
                break
            if now - t0 > timeout:
                break
            if exit_at is not None and rc != 0 and now - exit_at > 5.0:
                break  # storescu failed; give the router 5 s, then give up
            rx.proc.check_alive()
            time.sleep(poll_interval)
        if exit_at is None:
            # storescu sent the last instance but has not released yet: wait (bounded)
            # so the ingest time is known.
            try:
                rc = proc.wait(timeout=max(5.0, timeout - (time.perf_counter() - t0)))
                exit_at = time.perf_counter()
            except subprocess.TimeoutExpired:
                rc = None
    output = storescu_log.read_bytes()
    if exit_at is not None:
        result.ingest_seconds = exit_at - t0
    if rc is None:
        result.error = f"storescu did not finish within {timeout:.0f} s"
    elif rc != 0:
        tail = "\n".join(output.decode(errors="replace").splitlines()[-10:])
        result.error = f"storescu exited with status {rc}: {tail}"
    if done_at is None:
        have = _count_files(out_dir)
        result.error = result.error or (
            f"storescp holds {have}/{corpus.count} instances after {time.perf_counter() - t0:.0f} s"
        )
        return
    result.seconds = done_at - t0
    if exit_at is not None:
        result.drain_seconds = max(0.0, done_at - exit_at)
    with os.scandir(out_dir) as it:
        newest = max((e.stat().st_mtime for e in it if e.is_file()), default=None)
    if newest is not None:
        result.mtime_seconds = newest - wall0


def _cli_retry(consentgate: str, config: Path, *args: str, attempts: int = 3) -> str:
    """:func:`_cli`, retried a few times (a CLI run can fail transiently, e.g. while the
    work tree is being edited or the database is busy)."""
    last: BenchError | None = None
    for attempt in range(attempts):
        try:
            return _cli(consentgate, config, *args)
        except BenchError as exc:
            last = exc
            time.sleep(0.5 * (attempt + 1))
    assert last is not None
    raise last


def wait_router_idle(system: str, rx: RunningReceiver, timeout: float) -> str:
    """Wait until the router has nothing left to send; return a problem or ''."""
    last_error = ""

    def idle() -> bool:
        nonlocal last_error
        try:
            if system.startswith("consentgate"):
                cg: Any = rx
                stats = parse_queue_stats(_cli(cg.consentgate, cg.config, "queue", "stats"))
                return consentgate_pending(stats) == 0
            return orthanc_active_jobs(rx.http_port) == 0  # type: ignore[attr-defined]
        except (BenchError, KeyError, ValueError) as exc:
            last_error = str(exc)
            return False  # retried until the timeout

    try:
        wait_until(
            idle,
            timeout=timeout,
            interval=0.5,
            what=f"{system} to finish sending",
            alive=rx.proc.check_alive,
        )
    except BenchError as exc:
        return f"{exc}" + (f"; last error: {last_error}" if last_error else "")
    return ""


def check_destination(
    out_dir: Path, dest_log: Path, sent_uids: Sequence[str], result: RunResult
) -> None:
    """Every sent SOP Instance UID exactly once at storescp."""
    import pydicom

    received: list[str] = []
    for entry in sorted(out_dir.iterdir()):
        match = _STORESCP_NAME_RE.match(entry.name)
        if match:
            received.append(match.group(1))
        else:  # not a UID-derived name: read the file
            ds = pydicom.dcmread(entry, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            received.append(str(ds.get("SOPInstanceUID", "")))
    try:
        log_text = dest_log.read_text(errors="replace")
    except OSError:
        log_text = ""
    overwrites = [ln.strip() for ln in log_text.splitlines() if _DUPLICATE_RE.search(ln)]
    overwritten = len(overwrites)
    result.duplicate_lines = overwrites[:10]
    sent = set(sent_uids)
    got = set(received)
    result.received_files = len(received)
    result.distinct_uids = len(got)
    result.missing = len(sent - got)
    result.unexpected = len(got - sent)
    result.duplicates = overwritten + (len(received) - len(got))
    problems = []
    if result.missing:
        problems.append(f"{result.missing} instance(s) never reached storescp")
    if result.unexpected:
        problems.append(f"{result.unexpected} unexpected instance(s) at storescp")
    if result.duplicates:
        problems.append(f"{result.duplicates} instance(s) received more than once")
    if problems and not result.error:
        result.error = "; ".join(problems)


def _log_excerpt(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    interesting = [ln for ln in text if re.search(r"error|warn|fail|exception|trace", ln, re.I)]
    return "\n".join((interesting or text)[-lines:])


def _shutdown_traceback(path: Path) -> str:
    """The last traceback in a log (first and last lines), or ''."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    starts = [i for i, ln in enumerate(text) if ln.startswith("Traceback (most recent call")]
    if not starts:
        return ""
    block = text[starts[-1] :]
    end = next((i for i, ln in enumerate(block) if i and not ln.startswith((" ", "\t"))), 0)
    block = block[: end + 1] if end else block
    return "\n".join(block[:1] + block[-3:])


def run_one(
    system: str,
    corpus: Corpus,
    repeat: int,
    workdir: Path,
    *,
    storescu: str,
    patients: Sequence[PatientFacts],
    sent_uids: Sequence[str],
    lua_path: Path,
    timeout: float,
    idle_timeout: float,
    quiet: float,
) -> RunResult:
    """Fresh storescp + fresh router; time one forward; check storescp's content.

    System ``direct``: storescu sends to the fresh storescp itself (no router).
    """
    result = RunResult(system, corpus.name, corpus.label, repeat, corpus.count, corpus.total_bytes)
    workdir.mkdir(parents=True)
    dest_dir = workdir / "dest"
    router_dir = workdir / "router"
    with StoreScp().launch(dest_dir) as dest:
        out_dir: Path = dest.out_dir  # type: ignore[attr-defined]
        if system == DIRECT:
            time_forward(storescu, dest, corpus, out_dir, workdir, timeout=timeout, result=result)
            time.sleep(quiet)
            router_log = dest.proc.log_path
        else:
            router = make_router(system, dest.port, patients, router_dir, lua_path)
            router_dir.mkdir(parents=True)
            with router.launch(router_dir) as rx:
                try:
                    cpu_before = process_cpu_seconds(rx.proc.pid)
                    time_forward(
                        storescu, rx, corpus, out_dir, workdir, timeout=timeout, result=result
                    )
                    problem = wait_router_idle(system, rx, idle_timeout)
                    cpu_after = process_cpu_seconds(rx.proc.pid)
                    if cpu_before is not None and cpu_after is not None:
                        result.router_cpu_seconds = cpu_after - cpu_before
                    if problem and not result.error:
                        result.error = problem
                    time.sleep(quiet)  # a late duplicate would show up now
                    with contextlib.suppress(BenchError):
                        result.router_stored = rx.count_instances()
                    if system.startswith("consentgate"):
                        cg: Any = rx
                        try:
                            result.queue_stats = _cli_retry(
                                cg.consentgate, cg.config, "queue", "stats"
                            )
                            stats = parse_queue_stats(result.queue_stats)
                        except BenchError as exc:
                            result.queue_stats = f"(queue stats unavailable: {exc})"
                        else:
                            done = sum(c.get("done", 0) for c in stats.values())
                            if done != corpus.count and not result.error:
                                result.error = (
                                    f"queue stats: {done} jobs done, expected {corpus.count}"
                                )
                        if result.error:
                            with contextlib.suppress(BenchError):
                                result.queue_list = _cli_retry(
                                    cg.consentgate, cg.config, "queue", "list", "--limit", "30"
                                )
                    else:
                        with contextlib.suppress(BenchError, KeyError, ValueError):
                            result.orthanc_failed_jobs = orthanc_failed_jobs(rx.http_port)  # type: ignore[attr-defined]
                finally:
                    router_log = rx.proc.log_path
            # The router has been stopped (SIGTERM) here: record how it exited.
            if rx.proc.proc is not None:
                result.router_exit_status = rx.proc.proc.returncode
            result.router_shutdown_problem = _shutdown_traceback(rx.proc.log_path)
        check_destination(out_dir, dest.proc.log_path, sent_uids, result)
        if result.error or not result.seconds:
            result.log_excerpt = _log_excerpt(router_log)
    result.ok = not result.error and result.seconds is not None
    return result


# --------------------------------------------------------------------------- summary


@dataclass
class Row:
    """Summary of the repeats of one (system, corpus)."""

    system: str
    corpus: str
    label: str
    instances: int
    megabytes: float
    runs_ok: int = 0
    runs: int = 0
    median_seconds: float | None = None
    min_seconds: float | None = None
    max_seconds: float | None = None
    instances_per_second: float | None = None
    median_ingest_seconds: float | None = None
    median_cpu_seconds: float | None = None
    ratio_to_orthanc: float | None = None
    all_seconds: list[float] = field(default_factory=list)


def summarize(results: Sequence[RunResult]) -> list[Row]:
    """One row per (system, corpus); medians over successful runs (all must succeed)."""
    rows: dict[tuple[str, str], Row] = {}
    ingest: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    for r in results:
        key = (r.system, r.corpus)
        row = rows.setdefault(key, Row(r.system, r.corpus, r.label, r.instances, r.bytes / 1e6))
        row.runs += 1
        if r.ok and r.seconds is not None:
            row.runs_ok += 1
            row.all_seconds.append(r.seconds)
            if r.ingest_seconds is not None:
                ingest.setdefault(key, []).append(r.ingest_seconds)
            if r.router_cpu_seconds is not None:
                cpu.setdefault(key, []).append(r.router_cpu_seconds)
    for key, row in rows.items():
        if row.all_seconds and row.runs_ok == row.runs:
            row.median_seconds = median(row.all_seconds)
            row.min_seconds = min(row.all_seconds)
            row.max_seconds = max(row.all_seconds)
            row.instances_per_second = row.instances / row.median_seconds
            if ingest.get(key):
                row.median_ingest_seconds = median(ingest[key])
            if cpu.get(key):
                row.median_cpu_seconds = median(cpu[key])
    for row in rows.values():
        base = rows.get(("orthanc", row.corpus))
        if base is not None and base.median_seconds and row.median_seconds:
            row.ratio_to_orthanc = base.median_seconds / row.median_seconds
    order = {s: i for i, s in enumerate(SYSTEMS)}
    return sorted(rows.values(), key=lambda r: (CORPORA.index(r.corpus), order[r.system]))


def print_table(rows: Sequence[Row]) -> None:
    """The human-readable result table."""
    header = (
        f"{'router':<20} {'corpus':<18} {'inst':>5} {'MB':>7} {'e2e s':>8} "
        f"{'inst/s':>7} {'ingest s':>8} {'cpu s':>6}  vs orthanc"
    )
    print_table_header(header)
    for row in rows:
        if row.median_seconds is None:
            ratio = f"FAILED ({row.runs - row.runs_ok}/{row.runs} runs failed)"
        elif row.ratio_to_orthanc is None:
            ratio = "-"
        else:
            ratio = f"{row.ratio_to_orthanc:.2f}x"
        print(
            f"{row.system:<20} {row.label:<18} {row.instances:>5} {row.megabytes:>7.1f} "
            f"{fmt_cell(row.median_seconds, '8.2f')} {fmt_cell(row.instances_per_second, '7.1f')} "
            f"{fmt_cell(row.median_ingest_seconds, '8.2f')} "
            f"{fmt_cell(row.median_cpu_seconds, '6.2f')}  {ratio}"
        )


def target_checks(rows: Sequence[Row], results: Sequence[RunResult]) -> list[str]:
    """Lines comparing consentgate with the issue's targets."""
    by_key = {(r.system, r.corpus): r for r in rows}
    lines = []
    for corpus in CORPORA:
        need = TARGET_VS_ORTHANC[corpus]
        direct = by_key.get((DIRECT, corpus))
        if direct is not None and direct.ratio_to_orthanc is not None:
            lines.append(
                f"{corpus}: no router at all (storescu -> storescp) is "
                f"{direct.ratio_to_orthanc:.2f}x Orthanc: no router can reach more"
            )
        for system in ("consentgate", "consentgate-consent"):
            row = by_key.get((system, corpus))
            if row is not None and row.ratio_to_orthanc is not None:
                verdict = "met" if row.ratio_to_orthanc >= need else "NOT met"
                lines.append(
                    f"target {corpus}: {system} >= {need:.0f}x Orthanc: "
                    f"{row.ratio_to_orthanc:.2f}x -> {verdict}"
                )
        plain = by_key.get(("consentgate", corpus))
        consent = by_key.get(("consentgate-consent", corpus))
        if plain is not None and consent is not None:
            lines.extend(_consent_cost_lines(corpus, results, plain, consent))
    return lines


def paired_costs(corpus: str, results: Sequence[RunResult]) -> tuple[list[float], list[float]]:
    """Per repeat, the cost of the consent checks: (consentgate-consent / consentgate - 1)
    for the wall time and for the router's CPU time, from the two runs of that repeat
    (run back to back, so a machine that slows down for a while slows both)."""
    runs: dict[tuple[int, str], RunResult] = {
        (r.repeat, r.system): r for r in results if r.corpus == corpus and r.ok
    }
    wall: list[float] = []
    cpu: list[float] = []
    for repeat in sorted({rep for rep, _ in runs}):
        plain = runs.get((repeat, "consentgate"))
        consent = runs.get((repeat, "consentgate-consent"))
        if plain is None or consent is None:
            continue
        if plain.seconds and consent.seconds:
            wall.append(consent.seconds / plain.seconds - 1.0)
        if plain.router_cpu_seconds and consent.router_cpu_seconds:
            cpu.append(consent.router_cpu_seconds / plain.router_cpu_seconds - 1.0)
    return wall, cpu


def _consent_cost_lines(
    corpus: str, results: Sequence[RunResult], plain: Row, consent: Row
) -> list[str]:
    """The consent-cost target: median over repeats of the paired cost, for the wall time
    and the router CPU time; the ratio of the two variants' medians is printed beside it
    for reference (it mixes runs from different moments of the machine)."""
    lines = []
    wall, cpu = paired_costs(corpus, results)
    for what, costs, base, other in (
        ("time", wall, plain.median_seconds, consent.median_seconds),
        ("router CPU seconds", cpu, plain.median_cpu_seconds, consent.median_cpu_seconds),
    ):
        if not costs:
            continue
        cost = median(costs)
        verdict = "met" if cost < TARGET_CONSENT_OVERHEAD else "NOT met"
        per_repeat = ", ".join(f"{c:+.1%}" for c in costs)
        reference = f"; ratio of the medians {other / base - 1.0:+.1%}" if base and other else ""
        lines.append(
            f"target {corpus}: consent checks cost < {TARGET_CONSENT_OVERHEAD:.0%} "
            f"({what}, consentgate-consent / consentgate - 1, median of the repeats "
            f"[{per_repeat}]): {cost:+.1%} -> {verdict}{reference}"
        )
    return lines


# --------------------------------------------------------------------------- main


def rep_order(systems: Sequence[str], rep: int) -> list[str]:
    """The systems of repeat ``rep`` in running order: as given, except that the two
    consentgate variants swap places in every other repeat.

    Each run deletes its files. On ext4 without a journal (this machine's root file
    system) a file creation skips the inodes freed in the last minutes, reading each
    one's inode block, so a run's file creations cost more the more files the runs
    just before it deleted. Alternating keeps that cost from always falling on the
    same side of the with/without-consent comparison.
    """
    order = list(systems)
    pair = ("consentgate", "consentgate-consent")
    if rep % 2 and all(s in order for s in pair):
        i, j = order.index(pair[0]), order.index(pair[1])
        order[i], order[j] = order[j], order[i]
    return order


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = new_parser("python -m bench.run_forward", __doc__)
    p.add_argument("--ct", type=int, default=None, help="CT instances (~0.5 MB), default 1000")
    p.add_argument("--small", type=int, default=None, help="small instances (~10 kB), default 1000")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="runs per cell (median), default 6: even, so that each consentgate variant "
        "runs first in half of them",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="defaults --ct 200 --small 500 --repeats 1 (explicit options still win)",
    )
    add_csv_option(p, "--systems", SYSTEMS)
    add_csv_option(p, "--corpora", CORPORA)
    add_output_options(
        p,
        "forward",
        tmpdir_help="parent of the working directory",
        keep_help="keep corpora, logs and data",
    )
    p.add_argument(
        "--run-timeout",
        type=float,
        default=None,
        help="max seconds from storescu start to the last instance at storescp "
        "(default 120 + 0.5 s/instance)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        help="max seconds for the router's queue to empty after that",
    )
    p.add_argument(
        "--quiet",
        type=float,
        default=1.0,
        help="seconds to wait for late duplicates before checking storescp",
    )
    args = p.parse_args(argv)
    quick = {"ct": 200, "small": 500, "repeats": 1}
    full = {"ct": 1000, "small": 1000, "repeats": 6}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.ct < 0 or args.small < 0 or args.repeats < 1:
        p.error("--ct/--small must be >= 0 and --repeats >= 1")
    if args.ct > 100_000 or args.small > 100_000 or args.repeats > 100:
        p.error("counts are capped at 100000 instances and 100 repeats")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    return run_main(_main, parse_args(argv))


def _main(args: argparse.Namespace) -> int:
    storescu = find_dcmtk_tool("storescu")
    StoreScp().check_available()
    if "orthanc" in args.systems:
        Orthanc().check_available()
    if any(s.startswith("consentgate") for s in args.systems):
        Consentgate().check_available()
    out_path = results_path(args.out, "forward")
    results: list[RunResult] = []
    with work_tmpdir(args.tmpdir, "consentgate-fwd-bench-", keep=args.keep_tmp) as tmp:
        file_system = file_creation_probe(tmp)
        corpora = build_corpora(tmp, args.ct, args.small, args.corpora)
        if not corpora:
            raise BenchError("nothing to send (all corpus counts are 0)")
        lua_path = tmp / "forward.lua"
        lua_path.write_text(LUA_SCRIPT, encoding="utf-8")
        facts = {c.name: [read_patient(c.files[0])] for c in corpora}
        uids = {c.name: read_sop_uids(c.files) for c in corpora}
        for c in corpora:
            if len(set(uids[c.name])) != c.count:
                raise BenchError(f"corpus {c.name} has duplicate SOP Instance UIDs")
            p = facts[c.name][0]
            print(
                f"corpus {c.label}: patient {p.issuer or '(no issuer)'}/{p.patient_id}, "
                f"modality {p.modality}",
                flush=True,
            )
        plan = [
            (corpus, rep, system)
            for corpus in corpora
            for rep in range(args.repeats)
            for system in rep_order(args.systems, rep)
        ]
        for index, (corpus, rep, system) in enumerate(plan, start=1):
            prefix = (
                f"[{index:>3}/{len(plan)}] {corpus.label:<18} rep {rep + 1}/{args.repeats} "
                f"{system:<20}"
            )
            timeout = args.run_timeout or 120.0 + 0.5 * corpus.count
            workdir = tmp / f"run-{index:03d}-{system}-{corpus.name}"
            try:
                res = run_one(
                    system,
                    corpus,
                    rep,
                    workdir,
                    storescu=storescu,
                    patients=facts[corpus.name],
                    sent_uids=uids[corpus.name],
                    lua_path=lua_path,
                    timeout=timeout,
                    idle_timeout=args.idle_timeout,
                    quiet=args.quiet,
                )
            except BenchError as exc:
                res = RunResult(
                    system,
                    corpus.name,
                    corpus.label,
                    rep,
                    corpus.count,
                    corpus.total_bytes,
                    error=str(exc),
                )
            finally:
                if not args.keep_tmp:
                    shutil.rmtree(workdir, ignore_errors=True)
            results.append(res)
            if res.seconds is not None:
                status = "ok" if res.ok else f"FAILED: {res.error.splitlines()[0]}"
                print(
                    f"{prefix} {res.seconds:8.2f} s {res.instances / res.seconds:7.1f} inst/s "
                    f"(storescu {res.ingest_seconds or 0:.2f} s)  {status}",
                    flush=True,
                )
            else:
                print(f"{prefix} FAILED: {res.error}", flush=True)
            if res.router_shutdown_problem:
                print(
                    f"    router exited with status {res.router_exit_status} after SIGTERM: "
                    + res.router_shutdown_problem.splitlines()[-1]
                )
            if res.queue_stats:
                print("    queue stats: " + "\n    ".join(res.queue_stats.rstrip().splitlines()))
            if not res.ok:
                if res.queue_list:
                    print("    queue list:\n      " + "\n      ".join(res.queue_list.splitlines()))
                for line in res.duplicate_lines:
                    print(f"    storescp: {line}")
                if res.log_excerpt:
                    print(
                        "    router log excerpt:\n      "
                        + "\n      ".join(res.log_excerpt.splitlines())
                    )

    rows = summarize(results)
    print_table(rows)
    print(
        "(e2e s: median, storescu start -> last instance in storescp's output directory; "
        "ingest s: storescu start -> exit; cpu s: CPU seconds of the router process "
        "from storescu's start until its queue was empty)"
    )
    checks = target_checks(rows, results)
    print_block(checks)
    write_json(out_path, args, storescu, results, rows, checks, file_system)
    print(f"\nresults written to {out_path}")
    return 0 if results and all(r.ok for r in results) else 1


def write_json(
    path: Path,
    args: argparse.Namespace,
    storescu: str,
    results: Sequence[RunResult],
    rows: Sequence[Row],
    checks: Sequence[str],
    file_system: Mapping[str, Any],
) -> None:
    """Write the machine-readable results."""
    doc: dict[str, Any] = {
        **results_header("forward", args, cpus=True, file_system=file_system),
        "tools": {
            "storescu": {"path": storescu, "version": tool_version(storescu)},
            "storescp": StoreScp().version(),
            "orthanc": Orthanc().version() if "orthanc" in args.systems else "",
        },
        "lua_script": LUA_SCRIPT,
        "notes": [
            "seconds = storescu start -> last instance present in storescp's output "
            "directory (polled every 20 ms); median over repeats",
            "mtime_seconds = storescu start -> newest file mtime in that directory",
            "ingest_seconds = storescu process start -> exit (one association, TCP_NODELAY=1)",
            "routers and storescp are started fresh and empty for every run",
        ],
        "summary": [asdict(r) for r in rows],
        "targets": list(checks),
        "runs": [asdict(r) for r in results],
    }
    write_results(path, doc)


if __name__ == "__main__":
    sys.exit(main())
