"""Load the TOML configuration into one immutable, validated settings object.

Resolution order for the file: ``--config PATH``, then ``$CONSENTGATE_CONFIG``, then
``./consentgate.toml``, then the built-in defaults. Any unknown key or bad value raises
:class:`ConfigError` whose message names the key and the file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

DEFAULT_CONFIG_NAME = "consentgate.toml"
ENV_VAR = "CONSENTGATE_CONFIG"

SERVICES = frozenset({"echo", "store", "find", "move", "get"})
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash
_DUPLICATE_POLICIES = ("keep",)
#: ``[router] retention``: what happens to the local copy of instances whose jobs a consent
#: refusal or withdrawal dropped (see :mod:`router.retention`).
RETENTION_POLICIES = ("keep", "delete-unneeded")
#: ``[router] forwarders``: where the forwarders run. ``process``: in a child process of
#: ``consentgate serve`` (the receiving and forwarding sides then use both cores instead of
#: sharing one interpreter lock); ``thread``: in the serving process itself.
FORWARDER_MODES = ("process", "thread")


class ConfigError(ValueError):
    """A configuration file is missing, unreadable or invalid."""


@dataclass(frozen=True)
class NodeSettings:
    """The ``[node]`` table: this gateway's own identity and resources."""

    ae_title: str = "CONSENTGATE"
    dicom_host: str = "127.0.0.1"
    dicom_port: int = 11112
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    data_dir: Path = Path("var")
    database_url: str = ""
    max_associations: int = 10
    max_pdu: int = 1_048_576
    acse_timeout: float = 30.0
    dimse_timeout: float = 30.0
    network_timeout: float = 60.0
    shutdown_grace: float = 30.0
    on_duplicate: str = "keep"
    journal_segment_mb: int = 64

    @property
    def effective_database_url(self) -> str:
        """The database URL, defaulting to SQLite inside ``data_dir``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'consentgate.db').as_posix()}"


@dataclass(frozen=True)
class RouterSettings:
    """The ``[router]`` table: forward queue and forwarder tuning."""

    max_attempts: int = 10
    retry_base_delay: float = 2.0
    retry_max_delay: float = 300.0
    lease_seconds: float = 120.0
    batch_size: int = 64
    batch_linger: float = 0.05
    poll_interval: float = 0.5
    idle_release: float = 5.0
    consent_poll_interval: float = 1.0
    consent_sweep_interval: float = 30.0
    retention: str = "keep"
    forwarders: str = "process"


@dataclass(frozen=True)
class PeerSettings:
    """One ``[[peers]]`` entry: a remote application entity we talk to."""

    name: str
    ae_title: str
    host: str
    port: int
    services: frozenset[str] = field(default_factory=frozenset)
    issuer: str = ""
    purpose: str = ""

    def allows(self, service: str) -> bool:
        """Whether this peer may use ``service`` (``echo``, ``store``, ...) on us."""
        return service in self.services


MATCH_OPERATORS = ("equals", "one_of", "glob", "regex")


@dataclass(frozen=True)
class MatchCondition:
    """One condition of a route: an attribute keyword (or ``calling_ae``) and a test.

    ``operator`` is ``equals``, ``one_of``, ``glob`` (fnmatch, case-sensitive) or
    ``regex`` (Python syntax, searched anywhere in the value); ``values`` holds one value
    except for ``one_of``.
    """

    keyword: str
    operator: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class RouteSettings:
    """One ``[[routes]]`` entry: which instances go where, under which purpose."""

    name: str
    match: tuple[MatchCondition, ...]
    destinations: tuple[str, ...]
    purpose: str = ""


@dataclass(frozen=True)
class Settings:
    """Everything consentgate reads from its configuration file."""

    node: NodeSettings = field(default_factory=NodeSettings)
    peers: tuple[PeerSettings, ...] = ()
    routes: tuple[RouteSettings, ...] = ()
    router: RouterSettings = field(default_factory=RouterSettings)
    source: str = "<built-in defaults>"

    def peer_by_name(self, name: str) -> PeerSettings | None:
        """The peer called ``name`` (case-sensitive), or ``None``."""
        return next((p for p in self.peers if p.name == name), None)

    def peer_by_ae_title(self, ae_title: str) -> PeerSettings | None:
        """The first peer whose AE title is ``ae_title``, or ``None``."""
        return next((p for p in self.peers if p.ae_title == ae_title), None)

    def peers_for_association(self, ae_title: str, address: str) -> PeerSettings | None:
        """The peer with this calling AE title whose host matches ``address``."""
        for peer in self.peers:
            if peer.ae_title == ae_title and host_matches(peer.host, address):
                return peer
        return None


def host_matches(configured: str, address: str) -> bool:
    """Whether a connecting ``address`` is the configured host (IP, network or name)."""
    if configured == address:
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    try:
        if "/" in configured:
            return ip in ipaddress.ip_network(configured, strict=False)
        return ip == ipaddress.ip_address(configured)
    except ValueError:
        pass
    if configured == "localhost":
        return ip.is_loopback
    return False


def locate_config(explicit: str | os.PathLike[str] | None) -> Path | None:
    """Return the configuration file to use, or ``None`` for built-in defaults."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    local = Path(DEFAULT_CONFIG_NAME)
    if local.is_file():
        return local
    return None


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Load and validate settings.

    Parameters
    ----------
    path : path-like, optional
        An explicit configuration file; when omitted the resolution order of the
        module docstring applies.

    Raises
    ------
    ConfigError
        The file is missing, is not valid TOML, or has an unknown key or bad value.
    """
    located = locate_config(path)
    if located is None:
        return Settings()
    try:
        raw = tomllib.loads(located.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{located}: configuration file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{located}: cannot read configuration file ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{located}: invalid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{located}: invalid TOML: nested too deeply") from None
    return parse_settings(raw, source=str(located), base_dir=located.parent)


def parse_settings(raw: Mapping[str, Any], *, source: str, base_dir: Path) -> Settings:
    """Validate a parsed TOML document into :class:`Settings`."""
    _known(raw, {"node", "peers", "routes", "router"}, source, "")
    node = _parse_node(_table(raw.get("node", {}), source, "node"), source, base_dir)
    peers_raw = raw.get("peers", [])
    if not isinstance(peers_raw, list):
        raise ConfigError(f"{source}: 'peers' must be an array of tables ([[peers]])")
    peers = tuple(
        _parse_peer(_table(item, source, f"peers[{i}]"), source, f"peers[{i}]")
        for i, item in enumerate(peers_raw)
    )
    names = [p.name for p in peers]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{source}: peers.name '{name}' is defined more than once")
    routes_raw = raw.get("routes", [])
    if not isinstance(routes_raw, list):
        raise ConfigError(f"{source}: 'routes' must be an array of tables ([[routes]])")
    routes = tuple(
        _parse_route(_table(item, source, f"routes[{i}]"), source, f"routes[{i}]", set(names))
        for i, item in enumerate(routes_raw)
    )
    _check_route_purposes(routes, {p.name: p.purpose for p in peers}, source)
    route_names = [r.name for r in routes]
    for name in route_names:
        if route_names.count(name) > 1:
            raise ConfigError(f"{source}: routes.name '{name}' is defined more than once")
    router = _parse_router(_table(raw.get("router", {}), source, "router"), source)
    return Settings(node=node, peers=peers, routes=routes, router=router, source=source)


def _check_route_purposes(
    routes: Sequence[RouteSettings], peer_purposes: Mapping[str, str], source: str
) -> None:
    """What reaches a destination is checked against one purpose, known from the
    configuration alone.

    - A route to a purpose-bound peer carries that peer's purpose: the peer's users see
      what it receives under its purpose (the same check as its C-MOVE and C-GET), so a
      route may not reach it under another purpose, nor under none.
    - The routes that name one destination with a purpose all carry the same one: a job
      is checked against one purpose, and an instance that two routes with different
      purposes match would otherwise be sent on the consent of either.
    """
    by_destination: dict[str, tuple[int, RouteSettings]] = {}
    for i, route in enumerate(routes):
        for dest in route.destinations:
            bound = peer_purposes.get(dest, "")
            if bound and route.purpose != bound:
                has = f"purpose '{route.purpose}'" if route.purpose else "no purpose"
                raise ConfigError(
                    f"{source}: routes[{i}] ('{route.name}') has {has} but sends to peer "
                    f"'{dest}', which has purpose '{bound}': give the route purpose "
                    f"'{bound}' (what reaches a purpose-bound peer needs the patient's "
                    "consent to that peer's purpose)"
                )
            if not route.purpose:
                continue
            first = by_destination.setdefault(dest, (i, route))
            if first[1].purpose != route.purpose:
                raise ConfigError(
                    f"{source}: routes[{i}] ('{route.name}') sends to '{dest}' for purpose "
                    f"'{route.purpose}', but routes[{first[0]}] ('{first[1].name}') sends "
                    f"there for purpose '{first[1].purpose}': the routes to one destination "
                    "may carry one purpose only (an instance both match would be sent on "
                    "the consent to either)"
                )


def _parse_router(tbl: Mapping[str, Any], source: str) -> RouterSettings:
    defaults = RouterSettings()
    _known(tbl, set(RouterSettings.__dataclass_fields__), source, "router")
    router = RouterSettings(
        max_attempts=_int(tbl, "max_attempts", defaults.max_attempts, source, "router", 1, 1000),
        retry_base_delay=_float(
            tbl, "retry_base_delay", defaults.retry_base_delay, source, "router"
        ),
        retry_max_delay=_float(tbl, "retry_max_delay", defaults.retry_max_delay, source, "router"),
        lease_seconds=_float(tbl, "lease_seconds", defaults.lease_seconds, source, "router"),
        batch_size=_int(tbl, "batch_size", defaults.batch_size, source, "router", 1, 1000),
        batch_linger=_float(tbl, "batch_linger", defaults.batch_linger, source, "router"),
        poll_interval=_float(tbl, "poll_interval", defaults.poll_interval, source, "router"),
        idle_release=_float(tbl, "idle_release", defaults.idle_release, source, "router"),
        consent_poll_interval=_float(
            tbl, "consent_poll_interval", defaults.consent_poll_interval, source, "router"
        ),
        consent_sweep_interval=_float(
            tbl, "consent_sweep_interval", defaults.consent_sweep_interval, source, "router"
        ),
        retention=_choice(
            tbl, "retention", defaults.retention, RETENTION_POLICIES, source, "router"
        ),
        forwarders=_choice(
            tbl, "forwarders", defaults.forwarders, FORWARDER_MODES, source, "router"
        ),
    )
    if router.retry_max_delay < router.retry_base_delay:
        raise ConfigError(f"{source}: router.retry_max_delay must be >= router.retry_base_delay")
    return router


def _parse_node(tbl: Mapping[str, Any], source: str, base_dir: Path) -> NodeSettings:
    defaults = NodeSettings()
    _known(tbl, set(NodeSettings.__dataclass_fields__), source, "node")
    data_dir = _data_dir(_str(tbl, "data_dir", str(defaults.data_dir), source, "node"), source)
    if not data_dir.is_absolute():
        data_dir = (base_dir / data_dir).resolve()
    node = NodeSettings(
        ae_title=_ae(tbl, "ae_title", defaults.ae_title, source, "node"),
        dicom_host=_str(tbl, "dicom_host", defaults.dicom_host, source, "node"),
        dicom_port=_port(tbl, "dicom_port", defaults.dicom_port, source, "node"),
        http_host=_str(tbl, "http_host", defaults.http_host, source, "node"),
        http_port=_port(tbl, "http_port", defaults.http_port, source, "node", allow_zero=True),
        data_dir=data_dir,
        database_url=_str(tbl, "database_url", "", source, "node"),
        max_associations=_int(
            tbl, "max_associations", defaults.max_associations, source, "node", 1, 1000
        ),
        max_pdu=_int(tbl, "max_pdu", defaults.max_pdu, source, "node", 4096, 16 * 1024 * 1024),
        acse_timeout=_float(tbl, "acse_timeout", defaults.acse_timeout, source, "node"),
        dimse_timeout=_float(tbl, "dimse_timeout", defaults.dimse_timeout, source, "node"),
        network_timeout=_float(tbl, "network_timeout", defaults.network_timeout, source, "node"),
        shutdown_grace=_float(tbl, "shutdown_grace", defaults.shutdown_grace, source, "node"),
        on_duplicate=_choice(
            tbl, "on_duplicate", defaults.on_duplicate, _DUPLICATE_POLICIES, source, "node"
        ),
        journal_segment_mb=_int(
            tbl, "journal_segment_mb", defaults.journal_segment_mb, source, "node", 0, 4096
        ),
    )
    if node.database_url:
        _check_database_url(node.database_url, source)
    return node


def _data_dir(raw: str, source: str) -> Path:
    """``node.data_dir`` as a path (``~`` expanded)."""
    if "\x00" in raw:
        raise ConfigError(f"{source}: node.data_dir must not contain a NUL character")
    try:
        return Path(raw).expanduser()
    except RuntimeError:  # ~user of an unknown user, or no home directory
        raise ConfigError(
            f"{source}: node.data_dir: cannot expand '~' in {raw!r} (no such user or home)"
        ) from None


def _check_database_url(url: str, source: str) -> None:
    """Refuse a database URL that cannot be used: not SQLite or PostgreSQL, unparseable,
    a driver that is not installed, or an in-memory SQLite database (nothing would be
    kept)."""
    if not url.startswith(("sqlite", "postgresql")):
        raise ConfigError(f"{source}: node.database_url must start with 'sqlite' or 'postgresql'")
    try:
        parsed = make_url(url)
        parsed.get_dialect().import_dbapi()  # the driver must be installed
        _ = parsed.port  # a malformed port raises
    except ImportError as exc:
        raise ConfigError(
            f"{source}: node.database_url: driver not installed ({exc.name or exc}); "
            "use 'postgresql+psycopg://...' or 'sqlite:///PATH'"
        ) from None
    except (ValueError, ArgumentError) as exc:
        raise ConfigError(f"{source}: node.database_url cannot be parsed ({exc})") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigError(
            f"{source}: node.database_url: an in-memory SQLite database keeps nothing; "
            "give a file (sqlite:///PATH) or leave it empty for <data_dir>/consentgate.db"
        )


def _parse_peer(tbl: Mapping[str, Any], source: str, where: str) -> PeerSettings:
    _known(
        tbl, {"name", "ae_title", "host", "port", "services", "issuer", "purpose"}, source, where
    )
    for key in ("name", "ae_title", "host", "port"):
        if key not in tbl:
            raise ConfigError(f"{source}: {where}.{key} is required")
    services_raw = tbl.get("services", [])
    if not isinstance(services_raw, list) or not all(isinstance(s, str) for s in services_raw):
        raise ConfigError(f"{source}: {where}.services must be a list of strings")
    unknown = sorted(set(services_raw) - SERVICES)
    if unknown:
        raise ConfigError(
            f"{source}: {where}.services has unknown value(s) {', '.join(unknown)} "
            f"(allowed: {', '.join(sorted(SERVICES))})"
        )
    name = _str(tbl, "name", "", source, where)
    if not name:
        raise ConfigError(f"{source}: {where}.name must not be empty")
    host = _str(tbl, "host", "", source, where).strip()
    if not host:
        raise ConfigError(f"{source}: {where}.host must not be empty")
    return PeerSettings(
        name=name,
        ae_title=_ae(tbl, "ae_title", "", source, where),
        host=host,
        port=_port(tbl, "port", 0, source, where),
        services=frozenset(services_raw),
        issuer=_str(tbl, "issuer", "", source, where),
        purpose=_str(tbl, "purpose", "", source, where),
    )


def _parse_route(
    tbl: Mapping[str, Any], source: str, where: str, peer_names: set[str]
) -> RouteSettings:
    _known(tbl, {"name", "match", "destinations", "purpose"}, source, where)
    name = _str(tbl, "name", "", source, where)
    if not name:
        raise ConfigError(f"{source}: {where}.name is required")
    dest_raw = tbl.get("destinations")
    if (
        not isinstance(dest_raw, list)
        or not dest_raw
        or not all(isinstance(d, str) for d in dest_raw)
    ):
        raise ConfigError(f"{source}: {where}.destinations must be a non-empty list of peer names")
    for dest in dest_raw:
        if dest not in peer_names:
            raise ConfigError(f"{source}: {where}.destinations names unknown peer '{dest}'")
    if len(set(dest_raw)) != len(dest_raw):
        raise ConfigError(f"{source}: {where}.destinations names a peer more than once")
    match_raw = _table(tbl.get("match", {}), source, f"{where}.match")
    conditions = tuple(
        _parse_condition(key, value, source, f"{where}.match.{key}")
        for key, value in match_raw.items()
    )
    return RouteSettings(
        name=name,
        match=conditions,
        destinations=tuple(dest_raw),
        purpose=_str(tbl, "purpose", "", source, where),
    )


def _parse_condition(keyword: str, value: Any, source: str, where: str) -> MatchCondition:
    from pydicom.datadict import tag_for_keyword

    if keyword != "calling_ae" and tag_for_keyword(keyword) is None:
        raise ConfigError(
            f"{source}: {where}: '{keyword}' is not a DICOM attribute keyword or 'calling_ae'"
        )
    if isinstance(value, str):
        return MatchCondition(keyword, "equals", (value,))
    if isinstance(value, list):
        if not value or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{source}: {where} must be a non-empty list of strings")
        return MatchCondition(keyword, "one_of", tuple(value))
    if isinstance(value, dict):
        if len(value) != 1 or next(iter(value)) not in MATCH_OPERATORS:
            raise ConfigError(
                f"{source}: {where} must be a string, a list, or a table with exactly one of "
                f"{', '.join(MATCH_OPERATORS)}"
            )
        operator, operand = next(iter(value.items()))
        operands = operand if isinstance(operand, list) else [operand]
        if not operands or not all(isinstance(v, str) for v in operands):
            raise ConfigError(f"{source}: {where}.{operator} must be a string or strings")
        if operator != "one_of" and len(operands) != 1:
            raise ConfigError(f"{source}: {where}.{operator} takes one string")
        if operator == "regex":
            try:
                re.compile(operands[0])
            except re.error as exc:
                raise ConfigError(f"{source}: {where}.regex is invalid: {exc}") from None
        return MatchCondition(keyword, operator, tuple(operands))
    raise ConfigError(f"{source}: {where} must be a string, a list of strings or a table")


def _table(value: Any, source: str, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: '{where}' must be a table")
    return value


def _known(tbl: Mapping[str, Any], allowed: set[str], source: str, where: str) -> None:
    for key in tbl:
        if key not in allowed:
            name = f"{where}.{key}" if where else key
            raise ConfigError(f"{source}: unknown key '{name}'")


def _str(tbl: Mapping[str, Any], key: str, default: str, source: str, where: str) -> str:
    value = tbl.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{source}: {where}.{key} must be a string")
    return value


def _int(
    tbl: Mapping[str, Any], key: str, default: int, source: str, where: str, low: int, high: int
) -> int:
    value = tbl.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{source}: {where}.{key} must be an integer")
    if not low <= value <= high:
        raise ConfigError(f"{source}: {where}.{key} must be between {low} and {high}")
    return value


def _port(
    tbl: Mapping[str, Any],
    key: str,
    default: int,
    source: str,
    where: str,
    allow_zero: bool = False,
) -> int:
    return _int(tbl, key, default, source, where, 0 if allow_zero else 1, 65535)


def _float(tbl: Mapping[str, Any], key: str, default: float, source: str, where: str) -> float:
    value = tbl.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{source}: {where}.{key} must be a number of seconds")
    if not 0 < value <= 86400:
        raise ConfigError(f"{source}: {where}.{key} must be > 0 and <= 86400 seconds")
    return float(value)


def _ae(tbl: Mapping[str, Any], key: str, default: str, source: str, where: str) -> str:
    value = _str(tbl, key, default, source, where).strip()
    if not _AE_RE.match(value):
        raise ConfigError(
            f"{source}: {where}.{key} must be 1-16 printable characters without backslash"
        )
    return value


def _choice(
    tbl: Mapping[str, Any],
    key: str,
    default: str,
    allowed: tuple[str, ...],
    source: str,
    where: str,
) -> str:
    value = _str(tbl, key, default, source, where)
    if value not in allowed:
        raise ConfigError(f"{source}: {where}.{key} must be one of {', '.join(allowed)}")
    return value
