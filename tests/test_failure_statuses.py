"""Statuses on the wire when the node cannot do its work, and services a peer is not
allowed: each gets the standard status (or a refused presentation context), nothing is
half-written, and the node serves again once the fault is gone.

The database fault is real: the table the operation needs is renamed away under the
running node (SQLite and PostgreSQL), then put back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from sqlalchemy import create_engine, text

from tests.conftest import MODALITY_AE, NODE_AE, PACS_AE, RunningNode, run_tool
from tests.corpus import CorpusFile
from tests.scu_support import associate


def storescu(running: RunningNode, path: object, *flags: str) -> str:
    """DCMTK storescu sending one file as the modality; its output (exit status ignored)."""
    result = run_tool(
        "env",
        "TCP_NODELAY=1",
        "/usr/bin/storescu",
        *flags,
        "-aet",
        MODALITY_AE,
        "-aec",
        NODE_AE,
        running.host,
        running.port,
        path,
    )
    return result.stdout + result.stderr


@contextmanager
def table_missing(db_url: str, table: str) -> Iterator[None]:
    """``table`` renamed away while the block runs (a database that fails the node)."""
    engine = create_engine(db_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f"ALTER TABLE {table} RENAME TO {table}_away"))
        try:
            yield
        finally:
            with engine.connect() as conn:
                conn.execute(text(f"ALTER TABLE {table}_away RENAME TO {table}"))
    finally:
        engine.dispose()


def _associate(running: RunningNode, calling: str, *contexts: str) -> object:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for context in contexts:
        ae.add_requested_context(context)
    return associate(ae, running.host, running.port, ae_title=NODE_AE)


def _find_study(running: RunningNode) -> list[int]:
    assoc = _associate(running, PACS_AE, StudyRootQueryRetrieveInformationModelFind)
    assert assoc.is_established  # type: ignore[attr-defined]
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    try:
        responses = assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)  # type: ignore[attr-defined]
        return [int(status.Status) for status, _ in responses if status]
    finally:
        assoc.release()  # type: ignore[attr-defined]


def test_store_answers_a700_and_keeps_nothing_when_the_index_fails(
    running_node: RunningNode, corpus: list[CorpusFile], db_url: str
) -> None:
    source = next(f for f in corpus if f.modality == "CT")
    # the duplicate check still reads; the index transaction fails after the instance
    # was appended to the ingest journal
    with table_missing(db_url, "archive_series"):
        output = storescu(running_node, source.path, "-d")
        assert "DIMSE Status                  : 0xa700" in output, output[-1500:]
    files = running_node.runtime.files
    assert not any(files.root.rglob("*.dcm")), "a refused instance left an archive file"
    # the fault is gone: the same instance is stored
    output = storescu(running_node, source.path, "-v")
    assert "Received Store Response (Success)" in output, output[-1500:]
    assert running_node.runtime.index.find_instance(source.sop_instance_uid) is not None


def test_find_answers_c000_when_the_index_fails(running_node: RunningNode) -> None:
    assert _find_study(running_node) == [0x0000]
    with table_missing(running_node.settings.node.database_url, "archive_study"):
        statuses = _find_study(running_node)
    assert statuses[-1] & 0xF000 == 0xC000, [hex(s) for s in statuses]
    assert _find_study(running_node) == [0x0000]


@pytest.mark.parametrize(
    ("calling", "wanted", "allowed"),
    [
        # the modality may echo and store: no query/retrieve context is accepted
        (MODALITY_AE, StudyRootQueryRetrieveInformationModelFind, Verification),
        (MODALITY_AE, StudyRootQueryRetrieveInformationModelMove, Verification),
        (MODALITY_AE, StudyRootQueryRetrieveInformationModelGet, Verification),
        # (a peer allowed C-GET is offered storage contexts, for the C-GET sub-operations
        # it receives; its own C-STOREs are refused with 0x0124: test_dcmtk_services)
    ],
)
def test_a_peer_is_offered_only_the_contexts_of_its_services(
    running_node: RunningNode, calling: str, wanted: str, allowed: str
) -> None:
    assoc = _associate(running_node, calling, wanted, allowed)
    assert assoc.is_established  # type: ignore[attr-defined]
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}  # type: ignore[attr-defined]
        assert accepted == {str(allowed)}
    finally:
        assoc.release()  # type: ignore[attr-defined]
