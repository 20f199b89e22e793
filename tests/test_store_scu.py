"""The forwarders' C-STORE fast path (dicom_node.store_scu) against a pynetdicom SCP.

The sender writes the command set and the stored data set itself and reads only the
status of the response; these tests check what a destination sees and what the
forwarder gets back: the data set byte for byte (also split into many PDVs for a small
maximum PDU), the status as answered (including with extra response elements), no
answer within the timeout, and an association that goes away while a response is
awaited.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context, evt

from config.settings import NodeSettings, PeerSettings
from dicom_node.scu import connect
from dicom_node.store_scu import StoreSender
from tests.conftest import dataset_bytes, free_port, wait_until
from tests.corpus import CorpusFile, make_small_series

DEST_AE = "FASTDEST"


class Scp:
    """A pynetdicom storage SCP whose answer a test chooses."""

    def __init__(self, answer: Callable[[Any], Any], max_pdu: int = 16384) -> None:
        self.port = free_port()
        self.received: list[tuple[str, bytes]] = []
        self._answer = answer
        ae = AE(ae_title=DEST_AE)
        ae.maximum_pdu_size = max_pdu
        ae.add_supported_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
        ae.add_supported_context("1.2.840.10008.5.1.4.1.1.7", ["1.2.840.10008.1.2.1"])
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on)]
        )

    def _on(self, event: Any) -> Any:
        self.received.append(
            (str(event.request.AffectedSOPInstanceUID), event.request.DataSet.getvalue())
        )
        return self._answer(event)

    def stop(self) -> None:
        self._server.shutdown()


@pytest.fixture
def series(tmp_path: Path) -> list[CorpusFile]:
    return make_small_series(tmp_path / "series", 4)


@pytest.fixture
def scp_factory() -> Iterator[Callable[..., Scp]]:
    started: list[Scp] = []

    def start(answer: Callable[[Any], Any], max_pdu: int = 16384) -> Scp:
        scp = Scp(answer, max_pdu)
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


def _link(scp: Scp, files: list[CorpusFile], timeout: float = 10.0) -> tuple[Any, StoreSender]:
    node = NodeSettings(ae_title="CONSENTGATE", max_pdu=1_048_576)
    peer = PeerSettings("dest", DEST_AE, "127.0.0.1", scp.port, frozenset())
    contexts = [
        build_context(f.sop_class_uid, [f.transfer_syntax_uid])
        for f in {f.sop_class_uid: f for f in files}.values()
    ]
    assoc = connect(node, peer, contexts)
    return assoc, StoreSender(assoc, timeout)


def _send(sender: StoreSender, f: CorpusFile) -> int | None:
    return sender.send(f.path, f.sop_class_uid, f.sop_instance_uid, f.transfer_syntax_uid)


def test_data_set_arrives_byte_for_byte_in_small_pdus(
    series: list[CorpusFile], scp_factory: Callable[..., Scp]
) -> None:
    scp = scp_factory(lambda _event: 0x0000, max_pdu=4096)  # ~10 kB: several PDVs each
    assoc, sender = _link(scp, series)
    try:
        assert sender.accepts(series[0].sop_class_uid, series[0].transfer_syntax_uid)
        assert not sender.accepts(series[0].sop_class_uid, "1.2.840.10008.1.2.4.50")
        assert [_send(sender, f) for f in series] == [0x0000] * len(series)
    finally:
        assoc.release()
    assert [uid for uid, _ in scp.received] == [f.sop_instance_uid for f in series]
    for (_, data), f in zip(scp.received, series, strict=True):
        assert data == dataset_bytes(f.path)


def test_the_status_answered_is_returned(
    series: list[CorpusFile], scp_factory: Callable[..., Scp]
) -> None:
    def answer(event: Any) -> Any:
        if len(scp.received) == 1:
            return 0xA700
        status = Dataset()  # a warning with an error comment: extra response elements
        status.Status = 0xB000
        status.ErrorComment = "coerced"
        return status

    scp = scp_factory(answer)
    assoc, sender = _link(scp, series)
    try:
        assert _send(sender, series[0]) == 0xA700
        assert _send(sender, series[1]) == 0xB000
    finally:
        assoc.release()


def test_no_answer_in_time_gives_none(
    series: list[CorpusFile], scp_factory: Callable[..., Scp]
) -> None:
    release = threading.Event()

    def answer(_event: Any) -> int:
        release.wait(10)
        return 0x0000

    scp = scp_factory(answer)
    assoc, sender = _link(scp, series, timeout=1.0)
    try:
        started = time.monotonic()
        assert _send(sender, series[0]) is None
        assert 0.9 <= time.monotonic() - started < 5
    finally:
        release.set()
        assoc.abort()


def test_an_association_that_goes_away_ends_the_wait_at_once(
    series: list[CorpusFile], scp_factory: Callable[..., Scp]
) -> None:
    def answer(event: Any) -> int:
        event.assoc.abort()
        return 0x0000

    scp = scp_factory(answer)
    assoc, sender = _link(scp, series, timeout=20.0)
    started = time.monotonic()
    assert _send(sender, series[0]) is None
    assert time.monotonic() - started < 10, "waited for the timeout instead"
    wait_until(lambda: not assoc.is_established, 5, "association seen as aborted")
