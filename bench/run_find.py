"""C-FIND latency at STUDY level against consentgate holding a large index.

Usage (from the repository root)::

    .venv/bin/python -m bench.run_find [--instances 100000] [--queries 20] [--out FILE]

Steps: ``consentgate init`` on a throw-away data directory; bulk-insert a synthetic
patient/study/series/instance index straight into its database through SQLAlchemy with
the ORM tables of :mod:`dicom_node.archive.models` (no DICOM files: C-FIND at STUDY
level only reads the index); check it with ``consentgate status``; start
``consentgate serve``; then time Study Root C-FINDs with
``QueryRetrieveLevel=STUDY, PatientID=<one patient>, StudyInstanceUID=<return key>``,
each for a different patient, measured as

* ``findscu``: wall time of one DCMTK findscu process (association + query + release);
* ``pynetdicom assoc+find``: associate, C-FIND, release, from this process;
* ``pynetdicom find only``: the C-FIND alone over one association kept open;
* ``echoscu``: one DCMTK echoscu process, the floor of process + association overhead.

Median and p95 over ``--queries`` queries are printed in milliseconds, after one
untimed warm-up of each kind. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from bench.common import (
    LOOPBACK,
    BenchError,
    add_output_options,
    find_consentgate,
    find_dcmtk_tool,
    free_ports,
    median,
    new_parser,
    percentile,
    print_table_header,
    receiver_env,
    results_header,
    results_path,
    run_main,
    run_timed,
    tool_version,
    work_tmpdir,
    write_results,
)
from bench.receivers import (
    consentgate_cli,
    consentgate_status_count,
    consentgate_toml,
    serve_consentgate,
    wait_http_ok,
)

FIND_AET = "FINDSCU"
CG_AET = "CONSENTGATE"
TARGET_MS = 50.0
_UID_NS = uuid.UUID("6b1f0c52-6d0e-4c47-9a8c-2f4de7c1b0a1")
_CT = "1.2.840.10008.5.1.4.1.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _uid(kind: str, n: int) -> str:
    return f"2.25.{uuid.uuid5(_UID_NS, f'{kind}-{n}').int}"


def patient_id(n: int) -> str:
    """Patient ID of synthetic patient ``n``."""
    return f"BFP{n:07d}"


# --------------------------------------------------------------------------- index fill


@dataclass(frozen=True)
class Shape:
    """How the synthetic index is laid out."""

    patients: int
    studies_per_patient: int
    series_per_study: int
    instances_per_series: int

    @property
    def studies(self) -> int:
        """Total studies."""
        return self.patients * self.studies_per_patient

    @property
    def series(self) -> int:
        """Total series."""
        return self.studies * self.series_per_study

    @property
    def instances(self) -> int:
        """Total instances."""
        return self.series * self.instances_per_series


def _batched(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def fill_index(database_url: str, shape: Shape) -> float:
    """Bulk-insert the synthetic index with explicit primary keys; returns seconds."""
    try:
        from dicom_node.archive.models import Instance, Patient, Series, Study
    except ImportError as exc:
        raise BenchError(f"cannot import dicom_node.archive.models: {exc}") from exc
    from sqlalchemy import create_engine, func, insert, select

    try:
        from cli.database import make_engine

        engine = make_engine(database_url, pool_size=1)
    except ImportError:
        engine = create_engine(database_url)

    modalities = ["CT", "MR", "SR", "PR"][: max(1, shape.series_per_study)]
    received = datetime.now(UTC)

    def patients() -> Iterator[dict[str, Any]]:
        for p in range(1, shape.patients + 1):
            yield {
                "id": p,
                "patient_id": patient_id(p),
                "issuer": "",
                "patient_name": f"BENCH^FIND^{p}",
                "birth_date": "19700101",
                "sex": "FO"[p % 2],
            }

    def studies() -> Iterator[dict[str, Any]]:
        for s in range(1, shape.studies + 1):
            patient = (s - 1) // shape.studies_per_patient + 1
            day = s % 28 + 1
            yield {
                "id": s,
                "patient_pk": patient,
                "study_instance_uid": _uid("study", s),
                "study_date": f"20{20 + s % 5}{s % 12 + 1:02d}{day:02d}",
                "study_time": "101500",
                "accession_number": f"BA{s:08d}",
                "study_id": str(s % 10000),
                "study_description": "BENCH FIND",
                "referring_physician_name": "REF^DOC",
                "modalities": "\\".join(sorted(set(modalities))),
                "number_of_series": shape.series_per_study,
                "number_of_instances": shape.series_per_study * shape.instances_per_series,
            }

    def series() -> Iterator[dict[str, Any]]:
        for r in range(1, shape.series + 1):
            study = (r - 1) // shape.series_per_study + 1
            index = (r - 1) % shape.series_per_study
            yield {
                "id": r,
                "study_pk": study,
                "series_instance_uid": _uid("series", r),
                "modality": modalities[index % len(modalities)],
                "series_number": str(index + 1),
                "series_description": "BENCH",
                "body_part_examined": "CHEST",
                "series_date": "",
                "series_time": "",
                "number_of_instances": shape.instances_per_series,
            }

    def instances() -> Iterator[dict[str, Any]]:
        for i in range(1, shape.instances + 1):
            ser = (i - 1) // shape.instances_per_series + 1
            yield {
                "id": i,
                "series_pk": ser,
                "sop_instance_uid": _uid("instance", i),
                "sop_class_uid": _CT,
                "instance_number": str((i - 1) % shape.instances_per_series + 1),
                "number_of_frames": 1,
                "transfer_syntax_uid": _EXPLICIT_LE,
                "size": 525_000,
                "path": f"bench/{ser}/{i}.dcm",
                "calling_ae": "STORESCU",
                "received_at": received,
            }

    tables: list[tuple[Any, Callable[[], Iterator[dict[str, Any]]]]] = [
        (Patient, patients),
        (Study, studies),
        (Series, series),
        (Instance, instances),
    ]
    t0 = time.perf_counter()
    try:
        with engine.begin() as conn:
            existing = conn.execute(select(func.count()).select_from(Instance)).scalar_one()
            if existing:
                raise BenchError(f"fresh consentgate database already holds {existing} rows")
            for model, rows in tables:
                for batch in _batched(rows(), 10_000):
                    conn.execute(insert(model), batch)
    finally:
        engine.dispose()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- queries


@dataclass
class Timing:
    """Latency figures of one kind of query, in milliseconds."""

    kind: str
    count: int
    median_ms: float
    p95_ms: float
    min_ms: float
    max_ms: float
    matches_per_query: int | None
    all_ms: list[float]


def _timing(kind: str, seconds: Sequence[float], matches: int | None) -> Timing:
    ms = [s * 1000.0 for s in seconds]
    return Timing(kind, len(ms), median(ms), percentile(ms, 95), min(ms), max(ms), matches, ms)


def findscu_command(findscu: str, port: int, pid: str) -> list[str]:
    """One Study Root, STUDY level C-FIND by Patient ID."""
    return [
        findscu,
        "-v",
        "-S",
        "-aet",
        FIND_AET,
        "-aec",
        CG_AET,
        "-to",
        "10",
        "-ta",
        "30",
        "-td",
        "30",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"PatientID={pid}",
        "-k",
        "StudyInstanceUID",
        LOOPBACK,
        str(port),
    ]


def _findscu_matches(output: str) -> int:
    # DCMTK 3.6.7 logs one "Find Response: <n> (Pending)" line per match at -v.
    return sum(1 for line in output.splitlines() if "Find Response" in line and "Pending" in line)


def time_findscu(findscu: str, port: int, pids: Sequence[str]) -> tuple[list[float], int]:
    """Wall times of findscu processes, and the match count of each (must be equal)."""
    seconds: list[float] = []
    counts: set[int] = set()
    env = receiver_env()  # TCP_NODELAY=1: latency, not Nagle, is measured here
    for pid in pids:
        run = run_timed(findscu_command(findscu, port, pid), env=env, timeout=60)
        if run.returncode != 0:
            raise BenchError(
                f"findscu failed ({run.returncode}):\n" + (run.stdout + run.stderr)[-2000:]
            )
        seconds.append(run.seconds)
        counts.add(_findscu_matches(run.stdout + run.stderr))
    if len(counts) != 1:
        raise BenchError(f"findscu match counts differ between patients: {sorted(counts)}")
    return seconds, counts.pop()


def time_echoscu(echoscu: str, port: int, n: int) -> list[float]:
    """Wall times of echoscu processes (process + association floor)."""
    cmd = [echoscu, "-aet", FIND_AET, "-aec", CG_AET, "-to", "10", LOOPBACK, str(port)]
    seconds = []
    for _ in range(n):
        run = run_timed(cmd, env=receiver_env(), timeout=60)
        if run.returncode != 0:
            raise BenchError(f"echoscu failed ({run.returncode}): {run.stderr[-1000:]}")
        seconds.append(run.seconds)
    return seconds


def _study_query(pid: str) -> Any:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = pid
    ds.StudyInstanceUID = ""
    return ds


def _make_ae() -> Any:
    from pynetdicom import AE
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelFind,
    )

    ae = AE(ae_title=FIND_AET)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.acse_timeout = 30
    ae.dimse_timeout = 30
    ae.network_timeout = 30
    return ae


def _run_find(assoc: Any, pid: str) -> int:
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelFind,
    )

    matches = 0
    final = None
    for status, identifier in assoc.send_c_find(
        _study_query(pid), StudyRootQueryRetrieveInformationModelFind
    ):
        if not status:
            raise BenchError("C-FIND: connection timed out, was aborted or got an invalid response")
        final = int(status.Status)
        if final in (0xFF00, 0xFF01):
            if identifier is None or str(identifier.get("PatientID", "")) != pid:
                raise BenchError(f"C-FIND returned a match for another patient than {pid}")
            matches += 1
    if final != 0x0000:
        raise BenchError(f"C-FIND ended with status 0x{final or 0:04X}")
    return matches


def time_pynetdicom(port: int, pids: Sequence[str], *, reuse: bool) -> tuple[list[float], int]:
    """pynetdicom C-FIND latencies: new association per query, or one kept open."""
    ae = _make_ae()
    seconds: list[float] = []
    counts: set[int] = set()
    assoc = None
    try:
        if reuse:
            assoc = ae.associate(LOOPBACK, port, ae_title=CG_AET)
            if not assoc.is_established:
                raise BenchError("pynetdicom association to consentgate was not accepted")
        for pid in pids:
            t0 = time.perf_counter()
            if reuse:
                counts.add(_run_find(assoc, pid))
            else:
                one = ae.associate(LOOPBACK, port, ae_title=CG_AET)
                try:
                    if not one.is_established:
                        raise BenchError("pynetdicom association was not accepted")
                    counts.add(_run_find(one, pid))
                finally:
                    if one.is_established:
                        one.release()
            seconds.append(time.perf_counter() - t0)
    finally:
        if assoc is not None and assoc.is_established:
            assoc.release()
        ae.shutdown()
    if len(counts) != 1:
        raise BenchError(f"pynetdicom match counts differ between patients: {sorted(counts)}")
    return seconds, counts.pop()


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = new_parser("python -m bench.run_find", __doc__)
    p.add_argument(
        "--instances", type=int, default=100_000, help="instances in the index (default 100000)"
    )
    p.add_argument("--studies-per-patient", type=int, default=2)
    p.add_argument("--series-per-study", type=int, default=2)
    p.add_argument("--instances-per-series", type=int, default=25)
    p.add_argument("--queries", type=int, default=20, help="timed queries per kind")
    add_output_options(
        p,
        "find",
        tmpdir_help="parent of the temporary working directory",
        keep_help="keep the data dir and logs",
    )
    args = p.parse_args(argv)
    for name in (
        "instances",
        "studies_per_patient",
        "series_per_study",
        "instances_per_series",
        "queries",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.instances > 5_000_000 or args.queries > 10_000:
        p.error("capped at 5,000,000 instances and 10,000 queries")
    return args


def _shape(args: argparse.Namespace) -> Shape:
    per_patient = args.studies_per_patient * args.series_per_study * args.instances_per_series
    patients = max(1, -(-args.instances // per_patient))
    return Shape(
        patients, args.studies_per_patient, args.series_per_study, args.instances_per_series
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    return run_main(_main, parse_args(argv))


def _main(args: argparse.Namespace) -> int:
    consentgate = find_consentgate()
    findscu = find_dcmtk_tool("findscu")
    echoscu = find_dcmtk_tool("echoscu")
    from config import load_settings

    shape = _shape(args)
    out_path = results_path(args.out, "find")
    with work_tmpdir(args.tmpdir, "consentgate-bench-find-", keep=args.keep_tmp) as tmp:
        dicom_port, http_port = free_ports(2)
        cfg = tmp / "consentgate.toml"
        finder = (
            "\n[[peers]]\n"
            'name = "bench-finder"\n'
            f'ae_title = "{FIND_AET}"\n'
            f'host = "{LOOPBACK}"\n'
            "port = 104\n"
            'services = ["echo", "find"]\n'
        )
        cfg.write_text(
            consentgate_toml(
                dicom_port=dicom_port,
                http_port=http_port,
                data_dir=tmp / "cg-data",
                extra_peers=finder,
            ),
            encoding="utf-8",
        )
        init = consentgate_cli(consentgate, cfg, "init", timeout=120)
        if init.returncode != 0:
            raise BenchError(
                f"'consentgate init' failed ({init.returncode}):\n"
                + (init.stdout + init.stderr)[-2000:]
            )
        url = load_settings(cfg).node.effective_database_url
        print(
            f"filling index: {shape.patients} patients, {shape.studies} studies, "
            f"{shape.series} series, {shape.instances} instances",
            flush=True,
        )
        fill_s = fill_index(url, shape)
        print(f"index filled in {fill_s:.1f} s", flush=True)
        status_count = consentgate_status_count(consentgate, cfg)
        if status_count is not None and status_count != shape.instances:
            raise BenchError(
                f"'consentgate status' reports {status_count} instances, expected {shape.instances}"
            )

        # Different patients spread over the index, one per query (+1 warm-up).
        n = args.queries
        step = max(1, shape.patients // (n + 1))
        pids = [patient_id(min(shape.patients, 1 + k * step)) for k in range(n + 1)]
        warm, timed = pids[0], pids[1:]

        with serve_consentgate(consentgate, cfg, tmp / "consentgate.log") as proc:
            wait_http_ok(proc, f"http://{LOOPBACK}:{http_port}/healthz", "consentgate /healthz")
            time_findscu(findscu, dicom_port, [warm])
            time_pynetdicom(dicom_port, [warm], reuse=False)
            f_s, f_matches = time_findscu(findscu, dicom_port, timed)
            a_s, a_matches = time_pynetdicom(dicom_port, timed, reuse=False)
            r_s, r_matches = time_pynetdicom(dicom_port, timed, reuse=True)
            e_s = time_echoscu(echoscu, dicom_port, n)
            proc.check_alive()
        timings = [
            _timing("findscu (process)", f_s, f_matches),
            _timing("pynetdicom assoc+find", a_s, a_matches),
            _timing("pynetdicom find only", r_s, r_matches),
            _timing("echoscu (process floor)", e_s, None),
        ]

    expected = shape.studies_per_patient
    print(
        f"\nC-FIND STUDY level, PatientID=<one of {shape.patients}>, index of "
        f"{shape.instances} instances / {shape.studies} studies; {n} queries each"
    )
    header = f"{'kind':<26} {'median ms':>10} {'p95 ms':>8} {'min ms':>8} {'max ms':>8}  matches"
    print_table_header(header, blank_line=False)
    for t in timings:
        m = "-" if t.matches_per_query is None else str(t.matches_per_query)
        print(
            f"{t.kind:<26} {t.median_ms:>10.1f} {t.p95_ms:>8.1f} {t.min_ms:>8.1f} "
            f"{t.max_ms:>8.1f}  {m}"
        )
    bad = [
        t.kind
        for t in timings
        if t.matches_per_query is not None and t.matches_per_query != expected
    ]
    ok = not bad
    if bad:
        print(f"\nWRONG RESULTS: expected {expected} studies per patient from {', '.join(bad)}")
    print()
    for t in timings[:3]:
        verdict = "met" if t.median_ms < TARGET_MS else "NOT met"
        print(
            f"target: C-FIND median < {TARGET_MS:.0f} ms at {shape.instances} instances, "
            f"{t.kind}: {t.median_ms:.1f} ms -> {verdict}"
        )
    findscu_t = timings[0]

    doc = {
        **results_header("find", args),
        "tools": {"findscu": tool_version(findscu), "echoscu": tool_version(echoscu)},
        "index": asdict(shape)
        | {
            "instances": shape.instances,
            "studies": shape.studies,
            "series": shape.series,
            "fill_seconds": fill_s,
        },
        "expected_matches_per_query": expected,
        "timings": [asdict(t) for t in timings],
        "target_ms": TARGET_MS,
        "target_met": findscu_t.median_ms < TARGET_MS,
        "results_ok": ok,
    }
    write_results(out_path, doc)
    print(f"\nresults written to {out_path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
