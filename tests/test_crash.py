"""Acceptance crash test: ``kill -9`` of a node mid-series loses nothing it acknowledged.

A real ``consentgate serve`` process receives a series from DCMTK ``storescu``; it is
killed with SIGKILL after some instances were acknowledged, then restarted. Every
instance storescu saw acknowledged must be indexed with a file byte-identical to the one
sent; no staging file, partial file or dangling index row may remain; and the modality
resending the whole series afterwards must end with the complete series archived.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pydicom
from click.testing import CliRunner
from sqlalchemy import create_engine, func, select

from cli.main import cli
from dicom_node.archive.models import Instance, Series, Study
from tests.conftest import (
    ServeProcess,
    dataset_bytes,
    free_port,
    indexed_instances,
    storescu_acknowledged,
    storescu_args,
    write_config,
)
from tests.corpus import make_small_series

SERIES_SIZE = 300
KILL_AFTER_ACKS = 60


def storescu(port: int, directory: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        storescu_args(port, directory, "+sd"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def collect(proc: subprocess.Popen[str], lines: list[str]) -> threading.Thread:
    thread = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
    thread.start()
    return thread


def counters_consistent(db_url: str) -> list[str]:
    """Study and series instance counters that disagree with the instance rows."""
    engine = create_engine(db_url)
    problems = []
    try:
        with engine.connect() as conn:
            for series_pk, expected in conn.execute(select(Series.id, Series.number_of_instances)):
                actual = conn.scalar(
                    select(func.count(Instance.id)).where(Instance.series_pk == series_pk)
                )
                if actual != expected:
                    problems.append(f"series {series_pk}: counter {expected}, rows {actual}")
            for study_pk, expected in conn.execute(select(Study.id, Study.number_of_instances)):
                actual = conn.scalar(
                    select(func.count(Instance.id))
                    .join(Series, Instance.series_pk == Series.id)
                    .where(Series.study_pk == study_pk)
                )
                if actual != expected:
                    problems.append(f"study {study_pk}: counter {expected}, rows {actual}")
    finally:
        engine.dispose()
    return problems


def test_kill_9_mid_series_loses_no_acknowledged_instance(tmp_path: Path, db_url: str) -> None:
    source_dir = tmp_path / "series"
    series = make_small_series(source_dir, SERIES_SIZE)
    sources = {f.sop_instance_uid: f.path for f in series}
    data_dir = tmp_path / "data"
    dicom_port, http_port = free_port(), free_port()
    config = write_config(
        tmp_path / "cg.toml", data_dir, db_url, dicom_port=dicom_port, http_port=http_port
    )
    init = CliRunner().invoke(cli, ["--config", str(config), "init"])
    assert init.exit_code == 0, init.output

    # 1. stream the series and kill -9 the node after KILL_AFTER_ACKS acknowledgements
    lines: list[str] = []
    with ServeProcess(config, http_port, tmp_path / "serve-1.log") as serve:
        sender = storescu(dicom_port, source_dir)
        reader = collect(sender, lines)
        try:
            deadline = time.monotonic() + 60
            while len(storescu_acknowledged("".join(lines))) < KILL_AFTER_ACKS:
                assert time.monotonic() < deadline, "".join(lines)[-2000:]
                assert sender.poll() is None, "".join(lines)[-2000:]
                time.sleep(0.01)
            serve.kill()  # SIGKILL while storescu is still sending (checked below)
            sender.wait(timeout=60)
            reader.join(timeout=10)
        finally:
            if sender.poll() is None:
                sender.kill()
                sender.wait(timeout=10)
    output = "".join(lines)
    acked = [p.stem for p in storescu_acknowledged(output)]
    assert sender.returncode != 0, "storescu cannot have finished: the node was killed"
    assert KILL_AFTER_ACKS <= len(acked) < SERIES_SIZE
    assert len(set(acked)) == len(acked)

    # a staging file as a crash during a write leaves it (the kill may or may not have)
    (data_dir / "tmp" / "tmp_simulated_crash.part").write_bytes(b"\x00" * 128 + b"DICM")

    # 2. restart: the node cleans its staging area and serves again
    with ServeProcess(config, http_port, tmp_path / "serve-2.log") as serve:
        assert serve.healthz()[0] == 200
        assert list((data_dir / "tmp").iterdir()) == [], "staging area cleaned on restart"
        assert "incomplete staging file(s) left by a crash" in serve.log()

        indexed = indexed_instances(db_url)
        missing = sorted(set(acked) - set(indexed))
        assert not missing, f"{len(missing)} acknowledged instance(s) lost, e.g. {missing[:3]}"
        # the index has no row without its complete file, identical to what was sent
        for uid, relative in indexed.items():
            stored = data_dir / "archive" / relative
            assert stored.is_file(), f"index row {uid} has no file"
            assert uid in sources, f"indexed {uid} was never sent"
            assert dataset_bytes(stored) == dataset_bytes(sources[uid]), uid
        # every file in the archive is a complete DICOM file of an instance that was sent
        archived = [p for p in (data_dir / "archive").rglob("*") if p.is_file()]
        assert not [p for p in data_dir.rglob("*.part")]
        for path in archived:
            ds = pydicom.dcmread(path)
            assert len(ds.PixelData) == ds.Rows * ds.Columns * 2, path
            assert dataset_bytes(path) == dataset_bytes(sources[ds.SOPInstanceUID]), path
        assert len(archived) >= len(indexed)
        assert counters_consistent(db_url) == []

        # 3. the modality resends the whole series: it ends complete, without duplicates
        lines.clear()
        resend = storescu(dicom_port, source_dir)
        reader = collect(resend, lines)
        try:
            resend.wait(timeout=120)
            reader.join(timeout=10)
        finally:
            if resend.poll() is None:
                resend.kill()
                resend.wait(timeout=10)
        assert resend.returncode == 0, "".join(lines)[-2000:]
        assert len(storescu_acknowledged("".join(lines))) == SERIES_SIZE

        serve.signal(15)
        assert serve.wait(timeout=30) == 0

    final = indexed_instances(db_url)
    assert set(final) == set(sources)
    assert counters_consistent(db_url) == []
    archived = sorted(p for p in (data_dir / "archive").rglob("*") if p.is_file())
    assert sorted(data_dir / "archive" / rel for rel in final.values()) == archived
