"""Shared fixtures: databases (SQLite and the local PostgreSQL), a running node, a corpus.

Every test that takes ``db_url`` runs twice: on SQLite and on PostgreSQL
(127.0.0.1:5432, trust auth; each test gets a fresh database, dropped afterwards).
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import psycopg
import pytest

from cli.database import upgrade
from cli.runtime import Runtime, build_node, build_runtime
from config.settings import NodeSettings, PeerSettings, Settings
from dicom_node.server import DicomNode
from tests.corpus import CorpusFile, make_corpus

PG_ADMIN_DSN = os.environ.get(
    "CONSENTGATE_TEST_PG", "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
)
NODE_AE = "CONSENTGATE"
MODALITY_AE = "STORESCU"
PACS_AE = "QRSCU"


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session", autouse=True)
def _dcmtk_present() -> None:
    """The DCMTK tools are part of the test setup; a missing one is a setup failure."""
    for tool in ("echoscu", "storescu", "findscu", "movescu", "getscu", "storescp", "dcmdump"):
        if shutil.which(tool) is None:
            pytest.exit(f"{tool} not found: run ./scripts/test.sh (it installs DCMTK)", 3)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test."""
    name = f"cg_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The database URL of this test, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.db'}"
    return str(request.getfixturevalue("pg_url"))


def make_settings(data_dir: Path, db_url: str, **node_overrides: object) -> Settings:
    """Settings for a test node on a free loopback port with the standard test peers."""
    node = NodeSettings(
        ae_title=NODE_AE,
        dicom_host="127.0.0.1",
        dicom_port=free_port(),
        http_port=0,
        data_dir=data_dir,
        database_url=db_url,
        shutdown_grace=5.0,
    )
    node = replace(node, **node_overrides)  # type: ignore[arg-type]
    peers = (
        PeerSettings("modality", MODALITY_AE, "127.0.0.1", 104, frozenset({"echo", "store"}),
                     issuer="CHR-METZ"),
        PeerSettings("pacs", PACS_AE, "127.0.0.1", free_port(),
                     frozenset({"echo", "find", "move", "get"})),
    )
    return Settings(node=node, peers=peers, source="<tests>")


@dataclass
class RunningNode:
    """A node started in-process for a test."""

    settings: Settings
    runtime: Runtime
    node: DicomNode
    host: str
    port: int

    @property
    def ae_title(self) -> str:
        return self.settings.node.ae_title


def start_node(settings: Settings) -> RunningNode:
    """Initialise the database and archive, then start the DICOM node."""
    runtime = build_runtime(settings)
    runtime.files.prepare()
    upgrade(runtime.engine)
    node = build_node(runtime)
    host, port = node.start()
    return RunningNode(settings, runtime, node, host, port)


@pytest.fixture
def running_node(tmp_path: Path, db_url: str) -> Iterator[RunningNode]:
    """A node on a free port, backed by ``db_url`` (SQLite and PostgreSQL)."""
    running = start_node(make_settings(tmp_path / "data", db_url))
    try:
        yield running
    finally:
        running.node.stop(grace=2.0)
        running.runtime.close()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[CorpusFile]:
    """The mixed synthetic corpus (built once per session; treat it as read-only)."""
    return make_corpus(tmp_path_factory.mktemp("corpus"))
