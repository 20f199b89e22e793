"""Helpers of tests/test_durability.py: crash a storing process, inspect jobs and journal."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pydicom
from sqlalchemy import create_engine, delete, select, update

from dicom_node.archive.models import Instance, Series, Study
from router.models import ForwardJob, JobState
from tests.corpus import CorpusFile

REPO = Path(__file__).resolve().parents[1]

# A serving process's ingest (archive + journal, no checkpoint for an hour) stores the
# files of the manifest through the real store path, then dies by SIGKILL: what a
# ``kill -9`` leaves right after the acknowledgements.
CRASH_CHILD = """
import json, os, signal, sys
from pathlib import Path
from config.settings import load_settings
from cli.runtime import Ingest, build_runtime

config, manifest = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
runtime = build_runtime(load_settings(config))
ingest = Ingest(runtime, flush_interval=3600)
ingest.start()
for item in manifest:
    raw = Path(item["path"]).read_bytes()
    runtime.archive.store(
        raw[144 + int.from_bytes(raw[140:144], "little"):],
        transfer_syntax_uid=item["ts"],
        command_sop_class_uid=item["cls"],
        command_sop_instance_uid=item["uid"],
        calling_ae=item["ae"],
    )
print("stored", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def store_then_kill_9(config: Path, files: list[CorpusFile], calling_ae: str) -> None:
    """Store ``files`` in a child process through the journal, then SIGKILL it."""
    manifest = config.with_name("crash-manifest.json")
    manifest.write_text(
        json.dumps(
            [
                {
                    "path": str(f.path),
                    "ts": f.transfer_syntax_uid,
                    "cls": f.sop_class_uid,
                    "uid": f.sop_instance_uid,
                    "ae": calling_ae,
                }
                for f in files
            ]
        ),
        encoding="utf-8",
    )
    child = subprocess.run(
        [sys.executable, "-c", CRASH_CHILD, str(config), str(manifest)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert "stored" in child.stdout


def segment_header_seq(path: Path) -> int | None:
    """The sequence number in a journal segment file's header (None: no header)."""
    with path.open("rb") as fh:
        head = fh.read(20)
    magic, seq, _ = struct.unpack("<4sQQ", head)
    return int(seq) if magic == b"CGJS" else None


def delete_instance_rows(db_url: str, uid: str) -> None:
    """Delete an instance's index row, jobs and counters (what retention's transaction
    does in the index to an instance it deletes)."""
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            pk, series_pk = conn.execute(
                select(Instance.id, Instance.series_pk).where(Instance.sop_instance_uid == uid)
            ).one()
            study_pk = conn.scalar(select(Series.study_pk).where(Series.id == series_pk))
            conn.execute(delete(ForwardJob).where(ForwardJob.instance_pk == pk))
            conn.execute(delete(Instance).where(Instance.id == pk))
            conn.execute(
                update(Series)
                .where(Series.id == series_pk)
                .values(number_of_instances=Series.number_of_instances - 1)
            )
            conn.execute(
                update(Study)
                .where(Study.id == study_pk)
                .values(number_of_instances=Study.number_of_instances - 1)
            )
    finally:
        engine.dispose()


def rewritten_copy(original: CorpusFile, out_dir: Path) -> Path:
    """Another version of ``original`` (same UIDs, same size, other pixel values)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(original.path)
    pixels = bytearray(ds.PixelData)
    for i in range(0, len(pixels), 2):
        pixels[i] ^= 0x5A
    ds.PixelData = bytes(pixels)
    target = out_dir / original.path.name
    ds.save_as(target, enforce_file_format=True)
    return target


def job_rows(db_url: str) -> list[tuple[str, str, str, int]]:
    """(SOP Instance UID, destination, state, attempts) of every forward job."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(
                    Instance.sop_instance_uid,
                    ForwardJob.destination,
                    ForwardJob.state,
                    ForwardJob.attempts,
                ).join(Instance, Instance.id == ForwardJob.instance_pk)
            ).all()
    finally:
        engine.dispose()
    return [(str(u), str(d), str(s), int(a)) for u, d, s, a in rows]


FINAL_STATES = {JobState.DONE.value, JobState.FAILED.value, JobState.DROPPED.value}


def router_table(**values: object) -> str:
    """A ``[router]`` TOML table (appended after the routes)."""
    return "\n[router]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


FAST_ROUTER = {
    "max_attempts": 1000,
    "retry_base_delay": 0.2,
    "retry_max_delay": 1.0,
    "lease_seconds": 30.0,
    "batch_size": 16,
    "poll_interval": 0.1,
    "idle_release": 1.0,
}


def patient_add_args(patient_id: str, issuer: str) -> list[str]:
    """``consentgate patient add`` for a tests.corpus.make_small_series patient."""
    return [
        "patient",
        "add",
        "--issuer",
        issuer,
        "--patient-id",
        patient_id,
        "--birth-name",
        "TEST",
        "--first-name",
        "TEST",
        "--birth-date",
        "1970-01-01",
        "--sex",
        "U",
    ]


def job_detail(db_url: str, uid: str) -> list[tuple[str, str, int, str]]:
    """(destination, state, attempts, last error) of the jobs of one instance."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(
                    ForwardJob.destination,
                    ForwardJob.state,
                    ForwardJob.attempts,
                    ForwardJob.last_error,
                )
                .join(Instance, Instance.id == ForwardJob.instance_pk)
                .where(Instance.sop_instance_uid == uid)
            ).all()
    finally:
        engine.dispose()
    return [(str(d), str(s), int(a), str(e)) for d, s, a, e in rows]
