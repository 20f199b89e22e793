"""The archive behind C-STORE, driven by pynetdicom as SCU: data sets stored exactly as
received, instances refused cleanly, the duplicate policy, and the store metrics.

Every test runs on SQLite and on PostgreSQL (``running_node`` is parametrised).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.status import code_to_category
from sqlalchemy import func, select

from dicom_node.archive.models import Instance, Patient, Series, Study
from tests.conftest import MODALITY_AE, RunningNode, dataset_bytes
from tests.corpus import CorpusFile
from tests.scu_support import associate

OTHER_UID = "2.25.999999999999999999999999999999999"


@pytest.fixture(autouse=True)
def _chunked_send(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom sends a file's data set bytes as they are in the file (no re-encoding);
    the command's SOP Class/Instance UIDs then come from the file meta."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@contextmanager
def _association(
    running: RunningNode, files: list[CorpusFile], *extra: tuple[str, str]
) -> Iterator[Association]:
    """An association as the "modality" peer proposing each (SOP class, syntax) of
    ``files`` (and ``extra``) in a context of its own."""
    ae = AE(ae_title=MODALITY_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    pairs = {(f.sop_class_uid, f.transfer_syntax_uid) for f in files} | set(extra)
    for sop_class, syntax in sorted(pairs):
        ae.add_requested_context(sop_class, [syntax])
    assoc = associate(ae, running.host, running.port, ae_title=running.ae_title)
    assert assoc.is_established, "the node did not accept the modality's association"
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _store(assoc: Association, path: Path) -> int:
    status = assoc.send_c_store(path)
    assert "Status" in status, f"no C-STORE response for {path.name}"
    return int(status.Status)


def _counter(running: RunningNode, name: str, **labels: str) -> float:
    value = running.runtime.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _instance_rows(running: RunningNode, sop_instance_uid: str) -> list[Instance]:
    with running.runtime.sessions() as session:
        return list(
            session.scalars(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid))
        )


def _files_under(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("*") if p.is_file()]


def _rewrite_meta(source: Path, target: Path, **meta_changes: str) -> None:
    """Copy ``source`` to ``target`` with other File Meta values and the same data set bytes."""
    meta = FileMetaDataset(dcmread(source, stop_before_pixels=True).file_meta)
    for keyword, value in meta_changes.items():
        setattr(meta, keyword, UID(value))
    with target.open("wb") as fh:
        fh.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fh, meta, enforce_standard=True)  # type: ignore[arg-type]
        fh.write(dataset_bytes(source))


def test_stored_data_set_is_byte_identical_to_the_one_sent(
    running_node: RunningNode, corpus: list[CorpusFile]
) -> None:
    """Every transfer syntax, deflate included: the wire carries the file's bytes after its
    meta group (chunked send), and the archived file holds exactly those bytes."""
    with _association(running_node, corpus) as assoc:
        statuses = {f.path.name: _store(assoc, f.path) for f in corpus}
    assert statuses == {f.path.name: 0x0000 for f in corpus}

    runtime = running_node.runtime
    with runtime.sessions() as session:
        rows = {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
    assert set(rows) == {f.sop_instance_uid for f in corpus}
    for f in corpus:
        stored = runtime.files.absolute(rows[f.sop_instance_uid].path)
        assert dataset_bytes(stored) == dataset_bytes(f.path), (
            f"{f.path.name} ({f.transfer_syntax_uid}): stored data set differs from the one sent"
        )
        meta = dcmread(stored, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == f.transfer_syntax_uid
        assert rows[f.sop_instance_uid].transfer_syntax_uid == f.transfer_syntax_uid

    assert _counter(running_node, "consentgate_instances_received_total", outcome="stored") == len(
        corpus
    )
    assert _counter(running_node, "consentgate_bytes_received_total") == sum(
        i.size for i in rows.values()
    )
    # nothing left in the staging area
    assert _files_under(runtime.files.tmp) == []


@pytest.mark.parametrize(
    "forged_meta",
    [
        {"MediaStorageSOPInstanceUID": OTHER_UID},
        {"MediaStorageSOPClassUID": MRImageStorage},
    ],
    ids=["instance-uid", "class-uid"],
)
def test_dataset_differing_from_command_is_refused(
    running_node: RunningNode,
    corpus: list[CorpusFile],
    tmp_path: Path,
    forged_meta: dict[str, str],
) -> None:
    source = next(f for f in corpus if f.sop_class_uid == CTImageStorage)
    forged = tmp_path / "forged.dcm"
    # pynetdicom takes the command's Affected SOP Class/Instance UIDs from the file meta
    _rewrite_meta(source.path, forged, **forged_meta)
    ds = dcmread(forged, stop_before_pixels=True)
    assert (ds.SOPInstanceUID, ds.SOPClassUID) == (source.sop_instance_uid, CTImageStorage)

    runtime = running_node.runtime
    with _association(
        running_node, [source], (MRImageStorage, source.transfer_syntax_uid)
    ) as assoc:
        status = _store(assoc, forged)
        assert code_to_category(status) == "Failure", f"status 0x{status:04X}"
        assert runtime.index.counts() == {
            "patients": 0,
            "studies": 0,
            "series": 0,
            "instances": 0,
            "bytes": 0,
        }
        assert _files_under(runtime.files.root, runtime.files.tmp) == []
        assert _counter(running_node, "consentgate_instances_received_total", outcome="stored") == 0
        assert (
            _counter(running_node, "consentgate_errors_total", service="store", status=hex(status))
            == 1
        )
        # the association stays usable: the genuine instance is then accepted
        assert _store(assoc, source.path) == 0x0000

    assert _instance_rows(running_node, OTHER_UID) == []
    rows = _instance_rows(running_node, source.sop_instance_uid)
    assert len(rows) == 1
    # absolute() waits until the background writer has placed the file
    assert runtime.files.absolute(rows[0].path).is_file()
    assert _files_under(runtime.files.tmp) == []
    assert len(_files_under(runtime.files.root)) == 1


def test_duplicate_is_acknowledged_and_first_copy_kept(
    running_node: RunningNode, corpus: list[CorpusFile], tmp_path: Path
) -> None:
    """Policy "keep" (dicom_node/archive/service.py): a second instance with the same SOP
    Instance UID is acknowledged with success and discarded; the first copy stays."""
    first = next(f for f in corpus if f.transfer_syntax_uid == ExplicitVRLittleEndian)
    ds = dcmread(first.path)
    ds.SeriesDescription = "SECOND COPY, MUST BE DISCARDED"
    second = tmp_path / "second.dcm"
    ds.save_as(second, enforce_file_format=True)
    assert dataset_bytes(second) != dataset_bytes(first.path)

    with _association(running_node, [first]) as assoc:
        assert _store(assoc, first.path) == 0x0000
        assert _store(assoc, second) == 0x0000
    # and once more over a new association
    with _association(running_node, [first]) as assoc:
        assert _store(assoc, second) == 0x0000

    rows = _instance_rows(running_node, first.sop_instance_uid)
    assert len(rows) == 1
    runtime = running_node.runtime
    stored = runtime.files.absolute(rows[0].path)
    assert dataset_bytes(stored) == dataset_bytes(first.path)
    assert dcmread(stored).SeriesDescription != ds.SeriesDescription
    with runtime.sessions() as session:
        assert session.scalar(select(func.count(Instance.id))) == 1
    assert runtime.index.counts()["series"] == 1
    assert _files_under(runtime.files.tmp) == []
    assert len(_files_under(runtime.files.root)) == 1
    assert _counter(running_node, "consentgate_instances_received_total", outcome="stored") == 1
    assert _counter(running_node, "consentgate_instances_received_total", outcome="duplicate") == 2
    assert _counter(running_node, "consentgate_bytes_received_total") == rows[0].size


def test_store_without_patient_id_and_issuer_gets_peer_issuer(
    running_node: RunningNode, corpus: list[CorpusFile], tmp_path: Path
) -> None:
    """An instance without Issuer of Patient ID is indexed under the sending peer's issuer;
    one with its own issuer keeps it."""
    without = next(f for f in corpus if not f.issuer)
    with_issuer = next(f for f in corpus if f.issuer and f.issuer != "CHR-METZ")
    with _association(running_node, [without, with_issuer]) as assoc:
        assert _store(assoc, without.path) == 0x0000
        assert _store(assoc, with_issuer.path) == 0x0000
    with running_node.runtime.sessions() as session:
        issuers = dict(
            session.execute(
                select(Instance.sop_instance_uid, Patient.issuer)
                .join(Series, Instance.series_pk == Series.id)
                .join(Study, Series.study_pk == Study.id)
                .join(Patient, Study.patient_pk == Patient.id)
            ).all()
        )
    assert issuers == {
        without.sop_instance_uid: "CHR-METZ",
        with_issuer.sop_instance_uid: with_issuer.issuer,
    }
