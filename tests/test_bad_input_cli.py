"""Bad input to the ``consentgate`` command line and configuration gets a clear answer.

A user's mistake ends with one line on stderr and a non-zero exit code (2: configuration
or usage, 1: the operation failed), never a traceback, and a failed command leaves the
database and the data directory as they were, so the operator can fix the input and run
the command again without cleaning up after it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from pydicom.dataset import Dataset
from sqlalchemy import func, select

from cli.main import cli
from cli.runtime import build_runtime
from config.settings import load_settings
from consent.models import AuditEntry, ConsentEvent, Patient
from router.models import ForwardJob
from tests.conftest import (
    ISSUER,
    MODALITY_AE,
    consentgate_cli,
    free_port,
    seed_patient,
    seed_purpose,
    store_files,
    toml_routes,
    write_config,
)
from tests.corpus import make_small_series

SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
BEYOND_INT64 = str(2**70)
PATIENT = ["--issuer", "CHR-METZ", "--patient-id", "IPP-CLI"]


def invoke(config: Path, *args: object) -> Result:
    """``consentgate --config CONFIG ARGS...`` in-process (exceptions are caught by the
    runner and show up in ``result.exception``)."""
    return CliRunner().invoke(cli, ["--config", str(config), *map(str, args)])


def assert_clean_error(result: Result, code: int | tuple[int, ...] = 1) -> str:
    """Non-zero exit with ``code``, no exception escaped, one ``Error:`` line on stderr."""
    codes = code if isinstance(code, tuple) else (code,)
    escaped = result.exception if not isinstance(result.exception, SystemExit) else None
    assert escaped is None, f"escaped {type(escaped).__name__}: {escaped}"
    assert result.exit_code in codes, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    return lines[0]


def node_config(tmp_path: Path, db_url: str = "", **extra: object) -> Path:
    """A configuration with a data directory under ``tmp_path`` (not created)."""
    return write_config(
        tmp_path / "cg.toml",
        tmp_path / "data",
        db_url,
        dicom_port=free_port(),
        http_port=free_port(),
        **extra,
    )


@pytest.fixture
def initialised(tmp_path: Path, db_url: str) -> Path:
    """A configuration on ``db_url`` (SQLite and PostgreSQL), after ``init``."""
    config = node_config(tmp_path, db_url)
    result = invoke(config, "init")
    assert result.exit_code == 0, result.output
    return config


def patient_count(config: Path) -> int:
    runtime = build_runtime(load_settings(config))
    try:
        with runtime.sessions() as session:
            return int(session.scalar(select(func.count()).select_from(Patient)) or 0)
    finally:
        runtime.close()


# -- configuration and environment ------------------------------------------------------


@pytest.mark.parametrize("command", [["init"], ["purpose", "list"], ["status"]])
def test_data_dir_that_is_a_file_is_a_one_line_error(tmp_path: Path, command: list[str]) -> None:
    """``data_dir`` naming an existing file, with the default SQLite database: ``init``,
    ``purpose list`` and ``status`` each answer one line naming the path and leave the file
    untouched. A typo in the configuration must point at the wrong path, not end in an
    ``OSError`` traceback."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file", encoding="utf-8")
    config = write_config(
        tmp_path / "cg.toml",
        blocker,
        "",
        dicom_port=free_port(),
        http_port=free_port(),
    )
    line = assert_clean_error(invoke(config, *command))
    assert str(blocker) in line
    assert blocker.read_text(encoding="utf-8") == "a file"


def test_command_before_init_asks_for_init_and_creates_nothing(tmp_path: Path) -> None:
    """A command other than ``init``/``db upgrade`` on a missing SQLite database answers
    "no database at PATH: run 'consentgate init' first" and creates neither the data
    directory nor an empty database file, so a failed command leaves no half-made node
    behind for ``init`` to trip over."""
    config = node_config(tmp_path)
    data = tmp_path / "data"
    line = assert_clean_error(invoke(config, "purpose", "list"))
    assert "consentgate init" in line
    assert not data.exists(), sorted(p.name for p in data.rglob("*"))


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("postgresql://postgres@127.0.0.1:5432/cg", id="pg-default-driver"),
        pytest.param("sqlite:///:memory:", id="sqlite-memory"),
        pytest.param("postgresql+psycopg://cg@[::1/cg", id="unclosed-ipv6-bracket"),
    ],
)
def test_unusable_database_url_is_refused_in_one_line(tmp_path: Path, url: str) -> None:
    """``node.database_url`` values that look plausible but cannot work (``postgresql://``
    with a driver that is not installed, an in-memory SQLite database, an unparsable
    host) are refused with one line about the database, telling the operator which
    setting to fix instead of crashing inside SQLAlchemy."""
    line = assert_clean_error(invoke(node_config(tmp_path, url), "purpose", "list"), 2)
    assert "database" in line


@pytest.mark.parametrize(
    ("text", "named"),
    [
        pytest.param('[node]\ndata_dir = "a\\u0000b"\n', "node.data_dir", id="nul-in-data-dir"),
        pytest.param(
            '[node]\ndata_dir = "~no-such-user-cg/var"\n', "node.data_dir", id="unknown-user-home"
        ),
        pytest.param("x = " + "[" * 3000 + "]" * 3000 + "\n", "", id="deeply-nested-array"),
    ],
)
def test_unloadable_configuration_is_a_configuration_error(
    tmp_path: Path, text: str, named: str
) -> None:
    """Configuration files the loader cannot use (a NUL in ``data_dir``, ``~user`` for an
    unknown user, arrays nested too deeply for the TOML parser) are configuration errors:
    exit 2 and one line naming the file and, where there is one, the key, so the
    operator knows what to edit."""
    config = tmp_path / "cg.toml"
    config.write_text(text, encoding="utf-8")
    line = assert_clean_error(invoke(config, "status"), 2)
    assert str(config) in line and named in line


@pytest.mark.parametrize("command", ["echo", "send"])
def test_peer_whose_host_does_not_resolve_is_a_one_line_error(tmp_path: Path, command: str) -> None:
    """``echo PEER`` and ``send ... --to PEER`` to a peer whose ``host`` does not resolve
    (a typo, or DNS down) answer one line naming the peer, like a peer that refuses the
    connection, instead of a ``socket.gaierror`` traceback."""
    peer = {"name": "typo", "ae_title": "TYPO", "host": "no-such-host.invalid", "port": 104}
    config = node_config(tmp_path, peers=[peer])
    if command == "echo":
        args: list[object] = ["echo", "typo"]
    else:
        (instance,) = make_small_series(tmp_path / "series", 1)
        args = ["send", "--no-progress", instance.path, "--to", "typo"]
    line = assert_clean_error(invoke(config, *args))
    assert "typo" in line


def test_real_process_error_is_one_line_on_stderr(tmp_path: Path) -> None:
    """Run as a real process, a database command that fails prints exactly one line on
    stderr: no alembic INFO lines precede the ``Error:`` line. Operators and scripts read
    stderr, and extra log lines bury the one that explains the failure."""
    config = node_config(tmp_path)
    assert consentgate_cli(config, "init").returncode == 0
    added = consentgate_cli(config, "purpose", "add", "regional", "--name", "R", "--by", "t")
    assert added.returncode == 0, added.stderr
    again = consentgate_cli(config, "purpose", "add", "regional", "--name", "R", "--by", "t")
    assert again.returncode == 1
    assert "Traceback" not in again.stderr
    lines = again.stderr.strip().splitlines()
    assert lines == ["Error: purpose 'regional' already exists"], lines


# -- consent store commands -------------------------------------------------------------


@SQLITE_ONLY
@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["consent", "entered-in-error", BEYOND_INT64, "--reason", "x"], id="eie"),
        pytest.param(["queue", "retry", BEYOND_INT64, "--by", "t"], id="retry"),
        pytest.param(["queue", "drop", BEYOND_INT64, "--reason", "x", "--by", "t"], id="drop"),
        pytest.param(["queue", "restore", BEYOND_INT64, "--by", "t"], id="restore"),
        pytest.param(
            ["consent", "grant", *PATIENT, "--purpose", "p", "--notice-version", BEYOND_INT64],
            id="notice-version",
        ),
    ],
)
def test_id_beyond_64_bits_is_a_usage_error(initialised: Path, args: list[str]) -> None:
    """An event or job id (or ``--notice-version``) beyond 2**63-1, e.g. a pasted
    SOP-like number, is a click usage error: exit 2 and "Error: Invalid value ...", before
    the database is touched, rather than an ``OverflowError`` from the SQLite driver."""
    runtime = build_runtime(load_settings(initialised))
    try:
        seed_purpose(runtime.consent, "p")
        seed_patient(runtime.consent, "IPP-CLI")
    finally:
        runtime.close()
    result = invoke(initialised, *args)
    escaped = result.exception if not isinstance(result.exception, SystemExit) else None
    assert escaped is None, f"escaped {type(escaped).__name__}: {escaped}"
    # a usage error: click's usage line, then one error line naming the range, exit 2
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1].startswith("Error: Invalid value")


@pytest.mark.parametrize(
    ("option", "length", "field"),
    [
        pytest.param("--usage-name", 101, "usage name", id="usage-name"),
        pytest.param("--establishment", 65, "establishment", id="establishment"),
    ],
)
def test_patient_text_longer_than_its_column_is_refused_by_name(
    initialised: Path, option: str, length: int, field: str
) -> None:
    """``patient add --usage-name`` (100 characters) and ``--establishment`` (64) longer
    than their column are refused with one line naming the field and no patient is
    written, on SQLite and PostgreSQL alike, instead of being stored as is or failing
    with a database error that does not say which option is wrong."""
    result = invoke(
        initialised,
        "patient",
        "add",
        *PATIENT,
        "--birth-name",
        "Dupont",
        "--first-name",
        "Alice",
        "--birth-date",
        "1985-05-12",
        "--sex",
        "F",
        option,
        "x" * length,
        "--by",
        "t",
    )
    line = assert_clean_error(result)
    assert field in line.lower()
    assert patient_count(initialised) == 0


def test_representative_name_longer_than_its_column_is_refused_by_name(
    initialised: Path,
) -> None:
    """``consent grant --representative`` longer than its 200-character column is refused
    with one line naming the representative and no consent event is recorded, on both
    databases, so the operator knows which value to shorten."""
    runtime = build_runtime(load_settings(initialised))
    try:
        seed_purpose(runtime.consent, "regional")
        seed_patient(runtime.consent, "IPP-CLI")
    finally:
        runtime.close()
    result = invoke(
        initialised,
        "consent",
        "grant",
        *PATIENT,
        "--purpose",
        "regional",
        "--representative",
        "R" * 300,
        "--by",
        "t",
    )
    line = assert_clean_error(result)
    assert "representative" in line.lower()
    runtime = build_runtime(load_settings(initialised))
    try:
        with runtime.sessions() as session:
            assert session.scalar(select(func.count()).select_from(ConsentEvent)) == 0
    finally:
        runtime.close()


@pytest.mark.parametrize(
    "name", [pytest.param("Du\x1b[2Jpont", id="escape"), pytest.param("Du\x7fpont", id="del")]
)
def test_names_with_control_characters_are_refused(initialised: Path, name: str) -> None:
    """A birth name holding a control character (an ANSI escape sequence pasted from a
    terminal, DEL) is refused by name and no patient is written. Stored, it would be
    written back to operators' terminals by ``patient show``/``find`` and flow into
    exports."""
    result = invoke(
        initialised,
        "patient",
        "add",
        *PATIENT,
        "--birth-name",
        name,
        "--first-name",
        "Alice",
        "--birth-date",
        "1985-05-12",
        "--sex",
        "F",
        "--by",
        "t",
    )
    line = assert_clean_error(result)
    assert "name" in line
    assert patient_count(initialised) == 0


@SQLITE_ONLY
def test_patient_import_with_an_oversized_field_is_a_one_line_error(
    initialised: Path, tmp_path: Path
) -> None:
    """A CSV line with a field over the csv module's limit (a lost closing quote
    swallowing the rest of the file does this) makes ``patient import`` answer "nothing
    imported: ..." in one line and import no patient, instead of a ``_csv.Error``
    traceback."""
    csv_file = tmp_path / "patients.csv"
    csv_file.write_text(
        "issuer,patient_id,birth_name,first_name,birth_date,sex,postal_address\n"
        "CHR-METZ,P1,Dupont,Alice,1985-05-12,F,1 rue de la Gare\n"
        f"CHR-METZ,P2,Martin,Paul,1960-02-03,M,{'x' * 200_000}\n",
        encoding="utf-8",
    )
    line = assert_clean_error(invoke(initialised, "patient", "import", csv_file, "--by", "t"))
    assert "nothing imported" in line
    assert patient_count(initialised) == 0


# -- queue commands ---------------------------------------------------------------------


def _queue_env(tmp_path: Path, db_url: str) -> tuple[Path, list[int]]:
    """An initialised configuration with a care-team route to ``pacs`` and two stored
    instances: two ready jobs."""
    peers = [
        {"name": "modality", "ae_title": MODALITY_AE, "host": "127.0.0.1", "port": 104},
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()},
    ]
    config = node_config(tmp_path, db_url, peers=peers)
    with config.open("a", encoding="utf-8") as fh:
        fh.write(toml_routes([{"name": "all", "destinations": ["pacs"]}]))
    assert invoke(config, "init").exit_code == 0
    runtime = build_runtime(load_settings(config))
    try:
        store_files(runtime, make_small_series(tmp_path / "series", 2), MODALITY_AE, ISSUER)
        with runtime.sessions() as session:
            ids = sorted(session.scalars(select(ForwardJob.id)))
    finally:
        runtime.close()
    assert len(ids) == 2
    return config, ids


def _jobs_and_audit(config: Path) -> tuple[dict[int, str], list[str]]:
    runtime = build_runtime(load_settings(config))
    try:
        with runtime.sessions() as session:
            rows = session.execute(select(ForwardJob.id, ForwardJob.state)).all()
            states = {job_id: state for job_id, state in rows}
            actions = list(session.scalars(select(AuditEntry.action).order_by(AuditEntry.seq)))
        return states, actions
    finally:
        runtime.close()


@pytest.mark.parametrize("command", ["drop", "retry"])
def test_queue_command_with_one_unknown_job_id_changes_nothing(
    tmp_path: Path, db_url: str, command: str
) -> None:
    """``queue drop IDS`` and ``queue retry IDS`` are all-or-nothing: one unknown or
    ineligible id makes the command fail in one line and changes no job and no audit
    entry. An operator told the command failed reruns it with the right ids and must not
    have half of it already done."""
    config, (job, _other) = _queue_env(tmp_path, db_url)
    if command == "retry":
        runtime = build_runtime(load_settings(config))
        try:
            # the destination refuses both instances for good: two dead letters
            for claimed in runtime.queue.claim("pacs", "node-a", 10):
                runtime.queue.retry_later(claimed, "node-a", "0xA700", permanent=True)
        finally:
            runtime.close()
    before = _jobs_and_audit(config)
    if command == "drop":
        args: list[object] = ["queue", "drop", job, 999999, "--reason", "wrong id", "--by", "t"]
    else:
        args = ["queue", "retry", job, 999999, "--by", "t"]
    assert_clean_error(invoke(config, *args))
    assert _jobs_and_audit(config) == before


# -- files ------------------------------------------------------------------------------


def assert_route_test_ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


@SQLITE_ONLY
def test_route_test_refuses_a_truncated_dicom_file_like_the_node(
    initialised: Path, tmp_path: Path
) -> None:
    """``route test`` on a Part 10 file cut inside its data set fails in one line ("the
    node would refuse this file: ..."), while the whole file matches the route. The dry
    run must answer what the node would do, and the node refuses such a file."""
    with initialised.open("a", encoding="utf-8") as fh:
        fh.write(toml_routes([{"name": "all", "destinations": ["pacs"]}]))
    (instance,) = make_small_series(tmp_path / "series", 1)
    whole = assert_route_test_ok(invoke(initialised, "route", "test", instance.path))
    assert "route all -> pacs" in whole
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(instance.path.read_bytes()[:400])
    line = assert_clean_error(invoke(initialised, "route", "test", cut))
    assert "not a readable DICOM file" in line or "the node would refuse this file" in line


def test_send_association_lost_between_files_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``send`` to a peer that aborts the association between two files reports the
    remaining file as failed ("sent 0 of 2 file(s)", exit 1) instead of letting
    pynetdicom's ``RuntimeError`` escape. The abort is made deterministic here by an
    association that is lost between the established check and the next C-STORE."""
    import dicom_node.scu as scu

    class AbortedBetweenFiles:
        is_established = True
        sends = 0

        def send_c_store(self, path: Any) -> Dataset:
            self.sends += 1
            if self.sends == 1:
                return Dataset()  # no response: the peer aborted
            raise RuntimeError(
                "The association with a peer SCP must be established before sending a "
                "C-STORE request"
            )

        def release(self) -> None:
            self.is_established = False

    monkeypatch.setattr(scu, "connect", lambda node, peer, contexts: AbortedBetweenFiles())
    files = make_small_series(tmp_path / "series", 2)
    peer = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}
    config = node_config(tmp_path, peers=[peer])
    result = invoke(config, "send", "--no-progress", *(f.path for f in files), "--to", "pacs")
    escaped = result.exception if not isinstance(result.exception, SystemExit) else None
    assert escaped is None, f"escaped {type(escaped).__name__}: {escaped}"
    assert result.exit_code == 1, result.output
    assert "sent 0 of 2 file(s)" in result.stdout
    assert str(files[1].path) in result.stderr


# -- routes, identity and peers ---------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "named"),
    [
        pytest.param(
            {"name": "r", "destinations": ["nosuch"]}, "unknown peer 'nosuch'", id="unknown-peer"
        ),
        pytest.param(
            {"name": "r", "destinations": ["pacs"], "match": {"Modality": {"regex": "(CT"}}},
            "regex is invalid",
            id="bad-regex",
        ),
    ],
)
def test_bad_route_is_a_configuration_error(
    tmp_path: Path, route: dict[str, Any], named: str
) -> None:
    """A route naming an unknown peer, or with an invalid regex, stops any command with
    exit 2 and one line naming the route and the file, and creates no data directory, so
    a broken routing table is caught before the node does anything."""
    config = node_config(tmp_path)
    with config.open("a", encoding="utf-8") as fh:
        fh.write(toml_routes([route]))
    line = assert_clean_error(invoke(config, "status"), 2)
    assert named in line and "routes[0]" in line and str(config) in line
    assert not (tmp_path / "data").exists()


def test_wrong_ins_key_is_refused_and_writes_no_patient(initialised: Path) -> None:
    """``patient add --ins`` with a wrong control key is refused in one line ("wrong
    control key"), exit 1, and no patient is written: a mistyped INS must not reach the
    consent store."""
    result = invoke(
        initialised,
        "patient",
        "add",
        *PATIENT,
        "--birth-name",
        "Dupont",
        "--first-name",
        "Alice",
        "--birth-date",
        "1985-05-12",
        "--sex",
        "F",
        "--ins",
        "285057512345699",
        "--by",
        "t",
    )
    assert "wrong control key" in assert_clean_error(result)
    assert patient_count(initialised) == 0


def test_send_to_a_peer_that_is_down_is_one_line(tmp_path: Path) -> None:
    """``send`` (as a real process) to a configured peer whose port is closed prints one
    line on stderr naming the peer and its address, exit 1, so the operator sees at once
    which peer is unreachable."""
    (instance,) = make_small_series(tmp_path / "series", 1)
    peer = {"name": "down", "ae_title": "DOWN", "host": "127.0.0.1", "port": free_port()}
    config = node_config(tmp_path, peers=[peer])
    proc = consentgate_cli(config, "send", "--no-progress", instance.path, "--to", "down")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"Error: cannot associate with peer down at 127.0.0.1:{peer['port']}"
    ]
