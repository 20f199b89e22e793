"""``consentgate route|queue|held`` commands: routes, the forward queue, held studies."""

from __future__ import annotations

import getpass
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from consent.decision import Outcome
from consent.errors import ConsentError
from dicom_node.archive.attributes import attributes_of
from dicom_node.archive.header import dataset_offset, scan_dataset
from dicom_node.archive.identity import PatientIdentity, load_identity
from dicom_node.archive.models import Instance, Patient, Series, Study
from dicom_node.errors import InvalidInstance
from router.consent_sync import Restore, restore_after_retraction
from router.decisions import failed
from router.facts import IDENTITY_KEYWORDS, patient_facts, route_attributes
from router.models import ForwardJob, HoldReason, JobState
from router.queue import CONSENT_DROP_PREFIX, JobsNotEligible

if TYPE_CHECKING:
    from cli.runtime import Runtime


def _error(message: str) -> click.ClickException:
    from cli.main import CliError

    return CliError(message)


@contextmanager
def open_runtime(ctx: click.Context) -> Iterator[Runtime]:
    """The process's services, closed afterwards; a consent-store or database error
    becomes one error line."""
    runtime: Runtime = ctx.obj.runtime()
    try:
        yield runtime
    except ConsentError as exc:
        raise _error(str(exc)) from None
    except SQLAlchemyError as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _error(f"database error: {text}") from None
    finally:
        runtime.close()


#: A row id given on the command line (job, event): a positive 64-bit integer, what the
#: databases hold (a larger number is a usage error, not a driver's overflow).
ROW_ID = click.IntRange(1, 2**63 - 1)


def actor_name(by: str | None) -> str:
    """Who runs a command, for the audit log: ``--by``, else the system user name."""
    if by and by.strip():
        return by.strip()
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        raise _error("cannot tell who you are: pass --by NAME") from None


# -- route ---------------------------------------------------------------------------


@click.group("route")
def route_group() -> None:
    """Routes from the configuration."""


@route_group.command("test")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--calling-ae", default="", help="Calling AE title to assume (default: none).")
@click.option("--peer", "peer_name", default=None, help="Assume the file came from this peer.")
@click.pass_context
def route_test(
    ctx: click.Context, files: tuple[Path, ...], calling_ae: str, peer_name: str | None
) -> None:
    """Show which routes match each FILE and what consent would decide (changes nothing)."""
    settings = ctx.obj.settings
    issuer = ""
    if peer_name is not None:
        peer = ctx.obj.peer(peer_name)
        calling_ae = calling_ae or peer.ae_title
        issuer = peer.issuer
    with open_runtime(ctx) as runtime:
        keywords = sorted(runtime.routes.keywords() | set(IDENTITY_KEYWORDS))
        if not settings.routes:
            click.echo("no routes are configured")
        for path in files:
            try:
                part10 = path.read_bytes()
                ds = dcmread(BytesIO(part10), stop_before_pixels=True, specific_tags=keywords)
                _check_as_the_node_would(part10, str(ds.file_meta.TransferSyntaxUID))
            except (InvalidDicomError, OSError, ValueError, AttributeError) as exc:
                raise _error(f"{path}: not a readable DICOM file ({type(exc).__name__})") from None
            except InvalidInstance as exc:
                raise _error(f"{path}: the node would refuse this file: {exc}") from None
            read = attributes_of(ds, keywords)
            attributes = route_attributes(read, runtime.routes.keywords())
            facts = patient_facts(read, issuer)
            plan = runtime.planner.plan(attributes, calling_ae, facts)
            click.echo(f"{path}:")
            if not plan.jobs:
                click.echo("  no route matches")
                continue
            if plan.resolution is not None:
                res = plan.resolution
                click.echo(f"  patient: {res.status}" + (f" ({res.reason})" if res.reason else ""))
            for job in plan.jobs:
                what = job.state.value + (f" ({job.hold_reason})" if job.hold_reason else "")
                purpose = job.purpose or "none (care team)"
                note = f": {job.note}" if job.note else ""
                click.echo(
                    f"  route {job.route} -> {job.destination}, purpose {purpose}: {what}{note}"
                )


def _check_as_the_node_would(part10: bytes, transfer_syntax_uid: str) -> None:
    """The checks the node makes of a received data set (complete, well-formed, required
    UIDs present): ``route test`` answers only for a file the node would store.

    Raises
    ------
    InvalidInstance
        The node would refuse it.
    ValueError
        Not a Part 10 file.
    """
    dataset = memoryview(part10)[dataset_offset(part10) :]
    scanned = scan_dataset(dataset, transfer_syntax_uid, frozenset())
    if scanned.fast is not None:
        uids = (scanned.fast[0].sop_class_uid, scanned.fast[0].sop_instance_uid)
    else:  # an encoding the fast reader leaves to pydicom
        full = dcmread(BytesIO(part10), stop_before_pixels=True)
        uids = (str(full.get("SOPClassUID", "")), str(full.get("SOPInstanceUID", "")))
    if not all(uids):
        raise InvalidInstance("SOP Class or SOP Instance UID missing")


# -- queue ---------------------------------------------------------------------------


@click.group("queue")
def queue_group() -> None:
    """The durable forward queue."""


@queue_group.command("stats")
@click.pass_context
def queue_stats(ctx: click.Context) -> None:
    """Job counts per destination and state."""
    with open_runtime(ctx) as runtime:
        stats = runtime.queue.stats()
    if not stats:
        click.echo("queue is empty")
        return
    states = [s.value for s in JobState]
    destinations = sorted({d for d, _ in stats})
    click.echo(f"{'DESTINATION':20} " + " ".join(f"{s:>8}" for s in states))
    for dest in destinations:
        click.echo(f"{dest[:20]:20} " + " ".join(f"{stats.get((dest, s), 0):>8}" for s in states))


@queue_group.command("list")
@click.option("--state", type=click.Choice([s.value for s in JobState]), default=None)
@click.option("--destination", default=None)
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100000))
@click.pass_context
def queue_list(ctx: click.Context, state: str | None, destination: str | None, limit: int) -> None:
    """Jobs, newest first."""
    with open_runtime(ctx) as runtime:
        jobs = runtime.queue.list_jobs(state=state, destination=destination, limit=limit)
    click.echo(f"{'ID':>8} {'STATE':8} {'DESTINATION':16} {'PURPOSE':16} {'TRIES':>5}  NOTE")
    for job in jobs:
        note = job.hold_reason + (": " if job.hold_reason and job.last_error else "")
        note += job.last_error
        click.echo(
            f"{job.id:>8} {job.state:8} {job.destination[:16]:16} {(job.purpose or '-')[:16]:16} "
            f"{job.attempts:>5}  {note}"
        )
    click.echo(f"{len(jobs)} job(s)")


@queue_group.command("retry")
@click.argument("job_ids", nargs=-1, type=ROW_ID)
@click.option("--all-failed", is_flag=True, help="Retry every failed job.")
@click.option("--by", default=None, metavar="NAME")
@click.pass_context
def queue_retry(
    ctx: click.Context, job_ids: tuple[int, ...], all_failed: bool, by: str | None
) -> None:
    """Put failed (dead-letter) jobs back in the queue."""
    if not job_ids and not all_failed:
        raise _error("name the job ids to retry, or pass --all-failed")
    actor = actor_name(by)
    with open_runtime(ctx) as runtime:
        try:
            count = runtime.queue.retry_jobs(None if all_failed else list(job_ids))
        except JobsNotEligible as exc:
            raise _error(
                f"nothing queued again: job(s) {exc} are unknown or not failed (only failed "
                "jobs can be retried)"
            ) from None
        if count or all_failed:
            runtime.consent.audit(
                actor=actor,
                action="queue.retry",
                target="router_job",
                details={"jobs": list(job_ids) or "all-failed", "count": count},
            )
    click.echo(f"{count} job(s) queued again")


@queue_group.command("drop")
@click.argument("job_ids", nargs=-1, type=ROW_ID, required=True)
@click.option("--reason", required=True, help="Why (kept with the job and in the audit log).")
@click.option("--by", default=None, metavar="NAME")
@click.pass_context
def queue_drop(ctx: click.Context, job_ids: tuple[int, ...], reason: str, by: str | None) -> None:
    """Drop open or failed jobs: they will never be sent."""
    actor = actor_name(by)
    with open_runtime(ctx) as runtime:
        try:
            count = runtime.queue.drop_jobs(list(job_ids), f"dropped by {actor}: {reason}")
        except JobsNotEligible as exc:
            raise _error(
                f"nothing dropped: job(s) {exc} are unknown, sent or already dropped"
            ) from None
        if count:
            runtime.consent.audit(
                actor=actor,
                action="queue.drop",
                target="router_job",
                details={"jobs": list(job_ids), "count": count, "reason": reason},
            )
    click.echo(f"{count} job(s) dropped")


@queue_group.command("restore")
@click.argument("event_id", type=ROW_ID)
@click.option("--by", default=None, metavar="NAME")
@click.pass_context
def queue_restore(ctx: click.Context, event_id: int, by: str | None) -> None:
    """Queue again the jobs dropped by refusal EVENT_ID, marked entered-in-error.

    'consent entered-in-error' does this itself; run it when that step failed.
    """
    actor = actor_name(by)
    with open_runtime(ctx) as runtime:
        message = restore_retracted(runtime, event_id, actor)
    click.echo(message)


def restore_retracted(runtime: Runtime, event_id: int, actor: str) -> str:
    """Restore the jobs a retracted refusal dropped (see
    :func:`router.consent_sync.restore_after_retraction`); audited; returns the line to
    print. Raises a CLI error when the event is not a retracted decision or the consent
    decision fails."""
    window = runtime.consent.retracted_window(event_id)
    if window is None:
        raise _error(f"event {event_id} is not a consent decision marked entered-in-error")
    outcome, count = restore_after_retraction(runtime.queue, runtime.consent.decide, window)
    if outcome is Restore.DECISION_FAILED:
        raise _error(
            "the consent decision failed (database error): no job restored; run "
            f"'consentgate queue restore {event_id}' again"
        )
    if outcome is Restore.NOT_A_REFUSAL:
        return "the retracted decision was a permit: no job to restore"
    if outcome is Restore.REFUSED_BEFORE:
        return (
            f"the decision before the retracted refusal was a refusal for {window.purpose} "
            "too: the jobs stay dropped"
        )
    if outcome is Restore.STILL_REFUSED:
        return (
            f"the patient's consent for {window.purpose} is still refused: the jobs the "
            "retracted refusal dropped stay dropped"
        )
    if count:
        runtime.consent.audit(
            actor=actor,
            action="queue.restore",
            target=f"event:{event_id}",
            details={"patient": window.patient_pk, "purpose": window.purpose, "count": count},
        )
    if outcome is Restore.HELD:
        return (
            f"{count} job(s) dropped by the retracted refusal held again: the patient has "
            f"not decided for {window.purpose}"
        )
    return f"{count} job(s) dropped by the retracted refusal queued again"


# -- held ----------------------------------------------------------------------------


@click.group("held")
def held_group() -> None:
    """Studies held for identity reconciliation."""


@held_group.command("list")
@click.pass_context
def held_list(ctx: click.Context) -> None:
    """Studies whose jobs wait for the patient to be reconciled."""
    with open_runtime(ctx) as runtime, runtime.sessions() as session:
        rows = session.execute(
            select(
                Study.study_instance_uid,
                Patient.issuer,
                Patient.patient_id,
                func.count(ForwardJob.id),
                func.max(ForwardJob.last_error),
            )
            .join(Instance, Instance.id == ForwardJob.instance_pk)
            .join(Series, Series.id == Instance.series_pk)
            .join(Study, Study.id == Series.study_pk)
            .join(Patient, Patient.id == Study.patient_pk)
            .where(
                ForwardJob.state == JobState.HELD.value,
                ForwardJob.hold_reason == HoldReason.RECONCILIATION.value,
            )
            .group_by(Study.study_instance_uid, Patient.issuer, Patient.patient_id)
            .order_by(Study.study_instance_uid)
        ).all()
    if not rows:
        click.echo("no study is held for reconciliation")
        return
    for study_uid, issuer, patient_id, count, reason in rows:
        click.echo(f"{study_uid}  {issuer or '-'}/{patient_id}  {count} job(s)  {reason}")


@held_group.command("resolve")
@click.argument("study_uid")
@click.option("--issuer", default=None, help="Link to the consent-store patient with this IPP.")
@click.option("--patient-id", default=None)
@click.option("--reject", is_flag=True, help="Never forward this study's held jobs.")
@click.option("--by", default=None, metavar="NAME")
@click.pass_context
def held_resolve(
    ctx: click.Context,
    study_uid: str,
    issuer: str | None,
    patient_id: str | None,
    reject: bool,
    by: str | None,
) -> None:
    """Link a held study to a patient (then consent decides), or reject it."""
    if reject == (issuer is not None or patient_id is not None):
        raise _error("pass either --issuer and --patient-id, or --reject")
    if not reject and (issuer is None or patient_id is None):
        raise _error("pass both --issuer and --patient-id")
    actor = actor_name(by)
    with open_runtime(ctx) as runtime:
        result = _resolve_held(runtime, study_uid, issuer, patient_id, reject, actor)
    click.echo(result)


def _people_named(instances: Iterable[tuple[str | None, str, str]]) -> int:
    """How many different people held instances name, from ``(stored identity, row
    issuer, row Patient ID)``.

    Two instances name the same person when their stored identities are equal: issuer
    and Patient ID, but also birth date, sex and INS (two people under one Patient ID
    differ there). An instance indexed before identities were kept counts by the archive
    row's issuer and Patient ID; an unstorable identity counts as a person of its own,
    so that it never joins a link with others.
    """
    pairs: set[tuple[str, str]] = set()
    identities: set[PatientIdentity] = set()
    for index, (text, row_issuer, row_patient_id) in enumerate(instances):
        if text is None:
            pairs.add((row_issuer, row_patient_id))
            continue
        try:
            identity = load_identity(text)
        except ValueError:
            pairs.add(("", f"unstorable-{index}"))
            continue
        pairs.add((identity.issuer, identity.patient_id))
        identities.add(identity)
    return max(len(pairs), len(identities))


def _resolve_held(
    runtime: Runtime,
    study_uid: str,
    issuer: str | None,
    patient_id: str | None,
    reject: bool,
    actor: str,
) -> str:
    with runtime.sessions() as session:
        job_rows = session.execute(
            select(
                ForwardJob.id,
                ForwardJob.purpose,
                Instance.identity,
                Patient.issuer,
                Patient.patient_id,
            )
            .join(Instance, Instance.id == ForwardJob.instance_pk)
            .join(Series, Series.id == Instance.series_pk)
            .join(Study, Study.id == Series.study_pk)
            .join(Patient, Patient.id == Study.patient_pk)
            .where(
                Study.study_instance_uid == study_uid,
                ForwardJob.state == JobState.HELD.value,
                ForwardJob.hold_reason == HoldReason.RECONCILIATION.value,
            )
        ).all()
    if not job_rows:
        raise _error(f"study {study_uid} has no job held for reconciliation")
    ids_by_purpose: dict[str, list[int]] = {}
    for job_id, purpose, *_ in job_rows:
        ids_by_purpose.setdefault(purpose, []).append(job_id)
    details: dict[str, Any] = {"study": study_uid, "jobs": len(job_rows)}
    if reject:
        try:
            count = runtime.queue.drop_jobs([row[0] for row in job_rows], f"rejected by {actor}")
        except JobsNotEligible:
            raise _error(
                f"the held jobs of study {study_uid} changed meanwhile: nothing rejected, "
                "run the command again"
            ) from None
        details["result"] = "rejected"
        runtime.consent.audit(actor=actor, action="held.reject", target=study_uid, details=details)
        return f"{count} job(s) of study {study_uid} dropped"
    assert issuer is not None and patient_id is not None
    people = _people_named((row[2], row[3], row[4]) for row in job_rows)
    if people != 1:
        # a study UID reused across patients, or two people under one Patient ID (other
        # birth date, sex or INS): one link would give all of them one patient
        raise _error(
            f"study {study_uid} holds instances naming {people} different patients "
            "(Patient ID, birth date, sex or INS differ): it cannot be linked to one "
            "patient as a whole; reject it (--reject) and have the sender correct and "
            "resend the instances"
        )
    patient_pk = runtime.consent.find_patient(issuer, patient_id)
    if patient_pk is None:
        raise _error(f"no patient {patient_id} with issuer {issuer} in the consent store")
    summary = []
    for purpose, ids in ids_by_purpose.items():
        decision = runtime.consent.decide(patient_pk, purpose)
        note = f"reconciled by {actor}"
        if decision.outcome is Outcome.PERMIT:
            state, hold = JobState.READY, ""
        elif decision.outcome is Outcome.DENY and not failed(decision):
            state, hold = JobState.DROPPED, ""
            note = f"{CONSENT_DROP_PREFIX}: {decision.reason} ({note})"
        else:  # undecided, or the decision failed: held, decided again by the sweep
            state, hold = JobState.HELD, HoldReason.CONSENT.value
        runtime.queue.relink(ids, patient_pk, state, hold, note)
        summary.append(f"{len(ids)} job(s) for {purpose}: {state.value}")
    details.update({"patient_pk": patient_pk, "result": "linked"})
    runtime.consent.audit(actor=actor, action="held.link", target=study_uid, details=details)
    return f"study {study_uid} linked: " + "; ".join(summary)


def register_router_commands(cli: click.Group) -> None:
    """Add the route, queue and held groups to the ``consentgate`` command."""
    cli.add_command(route_group)
    cli.add_command(queue_group)
    cli.add_command(held_group)
