"""A destination that accepts no compressed syntax still receives compressed instances:
the forwarder decompresses them to Explicit VR Little Endian, pixels unchanged."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt

from cli.node_process import NodeProcess
from config.settings import NodeSettings, PeerSettings, RouteSettings
from dicom_node.scu import send_files
from tests.conftest import (
    FAST_FORWARD,
    FAST_RETRY,
    MODALITY_AE,
    NODE_AE,
    free_port,
    make_settings,
    prepare_runtime,
    wait_until,
    with_routes,
)
from tests.corpus import CorpusFile

LOSSLESS_COMPRESSED = {
    "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.5",  # RLE lossless
}


class UncompressedOnlyScp:
    """A storage SCP offering only Implicit/Explicit VR Little Endian; keeps what it got."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: dict[str, tuple[str, Dataset]] = {}
        self._lock = threading.Lock()
        self._server: Any = None

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta  # the negotiated transfer syntax, for decoding
        with self._lock:
            self.received[str(ds.SOPInstanceUID)] = (str(event.context.transfer_syntax), ds)
        return 0x0000

    def __enter__(self) -> UncompressedOnlyScp:
        ae = AE(ae_title="PLAINPACS")
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(
                cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
            )
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()

    def count(self) -> int:
        with self._lock:
            return len(self.received)


@pytest.fixture
def compressed(corpus: list[CorpusFile]) -> list[CorpusFile]:
    files = [f for f in corpus if f.transfer_syntax_uid in LOSSLESS_COMPRESSED]
    assert {f.transfer_syntax_uid for f in files} == LOSSLESS_COMPRESSED
    return files


@pytest.fixture
def destination() -> Iterator[UncompressedOnlyScp]:
    with UncompressedOnlyScp() as scp:
        yield scp


def test_compressed_instances_reach_an_uncompressed_only_destination(
    tmp_path: Path, db_url: str, compressed: list[CorpusFile], destination: UncompressedOnlyScp
) -> None:
    dest = PeerSettings("plain-pacs", "PLAINPACS", "127.0.0.1", destination.port, frozenset())
    settings = with_routes(
        make_settings(tmp_path / "data", db_url),
        [RouteSettings("to-plain", (), ("plain-pacs",), "")],
        [dest],
    )
    runtime = prepare_runtime(settings, FAST_RETRY)
    process = NodeProcess(runtime, forwarder_options=FAST_FORWARD)
    host, port = process.start()
    try:
        sender = NodeSettings(ae_title=MODALITY_AE)
        node = PeerSettings("node", NODE_AE, host, port, frozenset())
        report = send_files(sender, node, [f.path for f in compressed])
        assert report.sent == len(compressed), report.failed
        wait_until(
            lambda: destination.count() == len(compressed),
            30,
            "every compressed instance at the uncompressed-only destination",
        )
    finally:
        process.stop(grace=2.0)
        runtime.close()

    for source in compressed:
        syntax, received = destination.received[source.sop_instance_uid]
        assert syntax in (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
        original = dcmread(source.path)
        assert np.array_equal(received.pixel_array, original.pixel_array), source.path.name
        assert received.PatientID == original.PatientID
    # the archive keeps what the modality sent: compressed, as received
    stored = {f.sop_instance_uid: f.transfer_syntax_uid for f in compressed}
    with runtime.sessions() as session:
        from dicom_node.archive.models import Instance

        rows = session.query(Instance.sop_instance_uid, Instance.transfer_syntax_uid).all()
    assert {uid: ts for uid, ts in rows} == stored
