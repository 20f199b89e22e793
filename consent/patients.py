"""Patients of the consent store: registration, CSV import, lookup and display.

A patient is registered with an IPP (kind ``IPP``, within its issuer) and, when known, an
INS (kind ``INS-NIR`` or ``INS-NIA``, within its OID); field rules are in
:mod:`consent.identity` and :mod:`consent.patients_csv`. Patients and identifiers are
inserted only.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from consent.context import StoreContext, require_actor
from consent.errors import DuplicatePatient, InvalidRequest, UnknownPatient
from consent.fhir import fhir_datetime
from consent.identity import INS_NIR_OID, search_key
from consent.models import Patient, PatientIdentifier
from consent.patients_csv import (
    ImportProblem,
    ImportReport,
    PatientInput,
    parse_patients_csv,
    validate_patient,
)

_CHUNK = 500


def patient_pk(session: Session, issuer: str, patient_id: str) -> int | None:
    """The pk of the patient with this IPP within its issuer (both stripped), or ``None``."""
    return session.scalar(
        select(PatientIdentifier.patient_pk).where(
            PatientIdentifier.system == issuer.strip(),
            PatientIdentifier.value == patient_id.strip(),
            PatientIdentifier.kind == "IPP",
        )
    )


def require_patient(session: Session, issuer: str, patient_id: str) -> int:
    """:func:`patient_pk`, for a patient that must exist.

    Raises
    ------
    UnknownPatient
    """
    pk = patient_pk(session, issuer, patient_id)
    if pk is None:
        raise UnknownPatient(f"unknown patient {issuer.strip()}/{patient_id.strip()}")
    return pk


class Patients:
    """Registers, imports, finds and shows patients."""

    def __init__(self, context: StoreContext) -> None:
        self._context = context

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
        actor = require_actor(actor)
        patient = validate_patient(
            issuer=issuer,
            patient_id=patient_id,
            birth_name=birth_name,
            first_name=first_name,
            birth_date=birth_date,
            sex=sex,
            today=self._context.now().date(),
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
            allow_test_ins=allow_test_ins or self._context.allow_test_ins,
        )
        with self._context.write() as session:
            taken = self._taken_identifiers(session, [patient])
            if taken:
                raise DuplicatePatient(taken[0].message)
            (pk,) = self._insert_patients(session, [patient], self._context.now())
            self._context.audit(
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
                search_text=search_key(p.birth_name, p.usage_name, " ".join(p.first_names))[:400],
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
        actor = require_actor(actor)
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
            text,
            today=self._context.now().date(),
            allow_test_ins=allow_test_ins or self._context.allow_test_ins,
        )
        if problems:
            return ImportReport(0, tuple(problems))
        if not patients:
            return ImportReport(0, (ImportProblem(2, "no patient in the file"),))
        with self._context.write() as session:
            taken = self._taken_identifiers(session, patients)
            if taken:
                session.rollback()
                return ImportReport(0, tuple(taken))
            pks = self._insert_patients(session, patients, self._context.now())
            self._context.audit(
                session,
                actor,
                "patient.import",
                f"file:{source}"[:128],
                {"count": len(pks), "first_patient": pks[0], "last_patient": pks[-1]},
            )
        return ImportReport(len(pks), (), tuple(pks))

    def find_patient(self, issuer: str, patient_id: str) -> int | None:
        """The patient pk of an IPP within its issuer, or ``None``."""
        with self._context.read_sessions() as session:
            return patient_pk(session, issuer, patient_id)

    def search_patients(self, text: str, *, limit: int = 50) -> list[dict[str, Any]]:
        """Patients whose names contain every word of ``text`` (case and accents ignored),
        or who have an identifier equal to ``text``; at most ``limit``, by birth name."""
        terms = search_key(text).split()
        if not terms:
            return []
        with self._context.read_sessions() as session:
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
        with self._context.read_sessions() as session:
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
