"""The ``consentgate`` command line.

Every user mistake ends with one line on stderr and a non-zero exit code: 2 for a
configuration or usage problem, 1 when an operation fails.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any

import click
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from cli import database
from cli.consent_commands import register_consent_commands
from cli.router_commands import register_router_commands
from cli.runtime import (
    Runtime,
    SchemaOutOfDate,
    build_runtime,
    check_schema,
    configure_pynetdicom,
    setup_logging,
)
from config.settings import ConfigError, PeerSettings, Settings, load_settings

LOG = logging.getLogger("consentgate")


class CliError(click.ClickException):
    """An operation failed; the message is shown as one line."""

    exit_code = 1


class ConfigProblem(click.ClickException):
    """The configuration cannot be used."""

    exit_code = 2


class AppContext:
    """What ``ctx.obj`` holds: the config location and, once loaded, the settings."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            try:
                self._settings = load_settings(self.config_path)
            except ConfigError as exc:
                raise ConfigProblem(str(exc)) from None
        return self._settings

    def runtime(self, *, require_schema: bool = True, create: bool = False) -> Runtime:
        """The process's services. Only ``create`` (``init``, ``db upgrade``) may create
        the embedded SQLite database: any other command on a missing one says to run
        ``init`` and leaves nothing behind."""
        settings = self.settings
        database = _missing_database(settings)
        if not create and database is not None:
            raise CliError(
                f"no database at {database}: run 'consentgate init' first "
                "(or check node.data_dir / node.database_url)"
            )
        try:
            runtime = build_runtime(settings)
            if require_schema:
                check_schema(runtime)
        except SchemaOutOfDate as exc:
            raise CliError(str(exc)) from None
        except SQLAlchemyError as exc:
            raise CliError(f"cannot open the database: {_first_line(exc)}") from None
        except OSError as exc:  # the data directory cannot be created or used
            where = f": {exc.filename}" if exc.filename else ""
            raise CliError(
                f"cannot use the data directory ({exc.strerror or type(exc).__name__}{where})"
            ) from None
        return runtime

    def peer(self, name: str) -> PeerSettings:
        peer = self.settings.peer_by_name(name)
        if peer is None:
            known = ", ".join(p.name for p in self.settings.peers) or "none"
            raise CliError(f"unknown peer '{name}' (configured peers: {known})")
        return peer


def _missing_database(settings: Settings) -> Path | None:
    """The file of the SQLite database when it does not exist yet (``None`` when it does,
    or for another database)."""
    parsed = make_url(settings.node.effective_database_url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    path = Path(parsed.database)
    return None if path.exists() else path


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


@click.group()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Configuration file (default: $CONSENTGATE_CONFIG, then ./consentgate.toml, "
    "then built-in defaults).",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
)
@click.version_option(package_name="consentgate")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, log_level: str) -> None:
    """consentgate: consent-enforcing DICOM gateway."""
    setup_logging(getattr(logging, log_level.upper()))
    configure_pynetdicom()
    ctx.obj = AppContext(config_path)


@cli.command()
@click.pass_obj
def init(app: AppContext) -> None:
    """Create the data directory and the database schema (safe to run again)."""
    settings = app.settings
    runtime = app.runtime(require_schema=False, create=True)
    try:
        removed = runtime.files.prepare()
        revision = database.upgrade(runtime.engine)
    except (OSError, SQLAlchemyError) as exc:
        raise CliError(f"initialisation failed: {_first_line(exc)}") from None
    finally:
        runtime.close()
    click.echo(f"configuration: {settings.source}")
    click.echo(f"data directory: {settings.node.data_dir}")
    click.echo(f"database: {_safe_url(settings.node.effective_database_url)} (schema {revision})")
    if removed:
        click.echo(f"removed {removed} incomplete staging file(s) left by a crash")


@cli.group()
def db() -> None:
    """Database schema management."""


@db.command("upgrade")
@click.pass_obj
def db_upgrade(app: AppContext) -> None:
    """Apply pending schema migrations."""
    runtime = app.runtime(require_schema=False, create=True)
    try:
        before = database.current_revision(runtime.engine)
        after = database.upgrade(runtime.engine)
    except SQLAlchemyError as exc:
        raise CliError(f"migration failed: {_first_line(exc)}") from None
    finally:
        runtime.close()
    if before == after:
        click.echo(f"database already at {after}")
    else:
        click.echo(f"database upgraded from {before or 'empty'} to {after}")


@cli.command()
@click.pass_obj
def serve(app: AppContext) -> None:
    """Run the DICOM node and the /healthz + /metrics endpoint until SIGTERM or SIGINT."""
    from cli.node_process import ConfigurationMismatch, NodeProcess, check_purposes
    from cli.ops_http import OpsServer
    from dicom_node.archive.journal import JournalError

    settings = app.settings
    runtime = app.runtime()
    node_settings = settings.node
    try:
        removed = runtime.files.prepare()
    except OSError as exc:
        raise CliError(f"cannot prepare {node_settings.data_dir}: {exc.strerror}") from None
    if removed:
        LOG.info("removed %d incomplete staging file(s) left by a crash", removed)
    try:
        check_purposes(runtime)
    except ConfigurationMismatch as exc:
        runtime.close()
        raise ConfigProblem(str(exc)) from None
    node = NodeProcess(runtime)
    try:
        ops = OpsServer(runtime, node_settings.http_host, node_settings.http_port, node)
    except OSError as exc:
        raise CliError(
            f"cannot listen on HTTP {node_settings.http_host}:{node_settings.http_port}: "
            f"{exc.strerror}"
        ) from None
    try:
        host, port = node.start()
    except JournalError as exc:
        ops.stop()
        runtime.close()
        raise CliError(f"cannot open the ingest journal: {exc.strerror}") from None
    except OSError as exc:
        ops.stop()
        raise CliError(
            f"cannot listen on DICOM {node_settings.dicom_host}:{node_settings.dicom_port}: "
            f"{exc.strerror}"
        ) from None
    ops.start()
    LOG.info("ready: DICOM %s@%s:%d, HTTP port %d", node_settings.ae_title, host, port, ops.port)

    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        LOG.info("signal %d received: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    while not stop.wait(1.0):
        pass
    aborted = node.stop()
    ops.stop()
    runtime.close()
    if aborted:
        LOG.warning("%d association(s) aborted after the shutdown grace period", aborted)
    LOG.info("stopped")


@cli.command()
@click.pass_obj
def status(app: AppContext) -> None:
    """Show the archive's content and whether a running node answers."""
    settings = app.settings
    node = settings.node
    if node.data_dir.exists() and not node.data_dir.is_dir():
        raise CliError(f"cannot use the data directory ({node.data_dir} is not a directory)")
    missing = _missing_database(settings)
    revision, counts = None, None
    if missing is None:
        runtime = app.runtime(require_schema=False)
        try:
            revision = database.current_revision(runtime.engine)
            counts = runtime.index.counts() if revision == database.head_revision() else None
        except SQLAlchemyError as exc:
            raise CliError(f"cannot read the database: {_first_line(exc)}") from None
        finally:
            runtime.close()
    click.echo(f"configuration: {settings.source}")
    click.echo(f"node: {node.ae_title} DICOM {node.dicom_host}:{node.dicom_port}")
    click.echo(f"data directory: {node.data_dir}")
    if missing is not None:
        click.echo(f"database: {missing} does not exist (run 'consentgate init')")
    else:
        click.echo(f"database: {_safe_url(node.effective_database_url)} (schema {revision})")
        if counts is None:
            click.echo("archive: schema not current (run 'consentgate db upgrade')")
        else:
            for key in ("patients", "studies", "series", "instances"):
                click.echo(f"{key}: {counts[key]}")
            click.echo(f"bytes: {counts['bytes']}")
    click.echo(f"running: {'yes' if _node_answers(node.http_host, node.http_port) else 'no'}")


def _node_answers(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=2) as rsp:
            return bool(rsp.status == 200)
    except OSError:
        return False


def _quiet_pynetdicom() -> None:
    """As a client the command reports failures itself in one line: pynetdicom's own
    error records ("Association request failed", ...) would repeat it as log noise."""
    logger = logging.getLogger("pynetdicom")
    if logger.getEffectiveLevel() > logging.DEBUG:
        logger.setLevel(logging.CRITICAL)


def _safe_url(url: str) -> str:
    """The URL without its password."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@cli.group()
def studies() -> None:
    """Browse archived studies."""


@studies.command("list")
@click.option("--patient-id", default=None, help="Only this Patient ID.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100000))
@click.pass_obj
def studies_list(app: AppContext, patient_id: str | None, limit: int) -> None:
    """List studies, newest first."""
    from dicom_node.archive.models import Patient, Study

    runtime = app.runtime()
    try:
        with runtime.sessions() as session:
            stmt = select(Study, Patient).join(Patient, Study.patient_pk == Patient.id)
            if patient_id is not None:
                stmt = stmt.where(Patient.patient_id == patient_id)
            total = session.scalar(select(func.count()).select_from(stmt.subquery()))
            rows = session.execute(
                stmt.order_by(Study.study_date.desc(), Study.id.desc()).limit(limit)
            ).all()
    except SQLAlchemyError as exc:
        raise CliError(f"cannot read the database: {_first_line(exc)}") from None
    finally:
        runtime.close()
    click.echo(
        f"{'DATE':8}  {'PATIENT ID':16} {'ISSUER':12} {'MOD':8} {'SER':>3} {'INST':>5}  "
        "STUDY INSTANCE UID"
    )
    for study, patient in rows:
        click.echo(
            f"{study.study_date:8}  {patient.patient_id[:16]:16} {patient.issuer[:12]:12} "
            f"{study.modalities.replace(chr(92), '/')[:8]:8} {study.number_of_series:>3} "
            f"{study.number_of_instances:>5}  {study.study_instance_uid}"
        )
    click.echo(f"{len(rows)} of {total} studies")


@studies.command("fix-patient-row")
@click.argument("study_uid")
@click.option("--by", default=None, metavar="NAME", help="Who (for the audit log).")
@click.pass_context
def studies_fix_patient_row(ctx: click.Context, study_uid: str, by: str | None) -> None:
    """Make STUDY_UID's patient row show that study's own patient.

    A patient row shows the name and demographics of the instance that created it. When
    that instance named another person under the same Patient ID (it was held for
    reconciliation), purpose-bound peers see none of the patient's studies. This points
    the row at the first instance of STUDY_UID naming the row's patient. Audited.
    """
    from datetime import UTC, datetime

    from sqlalchemy.orm import Session

    from cli.router_commands import actor_name, open_runtime
    from consent.audit import append_audit, lock_for_write
    from dicom_node.archive.patient_rows import PatientRowError, RowChange, show_study_patient

    actor = actor_name(by)

    def audit(session: Session, change: RowChange) -> None:
        lock_for_write(session)
        append_audit(
            session,
            at=datetime.now(UTC),
            actor=actor,
            action="archive.patient-row",
            target=f"study:{study_uid}",
            details={"patient_row": change.patient_pk, "instance": change.instance_pk},
        )

    with open_runtime(ctx) as runtime:
        try:
            change = show_study_patient(
                runtime.sessions, runtime.files, study_uid, runtime.gate.confirms, audit
            )
        except PatientRowError as exc:
            raise CliError(str(exc)) from None
    if change.changed:
        click.echo(
            f"the patient row of study {study_uid} now shows its instance {change.instance_pk}"
        )
    else:
        click.echo(f"the patient row of study {study_uid} already shows its patient")


@cli.command()
@click.argument("peer_name", metavar="PEER")
@click.pass_obj
def echo(app: AppContext, peer_name: str) -> None:
    """Send a C-ECHO to a configured peer."""
    from dicom_node.scu import ScuError
    from dicom_node.scu import echo as send_echo

    peer = app.peer(peer_name)
    _quiet_pynetdicom()
    try:
        code = send_echo(app.settings.node, peer)
    except ScuError as exc:
        raise CliError(str(exc)) from None
    if code != 0:
        raise CliError(f"C-ECHO to {peer.name} answered status 0x{code:04X}")
    click.echo(f"C-ECHO to {peer.name} ({peer.ae_title}@{peer.host}:{peer.port}): success")


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--to", "peer_name", required=True, metavar="PEER", help="Configured peer name.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a tty).")
@click.pass_obj
def send(app: AppContext, paths: tuple[Path, ...], peer_name: str, progress: bool | None) -> None:
    """Send DICOM files (or directories of them) to a configured peer."""
    from tqdm import tqdm

    from dicom_node.scu import ScuError, expand_paths, send_files

    peer = app.peer(peer_name)
    _quiet_pynetdicom()
    files = expand_paths(paths)
    if not files:
        raise CliError("no files to send")
    show = sys.stderr.isatty() if progress is None else progress
    bar: Any = tqdm(total=len(files), unit="inst", disable=not show, file=sys.stderr)
    try:
        report = send_files(app.settings.node, peer, files, lambda _p, _s: bar.update(1))
    except ScuError as exc:
        raise CliError(str(exc)) from None
    finally:
        bar.close()
    for path, reason in report.skipped:
        click.echo(f"skipped {path}: {reason}", err=True)
    for path, reason in report.failed:
        click.echo(f"failed {path}: {reason}", err=True)
    click.echo(
        f"sent {report.sent} of {len(files)} file(s) to {peer.name} "
        f"({report.bytes_sent / 1e6:.1f} MB), {len(report.failed)} failed, "
        f"{len(report.skipped)} skipped"
    )
    if report.failed or report.skipped:
        sys.exit(1)


register_consent_commands(cli)
register_router_commands(cli)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="consentgate")


if __name__ == "__main__":
    main()
