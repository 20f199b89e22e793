"""The running node driven by the DCMTK command line tools: association control (C-ECHO),
service permissions and storage of the whole corpus with storescu.

Every test runs on SQLite and on PostgreSQL (``running_node`` is parametrised).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian
from sqlalchemy import select

from dicom_node.archive.models import Instance, Patient, Series, Study
from tests.conftest import (
    MODALITY_AE,
    PACS_AE,
    RunningNode,
    dataset_bytes,
    make_settings,
    run_tool,
    start_node,
    storescu,
)
from tests.corpus import CorpusFile


def _echo(running: RunningNode, calling_ae: str, called_ae: str | None = None) -> tuple[int, str]:
    result = run_tool(
        "echoscu",
        "-v",
        "-to",
        "10",
        "-ta",
        "10",
        "-td",
        "10",
        "-aet",
        calling_ae,
        "-aec",
        called_ae or running.ae_title,
        running.host,
        running.port,
    )
    return result.returncode, result.stdout + result.stderr


def _counter(running: RunningNode, name: str, **labels: str) -> float:
    value = running.runtime.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _archived_files(running: RunningNode) -> list[Path]:
    files = running.runtime.files
    return [p for root in (files.root, files.tmp) for p in root.rglob("*") if p.is_file()]


# -- C-ECHO and association control ---------------------------------------------------------


def test_echo_succeeds_for_configured_peers(running_node: RunningNode) -> None:
    for calling in (MODALITY_AE, PACS_AE):
        code, output = _echo(running_node, calling)
        assert code == 0, f"echoscu as {calling} failed:\n{output}"
        assert "Received Echo Response (Success)" in output
    assert _counter(running_node, "consentgate_associations_total", result="accepted") == 2


@pytest.mark.parametrize(
    ("calling", "called", "reason"),
    [
        ("INTRUDER", None, "Calling AE Title Not Recognized"),
        (MODALITY_AE, "NOT-THE-NODE", "Called AE Title Not Recognized"),
    ],
    ids=["unknown-calling-ae", "wrong-called-ae"],
)
def test_echo_rejected(
    running_node: RunningNode, calling: str, called: str | None, reason: str
) -> None:
    code, output = _echo(running_node, calling, called)
    assert code != 0, f"echoscu should have been rejected:\n{output}"
    assert "Association Rejected" in output
    assert reason in output
    assert "Echo Response" not in output


@pytest.fixture
def node_expecting_modality_elsewhere(tmp_path: Path, db_url: str) -> Iterator[RunningNode]:
    """A node whose peer "modality" (AE STORESCU) is configured on host 127.0.0.2."""
    settings = make_settings(tmp_path / "data", db_url)
    peers = tuple(
        replace(p, host="127.0.0.2") if p.name == "modality" else p for p in settings.peers
    )
    running = start_node(replace(settings, peers=peers))
    try:
        yield running
    finally:
        running.stop()
        running.runtime.close()


def test_echo_rejected_for_known_ae_from_wrong_host(
    node_expecting_modality_elsewhere: RunningNode,
) -> None:
    running = node_expecting_modality_elsewhere
    code, output = _echo(running, MODALITY_AE)  # from 127.0.0.1, configured 127.0.0.2
    assert code != 0, f"STORESCU from the wrong host was accepted:\n{output}"
    assert "Calling AE Title Not Recognized" in output
    # the same node still accepts a peer whose host matches: the host made the difference
    code, output = _echo(running, PACS_AE)
    assert code == 0, output


# -- C-STORE ----------------------------------------------------------------------------------


def test_store_refused_for_peer_without_store_service(
    running_node: RunningNode, corpus: list[CorpusFile], tmp_path: Path
) -> None:
    # "pacs" (QRSCU) may echo/find/move/get; storage contexts are negotiated (for C-GET)
    # but a C-STORE from it must be refused and leave nothing behind
    result = storescu(running_node, corpus[:2], tmp_path, calling_ae=PACS_AE)
    assert result.returncode != 0, result.stdout + result.stderr
    assert running_node.runtime.index.counts()["instances"] == 0
    assert _archived_files(running_node) == []
    assert _counter(running_node, "consentgate_errors_total", service="store", status="0x124") >= 1
    assert _counter(running_node, "consentgate_instances_received_total", outcome="stored") == 0


def test_storescu_whole_corpus_is_indexed_and_stored_as_sent(
    running_node: RunningNode, corpus: list[CorpusFile], tmp_path: Path
) -> None:
    syntaxes = {f.transfer_syntax_uid for f in corpus}
    assert len(syntaxes) >= 10, "the corpus should cover every transfer syntax family"

    result = storescu(running_node, corpus, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr

    runtime = running_node.runtime
    with runtime.sessions() as session:
        rows = {
            row.Instance.sop_instance_uid: row
            for row in session.execute(
                select(Instance, Series, Study, Patient)
                .join(Series, Instance.series_pk == Series.id)
                .join(Study, Series.study_pk == Study.id)
                .join(Patient, Study.patient_pk == Patient.id)
            )
        }
    assert set(rows) == {f.sop_instance_uid for f in corpus}

    for f in corpus:
        row = rows[f.sop_instance_uid]
        where = f"{f.path.name} ({f.transfer_syntax_uid})"
        # index: the attributes as sent (no issuer in the file -> the peer's issuer)
        assert row.Instance.sop_class_uid == f.sop_class_uid, where
        assert row.Instance.transfer_syntax_uid == f.transfer_syntax_uid, where
        assert row.Instance.number_of_frames == f.number_of_frames, where
        assert row.Instance.calling_ae == MODALITY_AE, where
        assert row.Series.series_instance_uid == f.series_uid, where
        assert row.Series.modality == f.modality, where
        assert row.Study.study_instance_uid == f.study_uid, where
        assert row.Study.study_date == f.study_date, where
        assert row.Study.accession_number == f.accession_number, where
        assert row.Patient.patient_id == f.patient_id, where
        assert row.Patient.issuer == (f.issuer or "CHR-METZ"), where
        assert row.Patient.patient_name == f.patient_name, where

        stored = runtime.files.absolute(row.Instance.path)
        meta = dcmread(stored, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == f.transfer_syntax_uid, where
        assert meta.MediaStorageSOPInstanceUID == f.sop_instance_uid, where
        assert meta.MediaStorageSOPClassUID == f.sop_class_uid, where
        assert meta.SourceApplicationEntityTitle == MODALITY_AE, where
        assert row.Instance.size == stored.stat().st_size, where

        sent, kept = dataset_bytes(f.path), dataset_bytes(stored)
        if f.transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
            # storescu inflates the file and deflates the data set again for the wire,
            # so the deflated bytes on the wire are storescu's, not the file's. The node
            # keeps what it received: still a deflate stream (not inflated, not
            # re-encoded), carrying exactly the data set of the source file. (Byte
            # equality of deflated data sets is proven in test_archive, where the
            # pynetdicom SCU sends the file's own deflated bytes.)
            inflated = zlib.decompress(sent, -zlib.MAX_WBITS)
            assert zlib.decompress(kept, -zlib.MAX_WBITS) == inflated, where
            assert len(kept) < len(inflated), where
        else:
            assert kept == sent, f"{where}: stored data set differs from the one sent"

    counts = runtime.index.counts()
    assert counts["instances"] == len(corpus)
    assert counts["series"] == len({f.series_uid for f in corpus})
    assert counts["studies"] == len({f.study_uid for f in corpus})
    # metrics: one "stored" per instance, bytes as accounted in the index
    assert _counter(running_node, "consentgate_instances_received_total", outcome="stored") == len(
        corpus
    )
    assert _counter(running_node, "consentgate_instances_received_total", outcome="duplicate") == 0
    assert _counter(running_node, "consentgate_bytes_received_total") == counts["bytes"]
    assert _counter(running_node, "consentgate_associations_total", result="accepted") == 1
