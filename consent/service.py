"""The consent store: patients, purposes and notices, the consent log, decisions, audit.

:class:`ConsentStore` is the one entry point; it is built once per process from the
process's sessionmaker and handed to whoever needs it (router, DICOM handlers, web, CLI).

Writes
    Each change is one transaction that first takes the store's write lock
    (:func:`consent.audit.lock_for_write`), then writes its rows and one audit entry. So
    writers are serialised on SQLite and PostgreSQL alike, and consent event ids grow in
    commit order (what :meth:`ConsentStore.changes_since` relies on).

The consent log
    ``consent_event`` is append-only: nothing is updated in place or deleted. A withdrawal
    is a new ``deny`` event (action ``withdraw``) superseding the ``permit``; a decision
    recorded by mistake is retracted by a new row with status ``entered-in-error`` naming
    it (see :class:`consent.models.ConsentEvent`). ``consent_state`` caches the current
    decision per patient and purpose, written in the same transaction as each event and
    rebuildable from the log with :meth:`ConsentStore.rebuild_state`.

Decisions
    :meth:`ConsentStore.decide` fails closed. Unknown patient: ``UNDECIDED`` (hold). Unknown
    purpose: ``DENY``. No event: ``UNDECIDED`` for an opt-in purpose, ``PERMIT``
    (non-opposition) for an opt-out one. Any error: ``DENY``. Only the purpose code → primary
    key mapping is cached (a purpose is never deleted nor changes model); consent state is
    read from the database on every call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Engine, delete, func, insert, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from config.db import reading
from consent.audit import AuditReport, append_audit, lock_for_write, verify_audit
from consent.decision import ConsentChange, Decision, Outcome, Resolution, StateReader
from consent.errors import (
    DuplicatePatient,
    DuplicatePurpose,
    InvalidRequest,
    InvalidTransition,
    UnknownEvent,
    UnknownPatient,
    UnknownPurpose,
)
from consent.fhir import consent_resource, fhir_datetime
from consent.identity import INS_NIR_OID, parse_dicom_date, search_key
from consent.models import (
    CHANNELS,
    DECISIONS,
    PERFORMERS,
    PURPOSE_MODELS,
    ConsentEvent,
    ConsentState,
    NoticeVersion,
    Patient,
    PatientIdentifier,
    Purpose,
)
from consent.patients_csv import (
    ImportProblem,
    ImportReport,
    PatientInput,
    parse_patients_csv,
    validate_patient,
)

LOG = logging.getLogger("consentgate.consent")

_PURPOSE_CODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_INS_KINDS = ("INS-NIR", "INS-NIA")
_CHUNK = 500

UNKNOWN_PATIENT = Decision(Outcome.UNDECIDED, "unknown patient")
UNKNOWN_PURPOSE = Decision(Outcome.DENY, "unknown purpose")
PERMITTED = Decision(Outcome.PERMIT, "consent given")
DENIED = Decision(Outcome.DENY, "consent refused or withdrawn")
NO_DECISION = Decision(Outcome.UNDECIDED, "no decision yet (opt-in purpose)")
NON_OPPOSITION = Decision(Outcome.PERMIT, "no opposition (opt-out purpose)")


def utc_now() -> datetime:
    """The default clock: the current time, timezone-aware UTC."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class PurposeInfo:
    """A purpose as returned by :meth:`ConsentStore.add_purpose` and ``list_purposes``.

    ``notice_version`` and ``notice_sha256`` describe the latest notice (``None`` when the
    purpose has none yet).
    """

    pk: int
    code: str
    name: str
    reference: str
    model: str
    created_at: datetime
    notice_version: int | None
    notice_sha256: str | None


@dataclass(frozen=True)
class NoticeInfo:
    """One version of a purpose's notice."""

    purpose_code: str
    version: int
    text: str
    sha256: str
    created_at: datetime


@dataclass(frozen=True)
class _PurposeKey:
    pk: int
    model: str


def _outcome(decision: str | None, model: str) -> Decision:
    if decision == "permit":
        return PERMITTED
    if decision == "deny":
        return DENIED
    return NON_OPPOSITION if model == "opt-out" else NO_DECISION


def _require_actor(actor: str) -> str:
    value = actor.strip()
    if not value or len(value) > 128:
        raise InvalidRequest("actor must be 1-128 characters")
    return value


def _evidence_text(evidence: str | Mapping[str, Any] | None) -> str | None:
    if evidence is None:
        return None
    if isinstance(evidence, str):
        return evidence
    return json.dumps(dict(evidence), sort_keys=True, ensure_ascii=False)


class ConsentStore:
    """Patients, purposes, the consent log and the decision function.

    Parameters
    ----------
    sessions : sessionmaker
        The process's sessionmaker (bound to its engine); each operation opens its own
        session.
    clock : callable, optional
        Returns the current time as an aware ``datetime`` (default: UTC now).
    allow_test_ins : bool
        Accept INS under the test/demo OIDs (1.2.250.1.213.1.4.10/11); off in production.

    Notes
    -----
    Thread-safe: no session is shared between calls. Listeners registered with
    :meth:`subscribe` belong to this instance and run in the thread that made the change,
    after its commit.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        clock: Callable[[], datetime] = utc_now,
        *,
        allow_test_ins: bool = False,
    ) -> None:
        bind = sessions.kw.get("bind")
        if not isinstance(bind, Engine):
            raise TypeError("ConsentStore needs a sessionmaker bound to an Engine")
        self._sessions = sessions
        self._read_sessions = reading(bind)
        self._engine = bind
        self._clock = clock
        self._allow_test_ins = allow_test_ins
        self._reader = StateReader(bind)
        self._purpose_keys: dict[str, _PurposeKey] = {}
        self._listeners: list[Callable[[ConsentChange], None]] = []
        self._listeners_lock = threading.Lock()

    # ------------------------------------------------------------------ plumbing

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("the clock must return timezone-aware datetimes")
        return now.astimezone(UTC)

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            lock_for_write(session)
            yield session

    def _audit(
        self,
        session: Session,
        actor: str,
        action: str,
        target: str,
        details: Mapping[str, Any] | None = None,
    ) -> int:
        return append_audit(
            session, at=self._now(), actor=actor, action=action, target=target, details=details
        )

    def _purpose_key(self, code: str) -> _PurposeKey | None:
        key = self._purpose_keys.get(code)
        if key is not None:
            return key
        with self._read_sessions() as session:
            row = session.execute(
                select(Purpose.id, Purpose.model).where(Purpose.code == code)
            ).first()
        if row is None:
            return None  # not cached: it may be added later, by any process
        key = _PurposeKey(row[0], row[1])
        self._purpose_keys[code] = key
        return key

    @staticmethod
    def _purpose_row(session: Session, code: str) -> Purpose:
        purpose = session.scalars(select(Purpose).where(Purpose.code == code)).first()
        if purpose is None:
            raise UnknownPurpose(f"unknown purpose '{code}'")
        return purpose

    @staticmethod
    def _patient_pk(session: Session, issuer: str, patient_id: str) -> int | None:
        return session.scalar(
            select(PatientIdentifier.patient_pk).where(
                PatientIdentifier.system == issuer.strip(),
                PatientIdentifier.value == patient_id.strip(),
                PatientIdentifier.kind == "IPP",
            )
        )

    def _require_patient(self, session: Session, issuer: str, patient_id: str) -> int:
        pk = self._patient_pk(session, issuer, patient_id)
        if pk is None:
            raise UnknownPatient(f"unknown patient {issuer.strip()}/{patient_id.strip()}")
        return pk

    @staticmethod
    def _latest_notice(session: Session, purpose_pk: int) -> NoticeVersion | None:
        return session.scalars(
            select(NoticeVersion)
            .where(NoticeVersion.purpose_pk == purpose_pk)
            .order_by(NoticeVersion.version.desc())
            .limit(1)
        ).first()

    def _notify(self, changes: Iterable[ConsentChange]) -> None:
        with self._listeners_lock:
            listeners = list(self._listeners)
        for change in changes:
            for listener in listeners:
                try:
                    listener(change)
                except Exception as exc:  # a listener must not undo a committed change
                    LOG.error("consent change listener failed: %s", type(exc).__name__)

    # ------------------------------------------------------------------ purposes

    def add_purpose(
        self,
        code: str,
        name: str,
        *,
        reference: str = "",
        model: str = "opt-in",
        notice_text: str | None = None,
        actor: str,
    ) -> PurposeInfo:
        """Create a purpose, optionally with its first notice version.

        Parameters
        ----------
        code : str
            Stable identifier: 1-64 of ``A-Z a-z 0-9 . _ -``.
        name : str
            Human-readable name.
        reference : str
            Legal or register reference of the processing ("traitement").
        model : {"opt-in", "opt-out"}
            ``opt-in``: nothing is shared before a permit. ``opt-out``: shared unless the
            patient objects (non-opposition).
        notice_text : str, optional
            The text of notice version 1, stored exactly as given.
        actor : str
            Who makes the change (audited).

        Returns
        -------
        PurposeInfo

        Raises
        ------
        InvalidRequest
            Malformed code, empty name, unknown model, empty notice.
        DuplicatePurpose
            The code exists.
        """
        actor = _require_actor(actor)
        if not _PURPOSE_CODE_RE.match(code):
            raise InvalidRequest("purpose code must be 1-64 characters among A-Z a-z 0-9 . _ -")
        name = " ".join(name.split())
        if not name or len(name) > 200:
            raise InvalidRequest("purpose name must be 1-200 characters")
        if model not in PURPOSE_MODELS:
            raise InvalidRequest("purpose model must be opt-in or opt-out")
        if len(reference) > 200:
            raise InvalidRequest("purpose reference is limited to 200 characters")
        if notice_text is not None and not notice_text.strip():
            raise InvalidRequest("notice text is empty")
        with self._write() as session:
            if session.scalar(select(Purpose.id).where(Purpose.code == code)) is not None:
                raise DuplicatePurpose(f"purpose '{code}' already exists")
            now = self._now()
            purpose = Purpose(
                code=code, name=name, reference=reference.strip(), model=model, created_at=now
            )
            session.add(purpose)
            session.flush()
            notice: NoticeVersion | None = None
            if notice_text is not None:
                notice = self._insert_notice(session, purpose.id, 1, notice_text, now)
            self._audit(
                session,
                actor,
                "purpose.add",
                f"purpose:{code}",
                {
                    "model": model,
                    "notice_version": notice.version if notice else None,
                    "notice_sha256": notice.sha256 if notice else None,
                },
            )
            info = self._purpose_info(purpose, notice)
        self._purpose_keys[code] = _PurposeKey(info.pk, info.model)
        return info

    @staticmethod
    def _insert_notice(
        session: Session, purpose_pk: int, version: int, text: str, now: datetime
    ) -> NoticeVersion:
        notice = NoticeVersion(
            purpose_pk=purpose_pk,
            version=version,
            text=text,
            sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
            created_at=now,
        )
        session.add(notice)
        session.flush()
        return notice

    @staticmethod
    def _purpose_info(purpose: Purpose, notice: NoticeVersion | None) -> PurposeInfo:
        return PurposeInfo(
            pk=purpose.id,
            code=purpose.code,
            name=purpose.name,
            reference=purpose.reference,
            model=purpose.model,
            created_at=purpose.created_at,
            notice_version=notice.version if notice else None,
            notice_sha256=notice.sha256 if notice else None,
        )

    def add_notice(self, code: str, text: str, *, actor: str) -> int:
        """Add a new version of a purpose's notice and return its version number.

        The text is stored exactly as given; its SHA-256 (UTF-8) identifies it in consent
        records and FHIR exports. Later permits refer to this version.

        Raises
        ------
        UnknownPurpose
        InvalidRequest
            The text is empty.
        """
        actor = _require_actor(actor)
        if not text.strip():
            raise InvalidRequest("notice text is empty")
        with self._write() as session:
            purpose = self._purpose_row(session, code)
            latest = self._latest_notice(session, purpose.id)
            version = (latest.version if latest else 0) + 1
            notice = self._insert_notice(session, purpose.id, version, text, self._now())
            self._audit(
                session,
                actor,
                "notice.add",
                f"purpose:{code}",
                {"notice_version": version, "notice_sha256": notice.sha256},
            )
        return version

    def notice(self, code: str, version: int | None = None) -> NoticeInfo:
        """A notice version of a purpose (the latest when ``version`` is ``None``).

        Raises
        ------
        UnknownPurpose
            No such purpose, or no such notice version.
        """
        with self._read_sessions() as session:
            purpose = self._purpose_row(session, code)
            if version is None:
                notice = self._latest_notice(session, purpose.id)
            else:
                notice = session.scalars(
                    select(NoticeVersion).where(
                        NoticeVersion.purpose_pk == purpose.id, NoticeVersion.version == version
                    )
                ).first()
            if notice is None:
                raise UnknownPurpose(f"purpose '{code}' has no notice version {version or ''}")
            return NoticeInfo(code, notice.version, notice.text, notice.sha256, notice.created_at)

    def list_purposes(self) -> list[PurposeInfo]:
        """Every purpose, by code, with its latest notice version."""
        with self._read_sessions() as session:
            latest = (
                select(NoticeVersion.purpose_pk, func.max(NoticeVersion.version).label("v"))
                .group_by(NoticeVersion.purpose_pk)
                .subquery()
            )
            rows = session.execute(
                select(Purpose, NoticeVersion)
                .outerjoin(latest, latest.c.purpose_pk == Purpose.id)
                .outerjoin(
                    NoticeVersion,
                    (NoticeVersion.purpose_pk == Purpose.id)
                    & (NoticeVersion.version == latest.c.v),
                )
                .order_by(Purpose.code)
            ).all()
            return [self._purpose_info(purpose, notice) for purpose, notice in rows]

    # ------------------------------------------------------------------ patients

    def add_patient(
        self,
        *,
        issuer: str,
        patient_id: str,
        birth_name: str,
        first_name: str,
        birth_date: date,
        sex: str,
        usage_name: str | None = None,
        email: str | None = None,
        phone: str | None = None,
        ins: str | None = None,
        ins_oid: str = INS_NIR_OID,
        identity_status: str = "PROV",
        establishment: str | None = None,
        first_names: Sequence[str] | None = None,
        birthplace_code: str | None = None,
        postal_address: str | None = None,
        allow_test_ins: bool = False,
        actor: str,
    ) -> int:
        """Register a patient with their IPP (and INS when known); return the patient pk.

        Parameters
        ----------
        issuer, patient_id : str
            The IPP and its issuer (the establishment's domain), stored as kind ``IPP``.
        birth_name, first_name, birth_date, sex : strict traits
            ``sex`` is F, M or U; ``first_name`` is the first birth given name.
        ins : str, optional
            Matricule INS (15 characters, key checked, cross-checked with sex and birth
            year), stored under ``ins_oid`` as ``INS-NIR`` (or ``INS-NIA`` for the NIA OID).
            It is used to match DICOM data only once ``identity_status`` is ``QUAL``.
        identity_status : {"PROV", "RECUP", "VALI", "QUAL"}
        first_names : sequence of str, optional
            All birth given names (default: ``[first_name]``).
        allow_test_ins : bool
            Accept the test/demo INS OIDs (also allowed store-wide by the constructor).
        actor : str
            Who makes the change (audited).

        Raises
        ------
        InvalidIdentity
            A malformed field, a bad INS key, a test/demo OID.
        DuplicatePatient
            The IPP or the INS already belongs to a patient.
        """
        actor = _require_actor(actor)
        patient = validate_patient(
            issuer=issuer,
            patient_id=patient_id,
            birth_name=birth_name,
            first_name=first_name,
            birth_date=birth_date,
            sex=sex,
            today=self._now().date(),
            first_names=list(first_names) if first_names is not None else None,
            usage_name=usage_name,
            email=email,
            phone=phone,
            ins=ins,
            ins_oid=ins_oid,
            identity_status=identity_status,
            birthplace_code=birthplace_code,
            establishment=establishment,
            postal_address=postal_address,
            allow_test_ins=allow_test_ins or self._allow_test_ins,
        )
        with self._write() as session:
            taken = self._taken_identifiers(session, [patient])
            if taken:
                raise DuplicatePatient(taken[0].message)
            (pk,) = self._insert_patients(session, [patient], self._now())
            self._audit(
                session,
                actor,
                "patient.add",
                f"patient:{pk}",
                {
                    "identity_status": patient.identity_status,
                    "identifiers": ["IPP"] + ([patient.ins_kind] if patient.ins_kind else []),
                },
            )
        return pk

    @staticmethod
    def _taken_identifiers(
        session: Session, patients: Sequence[PatientInput]
    ) -> list[ImportProblem]:
        wanted: dict[tuple[str, str], tuple[int, str]] = {}
        for p in patients:
            wanted[(p.issuer, p.patient_id)] = (
                p.line,
                f"patient {p.issuer}/{p.patient_id} already exists",
            )
            if p.ins is not None:
                wanted[(p.ins_oid, p.ins)] = (p.line, "this INS already belongs to a patient")
        keys = list(wanted)
        problems: list[ImportProblem] = []
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            rows = session.execute(
                select(PatientIdentifier.system, PatientIdentifier.value).where(
                    tuple_(PatientIdentifier.system, PatientIdentifier.value).in_(chunk)
                )
            ).all()
            for system, value in rows:
                line, message = wanted[(system, value)]
                problems.append(ImportProblem(line, message))
        return sorted(problems, key=lambda p: p.line)

    @staticmethod
    def _insert_patients(
        session: Session, patients: Sequence[PatientInput], now: datetime
    ) -> list[int]:
        rows = [
            Patient(
                identity_status=p.identity_status,
                birth_name=p.birth_name,
                first_names=" ".join(p.first_names),
                first_name=p.first_names[0],
                birth_date=p.birth_date,
                sex=p.sex,
                birthplace_code=p.birthplace_code,
                usage_name=p.usage_name,
                email=p.email,
                phone=p.phone,
                postal_address=p.postal_address,
                establishment=p.establishment,
                search_text=search_key(p.birth_name, p.usage_name, " ".join(p.first_names)),
                created_at=now,
            )
            for p in patients
        ]
        session.add_all(rows)
        session.flush()
        identifiers: list[PatientIdentifier] = []
        for row, p in zip(rows, patients, strict=True):
            identifiers.append(
                PatientIdentifier(
                    patient_pk=row.id, system=p.issuer, value=p.patient_id, kind="IPP"
                )
            )
            if p.ins is not None and p.ins_kind is not None:
                identifiers.append(
                    PatientIdentifier(
                        patient_pk=row.id, system=p.ins_oid, value=p.ins, kind=p.ins_kind
                    )
                )
        session.add_all(identifiers)
        session.flush()
        return [row.id for row in rows]

    def import_patients_csv(
        self, path_or_text: str | Path, *, actor: str, allow_test_ins: bool = False
    ) -> ImportReport:
        """Import patients from CSV, all or nothing.

        Parameters
        ----------
        path_or_text : str or Path
            A :class:`~pathlib.Path`, or a ``str`` holding the CSV text itself when it
            contains a line break (else a file path). Columns: see
            :mod:`consent.patients_csv`.
        actor : str
            Who imports (audited once for the whole import).

        Returns
        -------
        ImportReport
            With ``problems`` (and nothing written) when any line is wrong or designates an
            existing patient; else the number and pks of the patients written.

        Raises
        ------
        InvalidRequest
            The file cannot be read or is not UTF-8.
        """
        actor = _require_actor(actor)
        source = "<text>"
        if isinstance(path_or_text, Path) or "\n" not in path_or_text:
            path = Path(path_or_text)
            source = path.name
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest(f"{path}: not UTF-8 text") from None
            except OSError as exc:
                raise InvalidRequest(f"{path}: cannot read ({exc.strerror})") from None
        else:
            text = path_or_text
        patients, problems = parse_patients_csv(
            text, today=self._now().date(), allow_test_ins=allow_test_ins or self._allow_test_ins
        )
        if problems:
            return ImportReport(0, tuple(problems))
        if not patients:
            return ImportReport(0, (ImportProblem(2, "no patient in the file"),))
        with self._write() as session:
            taken = self._taken_identifiers(session, patients)
            if taken:
                session.rollback()
                return ImportReport(0, tuple(taken))
            pks = self._insert_patients(session, patients, self._now())
            self._audit(
                session,
                actor,
                "patient.import",
                f"file:{source}"[:128],
                {"count": len(pks), "first_patient": pks[0], "last_patient": pks[-1]},
            )
        return ImportReport(len(pks), (), tuple(pks))

    def find_patient(self, issuer: str, patient_id: str) -> int | None:
        """The patient pk of an IPP within its issuer, or ``None``."""
        with self._read_sessions() as session:
            return self._patient_pk(session, issuer, patient_id)

    def search_patients(self, text: str, *, limit: int = 50) -> list[dict[str, Any]]:
        """Patients whose names contain every word of ``text`` (case and accents ignored),
        or who have an identifier equal to ``text``; at most ``limit``, by birth name."""
        terms = search_key(text).split()
        if not terms:
            return []
        with self._read_sessions() as session:
            by_identifier = select(PatientIdentifier.patient_pk).where(
                PatientIdentifier.value == text.strip()
            )
            by_name = select(Patient.id)
            for term in terms:
                by_name = by_name.where(Patient.search_text.contains(term, autoescape=True))
            patients = session.scalars(
                select(Patient)
                .where(Patient.id.in_(by_identifier) | Patient.id.in_(by_name))
                .order_by(Patient.birth_name, Patient.first_name, Patient.id)
                .limit(limit)
            ).all()
            return [self._patient_dict(session, p) for p in patients]

    def show_patient(self, pk: int) -> dict[str, Any]:
        """Everything stored about a patient, identifiers included.

        Raises
        ------
        UnknownPatient
        """
        with self._read_sessions() as session:
            patient = session.get(Patient, pk)
            if patient is None:
                raise UnknownPatient(f"unknown patient #{pk}")
            return self._patient_dict(session, patient)

    @staticmethod
    def _patient_dict(session: Session, patient: Patient) -> dict[str, Any]:
        identifiers = session.execute(
            select(PatientIdentifier.system, PatientIdentifier.value, PatientIdentifier.kind)
            .where(PatientIdentifier.patient_pk == patient.id)
            .order_by(PatientIdentifier.id)
        ).all()
        return {
            "pk": patient.id,
            "identity_status": patient.identity_status,
            "birth_name": patient.birth_name,
            "usage_name": patient.usage_name,
            "first_name": patient.first_name,
            "first_names": patient.first_names.split(),
            "birth_date": patient.birth_date.isoformat(),
            "sex": patient.sex,
            "birthplace_code": patient.birthplace_code,
            "email": patient.email,
            "phone": patient.phone,
            "postal_address": patient.postal_address,
            "establishment": patient.establishment,
            "created_at": fhir_datetime(patient.created_at),
            "identifiers": [{"system": s, "value": v, "kind": k} for s, v, k in identifiers],
        }

    # ------------------------------------------------------------------ consent events

    def record_consent(
        self,
        *,
        issuer: str,
        patient_id: str,
        purpose: str,
        decision: Literal["permit", "deny"],
        channel: str,
        actor: str,
        performed_by: str = "patient",
        representative_name: str | None = None,
        evidence: str | Mapping[str, Any] | None = None,
        notice_version: int | None = None,
    ) -> int:
        """Append a decision to the consent log and return the event id.

        A ``deny`` while the patient's current decision is ``permit`` is recorded as a
        withdrawal (action ``withdraw``), otherwise as a refusal; a ``permit`` as a grant.

        Parameters
        ----------
        issuer, patient_id : str
            The patient's IPP.
        purpose : str
            Purpose code.
        decision : {"permit", "deny"}
        channel : {"desk", "remote", "paper", "cli", "api"}
        actor : str
            Who records it (operator or system user).
        performed_by : {"patient", "representative"}
        representative_name : str, optional
            Required when ``performed_by`` is ``representative``.
        evidence : str or mapping, optional
            Proof (free text or JSON object: scanned form id, solicitation id...).
        notice_version : int, optional
            The notice version shown to the patient (default: the latest). A ``permit``
            needs one: a purpose without a notice cannot be consented to.

        Raises
        ------
        UnknownPatient, UnknownPurpose
        InvalidRequest
            A bad decision, channel, performer, or a missing representative name.
        InvalidTransition
            A permit on a purpose without a notice, or an unknown notice version.
        """
        return self._record(
            issuer=issuer,
            patient_id=patient_id,
            purpose=purpose,
            decision=decision,
            channel=channel,
            actor=actor,
            performed_by=performed_by,
            representative_name=representative_name,
            evidence=evidence,
            notice_version=notice_version,
            withdrawal=False,
        )

    def grant(
        self,
        *,
        issuer: str,
        patient_id: str,
        purpose: str,
        channel: str,
        actor: str,
        performed_by: str = "patient",
        representative_name: str | None = None,
        evidence: str | Mapping[str, Any] | None = None,
        notice_version: int | None = None,
    ) -> int:
        """Record a permit; see :meth:`record_consent`."""
        return self.record_consent(
            issuer=issuer,
            patient_id=patient_id,
            purpose=purpose,
            decision="permit",
            channel=channel,
            actor=actor,
            performed_by=performed_by,
            representative_name=representative_name,
            evidence=evidence,
            notice_version=notice_version,
        )

    def refuse(
        self,
        *,
        issuer: str,
        patient_id: str,
        purpose: str,
        channel: str,
        actor: str,
        performed_by: str = "patient",
        representative_name: str | None = None,
        evidence: str | Mapping[str, Any] | None = None,
        notice_version: int | None = None,
    ) -> int:
        """Record a deny (a withdrawal when the current decision is permit); see
        :meth:`record_consent`."""
        return self.record_consent(
            issuer=issuer,
            patient_id=patient_id,
            purpose=purpose,
            decision="deny",
            channel=channel,
            actor=actor,
            performed_by=performed_by,
            representative_name=representative_name,
            evidence=evidence,
            notice_version=notice_version,
        )

    def withdraw(
        self,
        *,
        issuer: str,
        patient_id: str,
        purpose: str,
        channel: str,
        actor: str,
        performed_by: str = "patient",
        representative_name: str | None = None,
        evidence: str | Mapping[str, Any] | None = None,
    ) -> int:
        """Record the withdrawal of a permit (a ``deny`` event, action ``withdraw``).

        Raises
        ------
        InvalidTransition
            The patient's current outcome for the purpose is not ``PERMIT`` (nothing to
            withdraw). For an opt-out purpose without any event, withdrawing records the
            patient's opposition.
        """
        return self._record(
            issuer=issuer,
            patient_id=patient_id,
            purpose=purpose,
            decision="deny",
            channel=channel,
            actor=actor,
            performed_by=performed_by,
            representative_name=representative_name,
            evidence=evidence,
            notice_version=None,
            withdrawal=True,
        )

    def _record(
        self,
        *,
        issuer: str,
        patient_id: str,
        purpose: str,
        decision: str,
        channel: str,
        actor: str,
        performed_by: str,
        representative_name: str | None,
        evidence: str | Mapping[str, Any] | None,
        notice_version: int | None,
        withdrawal: bool,
    ) -> int:
        actor = _require_actor(actor)
        if decision not in DECISIONS:
            raise InvalidRequest("decision must be permit or deny")
        if channel not in CHANNELS:
            raise InvalidRequest(f"channel must be one of {', '.join(CHANNELS)}")
        if performed_by not in PERFORMERS:
            raise InvalidRequest("performed_by must be patient or representative")
        representative = " ".join((representative_name or "").split()) or None
        if performed_by == "representative" and representative is None:
            raise InvalidRequest("a representative's name is required")
        if performed_by == "patient":
            representative = None
        evidence_text = _evidence_text(evidence)
        with self._write() as session:
            purpose_row = self._purpose_row(session, purpose)
            patient_pk = self._require_patient(session, issuer, patient_id)
            state = session.execute(
                select(ConsentState.decision, ConsentState.event_pk).where(
                    ConsentState.patient_pk == patient_pk,
                    ConsentState.purpose_pk == purpose_row.id,
                )
            ).first()
            current = _outcome(state[0] if state else None, purpose_row.model)
            if withdrawal and current.outcome is not Outcome.PERMIT:
                raise InvalidTransition(
                    f"nothing to withdraw: the current decision for '{purpose}' is "
                    f"{current.outcome.value} ({current.reason})"
                )
            notice = self._notice_for(session, purpose_row, decision, notice_version)
            if decision == "permit":
                action = "grant"
            elif withdrawal or (state is not None and state[0] == "permit"):
                action = "withdraw"
            else:
                action = "refuse"
            event = ConsentEvent(
                patient_pk=patient_pk,
                purpose_pk=purpose_row.id,
                decision=decision,
                status="active",
                action=action,
                channel=channel,
                recorded_by=actor,
                performed_by=performed_by,
                representative_name=representative,
                notice_version_pk=notice.id if notice else None,
                evidence=evidence_text,
                recorded_at=self._now(),
                supersedes_pk=state[1] if state else None,
            )
            session.add(event)
            session.flush()
            self._set_state(session, patient_pk, purpose_row.id, decision, event.id)
            self._audit(
                session,
                actor,
                f"consent.{action}",
                f"event:{event.id}",
                {
                    "patient": patient_pk,
                    "purpose": purpose,
                    "decision": decision,
                    "channel": channel,
                    "performed_by": performed_by,
                    "notice_version": notice.version if notice else None,
                },
            )
            change = ConsentChange(
                patient_pk, purpose, _outcome(decision, purpose_row.model).outcome, event.id
            )
        self._notify([change])
        return change.event_id

    def _notice_for(
        self, session: Session, purpose: Purpose, decision: str, version: int | None
    ) -> NoticeVersion | None:
        if version is not None:
            notice = session.scalars(
                select(NoticeVersion).where(
                    NoticeVersion.purpose_pk == purpose.id, NoticeVersion.version == version
                )
            ).first()
            if notice is None:
                raise InvalidTransition(f"purpose '{purpose.code}' has no notice version {version}")
            return notice
        notice = self._latest_notice(session, purpose.id)
        if notice is None and decision == "permit":
            raise InvalidTransition(
                f"purpose '{purpose.code}' has no notice: a consent must refer to the notice "
                "shown (add one with 'consentgate purpose notice')"
            )
        return notice

    def _set_state(
        self, session: Session, patient_pk: int, purpose_pk: int, decision: str, event_pk: int
    ) -> None:
        values = {
            "patient_pk": patient_pk,
            "purpose_pk": purpose_pk,
            "decision": decision,
            "event_pk": event_pk,
        }
        if self._engine.dialect.name == "postgresql":
            pg_stmt = postgresql.insert(ConsentState).values(values)
            session.execute(
                pg_stmt.on_conflict_do_update(
                    index_elements=["patient_pk", "purpose_pk"],
                    set_={"decision": decision, "event_pk": event_pk},
                )
            )
        else:
            lite_stmt = sqlite.insert(ConsentState).values(values)
            session.execute(
                lite_stmt.on_conflict_do_update(
                    index_elements=["patient_pk", "purpose_pk"],
                    set_={"decision": decision, "event_pk": event_pk},
                )
            )

    @staticmethod
    def _retracted() -> Any:
        return select(ConsentEvent.supersedes_pk).where(
            ConsentEvent.status == "entered-in-error", ConsentEvent.supersedes_pk.is_not(None)
        )

    def mark_entered_in_error(
        self, event_id: int, *, actor: str, reason: str, channel: str = "cli"
    ) -> int:
        """Retract a decision recorded by mistake; return the id of the retraction row.

        Nothing is changed in place: a new row (status ``entered-in-error``) names the
        wrong event, and the current decision of that patient and purpose falls back to the
        latest decision not retracted (or to none).

        Raises
        ------
        UnknownEvent
        InvalidTransition
            The event is itself a retraction, or is already retracted.
        InvalidRequest
            Empty reason or bad channel.
        """
        actor = _require_actor(actor)
        reason = " ".join(reason.split())
        if not reason:
            raise InvalidRequest("a reason is required")
        if channel not in CHANNELS:
            raise InvalidRequest(f"channel must be one of {', '.join(CHANNELS)}")
        with self._write() as session:
            event = session.get(ConsentEvent, event_id)
            if event is None:
                raise UnknownEvent(f"unknown consent event {event_id}")
            if event.status != "active":
                raise InvalidTransition(f"event {event_id} is itself a retraction")
            already = session.scalar(
                select(ConsentEvent.id).where(
                    ConsentEvent.status == "entered-in-error",
                    ConsentEvent.supersedes_pk == event_id,
                )
            )
            if already is not None:
                raise InvalidTransition(f"event {event_id} is already marked entered-in-error")
            marker = ConsentEvent(
                patient_pk=event.patient_pk,
                purpose_pk=event.purpose_pk,
                decision=event.decision,
                status="entered-in-error",
                action="entered-in-error",
                channel=channel,
                recorded_by=actor,
                performed_by=event.performed_by,
                representative_name=None,
                notice_version_pk=None,
                evidence=json.dumps({"reason": reason}, ensure_ascii=False),
                recorded_at=self._now(),
                supersedes_pk=event_id,
            )
            session.add(marker)
            session.flush()
            decision = self._recompute_state(session, event.patient_pk, event.purpose_pk)
            purpose = session.get_one(Purpose, event.purpose_pk)
            self._audit(
                session,
                actor,
                "consent.entered-in-error",
                f"event:{event_id}",
                {"patient": event.patient_pk, "purpose": purpose.code, "marker": marker.id},
            )
            change = ConsentChange(
                event.patient_pk, purpose.code, _outcome(decision, purpose.model).outcome, marker.id
            )
        self._notify([change])
        return change.event_id

    def _recompute_state(self, session: Session, patient_pk: int, purpose_pk: int) -> str | None:
        latest = session.execute(
            select(ConsentEvent.id, ConsentEvent.decision)
            .where(
                ConsentEvent.patient_pk == patient_pk,
                ConsentEvent.purpose_pk == purpose_pk,
                ConsentEvent.status == "active",
                ConsentEvent.id.not_in(self._retracted()),
            )
            .order_by(ConsentEvent.id.desc())
            .limit(1)
        ).first()
        if latest is None:
            session.execute(
                delete(ConsentState).where(
                    ConsentState.patient_pk == patient_pk, ConsentState.purpose_pk == purpose_pk
                )
            )
            return None
        self._set_state(session, patient_pk, purpose_pk, latest[1], latest[0])
        return str(latest[1])

    def rebuild_state(self, *, actor: str = "system") -> int:
        """Recompute the ``consent_state`` cache from the consent log; return its row count.

        The cache is always written with the events, so this is a repair tool (after a
        restore, or to check the cache: the count and content must not change).
        """
        actor = _require_actor(actor)
        with self._write() as session:
            latest: dict[tuple[int, int], tuple[int, str]] = {}
            rows = session.execute(
                select(
                    ConsentEvent.patient_pk,
                    ConsentEvent.purpose_pk,
                    ConsentEvent.id,
                    ConsentEvent.decision,
                )
                .where(
                    ConsentEvent.status == "active",
                    ConsentEvent.id.not_in(self._retracted()),
                )
                .order_by(ConsentEvent.id)
            )
            for patient_pk, purpose_pk, event_pk, decision in rows:
                latest[(patient_pk, purpose_pk)] = (event_pk, decision)
            session.execute(delete(ConsentState))
            values = [
                {"patient_pk": k[0], "purpose_pk": k[1], "event_pk": v[0], "decision": v[1]}
                for k, v in latest.items()
            ]
            for start in range(0, len(values), 5000):
                session.execute(insert(ConsentState), values[start : start + 5000])
            self._audit(
                session, actor, "consent.rebuild-state", "consent_state", {"rows": len(values)}
            )
        return len(values)

    # ------------------------------------------------------------------ decisions

    def close(self) -> None:
        """Release connections the store holds of its own (the decision reader's)."""
        self._reader.close()

    def decide(self, patient_pk: int | None, purpose_code: str) -> Decision:
        """May this patient's data be used for this purpose now? Never raises.

        Parameters
        ----------
        patient_pk : int or None
            The consent-store patient (``None`` when the data's patient is not resolved).
        purpose_code : str

        Returns
        -------
        Decision
            ``UNDECIDED`` for an unknown patient or an opt-in purpose without decision;
            ``DENY`` for an unknown purpose, a refusal/withdrawal or any error
            (reason ``"error: <exception type>"``); ``PERMIT`` for a permit or an opt-out
            purpose without opposition.
        """
        try:
            if patient_pk is None:
                return UNKNOWN_PATIENT
            key = self._purpose_key(purpose_code)
            if key is None:
                return UNKNOWN_PURPOSE
            exists, decision = self._reader.lookup(patient_pk, key.pk)
            if not exists:
                return UNKNOWN_PATIENT
            return _outcome(decision, key.model)
        except Exception as exc:  # fail closed, whatever happened
            LOG.error("consent decision failed, denying: %s", type(exc).__name__)
            return Decision(Outcome.DENY, f"error: {type(exc).__name__}")

    def decide_many(
        self, patient_pks: Iterable[int | None], purpose_code: str
    ) -> dict[int, Decision]:
        """:meth:`decide` for many patients at once (one query per 500 patients).

        ``None`` entries are skipped (they are ``UNDECIDED``, like :meth:`decide` says).
        Never raises: on error every patient gets ``DENY``.
        """
        pks = list(dict.fromkeys(pk for pk in patient_pks if pk is not None))
        try:
            key = self._purpose_key(purpose_code)
            if key is None:
                return dict.fromkeys(pks, UNKNOWN_PURPOSE)
            found = self._reader.lookup_many(pks, key.pk)
            return {
                pk: _outcome(found[pk], key.model) if pk in found else UNKNOWN_PATIENT for pk in pks
            }
        except Exception as exc:
            LOG.error("consent decision failed, denying: %s", type(exc).__name__)
            return dict.fromkeys(pks, Decision(Outcome.DENY, f"error: {type(exc).__name__}"))

    def current(self, issuer: str, patient_id: str) -> dict[str, Decision]:
        """The decision for every purpose, by purpose code.

        Raises
        ------
        UnknownPatient
        """
        with self._read_sessions() as session:
            pk = self._require_patient(session, issuer, patient_id)
            rows = session.execute(
                select(Purpose.code, Purpose.model, ConsentState.decision)
                .outerjoin(
                    ConsentState,
                    (ConsentState.purpose_pk == Purpose.id) & (ConsentState.patient_pk == pk),
                )
                .order_by(Purpose.code)
            ).all()
        return {code: _outcome(decision, model) for code, model, decision in rows}

    def history(
        self, issuer: str, patient_id: str, purpose: str | None = None
    ) -> list[dict[str, Any]]:
        """The consent log of a patient (optionally one purpose), oldest first.

        Each entry: ``id``, ``purpose``, ``action`` (grant / refuse / withdraw /
        entered-in-error), ``decision``, ``status`` (the row's kind: ``active`` or
        ``entered-in-error``), ``effective_status`` (``active``, ``inactive`` or
        ``entered-in-error``, derived from later rows), ``channel``, ``recorded_by``,
        ``performed_by``, ``representative_name``, ``notice_version``, ``notice_sha256``,
        ``evidence``, ``recorded_at`` (ISO 8601 UTC), ``supersedes``.

        Raises
        ------
        UnknownPatient, UnknownPurpose
        """
        with self._read_sessions() as session:
            pk = self._require_patient(session, issuer, patient_id)
            return self._history(session, pk, purpose)

    def _history(
        self, session: Session, patient_pk: int, purpose: str | None
    ) -> list[dict[str, Any]]:
        stmt = (
            select(ConsentEvent, Purpose.code, NoticeVersion.version, NoticeVersion.sha256)
            .join(Purpose, Purpose.id == ConsentEvent.purpose_pk)
            .outerjoin(NoticeVersion, NoticeVersion.id == ConsentEvent.notice_version_pk)
            .where(ConsentEvent.patient_pk == patient_pk)
            .order_by(ConsentEvent.id)
        )
        if purpose is not None:
            stmt = stmt.where(ConsentEvent.purpose_pk == self._purpose_row(session, purpose).id)
        rows = session.execute(stmt).all()
        retracted = {e.supersedes_pk for e, *_ in rows if e.status == "entered-in-error"}
        current: dict[int, int] = {}
        for event, *_ in rows:
            if event.status == "active" and event.id not in retracted:
                current[event.purpose_pk] = event.id
        entries = []
        for event, code, version, sha256 in rows:
            if event.status != "active" or event.id in retracted:
                effective = "entered-in-error"
            elif current.get(event.purpose_pk) == event.id:
                effective = "active"
            else:
                effective = "inactive"
            entries.append(
                {
                    "id": event.id,
                    "purpose": code,
                    "action": event.action,
                    "decision": event.decision,
                    "status": event.status,
                    "effective_status": effective,
                    "channel": event.channel,
                    "recorded_by": event.recorded_by,
                    "performed_by": event.performed_by,
                    "representative_name": event.representative_name,
                    "notice_version": version,
                    "notice_sha256": sha256,
                    "evidence": event.evidence,
                    "recorded_at": fhir_datetime(event.recorded_at),
                    "supersedes": event.supersedes_pk,
                }
            )
        return entries

    def export_fhir(self, issuer: str, patient_id: str) -> list[dict[str, Any]]:
        """The patient's consent decisions as FHIR R4 ``Consent`` resources (JSON-ready).

        One resource per decision, oldest first; see :mod:`consent.fhir` for the mapping.

        Raises
        ------
        UnknownPatient
        """
        with self._read_sessions() as session:
            pk = self._require_patient(session, issuer, patient_id)
            patient = session.get_one(Patient, pk)
            system, value = issuer.strip(), patient_id.strip()
            if patient.identity_status == "QUAL":
                ins = session.execute(
                    select(PatientIdentifier.system, PatientIdentifier.value)
                    .where(
                        PatientIdentifier.patient_pk == pk,
                        PatientIdentifier.kind.in_(_INS_KINDS),
                    )
                    .order_by(PatientIdentifier.id)
                ).first()
                if ins is not None:
                    system, value = ins[0], ins[1]
            purposes = {p.code: p for p in session.scalars(select(Purpose)).all()}
            return [
                consent_resource(
                    event=event,
                    patient_system=system,
                    patient_value=value,
                    purpose_code=event["purpose"],
                    purpose_name=purposes[event["purpose"]].name,
                    purpose_model=purposes[event["purpose"]].model,
                    establishment=patient.establishment,
                )
                for event in self._history(session, pk, None)
                if event["status"] == "active"
            ]

    # ------------------------------------------------------------------ changes

    def subscribe(self, callback: Callable[[ConsentChange], None]) -> Callable[[], None]:
        """Call ``callback`` after each committed consent change made through this instance.

        Callbacks run in the thread that made the change; an exception in one is logged
        and ignored. Changes made by other processes are seen with :meth:`changes_since`.

        Returns
        -------
        callable
            Call it to unsubscribe.
        """
        with self._listeners_lock:
            self._listeners.append(callback)

        def unsubscribe() -> None:
            with self._listeners_lock:
                if callback in self._listeners:
                    self._listeners.remove(callback)

        return unsubscribe

    def last_event_id(self) -> int:
        """The highest consent event id (0 when the log is empty): a starting point for
        :meth:`changes_since`."""
        with self._read_sessions() as session:
            return int(session.scalar(select(func.coalesce(func.max(ConsentEvent.id), 0))) or 0)

    def changes_since(self, event_id: int) -> list[ConsentChange]:
        """The (patient, purpose) pairs changed by events after ``event_id``, with the
        outcome they have now; one entry per pair, ordered by the last event that touched
        it (``event_id`` of each entry). Poll with the highest ``event_id`` returned.

        Event ids grow in commit order (writers are serialised), so no change is missed.
        """
        with self._read_sessions() as session:
            last = func.max(ConsentEvent.id).label("last")
            changed = (
                select(ConsentEvent.patient_pk, ConsentEvent.purpose_pk, last)
                .where(ConsentEvent.id > event_id)
                .group_by(ConsentEvent.patient_pk, ConsentEvent.purpose_pk)
                .subquery()
            )
            rows = session.execute(
                select(
                    changed.c.patient_pk,
                    Purpose.code,
                    Purpose.model,
                    ConsentState.decision,
                    changed.c.last,
                )
                .join(Purpose, Purpose.id == changed.c.purpose_pk)
                .outerjoin(
                    ConsentState,
                    (ConsentState.patient_pk == changed.c.patient_pk)
                    & (ConsentState.purpose_pk == changed.c.purpose_pk),
                )
                .order_by(changed.c.last)
            ).all()
        return [
            ConsentChange(patient_pk, code, _outcome(decision, model).outcome, last)
            for patient_pk, code, model, decision, last in rows
        ]

    # ------------------------------------------------------------------ DICOM patients

    def resolve_dicom_patient(
        self,
        *,
        issuer: str,
        patient_id: str,
        ins_values: Sequence[tuple[str, str]],
        birth_date: str,
        sex: str,
    ) -> Resolution:
        """Find the consent-store patient a DICOM dataset designates. Never raises.

        Parameters
        ----------
        issuer, patient_id : str
            Issuer of Patient ID (or the calling AE's default issuer) and Patient ID.
        ins_values : sequence of (oid, matricule)
            INS found in Other Patient IDs Sequence.
        birth_date : str
            DICOM DA (``YYYYMMDD``) or ``""``.
        sex : str
            DICOM CS (``M``, ``F``, ``O``) or ``""``.

        Returns
        -------
        Resolution
            ``matched`` by INS (only a ``QUAL`` identity's INS counts) or else by IPP;
            ``mismatch`` when INS and IPP designate different patients, or when a
            non-empty birth date or sex contradicts the stored one (unreadable birth date
            included); ``unknown`` when nothing matches or on error.
        """
        try:
            with self._read_sessions() as session:
                return self._resolve(session, issuer, patient_id, ins_values, birth_date, sex)
        except Exception as exc:
            LOG.error("patient resolution failed: %s", type(exc).__name__)
            return Resolution(None, "unknown", f"error: {type(exc).__name__}")

    def _resolve(
        self,
        session: Session,
        issuer: str,
        patient_id: str,
        ins_values: Sequence[tuple[str, str]],
        birth_date: str,
        sex: str,
    ) -> Resolution:
        by_ins: Patient | None = None
        for oid, matricule in ins_values:
            value = matricule.replace(" ", "").upper()
            if not value:
                continue
            candidate = session.scalars(
                select(Patient)
                .join(PatientIdentifier, PatientIdentifier.patient_pk == Patient.id)
                .where(
                    PatientIdentifier.system == oid.strip(),
                    PatientIdentifier.value == value,
                    PatientIdentifier.kind.in_(_INS_KINDS),
                )
            ).first()
            if candidate is not None and candidate.identity_status == "QUAL":
                by_ins = candidate
                break
        by_ipp: Patient | None = None
        if issuer.strip() and patient_id.strip():
            pk = self._patient_pk(session, issuer, patient_id)
            by_ipp = session.get(Patient, pk) if pk is not None else None
        if by_ins is not None and by_ipp is not None and by_ins.id != by_ipp.id:
            return Resolution(None, "mismatch", "INS and patient id designate different patients")
        patient = by_ins or by_ipp
        if patient is None:
            return Resolution(None, "unknown", "no patient with these identifiers")
        how = "INS" if by_ins is not None else "patient id"
        if by_ins is None and ins_values:
            rows = session.execute(
                select(PatientIdentifier.system, PatientIdentifier.value).where(
                    PatientIdentifier.patient_pk == patient.id,
                    PatientIdentifier.kind.in_(_INS_KINDS),
                )
            ).all()
            stored: dict[str, str] = {system: value for system, value in rows}
            for oid, matricule in ins_values:
                known = stored.get(oid.strip())
                if known is not None and known != matricule.replace(" ", "").upper():
                    return Resolution(patient.id, "mismatch", "INS differs from the stored one")
        if birth_date.strip():
            parsed = parse_dicom_date(birth_date)
            if parsed is None:
                return Resolution(patient.id, "mismatch", "birth date unreadable")
            if parsed != patient.birth_date:
                return Resolution(patient.id, "mismatch", "birth date differs")
        dicom_sex = sex.strip().upper()
        if dicom_sex and patient.sex != "U" and dicom_sex != patient.sex:
            return Resolution(patient.id, "mismatch", "sex differs")
        return Resolution(patient.id, "matched", f"matched by {how}")

    # ------------------------------------------------------------------ audit

    def audit(
        self, *, actor: str, action: str, target: str, details: Mapping[str, Any] | None = None
    ) -> int:
        """Append an entry to the audit log in its own transaction; return its ``seq``.

        For other parts of the gateway (routing decisions, accesses by people). Keep
        ``details`` free of patient data beyond primary keys. Inside a transaction of
        your own, use :func:`consent.audit.lock_for_write` then
        :func:`consent.audit.append_audit` instead.
        """
        actor = _require_actor(actor)
        if not action or len(action) > 64 or len(target) > 128:
            raise InvalidRequest("audit action must be 1-64 characters, target at most 128")
        with self._write() as session:
            return self._audit(session, actor, action, target, details)

    def verify_audit(self, *, known_head: tuple[int, str] | None = None) -> AuditReport:
        """Verify the audit chain (see :func:`consent.audit.verify_audit`)."""
        with self._read_sessions() as session:
            return verify_audit(session, known_head=known_head)
