"""Hostile and broken input on the DICOM port: refused cleanly, nothing written, node alive.

The node runs in-process (SQLite: PostgreSQL adds nothing to what is tested here), so its
memory can be read from /proc/self/status. Hostile C-STOREs that pynetdicom itself would
refuse to send are sent from a subprocess whose pynetdicom has UID validation disabled,
so the node's own pynetdicom stays untouched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
import struct
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    MRImageStorage,
)
from pynetdicom import AE, _config, build_context
from pynetdicom.sop_class import Verification

from tests.conftest import (
    MODALITY_AE,
    NODE_AE,
    PACS_AE,
    RunningNode,
    dataset_bytes,
    make_settings,
    run_tool,
    start_node,
    storescu,
)
from tests.corpus import CorpusFile, make_small_series
from tests.scu_support import associate

SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
pytestmark = SQLITE_ONLY


def is_failure(status: int) -> bool:
    """A C-STORE failure status: refused, out of resources, SOP class mismatch, cannot
    understand (PS3.4 B.2.3; 0xA7xx, 0xA9xx, 0xCxxx, and 0x0124 refused)."""
    return status == 0x0124 or (status & 0xF000) in (0xA000, 0xC000)


def files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def assert_nothing_stored(running: RunningNode) -> None:
    data = running.settings.node.data_dir
    assert files_under(data / "archive") == []
    assert files_under(data / "tmp") == []
    assert running.runtime.index.counts()["instances"] == 0


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def echo_ok(running: RunningNode) -> bool:
    ae = AE(ae_title=MODALITY_AE)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = associate(ae, running.host, running.port, ae_title=NODE_AE)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0
    finally:
        assoc.release()


def store_file(running: RunningNode, path: Path, sop_class: str, syntax: str) -> int | None:
    """C-STORE a Part 10 file's bytes as they are (pynetdicom's chunked mode sends the
    data set after the file meta unparsed); returns the status, None without a response."""
    ae = AE(ae_title=MODALITY_AE)
    ae.add_requested_context(sop_class, syntax)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = associate(ae, running.host, running.port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        return int(status.Status) if status and "Status" in status else None
    finally:
        if assoc.is_established:
            assoc.release()


@pytest.fixture(autouse=True)
def _chunked_send(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.fixture
def quick_node(tmp_path: Path, db_url: str) -> Iterator[RunningNode]:
    """A node whose ACSE and network timeouts are 2 s."""
    running = start_node(
        make_settings(tmp_path / "data", db_url, acse_timeout=2, network_timeout=2)
    )
    try:
        yield running
    finally:
        running.stop()
        running.runtime.close()


# -- malformed and truncated data sets ----------------------------------------------------


def part10(sop_class: str, sop_instance: str, syntax: str, dataset: bytes) -> bytes:
    """Preamble + File Meta Information + ``dataset`` exactly as given."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.1517.99"
    buffer = BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)  # type: ignore[arg-type]
    return buffer.getvalue() + dataset


def pick(corpus: list[CorpusFile], syntax: str) -> CorpusFile:
    return next(f for f in corpus if f.transfer_syntax_uid == syntax)


def _set_pixel_length(ds: bytes, length: int) -> bytes:
    at = ds.rindex(b"\xe0\x7f\x10\x00OW\x00\x00")
    return ds[: at + 8] + struct.pack("<I", length) + ds[at + 12 :]


MALFORMED = {
    # name: (corpus transfer syntax, function of the data set bytes)
    "random-garbage": (ExplicitVRLittleEndian, lambda ds: random.Random(7).randbytes(4000)),
    "all-zeros": (ExplicitVRLittleEndian, lambda ds: b"\x00" * 4000),
    "empty-data-set": (ExplicitVRLittleEndian, lambda ds: b""),
    "cut-in-patient-module": (ExplicitVRLittleEndian, lambda ds: ds[:200]),
    "cut-after-the-uids": (
        ExplicitVRLittleEndian,
        lambda ds: ds[: ds.index(b"\x28\x00\x10\x00US") + 9],
    ),
    "cut-in-pixel-data": (ExplicitVRLittleEndian, lambda ds: ds[:-1000]),
    "cut-last-byte": (ExplicitVRLittleEndian, lambda ds: ds[:-1]),
    "pixel-length-beyond-end": (
        ExplicitVRLittleEndian,
        lambda ds: _set_pixel_length(ds, 0x7FFFFFF0),
    ),
    "value-length-beyond-end": (
        ExplicitVRLittleEndian,
        lambda ds: ds + b"\x09\x00\x10\x00UT\x00\x00\x00\x00\x10\x00",
    ),
    "sequence-never-closed": (
        ExplicitVRLittleEndian,
        lambda ds: (
            ds + b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff"
            b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
            b"\x08\x00\x50\x11UI\x02\x001\x00"
        ),
    ),
    "implicit-vr-cut": (ImplicitVRLittleEndian, lambda ds: ds[:-10]),
    "deflated-cut": (DeflatedExplicitVRLittleEndian, lambda ds: ds[: len(ds) // 2]),
    "deflated-garbage": (
        DeflatedExplicitVRLittleEndian,
        lambda ds: random.Random(3).randbytes(2000),
    ),
    "encapsulated-no-delimiter": (JPEGBaseline8Bit, lambda ds: ds[:-8]),
    "encapsulated-cut-in-fragment": (JPEGBaseline8Bit, lambda ds: ds[:-300]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_data_set_is_refused_and_leaves_nothing(
    tmp_path: Path, running_node: RunningNode, corpus: list[CorpusFile], case: str
) -> None:
    syntax, mangle = MALFORMED[case]
    source = pick(corpus, syntax)
    bad = tmp_path / f"{case}.dcm"
    bad.write_bytes(
        part10(
            source.sop_class_uid,
            source.sop_instance_uid,
            syntax,
            mangle(dataset_bytes(source.path)),
        )
    )
    status = store_file(running_node, bad, source.sop_class_uid, syntax)
    assert status is not None, "the node must answer with a status, not drop the association"
    assert is_failure(status), f"0x{status:04X}"
    assert_nothing_stored(running_node)
    # the node is still fine: the intact instance is accepted afterwards
    assert store_file(running_node, source.path, source.sop_class_uid, syntax) == 0
    assert running_node.runtime.index.counts()["instances"] == 1


def test_data_set_contradicting_the_command(
    tmp_path: Path, running_node: RunningNode, corpus: list[CorpusFile]
) -> None:
    source = pick(corpus, ExplicitVRLittleEndian)
    ds = dataset_bytes(source.path)
    other_instance = tmp_path / "other-instance.dcm"
    other_instance.write_bytes(
        part10(source.sop_class_uid, "1.2.3.4.5.6", source.transfer_syntax_uid, ds)
    )
    other_class = tmp_path / "other-class.dcm"
    other_class.write_bytes(
        part10(
            MRImageStorage if source.sop_class_uid != MRImageStorage else CTImageStorage,
            source.sop_instance_uid,
            source.transfer_syntax_uid,
            ds,
        )
    )
    instance_status = store_file(
        running_node, other_instance, source.sop_class_uid, source.transfer_syntax_uid
    )
    assert instance_status is not None and is_failure(instance_status)
    wrong_class = MRImageStorage if source.sop_class_uid != MRImageStorage else CTImageStorage
    class_status = store_file(running_node, other_class, wrong_class, source.transfer_syntax_uid)
    assert class_status == 0xA900
    assert_nothing_stored(running_node)


# -- hostile UIDs ------------------------------------------------------------------------

HOSTILE_SENDER = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
from pynetdicom import AE, _config
_config.VALIDATORS["UI"] = lambda value: (True, "")  # send what a hostile peer sends
_config.STORE_SEND_CHUNKED_DATASET = True
port, called, calling = int(sys.argv[1]), sys.argv[2], sys.argv[3]
results = {}
for path in sys.argv[4:]:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        results[path] = "no association"
        continue
    try:
        status = assoc.send_c_store(path)
        results[path] = int(status.Status) if status and "Status" in status else None
    except Exception as exc:
        results[path] = "sender error " + type(exc).__name__
    if assoc.is_established:
        assoc.release()
print(json.dumps(results))
"""

EVIL = f"cg-evil-{uuid.uuid4().hex[:8]}"
HOSTILE_UIDS = {
    "dot-dot-slash": f"1.2.3/../../../../{EVIL}",
    "relative-path": f"../../../../../tmp/{EVIL}",
    "absolute-path": f"/tmp/{EVIL}",
    "nul-byte": "1.2.3\x00.4.5",
    "over-64-chars": "1." * 40 + "9",
    "letters": "1.2.840.abc.1",
    "backslash-multi-value": "1.2.3\\4.5.6",
    "spaces": "1.2 .3",
}


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
@pytest.mark.parametrize("where", ["command-and-data-set", "data-set-only"])
def test_hostile_sop_instance_uid_is_refused_and_writes_nothing(
    tmp_path: Path, running_node: RunningNode, where: str
) -> None:
    (template,) = make_small_series(tmp_path / "template", 1)
    base = pydicom.dcmread(template.path)
    send_dir = tmp_path / "hostile"
    send_dir.mkdir()
    paths = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values it writes
        for name, uid in HOSTILE_UIDS.items():
            if name == "backslash-multi-value" and where == "command-and-data-set":
                continue  # a command element cannot even be encoded with two values
            ds = base.copy()
            ds.SOPInstanceUID = uid
            ds.file_meta.MediaStorageSOPInstanceUID = (
                uid if where == "command-and-data-set" else f"2.25.{uuid.uuid4().int}"
            )
            path = send_dir / f"{name}.dcm"
            ds.save_as(path, enforce_file_format=False)
            paths[str(path)] = name
    data_dir = running_node.settings.node.data_dir
    before = {p for p in tmp_path.rglob("*") if data_dir not in p.parents}

    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            HOSTILE_SENDER,
            str(running_node.port),
            NODE_AE,
            MODALITY_AE,
            *paths,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for path, status in results.items():
        name = paths[path]
        if name == "over-64-chars" and where == "command-and-data-set":
            # pynetdicom cannot decode such a command and aborts: no success either
            assert status is None or (isinstance(status, int) and is_failure(status)), status
        else:
            assert isinstance(status, int) and is_failure(status), (name, status)
    assert_nothing_stored(running_node)
    after = {p for p in tmp_path.rglob("*") if data_dir not in p.parents}
    assert after == before, sorted(map(str, after - before))
    assert not list(Path("/tmp").glob(f"{EVIL}*"))
    assert not list(tmp_path.parent.rglob(f"*{EVIL}*"))


# -- protocol-level attacks: oversized PDU claims, idle and half-open connections --------


def read_until_closed(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the peer closed ``sock`` (EOF or reset), None if still open."""
    start = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - start < timeout:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - start
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - start
    return None


def test_associate_rq_claiming_4gib_is_dropped_without_memory_growth(
    running_node: RunningNode,
) -> None:
    before = rss_bytes()
    attacker = socket.create_connection((running_node.host, running_node.port), timeout=5)
    try:
        attacker.sendall(b"\x01\x00" + struct.pack(">I", 0xFFFFFFF0))
        # keep pushing junk as a real attacker would: at most 64 MiB, until the node hangs up
        sent = 0
        chunk = b"\xaa" * (1 << 20)
        try:
            while sent < 64 << 20:
                attacker.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        assert echo_ok(running_node), "other associations are served meanwhile"
        closed_after = read_until_closed(attacker, timeout=10)
        assert closed_after is not None, "the connection must be closed"
        assert closed_after < 5
    finally:
        attacker.close()
    grown = rss_bytes() - before
    assert grown < 50 * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MiB"
    assert echo_ok(running_node)


def test_p_data_claiming_4gib_inside_an_association_is_dropped(
    running_node: RunningNode,
) -> None:
    before = rss_bytes()
    ae = AE(ae_title=MODALITY_AE)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = associate(ae, running_node.host, running_node.port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        raw = assoc.dul.socket.socket
        # the node may close the connection before the whole megabyte is written
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            raw.sendall(b"\x04\x00" + struct.pack(">I", 0xFFFFFFF0) + b"\x00" * (1 << 20))
        deadline = time.monotonic() + 10
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not assoc.is_established, "the node must drop the association"
    finally:
        if assoc.is_established:
            assoc.abort()
    assert rss_bytes() - before < 50 * 1024 * 1024
    assert echo_ok(running_node)


def test_idle_connections_do_not_block_others_and_are_closed(
    quick_node: RunningNode, corpus: list[CorpusFile]
) -> None:
    idle = [
        socket.create_connection((quick_node.host, quick_node.port), timeout=5) for _ in range(5)
    ]
    opened = time.monotonic()
    try:
        source = pick(corpus, ExplicitVRLittleEndian)
        assert echo_ok(quick_node)
        assert (
            store_file(quick_node, source.path, source.sop_class_uid, source.transfer_syntax_uid)
            == 0
        )
        assert time.monotonic() - opened < 2, "served while the idle connections are open"
        for sock in idle:
            assert read_until_closed(sock, timeout=10) is not None, "idle connection kept"
        elapsed = time.monotonic() - opened
        assert 1.5 <= elapsed < 10, elapsed  # closed by the 2 s ACSE timeout, not before
    finally:
        for sock in idle:
            sock.close()
    assert echo_ok(quick_node)


def _associate_rq_bytes(called: str, calling: str) -> bytes:
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    context = build_context(Verification)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    primitive.user_information = [max_length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def test_half_sent_associate_rq_is_closed_after_timeout(quick_node: RunningNode) -> None:
    """A peer that stops in the middle of its A-ASSOCIATE-RQ must not hold a connection
    (and an association slot) for ever: the 2 s timeouts apply."""
    request = _associate_rq_bytes(NODE_AE, MODALITY_AE)
    assert request[:1] == b"\x01" and len(request) > 40
    stalled = []
    for cut in (6, 40):  # the PDU header alone; the header and part of the body
        sock = socket.create_connection((quick_node.host, quick_node.port), timeout=5)
        sock.sendall(request[:cut])
        stalled.append(sock)
    try:
        assert echo_ok(quick_node), "served while the stalled connections are open"
        for sock in stalled:
            assert read_until_closed(sock, timeout=8) is not None, (
                "a connection stalled inside a PDU is never closed"
            )
    finally:
        for sock in stalled:
            sock.close()


# -- no patient data in the logs ---------------------------------------------------------


def test_no_patient_data_in_info_logs(
    tmp_path: Path,
    running_node: RunningNode,
    corpus: list[CorpusFile],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="pynetdicom")
    caplog.set_level(logging.INFO, logger="pydicom")
    stored = storescu(running_node, corpus, tmp_path)
    assert stored.returncode == 0, stored.stderr[-2000:]
    # a duplicate and a refused sender also log
    assert storescu(running_node, corpus[:1], tmp_path).returncode == 0
    storescu(running_node, corpus[:1], tmp_path, calling_ae="INTRUDER")
    assert running_node.runtime.index.counts()["instances"] == len(corpus)
    queries = [
        ("-P", "QueryRetrieveLevel=PATIENT", "PatientName", "PatientID", "PatientBirthDate"),
        ("-S", "QueryRetrieveLevel=STUDY", "PatientName", "PatientID", "StudyInstanceUID"),
        ("-P", "QueryRetrieveLevel=PATIENT", f"PatientName={corpus[0].patient_name}", "PatientID"),
        ("-P", "QueryRetrieveLevel=PATIENT", "PatientBirthDate=19000101-20301231", "PatientID"),
    ]
    answers = ""
    for model, *keys in queries:
        args = [arg for key in keys for arg in ("-k", key)]
        found = run_tool(
            "findscu",
            "-v",
            model,
            "-aet",
            PACS_AE,
            "-aec",
            NODE_AE,
            *args,
            running_node.host,
            running_node.port,
        )
        assert found.returncode == 0, found.stderr[-2000:]
        answers += found.stdout + found.stderr
    assert corpus[0].patient_id in answers, "the queries returned patient data"

    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert logged, "the node logs at INFO"
    leaks = sorted(
        {
            value
            for f in corpus
            for value in (f.patient_id, f.patient_name, f.birth_date)
            if value in logged
        }
        | {part for f in corpus for part in f.patient_name.split("^") if part in logged}
    )
    assert leaks == [], f"patient data in INFO logs: {leaks}"
