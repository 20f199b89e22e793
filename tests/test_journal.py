"""The ingest journal: what a crash leaves is repaired before the node serves again.

A process kill does not lose the page cache, so to check that the journal really holds
what was acknowledged, these tests simulate the worst case of a power loss after the
kill: every archive file written since the last checkpoint is truncated or missing. The
replay must bring back every indexed instance byte for byte, remove the files of stores
that never committed, and leave nothing live in the journal once the node has stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import create_engine, delete, select, update

from cli.ops_http import health
from cli.runtime import Ingest, build_runtime
from config.settings import ConfigError, load_settings
from dicom_node.archive.identity import UNSTORABLE, load_identity
from dicom_node.archive.journal import _RECORD_HEADER, IngestJournal, JournalLocked
from dicom_node.archive.models import Instance, Series, Study
from dicom_node.errors import StorageFailure
from router.models import ForwardJob
from tests.conftest import (
    CONSENTGATE_BIN,
    NODE_AE,
    dataset_bytes,
    free_port,
    indexed_instances,
    prepare_runtime,
    store_files,
    wait_until,
    write_config,
)
from tests.corpus import CorpusFile, make_ct_series, make_small_series
from tests.test_crash import counters_consistent

RECORD_HEADER_SIZE = _RECORD_HEADER.size

# Stores through the real archive + journal in a child process, then dies by SIGKILL
# without any checkpoint (flush interval of an hour). Manifest entries with a role leave
# a journalled file whose index row never committed ("pending": the process died first)
# or whose store failed ("cancelled": a cancel marker follows).
CHILD = """
import json, os, signal, sys
from pathlib import Path
from config.settings import load_settings
from cli.ops_http import health
from cli.runtime import Ingest, build_runtime

config, manifest, mode = sys.argv[1], json.loads(Path(sys.argv[2]).read_text()), sys.argv[3]
runtime = build_runtime(load_settings(config))
Ingest(runtime, flush_interval=3600).start()

def dataset(path):
    raw = Path(path).read_bytes()
    return raw[144 + int.from_bytes(raw[140:144], "little"):]

def part10(path):
    raw = Path(path).read_bytes()
    return raw[:144 + int.from_bytes(raw[140:144], "little")], dataset(path)

for item in manifest:
    role = item.get("role", "store")
    if role == "store":
        runtime.archive.store(
            dataset(item["path"]),
            transfer_syntax_uid=item["ts"],
            command_sop_class_uid=item["cls"],
            command_sop_instance_uid=item["uid"],
            calling_ae="MODALITY",
        )
        continue
    # journalled, then the process died before the index commit ("pending"), or the
    # index commit failed and the sender was told so ("cancelled")
    relative = runtime.files.relative_path_for(item["uid"])
    chunks = part10(item["path"])
    runtime.journal.append(item["uid"], relative, chunks)
    runtime.files.write_unsynced(relative, chunks)
    if role == "cancelled":
        runtime.journal.cancel(item["uid"], relative)
if mode == "direct-rewrite":
    # the first instance's file replaced through the direct path (as after a retention
    # delete and a new store of the same UID too large for the journal)
    item = manifest[0]
    relative = runtime.files.relative_path_for(item["uid"])
    runtime.journal.mark_direct(item["uid"], relative)
    staged, _ = runtime.files.stage((b"DIRECT COPY",))
    runtime.files.commit(staged, relative)
print("stored", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _manifest(files: list[CorpusFile], path: Path, roles: dict[str, str]) -> Path:
    path.write_text(
        json.dumps(
            [
                {
                    "path": str(f.path),
                    "ts": f.transfer_syntax_uid,
                    "cls": f.sop_class_uid,
                    "uid": f.sop_instance_uid,
                    "role": roles.get(f.sop_instance_uid, "store"),
                }
                for f in files
            ]
        ),
        encoding="utf-8",
    )
    return path


def _crash_after_storing(
    config: Path,
    files: list[CorpusFile],
    mode: str = "-",
    roles: dict[str, str] | None = None,
) -> None:
    manifest = _manifest(files, config.with_suffix(".json"), roles or {})
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(config), str(manifest), mode],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert "stored" in child.stdout


def _lose_index_rows(db_url: str, uids: list[str]) -> None:
    """What a power loss does to index transactions committed without their own sync:
    the rows (and their parents' counter increments) are gone."""
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            for uid in uids:
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


def _config(
    tmp_path: Path,
    db_url: str,
    segment_mb: int = 1,
    peers: list[dict[str, object]] | None = None,
) -> Path:
    config = write_config(
        tmp_path / "cg.toml",
        tmp_path / "data",
        db_url,
        dicom_port=free_port(),
        http_port=free_port(),
        peers=peers,
        journal_segment_mb=segment_mb,
    )
    prepare_runtime(load_settings(config)).close()
    return config


def _live_segments(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "journal").glob("seg-*.jnl"))


def test_replay_restores_acknowledged_files_lost_after_a_crash(tmp_path: Path, db_url: str) -> None:
    data_dir = tmp_path / "data"
    config = _config(tmp_path, db_url, segment_mb=1)
    small = make_small_series(tmp_path / "small", 44)
    # 0.5 MB CT instances rotate 1 MiB segments; a 2 MB one is too big for a record and
    # takes the direct path (fsync, rename, directory fsync) behind a marker record
    ct = make_ct_series(tmp_path / "ct", 3, patient_id="CRASHCT")
    big = make_ct_series(tmp_path / "big", 1, rows=1024, columns=1024, patient_id="CRASHBIG")
    files = small[:20] + ct + big + small[20:40]
    pending, cancelled = small[40:42], small[42:44]
    roles = {f.sop_instance_uid: "pending" for f in pending}
    roles |= {f.sop_instance_uid: "cancelled" for f in cancelled}
    _crash_after_storing(config, files + pending + cancelled, roles=roles)

    indexed = indexed_instances(db_url)
    assert set(indexed) == {f.sop_instance_uid for f in files}
    assert len(_live_segments(data_dir)) >= 2, "the 1 MiB segments rotated"

    # power loss on top of the kill: index commits not yet synced are lost, unsynced
    # archive files are damaged or gone
    lost_rows = [f.sop_instance_uid for f in files[-3:]]
    _lose_index_rows(db_url, lost_rows)
    archive = data_dir / "archive"
    for n, f in enumerate(files):
        target = archive / indexed[f.sop_instance_uid]
        if f in big or not target.exists():  # synced / not written yet by the writer
            continue
        if n % 2:
            target.unlink()
        else:
            with target.open("r+b") as fh:
                fh.truncate(target.stat().st_size // 3)
    cancelled_files = [archive / indexed_path_for(f.sop_instance_uid) for f in cancelled]
    assert all(p.exists() for p in cancelled_files)

    runtime = build_runtime(load_settings(config))
    ingest = Ingest(runtime)
    try:
        ingest.start()
        report = ingest.replay
        assert report is not None
        assert report.reindexed == len(lost_rows) + len(pending)
        assert report.restored == len(files) - len(big) - len(lost_rows)
        assert report.removed == len(cancelled)
        assert not any(p.exists() for p in cancelled_files), "a failed store leaves no file"
        final = indexed_instances(db_url)
        assert set(final) == {f.sop_instance_uid for f in files + pending}
        for f in files + pending:
            stored = archive / final[f.sop_instance_uid]
            assert dataset_bytes(stored) == dataset_bytes(f.path), f.sop_instance_uid
            assert pydicom.dcmread(stored).SOPInstanceUID == f.sop_instance_uid
        on_disk = {p for p in archive.rglob("*") if p.is_file()}
        assert on_disk == {archive / rel for rel in final.values()}
        assert counters_consistent(db_url) == []
    finally:
        ingest.stop()
        runtime.close()
    assert _live_segments(data_dir) == [], "a clean stop leaves no live segment"


def indexed_path_for(uid: str) -> str:
    """The archive-relative path the archive uses for ``uid``."""
    from dicom_node.archive.files import InstanceFiles

    return InstanceFiles.relative_path_for(uid)


def test_a_damaged_record_is_skipped_and_later_records_still_replayed(
    tmp_path: Path, db_url: str
) -> None:
    data_dir = tmp_path / "data"
    config = _config(tmp_path, db_url, segment_mb=4)
    files = make_small_series(tmp_path / "small", 5)
    _crash_after_storing(config, files)
    indexed = indexed_instances(db_url)
    (segment,) = _live_segments(data_dir)
    journal = IngestJournal(data_dir / "journal", 4 * 1024 * 1024)
    records = list(journal.scan(int(segment.stem[4:], 16), segment))
    assert [r.sop_instance_uid for r in records] == [f.sop_instance_uid for f in files]

    # flip a byte inside the second record's payload, and put a torn record (valid
    # header, missing payload) after the last one, as a crash mid-append leaves it
    with segment.open("r+b") as fh:
        fh.seek(records[1].payload_offset + 200)
        byte = fh.read(1)
        fh.seek(records[1].payload_offset + 200)
        fh.write(bytes([byte[0] ^ 0xFF]))
        last = records[-1]
        torn_at = (last.payload_offset + last.payload_length + 4095) // 4096 * 4096
        fh.seek(last.offset)
        header = bytearray(fh.read(RECORD_HEADER_SIZE))
        fh.seek(torn_at)
        fh.write(bytes(header))
    rescanned = list(journal.scan(int(segment.stem[4:], 16), segment))
    assert [r.sop_instance_uid for r in rescanned] == [
        f.sop_instance_uid for i, f in enumerate(files) if i != 1
    ]

    archive = data_dir / "archive"
    for f in files:  # lost (or never written by the background writer before the kill)
        (archive / indexed[f.sop_instance_uid]).unlink(missing_ok=True)
    runtime = build_runtime(load_settings(config))
    ingest = Ingest(runtime)
    try:
        ingest.start()
        assert ingest.replay is not None and ingest.replay.restored == len(files) - 1
        for i, f in enumerate(files):
            stored = archive / indexed[f.sop_instance_uid]
            if i == 1:
                assert not stored.exists(), "damaged bytes are never written to the archive"
            else:
                assert dataset_bytes(stored) == dataset_bytes(f.path)
    finally:
        ingest.stop()
        runtime.close()


@pytest.mark.parametrize("crc32c", [False, True], ids=["crc32-zlib", "crc32c"])
def test_records_of_either_checksum_are_read_back_and_checked(tmp_path: Path, crc32c: bool) -> None:
    """Records written with zlib's CRC-32 (earlier versions) and with CRC-32C are both
    read back by a scan, and a damaged one of either kind is skipped."""
    directory = tmp_path / "journal"
    writer = IngestJournal(directory, 1024 * 1024, crc32c=crc32c)
    writer.lock()
    writer.start()
    try:
        payloads = [os.urandom(size) for size in (10, 5000, 70_000, 300_000)]
        for i, payload in enumerate(payloads):
            writer.append(f"1.2.826.0.1.{i}", f"ab/{i:064x}.dcm", [b"DICM", bytearray(payload)])
        ((seq, segment),) = writer.live_segments()
        reader = IngestJournal(directory, 1024 * 1024)  # what a replay after a crash reads
        records = list(reader.scan(seq, segment))
        assert [r.sop_instance_uid for r in records] == [
            f"1.2.826.0.1.{i}" for i in range(len(payloads))
        ]
        with segment.open("r+b") as fh:
            fh.seek(records[0].offset)
            assert fh.read(4) == (b"CGJC" if crc32c else b"CGJR")
            for record, payload in zip(records, payloads, strict=True):
                fh.seek(record.payload_offset)
                assert fh.read(record.payload_length) == b"DICM" + payload
            fh.seek(records[2].payload_offset + 40_000)
            byte = fh.read(1)
            fh.seek(records[2].payload_offset + 40_000)
            fh.write(bytes([byte[0] ^ 0x01]))
        rescanned = list(reader.scan(seq, segment))
        assert [r.sop_instance_uid for r in rescanned] == [f"1.2.826.0.1.{i}" for i in (0, 1, 3)]
    finally:
        writer.close()


def test_a_direct_write_after_a_journal_record_is_not_overwritten_by_replay(
    tmp_path: Path, db_url: str
) -> None:
    data_dir = tmp_path / "data"
    config = _config(tmp_path, db_url, segment_mb=4)
    files = make_small_series(tmp_path / "small", 2)
    _crash_after_storing(config, files, "direct-rewrite")
    indexed = indexed_instances(db_url)
    direct = data_dir / "archive" / indexed[files[0].sop_instance_uid]
    assert direct.read_bytes() == b"DIRECT COPY"
    runtime = build_runtime(load_settings(config))
    ingest = Ingest(runtime)
    try:
        ingest.start()
        assert ingest.replay is not None and ingest.replay.records == 3
        assert direct.read_bytes() == b"DIRECT COPY", "the older journal copy won"
        other = data_dir / "archive" / indexed[files[1].sop_instance_uid]
        assert dataset_bytes(other) == dataset_bytes(files[1].path)
    finally:
        ingest.stop()
        runtime.close()


def test_segments_are_recycled_while_receiving(tmp_path: Path, db_url: str) -> None:
    data_dir = tmp_path / "data"
    config = _config(tmp_path, db_url, segment_mb=1)
    files = make_small_series(tmp_path / "small", 150)  # ~1.8 MB of records: 2+ segments
    runtime = build_runtime(load_settings(config))
    ingest = Ingest(runtime, flush_interval=0.05)
    try:
        ingest.start()
        store_files(runtime, files, "MODALITY")
        journal = runtime.journal
        assert journal is not None
        # once the background writer has written them, everything before the active
        # segment is made durable in the archive and the older segments recycled
        wait_until(
            lambda: journal.checkpoint() >= 0 and len(_live_segments(data_dir)) == 1,
            10,
            "older segments recycled",
        )
        assert len(list((data_dir / "journal").glob("free-*.jnl"))) <= 2
    finally:
        ingest.stop()
        runtime.close()
    assert _live_segments(data_dir) == []
    indexed = indexed_instances(db_url)
    for f in files:
        assert dataset_bytes(data_dir / "archive" / indexed[f.sop_instance_uid]) == dataset_bytes(
            f.path
        )


def test_an_unwritable_archive_refuses_new_stores_and_loses_nothing(
    tmp_path: Path, db_url: str
) -> None:
    data_dir = tmp_path / "data"
    config = _config(tmp_path, db_url)
    first, blocked, later = make_small_series(tmp_path / "small", 3)
    runtime = build_runtime(load_settings(config))
    ingest = Ingest(runtime)
    try:
        ingest.start()
        store_files(runtime, [first], "MODALITY")
        assert runtime.files.absolute(indexed_path_for(first.sop_instance_uid)).is_file()
        # the directory the next file goes to is replaced by a file: writes there fail
        directory = data_dir / "archive" / indexed_path_for(blocked.sop_instance_uid)[:2]
        shutil.rmtree(directory)
        directory.write_bytes(b"")
        store_files(runtime, [blocked], "MODALITY")  # durable in the journal: acknowledged
        wait_until(lambda: ingest.archive_writes_failing, 10, "writer reports the failure")
        healthy, checks = health(runtime, ingest)  # what /healthz answers (503)
        assert not healthy
        assert checks["archive_writer"] == "error: cannot write archive files"
        with pytest.raises(StorageFailure):
            store_files(runtime, [later], "MODALITY")
        assert set(indexed_instances(db_url)) == {first.sop_instance_uid, blocked.sop_instance_uid}
        # the disk is repaired: the writer's retry places the file, stores are taken again
        directory.unlink()
        directory.mkdir()
        wait_until(lambda: not ingest.archive_writes_failing, 10, "writer recovers")
        assert health(runtime, ingest) == (True, {**checks, "archive_writer": "ok"})
        stored = runtime.files.absolute(indexed_path_for(blocked.sop_instance_uid))
        assert dataset_bytes(stored) == dataset_bytes(blocked.path)
        store_files(runtime, [later], "MODALITY")
        assert len(indexed_instances(db_url)) == 3
    finally:
        ingest.stop()
        runtime.close()


def test_one_serving_process_per_data_directory(tmp_path: Path, db_url: str) -> None:
    config = _config(tmp_path, db_url)
    runtime = build_runtime(load_settings(config))
    ingest = Ingest(runtime)
    ingest.start()
    try:
        second = build_runtime(load_settings(config))
        try:
            with pytest.raises(JournalLocked):
                Ingest(second).start()
        finally:
            second.close()
        # the CLI says so in one line, without a traceback
        serve = subprocess.run(
            [str(CONSENTGATE_BIN), "--config", str(config), "serve"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert serve.returncode == 1
        assert "cannot open the ingest journal: another consentgate process is serving" in (
            serve.stderr
        )
        assert "Traceback" not in serve.stderr
    finally:
        ingest.stop()
        runtime.close()


def test_journal_off_stores_directly(tmp_path: Path, db_url: str) -> None:
    data_dir = tmp_path / "data"
    config = _config(tmp_path, db_url, segment_mb=0)
    files = make_small_series(tmp_path / "small", 3)
    runtime = build_runtime(load_settings(config))
    assert runtime.journal is None
    ingest = Ingest(runtime)
    try:
        ingest.start()
        store_files(runtime, files, "MODALITY")
    finally:
        ingest.stop()
        runtime.close()
    assert not (data_dir / "journal").exists()
    assert len(indexed_instances(db_url)) == 3


@pytest.mark.parametrize("value", ["-1", "5000", '"big"', "1.5"])
def test_bad_journal_segment_size_names_the_key(tmp_path: Path, value: str) -> None:
    config = tmp_path / "cg.toml"
    config.write_text(f'[node]\nae_title = "{NODE_AE}"\njournal_segment_mb = {value}\n')
    with pytest.raises(ConfigError, match=r"node\.journal_segment_mb") as raised:
        load_settings(config)
    assert str(config) in str(raised.value)
    assert os.linesep not in str(raised.value).strip()


@pytest.mark.parametrize(
    ("issuers", "expected"),
    [(("HOSP-A", "HOSP-A"), "HOSP-A"), (("HOSP-A", "HOSP-B"), None)],
    ids=["same-issuer", "different-issuers"],
)
def test_replay_applies_a_peer_issuer_only_when_the_ae_title_names_one(
    tmp_path: Path, issuers: tuple[str, str], expected: str | None
) -> None:
    """The journal keeps the sending AE title, not the address. Two peers share the AE
    title from two hosts: with one issuer between them, an instance indexed again by the
    replay gets it; with two, it is filed without a patient identity rather than under
    the first peer's issuer, which could name another patient with the same Patient ID."""
    db_url = f"sqlite:///{tmp_path / 'index.db'}"
    peers: list[dict[str, object]] = [
        {
            "name": f"modality-{n}",
            "ae_title": "MODALITY",  # the child's calling AE title
            "host": f"127.0.0.{n}",
            "port": 104,
            "services": ["echo", "store"],
            "issuer": issuer,
        }
        for n, issuer in enumerate(issuers, start=1)
    ]
    config = _config(tmp_path, db_url, peers=peers)
    files = make_small_series(tmp_path / "small", 2)
    for f in files:  # the issuer comes from the peer: the instances name none
        ds = pydicom.dcmread(f.path)
        del ds.IssuerOfPatientID
        ds.save_as(f.path)
    _crash_after_storing(config, files)
    _lose_index_rows(db_url, [f.sop_instance_uid for f in files])

    runtime = build_runtime(load_settings(config))
    ingest = Ingest(runtime)
    try:
        ingest.start()
        assert ingest.replay is not None and ingest.replay.reindexed == len(files)
        with runtime.sessions() as session:
            stored = session.scalars(select(Instance.identity)).all()
        assert len(stored) == len(files)
        if expected:
            assert {load_identity(text).issuer for text in stored if text} == {expected}
        else:  # filed without a patient identity: no check accepts it
            assert set(stored) == {UNSTORABLE}
    finally:
        ingest.stop()
        runtime.close()
