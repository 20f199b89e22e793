"""C-STORE throughput: DCMTK storescu -> {storescp, Orthanc, consentgate} over loopback.

Usage (from the repository root)::

    .venv/bin/python -m bench.run_store [--ct N] [--small N] [--repeats R] [--out FILE]

For every corpus (CT ~0.5 MB/instance, small ~10 kB/instance), sender mode (``nodelay``:
storescu with TCP_NODELAY=1; ``nagle``: TCP_NODELAY unset, the Debian default) and
receiver, storescu sends the corpus over ONE association to a freshly started, empty
receiver; the wall time of the storescu process (start to exit) is measured, then the
receiver's instance count is checked. The median of ``--repeats`` runs is reported.
In nagle mode only the first ``--nagle-count`` instances of each corpus are sent (the
same for every receiver) because Nagle + delayed ACK caps senders at ~20 instances/s.

This is a benchmark, not a test: nothing here is part of the pytest suite.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    LOOPBACK,
    SENDER_AET,
    BenchError,
    add_csv_option,
    add_output_options,
    file_creation_probe,
    find_dcmtk_tool,
    fmt_cell,
    median,
    new_parser,
    print_block,
    print_table_header,
    results_header,
    results_path,
    run_main,
    run_timed,
    sender_env,
    tool_version,
    wait_until,
    work_tmpdir,
    write_results,
)
from bench.receivers import RECEIVERS, Receiver

MODES = ("nodelay", "nagle")
CORPORA = ("ct", "small")

# Transfer syntax of the corpus files -> storescu proposal option (None: default -x=).
_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
_TS_FLAGS = {
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.5": "-xr",  # RLE Lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS lossless
    "1.2.840.10008.1.2.1.99": "-xd",  # Deflated explicit VR little endian
}


# --------------------------------------------------------------------------- corpora


@dataclass(frozen=True)
class Corpus:
    """Files of one corpus, in sending order."""

    name: str
    files: tuple[Path, ...]
    sizes: tuple[int, ...]
    storescu_flags: tuple[str, ...]

    @property
    def count(self) -> int:
        """Number of instances."""
        return len(self.files)

    @property
    def total_bytes(self) -> int:
        """Sum of the file sizes (what storescu reads; the dataset bytes sent are ~equal)."""
        return sum(self.sizes)

    @property
    def label(self) -> str:
        """E.g. ``ct(300x0.5MB)`` or ``small(1000x10kB)``."""
        if not self.files:
            return f"{self.name}(0)"
        avg = self.total_bytes / self.count
        size = f"{avg / 1e6:.1f}MB" if avg >= 100_000 else f"{avg / 1e3:.0f}kB"
        return f"{self.name}({self.count}x{size})"

    def head(self, count: int) -> Corpus:
        """The first ``count`` instances."""
        return Corpus(self.name, self.files[:count], self.sizes[:count], self.storescu_flags)


def _storescu_flags(files: Sequence[Path]) -> tuple[str, ...]:
    from pydicom.filereader import read_file_meta_info

    syntaxes = {str(read_file_meta_info(f).TransferSyntaxUID) for f in files}
    compressed = syntaxes - _UNCOMPRESSED
    if not compressed:
        return ()
    unknown = compressed - set(_TS_FLAGS)
    if unknown or len(compressed) > 1:
        raise BenchError(
            f"corpus mixes or uses transfer syntaxes storescu cannot propose in one "
            f"association: {sorted(compressed)}"
        )
    return (_TS_FLAGS[compressed.pop()],)


def build_corpora(root: Path, ct: int, small: int, which: Sequence[str]) -> list[Corpus]:
    """Generate the corpora once with :mod:`tests.corpus`."""
    try:
        from tests.corpus import make_ct_series, make_small_series
    except ImportError as exc:
        raise BenchError(
            f"cannot import tests.corpus ({exc}); run from the repository root with "
            "'.venv/bin/python -m bench.run_store'"
        ) from exc
    makers = {"ct": (make_ct_series, ct), "small": (make_small_series, small)}
    corpora = []
    for name in which:
        maker, count = makers[name]
        if count <= 0:
            continue
        out_dir = root / f"corpus-{name}"
        out_dir.mkdir(parents=True)
        t0 = time.perf_counter()
        made = maker(out_dir, count)
        files = tuple(Path(cf.path) for cf in made)
        if len(files) != count:
            raise BenchError(f"tests.corpus made {len(files)} {name} files, asked for {count}")
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise BenchError(f"tests.corpus returned missing files, e.g. {missing[0]}")
        corpus = Corpus(name, files, tuple(f.stat().st_size for f in files), _storescu_flags(files))
        print(
            f"corpus {corpus.label}: {corpus.total_bytes / 1e6:.1f} MB generated in "
            f"{time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        corpora.append(corpus)
    return corpora


# --------------------------------------------------------------------------- runs


@dataclass
class RunResult:
    """One timed storescu run against one fresh receiver."""

    receiver: str
    corpus: str
    label: str
    mode: str
    repeat: int
    instances: int
    bytes: int
    seconds: float | None = None
    received: int | None = None
    count_source: str = ""
    settle_seconds: float | None = None
    ok: bool = False
    error: str = ""


@dataclass
class Row:
    """Summary of the repeats of one (receiver, corpus, mode)."""

    receiver: str
    corpus: str
    label: str
    mode: str
    instances: int
    megabytes: float
    runs_ok: int
    runs: int
    median_seconds: float | None = None
    min_seconds: float | None = None
    max_seconds: float | None = None
    instances_per_second: float | None = None
    megabytes_per_second: float | None = None
    ratio_to_storescp: float | None = None
    all_seconds: list[float] = field(default_factory=list)


def failed_run(rx: Receiver, corpus: Corpus, mode: str, repeat: int, error: str) -> RunResult:
    """A run that did not take place or whose receiver failed."""
    return RunResult(
        rx.name,
        corpus.name,
        corpus.label,
        mode,
        repeat,
        corpus.count,
        corpus.total_bytes,
        error=error,
    )


def storescu_command(storescu: str, receiver_aet: str, port: int, corpus: Corpus) -> list[str]:
    """storescu sending every file of ``corpus`` over one association."""
    return [
        storescu,
        "-aet",
        SENDER_AET,
        "-aec",
        receiver_aet,
        "-to",
        "10",
        "-ta",
        "30",
        "-ts",
        "60",
        *corpus.storescu_flags,
        LOOPBACK,
        str(port),
        *(str(f) for f in corpus.files),
    ]


def run_one(
    receiver: Receiver,
    corpus: Corpus,
    mode: str,
    repeat: int,
    workdir: Path,
    *,
    storescu: str,
    run_timeout: float,
    settle_timeout: float,
) -> RunResult:
    """Start a clean receiver, send ``corpus`` once, verify, stop the receiver."""
    result = RunResult(
        receiver.name, corpus.name, corpus.label, mode, repeat, corpus.count, corpus.total_bytes
    )
    workdir.mkdir(parents=True)
    with receiver.launch(workdir) as rx:
        cmd = storescu_command(storescu, rx.ae_title, rx.port, corpus)
        # Flush earlier runs' dirty pages so their write-back does not land in this run.
        os.sync()
        run = run_timed(cmd, env=sender_env(mode), timeout=run_timeout)
        result.seconds = run.seconds
        if run.timed_out:
            result.error = f"storescu timed out after {run_timeout:.0f} s"
        elif run.returncode != 0:
            tail = "\n".join((run.stdout + run.stderr).splitlines()[-10:])
            result.error = f"storescu exited with status {run.returncode}: {tail}"

        def complete() -> bool:
            try:
                return rx.count_instances() >= corpus.count
            except BenchError:
                return False

        with contextlib.suppress(BenchError):
            result.settle_seconds = wait_until(
                complete,
                timeout=settle_timeout,
                interval=0.05,
                what=f"{receiver.name} to hold {corpus.count} instances",
            )
        try:
            result.received, result.count_source = rx.final_count()
        except BenchError as exc:
            result.error = result.error or f"cannot count received instances: {exc}"
            result.ok = False
            return result
        if result.received != corpus.count and not result.error:
            result.error = (
                f"receiver holds {result.received} instances, "
                f"expected {corpus.count}; log tail:\n{rx.proc.log_tail(10)}"
            )
    result.ok = not result.error
    return result


def summarize(results: Sequence[RunResult]) -> list[Row]:
    """One row per (receiver, corpus, mode), medians over successful runs."""
    rows: dict[tuple[str, str, str], Row] = {}
    for r in results:
        key = (r.receiver, r.corpus, r.mode)
        row = rows.get(key)
        if row is None:
            row = rows[key] = Row(
                r.receiver, r.corpus, r.label, r.mode, r.instances, r.bytes / 1e6, 0, 0
            )
        row.runs += 1
        if r.ok and r.seconds is not None:
            row.runs_ok += 1
            row.all_seconds.append(r.seconds)
    for row in rows.values():
        if row.all_seconds and row.runs_ok == row.runs:
            row.median_seconds = median(row.all_seconds)
            row.min_seconds = min(row.all_seconds)
            row.max_seconds = max(row.all_seconds)
            row.instances_per_second = row.instances / row.median_seconds
            row.megabytes_per_second = row.megabytes / row.median_seconds
    for row in rows.values():
        base = rows.get(("storescp", row.corpus, row.mode))
        if (
            base is not None
            and base.median_seconds
            and row.median_seconds
            and base.instances == row.instances
        ):
            row.ratio_to_storescp = base.median_seconds / row.median_seconds
    return list(rows.values())


def print_table(rows: Sequence[Row]) -> None:
    """The human-readable result table."""
    header = (
        f"{'receiver':<12} {'corpus':<18} {'mode':<8} {'inst':>5} {'MB':>7} "
        f"{'median s':>9} {'inst/s':>8} {'MB/s':>7}  {'vs storescp'}"
    )
    print_table_header(header)
    for row in rows:
        if row.median_seconds is None:
            ratio = f"FAILED ({row.runs - row.runs_ok}/{row.runs} runs failed)"
        elif row.ratio_to_storescp is None:
            ratio = "-"
        else:
            ratio = f"{row.ratio_to_storescp:.2f}x storescp"
        print(
            f"{row.receiver:<12} {row.label:<18} {row.mode:<8} {row.instances:>5} "
            f"{row.megabytes:>7.1f} {fmt_cell(row.median_seconds, '9.3f')} "
            f"{fmt_cell(row.instances_per_second, '8.1f')} "
            f"{fmt_cell(row.megabytes_per_second, '7.1f')}  {ratio}"
        )


def target_checks(rows: Sequence[Row]) -> list[str]:
    """Lines comparing consentgate with the targets of bench/README.md."""
    by_key = {(r.receiver, r.corpus, r.mode): r for r in rows}
    lines = []
    for corpus in CORPORA:
        cg = by_key.get(("consentgate", corpus, "nodelay"))
        if cg is not None and cg.ratio_to_storescp is not None:
            verdict = "met" if cg.ratio_to_storescp >= 0.5 else "NOT met"
            lines.append(
                f"target nodelay {cg.label}: consentgate >= 0.50x storescp: "
                f"{cg.ratio_to_storescp:.2f}x -> {verdict}"
            )
        if corpus != "small":
            # Nagle only stalls small instances (~20 inst/s); large ones fill segments.
            continue
        cg = by_key.get(("consentgate", corpus, "nagle"))
        refs = [by_key.get((name, corpus, "nagle")) for name in ("storescp", "orthanc")]
        ref_rates = [
            r.instances_per_second
            for r in refs
            if r is not None and r.instances_per_second is not None
        ]
        if cg is not None and cg.instances_per_second is not None and ref_rates:
            need = 5 * max(ref_rates)
            verdict = "met" if cg.instances_per_second >= need else "NOT met"
            lines.append(
                f"target nagle {cg.label}: consentgate >= 5x best of "
                f"storescp/orthanc ({need:.1f} inst/s): "
                f"{cg.instances_per_second:.1f} inst/s -> {verdict}"
            )
    return lines


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = new_parser("python -m bench.run_store", __doc__)
    p.add_argument("--ct", type=int, default=300, help="CT instances (~0.5 MB each)")
    p.add_argument("--small", type=int, default=1000, help="small instances (~10 kB each)")
    p.add_argument("--repeats", type=int, default=3, help="runs per cell; median reported")
    p.add_argument(
        "--nagle-count",
        type=int,
        default=200,
        help="instances sent per corpus in nagle mode (default 200)",
    )
    add_csv_option(p, "--receivers", list(RECEIVERS))
    add_csv_option(p, "--modes", MODES)
    add_csv_option(p, "--corpora", CORPORA)
    add_output_options(
        p,
        "store",
        tmpdir_help="parent of the temporary working directory",
        keep_help="keep corpora, receiver logs and data for inspection",
    )
    p.add_argument(
        "--run-timeout",
        type=float,
        default=None,
        help="max seconds for one storescu run (default 120 + 1 s/instance)",
    )
    p.add_argument(
        "--settle-timeout",
        type=float,
        default=10.0,
        help="max seconds after storescu exits for the count to be reached",
    )
    args = p.parse_args(argv)
    for name in ("ct", "small", "repeats", "nagle_count"):
        value = getattr(args, name)
        if value < 0 or (name in ("repeats", "nagle_count") and value < 1):
            p.error(f"--{name.replace('_', '-')} out of range: {value}")
    if args.ct > 100_000 or args.small > 100_000 or args.repeats > 100:
        p.error("counts are capped at 100000 instances and 100 repeats")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    return run_main(_main, parse_args(argv))


def _main(args: argparse.Namespace) -> int:
    storescu = find_dcmtk_tool("storescu")
    receivers = [RECEIVERS[name]() for name in args.receivers]
    for rx in receivers:
        rx.check_available()
    out_path = results_path(args.out, "store")
    results: list[RunResult] = []
    broken: dict[str, str] = {}
    with work_tmpdir(args.tmpdir, "consentgate-bench-", keep=args.keep_tmp) as tmp:
        file_system = file_creation_probe(tmp)
        corpora = build_corpora(tmp, args.ct, args.small, args.corpora)
        if not corpora:
            raise BenchError("nothing to send (all corpus counts are 0)")
        plan: list[tuple[Corpus, str, int, Receiver]] = []
        for corpus in corpora:
            for mode in args.modes:
                sent = corpus if mode == "nodelay" else corpus.head(args.nagle_count)
                plan.extend(
                    (sent, mode, rep, rx) for rep in range(args.repeats) for rx in receivers
                )
        if "nagle" in args.modes:
            print(
                f"note: nagle mode sends the first {args.nagle_count} instances of each "
                "corpus (same count for every receiver); nodelay mode sends all",
                flush=True,
            )
        for index, (corpus, mode, rep, rx) in enumerate(plan, start=1):
            prefix = (
                f"[{index:>3}/{len(plan)}] {corpus.label:<18} {mode:<7} "
                f"rep {rep + 1}/{args.repeats} {rx.name:<11}"
            )
            if rx.name in broken:
                results.append(failed_run(rx, corpus, mode, rep, f"skipped: {broken[rx.name]}"))
                print(f"{prefix} skipped (receiver failed to start earlier)", flush=True)
                continue
            timeout = args.run_timeout or 120.0 + 1.0 * corpus.count
            workdir = tmp / f"run-{index:03d}-{rx.name}-{corpus.name}-{mode}"
            try:
                res = run_one(
                    rx,
                    corpus,
                    mode,
                    rep,
                    workdir,
                    storescu=storescu,
                    run_timeout=timeout,
                    settle_timeout=args.settle_timeout,
                )
            except BenchError as exc:
                broken[rx.name] = str(exc).splitlines()[0]
                res = failed_run(rx, corpus, mode, rep, str(exc))
                print(f"{prefix} RECEIVER FAILED: {exc}", flush=True)
            finally:
                if not args.keep_tmp:
                    shutil.rmtree(workdir, ignore_errors=True)
            results.append(res)
            if res.seconds is not None:
                status = "ok" if res.ok else f"FAILED: {res.error.splitlines()[0]}"
                print(
                    f"{prefix} {res.seconds:8.3f} s {res.instances / res.seconds:8.1f} "
                    f"inst/s  {status}",
                    flush=True,
                )

    rows = summarize(results)
    print_table(rows)
    if "nagle" in args.modes:
        print(
            f"(nagle rows: first {args.nagle_count} instances of each corpus; "
            "receivers always run with TCP_NODELAY=1)"
        )
    checks = target_checks(rows)
    print_block(checks)
    write_json(out_path, args, receivers, storescu, results, rows, checks, file_system)
    print(f"\nresults written to {out_path}")
    return 0 if all(r.ok for r in results) else 1


def write_json(
    path: Path,
    args: argparse.Namespace,
    receivers: Sequence[Receiver],
    storescu: str,
    results: Sequence[RunResult],
    rows: Sequence[Row],
    checks: Sequence[str],
    file_system: Mapping[str, Any],
) -> None:
    """Write the machine-readable results."""
    doc: dict[str, Any] = {
        **results_header("store", args, file_system=file_system),
        "sender": {"tool": storescu, "version": tool_version(storescu)},
        "receivers": {rx.name: rx.version() for rx in receivers},
        "notes": [
            "seconds = wall time of one storescu process sending the corpus over one "
            "association (process start to exit); median over repeats",
            "MB = 10^6 bytes of DICOM files sent",
            f"nagle mode sends the first {args.nagle_count} instances of each corpus",
            "receivers are started fresh and empty for every run, with TCP_NODELAY=1",
        ],
        "summary": [asdict(r) for r in rows],
        "targets": list(checks),
        "runs": [asdict(r) for r in results],
    }
    write_results(path, doc)


if __name__ == "__main__":
    sys.exit(main())
