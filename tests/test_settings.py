"""Configuration loading: where the file comes from, what it may hold, how errors read.

Every error a user can make in ``consentgate.toml`` must raise :class:`ConfigError` with
a message naming both the file and the offending key, so the fix is obvious from one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from config.settings import (
    DEFAULT_CONFIG_NAME,
    ENV_VAR,
    ConfigError,
    NodeSettings,
    Settings,
    load_settings,
)

FULL_NODE = """
[node]
ae_title = "GATEWAY_01"
dicom_host = "0.0.0.0"
dicom_port = 4242
http_host = "127.0.0.2"
http_port = 9090
data_dir = "store"
database_url = "postgresql+psycopg://cg@db.example/cg"
max_associations = 25
max_pdu = 65536
acse_timeout = 12
dimse_timeout = 45.5
network_timeout = 90
shutdown_grace = 7.5
on_duplicate = "keep"
"""

FULL_PEERS = """
[[peers]]
name = "ct-room-1"
ae_title = "CT_ROOM_1"
host = "10.0.0.0/24"
port = 104
services = ["echo", "store"]
issuer = "CHR-METZ"
purpose = "care"

[[peers]]
name = "pacs"
ae_title = "REGIONAL PACS"
host = "pacs.example"
port = 11112
services = ["echo", "find", "move", "get"]
"""


def write(tmp_path: Path, text: str, name: str = "cg.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory and no $CONSENTGATE_CONFIG."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv(ENV_VAR, raising=False)
    return work


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    return str(caught.value)


# -- resolution order ------------------------------------------------------------------------


def test_defaults_when_no_file_anywhere(isolated: Path) -> None:
    settings = load_settings()
    assert settings == Settings()
    assert settings.source == "<built-in defaults>"
    assert settings.node.dicom_port == 11112
    assert settings.node.ae_title == "CONSENTGATE"
    assert settings.peers == ()


def test_local_file_used_when_nothing_else_given(isolated: Path) -> None:
    write(isolated, '[node]\nae_title = "FROM_CWD"\n', DEFAULT_CONFIG_NAME)
    settings = load_settings()
    assert settings.node.ae_title == "FROM_CWD"
    assert Path(settings.source).name == DEFAULT_CONFIG_NAME


def test_env_var_beats_local_file(
    isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(isolated, '[node]\nae_title = "FROM_CWD"\n', DEFAULT_CONFIG_NAME)
    env_file = write(tmp_path, '[node]\nae_title = "FROM_ENV"\n', "env.toml")
    monkeypatch.setenv(ENV_VAR, str(env_file))
    settings = load_settings()
    assert settings.node.ae_title == "FROM_ENV"
    assert settings.source == str(env_file)


def test_explicit_path_beats_env_and_local(
    isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(isolated, '[node]\nae_title = "FROM_CWD"\n', DEFAULT_CONFIG_NAME)
    monkeypatch.setenv(ENV_VAR, str(write(tmp_path, '[node]\nae_title = "FROM_ENV"\n', "e.toml")))
    explicit = write(tmp_path, '[node]\nae_title = "FROM_FLAG"\n', "flag.toml")
    assert load_settings(explicit).node.ae_title == "FROM_FLAG"


def test_env_var_naming_a_missing_file_is_an_error_not_a_fallback(
    isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(isolated, '[node]\nae_title = "FROM_CWD"\n', DEFAULT_CONFIG_NAME)
    missing = tmp_path / "nowhere.toml"
    monkeypatch.setenv(ENV_VAR, str(missing))
    with pytest.raises(ConfigError, match="not found") as caught:
        load_settings()
    assert str(missing) in str(caught.value)


def test_explicit_missing_file_is_an_error(isolated: Path, tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    assert str(missing) in config_error(missing)


def test_unreadable_path_is_a_config_error(isolated: Path, tmp_path: Path) -> None:
    directory = tmp_path / "a_directory.toml"
    directory.mkdir()
    assert str(directory) in config_error(directory)


# -- every documented key ------------------------------------------------------------------


def test_every_node_and_peer_key_is_parsed(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_NODE + FULL_PEERS)
    settings = load_settings(path)
    node = settings.node
    assert node == NodeSettings(
        ae_title="GATEWAY_01",
        dicom_host="0.0.0.0",
        dicom_port=4242,
        http_host="127.0.0.2",
        http_port=9090,
        data_dir=(tmp_path / "store").resolve(),
        database_url="postgresql+psycopg://cg@db.example/cg",
        max_associations=25,
        max_pdu=65536,
        acse_timeout=12.0,
        dimse_timeout=45.5,
        network_timeout=90.0,
        shutdown_grace=7.5,
        on_duplicate="keep",
    )
    assert isinstance(node.acse_timeout, float)
    ct, pacs = settings.peers
    assert (ct.name, ct.ae_title, ct.host, ct.port) == (
        "ct-room-1",
        "CT_ROOM_1",
        "10.0.0.0/24",
        104,
    )
    assert ct.services == frozenset({"echo", "store"})
    assert ct.issuer == "CHR-METZ"
    assert ct.purpose == "care"
    assert (pacs.name, pacs.ae_title, pacs.host, pacs.port) == (
        "pacs",
        "REGIONAL PACS",
        "pacs.example",
        11112,
    )
    assert pacs.services == frozenset({"echo", "find", "move", "get"})
    assert pacs.issuer == ""
    assert settings.peer_by_name("pacs") is pacs
    assert settings.peer_by_ae_title("CT_ROOM_1") is ct
    # a network in `host` admits any address inside it, and only those
    assert settings.peers_for_association("CT_ROOM_1", "10.0.0.77") is ct
    assert settings.peers_for_association("CT_ROOM_1", "10.0.1.77") is None
    assert settings.source == str(path)


def test_defaults_fill_absent_keys(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "[node]\ndicom_port = 104\n"))
    defaults = NodeSettings()
    assert settings.node.dicom_port == 104
    assert settings.node.max_pdu == defaults.max_pdu
    assert settings.node.acse_timeout == defaults.acse_timeout
    assert settings.node.database_url == ""
    # the default database lives inside the data directory
    assert settings.node.effective_database_url == (
        f"sqlite:///{(tmp_path / 'var').resolve().as_posix()}/consentgate.db"
    )


def test_relative_data_dir_is_relative_to_the_config_file_not_the_cwd(
    isolated: Path, tmp_path: Path
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    settings = load_settings(write(etc, '[node]\ndata_dir = "../srv/cg"\n'))
    assert settings.node.data_dir == (tmp_path / "srv" / "cg").resolve()
    absolute = load_settings(write(etc, f'[node]\ndata_dir = "{tmp_path / "abs"}"\n', "b.toml"))
    assert absolute.node.data_dir == tmp_path / "abs"


def test_http_port_zero_means_any_free_port(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "[node]\nhttp_port = 0\n")).node.http_port == 0


def test_peer_with_no_services_may_do_nothing(tmp_path: Path) -> None:
    text = '[[peers]]\nname = "x"\nae_title = "X"\nhost = "127.0.0.1"\nport = 104\n'
    (peer,) = load_settings(write(tmp_path, text)).peers
    assert peer.services == frozenset()
    assert not any(peer.allows(s) for s in ("echo", "store", "find", "move", "get"))


# -- errors: each names the key and the file ------------------------------------------------

PEER = '[[peers]]\nname = "p"\nae_title = "P"\nhost = "127.0.0.1"\nport = 104\n'

BAD_CONFIGS = [
    # (id, toml text, key that must be named)
    ("unknown-top-level", '[nodes]\nae_title = "X"\n', "nodes"),
    ("unknown-node-key", '[node]\nae_tilte = "X"\n', "node.ae_tilte"),
    ("unknown-peer-key", PEER + 'service = ["echo"]\n', "peers[0].service"),
    ("node-not-table", 'node = "x"\n', "node"),
    ("peers-not-array", '[peers]\nname = "p"\n', "peers"),
    ("port-string", '[node]\ndicom_port = "104"\n', "node.dicom_port"),
    ("port-float", "[node]\ndicom_port = 104.0\n", "node.dicom_port"),
    ("port-bool", "[node]\ndicom_port = true\n", "node.dicom_port"),
    ("port-zero", "[node]\ndicom_port = 0\n", "node.dicom_port"),
    ("port-too-big", "[node]\ndicom_port = 65536\n", "node.dicom_port"),
    ("port-negative", "[node]\nhttp_port = -1\n", "node.http_port"),
    ("peer-port-too-big", PEER.replace("104", "70000"), "peers[0].port"),
    ("peer-port-missing", PEER.replace("port = 104\n", ""), "peers[0].port"),
    ("max-assoc-zero", "[node]\nmax_associations = 0\n", "node.max_associations"),
    ("max-pdu-tiny", "[node]\nmax_pdu = 100\n", "node.max_pdu"),
    ("max-pdu-huge", "[node]\nmax_pdu = 4294967296\n", "node.max_pdu"),
    ("timeout-zero", "[node]\nacse_timeout = 0\n", "node.acse_timeout"),
    ("timeout-negative", "[node]\ndimse_timeout = -5\n", "node.dimse_timeout"),
    ("timeout-string", '[node]\nnetwork_timeout = "30s"\n', "node.network_timeout"),
    ("timeout-nan", "[node]\nshutdown_grace = nan\n", "node.shutdown_grace"),
    ("timeout-inf", "[node]\nnetwork_timeout = inf\n", "node.network_timeout"),
    ("data-dir-int", "[node]\ndata_dir = 3\n", "node.data_dir"),
    ("db-url-scheme", '[node]\ndatabase_url = "mysql://x/y"\n', "node.database_url"),
    ("on-duplicate", '[node]\non_duplicate = "overwrite"\n', "node.on_duplicate"),
    ("ae-too-long", '[node]\nae_title = "ABCDEFGHIJKLMNOPQ"\n', "node.ae_title"),
    ("ae-empty", '[node]\nae_title = "   "\n', "node.ae_title"),
    ("ae-backslash", '[node]\nae_title = "A\\\\B"\n', "node.ae_title"),
    ("ae-control-char", '[node]\nae_title = "A\\tB"\n', "node.ae_title"),
    ("ae-non-ascii", '[node]\nae_title = "SCANNÉR"\n', "node.ae_title"),
    ("ae-not-string", "[node]\nae_title = 12\n", "node.ae_title"),
    ("peer-ae-bad", PEER.replace('"P"', '"TOO_LONG_AE_TITLE_X"'), "peers[0].ae_title"),
    ("peer-ae-missing", PEER.replace('ae_title = "P"\n', ""), "peers[0].ae_title"),
    ("peer-name-empty", PEER.replace('name = "p"', 'name = ""'), "peers[0].name"),
    ("service-unknown", PEER + 'services = ["echo", "print"]\n', "peers[0].services"),
    ("services-not-list", PEER + 'services = "echo"\n', "peers[0].services"),
    ("duplicate-peer", PEER + PEER.replace('"P"', '"Q"'), "name"),
    ("peer-host-empty", PEER.replace('"127.0.0.1"', '"  "'), "peers[0].host"),
    (
        "route-same-destination-twice",
        PEER + '[[routes]]\nname = "r"\ndestinations = ["p", "p"]\n',
        "routes[0].destinations",
    ),
    ("db-url-driver-missing", '[node]\ndatabase_url = "postgresql://h/db"\n', "node.database_url"),
    (
        "db-url-bad-port",
        '[node]\ndatabase_url = "postgresql+psycopg://u@[::1/db"\n',
        "node.database_url",
    ),
    ("db-url-in-memory", '[node]\ndatabase_url = "sqlite:///:memory:"\n', "node.database_url"),
    ("data-dir-nul", '[node]\ndata_dir = "a\\u0000b"\n', "node.data_dir"),
    ("data-dir-unknown-user", '[node]\ndata_dir = "~no-such-user-cg/x"\n', "node.data_dir"),
]


@pytest.mark.parametrize(("text", "key"), [pytest.param(t, k, id=i) for i, t, k in BAD_CONFIGS])
def test_bad_value_names_key_and_file(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    message = config_error(path)
    assert str(path) in message
    assert key in message
    assert "\n" not in message.strip(), "a configuration error is one line"


def test_unknown_service_message_lists_the_allowed_ones(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, PEER + 'services = ["print"]\n'))
    assert "print" in message
    for service in ("echo", "store", "find", "move", "get"):
        assert service in message


def test_duplicate_peer_name_names_the_peer(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, PEER + PEER.replace('"P"', '"Q"')))
    assert "'p'" in message
    assert "more than once" in message


def test_same_ae_title_under_two_names_is_allowed(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, PEER + PEER.replace('name = "p"', 'name = "p2"')))
    assert [p.name for p in settings.peers] == ["p", "p2"]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        pytest.param('[node]\nae_title = "unterminated\n', 2, id="unterminated-string"),
        pytest.param("[node]\ndicom_port = 104\ndicom_port = 105\n", 3, id="duplicate-key"),
        pytest.param("[node\n", 1, id="broken-header"),
        pytest.param('[node]\nae_title "X"\n', 2, id="missing-equals"),
    ],
)
def test_invalid_toml_names_file_and_line(tmp_path: Path, text: str, line: int) -> None:
    path = write(tmp_path, text)
    message = config_error(path)
    assert str(path) in message
    assert "invalid TOML" in message
    assert f"line {line}" in message


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[node]\nae_title = "SCANNÉR"\n'.encode("latin-1"))
    assert str(path) in config_error(path)


def test_router_table_is_parsed_and_validated(tmp_path: Path) -> None:
    from config.settings import ConfigError, load_settings

    good = tmp_path / "good.toml"
    good.write_text("[router]\nmax_attempts = 3\nretry_base_delay = 0.5\nlease_seconds = 10\n")
    router = load_settings(good).router
    assert (router.max_attempts, router.retry_base_delay, router.lease_seconds) == (3, 0.5, 10.0)
    assert router.batch_size == 64  # untouched keys keep their defaults
    bad = tmp_path / "bad.toml"
    bad.write_text("[router]\nretry_base_delay = 10\nretry_max_delay = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: router\.retry_max_delay"):
        load_settings(bad)
    assert router.forwarders == "process"
    threads = tmp_path / "threads.toml"
    threads.write_text('[router]\nforwarders = "thread"\n')
    assert load_settings(threads).router.forwarders == "thread"
    mode = tmp_path / "mode.toml"
    mode.write_text('[router]\nforwarders = "fork"\n')
    with pytest.raises(ConfigError, match=r"mode\.toml: router\.forwarders.*process.*thread"):
        load_settings(mode)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[router]\nmax_attempt = 3\n")
    with pytest.raises(ConfigError, match=r"unknown\.toml: unknown key 'router\.max_attempt'"):
        load_settings(unknown)


def test_route_without_purpose_to_a_purpose_bound_peer_is_refused(tmp_path: Path) -> None:
    text = (
        "[[peers]]\nname = 'regional'\nae_title = 'REGIONAL'\nhost = '127.0.0.1'\n"
        "port = 11112\nservices = ['find']\npurpose = 'PARTAGE'\n"
        "[[routes]]\nname = 'to-regional'\ndestinations = ['regional']\n"
    )
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert str(path) in message and "to-regional" in message and "PARTAGE" in message
    # with a purpose, the same route is accepted
    path.write_text(text + "purpose = 'PARTAGE'\n", encoding="utf-8")
    assert load_settings(path).routes[0].purpose == "PARTAGE"
