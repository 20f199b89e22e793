"""``consentgate purpose | patient | consent | audit``: the consent store from the CLI.

Every error of the consent store (:class:`consent.errors.ConsentError`) and every database
failure ends as one line on stderr and exit code 1. Changes are made in the name of
``--by NAME`` or, by default, of the operating-system user.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cli.router_commands import ROW_ID, actor_name, open_runtime, restore_retracted
from consent.errors import ConsentError
from consent.identity import parse_iso_date

if TYPE_CHECKING:
    from consent.service import ConsentStore

_CHANNELS = ("desk", "remote", "paper", "cli", "api")


def _cli_error(message: str) -> click.ClickException:
    from cli.main import CliError

    return CliError(message)


@contextmanager
def _store(ctx: click.Context) -> Iterator[ConsentStore]:
    """A :class:`ConsentStore` on the configured database; errors become one line."""
    with open_runtime(ctx) as runtime:
        yield runtime.consent


def _patient_pk(store: ConsentStore, issuer: str, patient_id: str) -> int:
    pk = store.find_patient(issuer, patient_id)
    if pk is None:
        raise ConsentError(f"unknown patient {issuer}/{patient_id}")
    return pk


def _audit_read(store: ConsentStore, by: str | None, action: str, patients: list[int]) -> None:
    """Trace a person's read of patient data before it is shown (no entry, no read):
    who, what, whose (consent-store primary keys)."""
    store.audit(
        actor=actor_name(by),
        action=action,
        target="patients",
        details={"patients": patients[:200], "count": len(patients)},
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _cli_error(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise _cli_error(f"{path}: cannot read ({exc.strerror})") from None


_by_option = click.option(
    "--by", "by", metavar="NAME", default=None, help="Who makes the change (default: OS user)."
)
_patient_options = [
    click.option("--issuer", required=True, help="Issuer of the patient id (IPP domain)."),
    click.option("--patient-id", required=True, help="Patient id (IPP) within the issuer."),
]


def _with_patient(func: Any) -> Any:
    for option in reversed(_patient_options):
        func = option(func)
    return func


# ---------------------------------------------------------------------- purpose


@click.group()
def purpose() -> None:
    """Purposes ("traitements") and their notices."""


@purpose.command("add")
@click.argument("code")
@click.option("--name", required=True, help="Human-readable name.")
@click.option("--reference", default="", help="Register reference of the processing.")
@click.option(
    "--model",
    type=click.Choice(["opt-in", "opt-out"]),
    default="opt-in",
    show_default=True,
    help="opt-in: consent needed; opt-out: shared unless the patient objects.",
)
@click.option(
    "--notice",
    "notice_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="UTF-8 file with the text of notice version 1.",
)
@_by_option
@click.pass_context
def purpose_add(
    ctx: click.Context,
    code: str,
    name: str,
    reference: str,
    model: str,
    notice_file: Path | None,
    by: str | None,
) -> None:
    """Create the purpose CODE."""
    notice = _read_text(notice_file) if notice_file is not None else None
    with _store(ctx) as store:
        info = store.add_purpose(
            code, name, reference=reference, model=model, notice_text=notice, actor=actor_name(by)
        )
    suffix = (
        f", notice v{info.notice_version} sha256 {info.notice_sha256}"
        if info.notice_version
        else ", no notice yet"
    )
    click.echo(f"purpose {info.code} added ({info.model}{suffix})")


@purpose.command("list")
@click.pass_context
def purpose_list(ctx: click.Context) -> None:
    """List purposes with their model and latest notice version."""
    with _store(ctx) as store:
        purposes = store.list_purposes()
    click.echo(f"{'CODE':24} {'MODEL':8} {'NOTICE':6} NAME")
    for info in purposes:
        version = f"v{info.notice_version}" if info.notice_version else "-"
        click.echo(f"{info.code:24} {info.model:8} {version:6} {info.name}")
    click.echo(f"{len(purposes)} purpose(s)")


@purpose.command("notice")
@click.argument("code")
@click.option(
    "--file",
    "notice_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="UTF-8 file with the new notice text (stored exactly).",
)
@_by_option
@click.pass_context
def purpose_notice(ctx: click.Context, code: str, notice_file: Path, by: str | None) -> None:
    """Add a new version of the notice of purpose CODE."""
    text = _read_text(notice_file)
    with _store(ctx) as store:
        version = store.add_notice(code, text, actor=actor_name(by))
        info = store.notice(code, version)
    click.echo(f"purpose {code}: notice v{version} sha256 {info.sha256}")


# ---------------------------------------------------------------------- patient


@click.group()
def patient() -> None:
    """Patients and their identifiers."""


@patient.command("add")
@_with_patient
@click.option("--birth-name", required=True, help="Nom de naissance.")
@click.option("--first-name", required=True, help="First birth given name.")
@click.option("--first-names", default=None, help="All birth given names, space-separated.")
@click.option("--birth-date", required=True, metavar="YYYY-MM-DD")
@click.option("--sex", required=True, type=click.Choice(["F", "M", "U"], case_sensitive=False))
@click.option("--usage-name", default=None, help="Nom d'usage.")
@click.option("--email", default=None)
@click.option("--phone", default=None)
@click.option("--ins", default=None, metavar="MATRICULE", help="Matricule INS (15 characters).")
@click.option("--ins-oid", default="1.2.250.1.213.1.4.8", show_default=True, help="OID of the INS.")
@click.option(
    "--identity-status",
    type=click.Choice(["PROV", "RECUP", "VALI", "QUAL"], case_sensitive=False),
    default="PROV",
    show_default=True,
)
@click.option("--birthplace", "birthplace_code", default=None, help="INSEE code of birthplace.")
@click.option("--establishment", default=None)
@click.option(
    "--allow-test-ins", is_flag=True, help="Accept test/demo INS OIDs (not for production)."
)
@_by_option
@click.pass_context
def patient_add(
    ctx: click.Context,
    issuer: str,
    patient_id: str,
    birth_name: str,
    first_name: str,
    first_names: str | None,
    birth_date: str,
    sex: str,
    usage_name: str | None,
    email: str | None,
    phone: str | None,
    ins: str | None,
    ins_oid: str,
    identity_status: str,
    birthplace_code: str | None,
    establishment: str | None,
    allow_test_ins: bool,
    by: str | None,
) -> None:
    """Register a patient."""
    with _store(ctx) as store:
        pk = store.add_patient(
            issuer=issuer,
            patient_id=patient_id,
            birth_name=birth_name,
            first_name=first_name,
            first_names=first_names.split() if first_names else None,
            birth_date=parse_iso_date(birth_date),
            sex=sex.upper(),
            usage_name=usage_name,
            email=email,
            phone=phone,
            ins=ins,
            ins_oid=ins_oid,
            identity_status=identity_status.upper(),
            birthplace_code=birthplace_code,
            establishment=establishment,
            allow_test_ins=allow_test_ins,
            actor=actor_name(by),
        )
    click.echo(f"patient {issuer}/{patient_id} added (#{pk})")


@patient.command("import")
@click.argument("csv_file", metavar="FILE.csv", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--allow-test-ins", is_flag=True, help="Accept test/demo INS OIDs (not for production)."
)
@_by_option
@click.pass_context
def patient_import(
    ctx: click.Context, csv_file: Path, allow_test_ins: bool, by: str | None
) -> None:
    """Import patients from FILE.csv, all or nothing.

    \b
    UTF-8, header line, comma or semicolon separated. Columns (any order):
      required: issuer, patient_id, birth_name, first_name, birth_date (YYYY-MM-DD),
                sex (F/M/U)
      optional: first_names (space-separated), usage_name, email, phone, ins,
                ins_oid (default 1.2.250.1.213.1.4.8), identity_status (PROV/RECUP/VALI/QUAL),
                birthplace_code, establishment, postal_address
    Any bad line, or a patient that already exists, and nothing is imported.
    """
    with _store(ctx) as store:
        report = store.import_patients_csv(
            csv_file, actor=actor_name(by), allow_test_ins=allow_test_ins
        )
    if not report.ok:
        shown = "; ".join(str(p) for p in report.problems[:3])
        more = len(report.problems) - 3
        extra = f" (+{more} more problem(s))" if more > 0 else ""
        raise _cli_error(f"{csv_file.name}: nothing imported: {shown}{extra}")
    click.echo(f"imported {report.imported} patient(s) from {csv_file.name}")


@patient.command("show")
@_with_patient
@_by_option
@click.pass_context
def patient_show(ctx: click.Context, issuer: str, patient_id: str, by: str | None) -> None:
    """Show a patient's identity, identifiers and consents (audited)."""
    with _store(ctx) as store:
        pk = _patient_pk(store, issuer, patient_id)
        _audit_read(store, by, "patient.show", [pk])
        info = store.show_patient(pk)
        decisions = store.current(issuer, patient_id)
    for key in (
        "pk",
        "identity_status",
        "birth_name",
        "usage_name",
        "first_name",
        "first_names",
        "birth_date",
        "sex",
        "birthplace_code",
        "email",
        "phone",
        "establishment",
        "created_at",
    ):
        value = info[key]
        if isinstance(value, list):
            value = " ".join(value)
        click.echo(f"{key}: {'' if value is None else value}")
    for ident in info["identifiers"]:
        click.echo(f"identifier: {ident['kind']} {ident['system']} {ident['value']}")
    for code, decision in decisions.items():
        click.echo(f"consent: {code} {decision.outcome.value} ({decision.reason})")


@patient.command("find")
@click.argument("text")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@_by_option
@click.pass_context
def patient_find(ctx: click.Context, text: str, limit: int, by: str | None) -> None:
    """Find patients by name words (accents and case ignored) or exact identifier
    (audited: the patients listed)."""
    with _store(ctx) as store:
        found = store.search_patients(text, limit=limit)
        _audit_read(store, by, "patient.find", [int(p["pk"]) for p in found])
    for p in found:
        ipp = next((i for i in p["identifiers"] if i["kind"] == "IPP"), None)
        ident = f"{ipp['system']}/{ipp['value']}" if ipp else "-"
        usage = f" ({p['usage_name']})" if p["usage_name"] else ""
        click.echo(
            f"{ident:30} {p['birth_name']}{usage} {p['first_name']} "
            f"{p['birth_date']} {p['sex']} {p['identity_status']}"
        )
    click.echo(f"{len(found)} patient(s)")


# ---------------------------------------------------------------------- consent


@click.group()
def consent() -> None:
    """Record and inspect consent decisions."""


def _decision_command(name: str, help_text: str) -> click.Command:
    @click.pass_context
    def command(
        ctx: click.Context,
        issuer: str,
        patient_id: str,
        purpose_code: str,
        channel: str,
        by: str | None,
        representative: str | None,
        evidence: str | None,
        notice_version: int | None,
    ) -> None:
        common: dict[str, Any] = {
            "issuer": issuer,
            "patient_id": patient_id,
            "purpose": purpose_code,
            "channel": channel,
            "actor": actor_name(by),
            "performed_by": "representative" if representative else "patient",
            "representative_name": representative,
            "evidence": evidence,
        }
        with _store(ctx) as store:
            if name == "withdraw":
                if notice_version is not None:
                    raise _cli_error("--notice-version does not apply to a withdrawal")
                event_id = store.withdraw(**common)
            elif name == "grant":
                event_id = store.grant(**common, notice_version=notice_version)
            else:
                event_id = store.refuse(**common, notice_version=notice_version)
            pk = store.find_patient(issuer, patient_id)
            decision = store.decide(pk, purpose_code)
        click.echo(
            f"{name} recorded for {issuer}/{patient_id}, purpose {purpose_code} "
            f"(event {event_id}): now {decision.outcome.value}"
        )

    params: list[click.Parameter] = [
        click.Option(["--issuer"], required=True, help="Issuer of the patient id."),
        click.Option(["--patient-id"], required=True, help="Patient id (IPP)."),
        click.Option(["--purpose", "purpose_code"], required=True, help="Purpose code."),
        click.Option(
            ["--channel"],
            type=click.Choice(_CHANNELS),
            default="cli",
            show_default=True,
            help="How the decision was collected.",
        ),
        click.Option(
            ["--by"], default=None, metavar="NAME", help="Who records it (default: OS user)."
        ),
        click.Option(
            ["--representative"],
            default=None,
            metavar="NAME",
            help="Decision made by this representative, not the patient.",
        ),
        click.Option(["--evidence"], default=None, help="Proof (form reference, ...)."),
        click.Option(
            ["--notice-version"],
            type=ROW_ID,
            default=None,
            help="Notice version shown (default: latest).",
        ),
    ]
    return click.Command(name, callback=command, params=params, help=help_text)


consent.add_command(_decision_command("grant", "Record the patient's consent (permit)."))
consent.add_command(_decision_command("refuse", "Record the patient's refusal (deny)."))
consent.add_command(
    _decision_command("withdraw", "Record the withdrawal of a consent given earlier.")
)


@consent.command("show")
@_with_patient
@_by_option
@click.pass_context
def consent_show(ctx: click.Context, issuer: str, patient_id: str, by: str | None) -> None:
    """Show the current decision of a patient for every purpose (audited)."""
    with _store(ctx) as store:
        _audit_read(store, by, "consent.show", [_patient_pk(store, issuer, patient_id)])
        decisions = store.current(issuer, patient_id)
    click.echo(f"{'PURPOSE':24} {'OUTCOME':9} REASON")
    for code, decision in decisions.items():
        click.echo(f"{code:24} {decision.outcome.value:9} {decision.reason}")


@consent.command("history")
@_with_patient
@click.option("--purpose", "purpose_code", default=None, help="Only this purpose.")
@_by_option
@click.pass_context
def consent_history(
    ctx: click.Context, issuer: str, patient_id: str, purpose_code: str | None, by: str | None
) -> None:
    """Show the consent log of a patient, oldest first (audited)."""
    with _store(ctx) as store:
        _audit_read(store, by, "consent.history", [_patient_pk(store, issuer, patient_id)])
        entries = store.history(issuer, patient_id, purpose_code)
    click.echo(
        f"{'EVENT':>6} {'RECORDED AT (UTC)':27} {'PURPOSE':20} {'ACTION':16} {'STATUS':16} "
        f"{'CHANNEL':7} {'NOTICE':6} BY"
    )
    for e in entries:
        notice = f"v{e['notice_version']}" if e["notice_version"] else "-"
        by = e["recorded_by"]
        if e["representative_name"]:
            by += f" (for: {e['representative_name']})"
        click.echo(
            f"{e['id']:>6} {e['recorded_at']:27} {e['purpose'][:20]:20} {e['action']:16} "
            f"{e['effective_status']:16} {e['channel']:7} {notice:6} {by}"
        )
    click.echo(f"{len(entries)} event(s)")


@consent.command("export-fhir")
@_with_patient
@click.option(
    "--output",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="Write to this file instead of stdout.",
)
@_by_option
@click.pass_context
def consent_export_fhir(
    ctx: click.Context, issuer: str, patient_id: str, output: Path | None, by: str | None
) -> None:
    """Export a patient's consents as a FHIR R4 Bundle (collection) of Consent resources
    (audited)."""
    with _store(ctx) as store:
        _audit_read(store, by, "consent.export", [_patient_pk(store, issuer, patient_id)])
        resources = store.export_fhir(issuer, patient_id)
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": f"urn:consentgate:consent:{r['id']}", "resource": r} for r in resources
        ],
    }
    text = json.dumps(bundle, indent=2, ensure_ascii=False) + "\n"
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise _cli_error(f"{output}: cannot write ({exc.strerror})") from None
    click.echo(f"{len(resources)} Consent resource(s) written to {output}")


@consent.command("entered-in-error")
@click.argument("event_id", type=ROW_ID)
@click.option("--reason", required=True, help="Why the event was a mistake.")
@_by_option
@click.pass_context
def consent_entered_in_error(
    ctx: click.Context, event_id: int, reason: str, by: str | None
) -> None:
    """Mark consent event EVENT_ID as recorded by mistake (wrong patient, wrong purpose).

    When it was a refusal or withdrawal, the forward jobs it dropped are queued again
    (held, when the patient has not decided).
    """
    actor = actor_name(by)
    with open_runtime(ctx) as runtime:
        marker = runtime.consent.mark_entered_in_error(event_id, actor=actor, reason=reason)
        click.echo(f"event {event_id} marked entered-in-error (event {marker})")
        click.echo(restore_retracted(runtime, event_id, actor))


@consent.command("rebuild-state")
@_by_option
@click.pass_context
def consent_rebuild_state(ctx: click.Context, by: str | None) -> None:
    """Recompute the decision cache from the consent log (after 'audit verify' reported
    it edited, or after a restore). Audited."""
    actor = actor_name(by)
    with _store(ctx) as store:
        rows = store.rebuild_state(actor=actor)
    click.echo(f"decision cache rebuilt from the consent log: {rows} decision(s)")


# ---------------------------------------------------------------------- audit


@click.group()
def audit() -> None:
    """The tamper-evident audit log."""


@audit.command("verify")
@click.option(
    "--head",
    default=None,
    metavar="SEQ:HASH",
    help="A head printed by an earlier verify: it must still be in the chain.",
)
@click.pass_context
def audit_verify(ctx: click.Context, head: str | None) -> None:
    """Check the hash chain of the audit log; exit 1 at the first bad entry."""
    known: tuple[int, str] | None = None
    if head is not None:
        seq_text, _, digest = head.partition(":")
        if not seq_text.isdigit() or len(digest) != 64:
            raise _cli_error("--head must be SEQ:HASH as printed by 'audit verify'")
        known = (int(seq_text), digest.lower())
    with _store(ctx) as store:
        report = store.verify_audit(known_head=known)
    problems = report.record_problems
    if problems:
        click.echo(f"audit log intact ({report.entries} entries), but:")
        for problem in problems:
            click.echo(f"  {problem}")
        raise _cli_error(
            f"the consent records disagree with the audit log ({len(problems)} problem(s)"
            f"{', the first 20 listed' if len(problems) >= 20 else ''})"
        )
    if not report.ok:
        raise _cli_error(f"audit log damaged at entry {report.first_bad_seq}: {report.problem}")
    click.echo(f"audit log intact ({report.entries} entries); consent records agree with it")
    click.echo(f"head {report.head_seq}:{report.head_hash}")


def register_consent_commands(cli_group: click.Group) -> None:
    """Add the ``purpose``, ``patient``, ``consent`` and ``audit`` groups to ``cli_group``."""
    for group in (purpose, patient, consent, audit):
        cli_group.add_command(group)
