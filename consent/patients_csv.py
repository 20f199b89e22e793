"""Parsing and validation of patient CSV files (no database).

Format: UTF-8 (a BOM is accepted), a header line, comma- or semicolon-separated (the
header decides). Columns, in any order; unknown columns are an error:

=================  ========  ===================================================
column             required  content
=================  ========  ===================================================
issuer             yes       IPP issuer (establishment domain), e.g. CHR-METZ
patient_id         yes       IPP within the issuer
birth_name         yes       nom de naissance
first_name         yes       first birth given name
birth_date         yes       YYYY-MM-DD
sex                yes       F, M or U
first_names        no        all birth given names, space-separated
usage_name         no        nom d'usage
email, phone       no        contact data
ins                no        matricule INS (15 characters)
ins_oid            no        default 1.2.250.1.213.1.4.8 (INS-NIR)
identity_status    no        PROV (default), RECUP, VALI or QUAL
birthplace_code    no        INSEE code
establishment      no        establishment name
postal_address     no        free text
=================  ========  ===================================================
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from consent.errors import ConsentError
from consent.identity import (
    INS_NIR_OID,
    check_matricule_traits,
    clean_text,
    ins_kind,
    parse_iso_date,
    validate_email,
    validate_identity_status,
    validate_issuer,
    validate_matricule,
    validate_patient_id,
    validate_phone,
    validate_traits,
)

REQUIRED_COLUMNS = ("issuer", "patient_id", "birth_name", "first_name", "birth_date", "sex")
OPTIONAL_COLUMNS = (
    "first_names",
    "usage_name",
    "email",
    "phone",
    "ins",
    "ins_oid",
    "identity_status",
    "birthplace_code",
    "establishment",
    "postal_address",
)


@dataclass(frozen=True)
class PatientInput:
    """One validated patient ready to insert (from ``add_patient`` or a CSV line)."""

    issuer: str
    patient_id: str
    birth_name: str
    first_names: tuple[str, ...]
    birth_date: date
    sex: str
    identity_status: str
    usage_name: str | None = None
    email: str | None = None
    phone: str | None = None
    ins: str | None = None
    ins_oid: str = INS_NIR_OID
    ins_kind: str | None = None
    birthplace_code: str | None = None
    establishment: str | None = None
    postal_address: str | None = None
    line: int = 0


@dataclass(frozen=True)
class ImportProblem:
    """A problem found on one line of an import file (line 1 is the header)."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass(frozen=True)
class ImportReport:
    """Result of :meth:`consent.service.ConsentStore.import_patients_csv`.

    Attributes
    ----------
    imported : int
        Patients written (0 whenever there is a problem: the import is all-or-nothing).
    problems : tuple of ImportProblem
        Every problem found, by line.
    patient_pks : tuple of int
        Primary keys of the patients written, in file order.
    """

    imported: int
    problems: tuple[ImportProblem, ...] = field(default_factory=tuple)
    patient_pks: tuple[int, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """Whether the import was written."""
        return not self.problems


def validate_patient(
    *,
    issuer: str,
    patient_id: str,
    birth_name: str,
    first_name: str,
    birth_date: date,
    sex: str,
    today: date,
    first_names: tuple[str, ...] | list[str] | None = None,
    usage_name: str | None = None,
    email: str | None = None,
    phone: str | None = None,
    ins: str | None = None,
    ins_oid: str = INS_NIR_OID,
    identity_status: str = "PROV",
    birthplace_code: str | None = None,
    establishment: str | None = None,
    postal_address: str | None = None,
    allow_test_ins: bool = False,
    line: int = 0,
) -> PatientInput:
    """Validate every field of a new patient.

    Raises
    ------
    InvalidIdentity
        The first problem found.
    """
    traits = validate_traits(
        birth_name=birth_name,
        first_name=first_name,
        birth_date=birth_date,
        sex=sex,
        first_names=first_names,
        birthplace_code=birthplace_code,
        today=today,
    )
    matricule: str | None = None
    kind: str | None = None
    if ins is not None and ins.strip():
        kind = ins_kind(ins_oid.strip(), allow_test_ins=allow_test_ins)
        matricule = validate_matricule(ins)
        check_matricule_traits(matricule, traits.sex, traits.birth_date)
    usage = clean_text(usage_name, "usage name", 100)
    return PatientInput(
        issuer=validate_issuer(issuer),
        patient_id=validate_patient_id(patient_id),
        birth_name=traits.birth_name,
        first_names=traits.first_names,
        birth_date=traits.birth_date,
        sex=traits.sex,
        identity_status=validate_identity_status(identity_status),
        usage_name=usage or None,
        email=validate_email(email),
        phone=validate_phone(phone),
        ins=matricule,
        ins_oid=ins_oid.strip(),
        ins_kind=kind,
        birthplace_code=traits.birthplace_code,
        establishment=clean_text(establishment, "establishment", 64),
        postal_address=clean_text(postal_address, "postal address", 1000, lines=True),
        line=line,
    )


def _records(reader: Any, problems: list[ImportProblem]) -> Iterator[list[str]]:
    """The reader's records, until the end or a record the CSV reader cannot read (an
    unclosed quote swallowing the rest of the file, a field over the reader's limit):
    that one becomes a problem, and the reading stops."""
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            problems.append(ImportProblem(reader.line_num, f"unreadable CSV record: {exc}"))
            return
        yield values


def parse_patients_csv(
    text: str, *, today: date, allow_test_ins: bool = False
) -> tuple[list[PatientInput], list[ImportProblem]]:
    """Parse and validate a whole file; returns the patients and every problem found.

    Duplicate IPPs or INS within the file are problems too (checking against the
    database is the caller's job).
    """
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        return [], [ImportProblem(1, "empty file: a header line is required")]
    delimiter = ";" if lines[0].count(";") > lines[0].count(",") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    problems: list[ImportProblem] = []
    records = _records(reader, problems)
    header = [h.strip().lower() for h in next(records, [])]
    if problems:
        return [], problems
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    unknown = [c for c in header if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if missing:
        problems.append(ImportProblem(1, f"missing column(s): {', '.join(missing)}"))
    if unknown:
        problems.append(ImportProblem(1, f"unknown column(s): {', '.join(unknown)}"))
    if len(set(header)) != len(header):
        problems.append(ImportProblem(1, "a column appears twice"))
    if problems:
        return [], problems
    patients: list[PatientInput] = []
    seen_ipp: dict[tuple[str, str], int] = {}
    seen_ins: dict[tuple[str, str], int] = {}
    for values in records:
        line = reader.line_num
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            problems.append(
                ImportProblem(line, f"{len(values)} field(s), the header has {len(header)}")
            )
            continue
        row = dict(zip(header, values, strict=True))
        try:
            first_names = row.get("first_names", "").split() or None
            patient = validate_patient(
                issuer=row["issuer"],
                patient_id=row["patient_id"],
                birth_name=row["birth_name"],
                first_name=row["first_name"],
                birth_date=parse_iso_date(row["birth_date"]),
                sex=row["sex"],
                today=today,
                first_names=first_names,
                usage_name=row.get("usage_name") or None,
                email=row.get("email") or None,
                phone=row.get("phone") or None,
                ins=row.get("ins") or None,
                ins_oid=row.get("ins_oid") or INS_NIR_OID,
                identity_status=row.get("identity_status") or "PROV",
                birthplace_code=row.get("birthplace_code") or None,
                establishment=row.get("establishment") or None,
                postal_address=row.get("postal_address") or None,
                allow_test_ins=allow_test_ins,
                line=line,
            )
        except ConsentError as exc:
            problems.append(ImportProblem(line, str(exc)))
            continue
        ipp = (patient.issuer, patient.patient_id)
        if ipp in seen_ipp:
            problems.append(
                ImportProblem(line, f"patient id already on line {seen_ipp[ipp]} of this file")
            )
            continue
        seen_ipp[ipp] = line
        if patient.ins is not None:
            key = (patient.ins_oid, patient.ins)
            if key in seen_ins:
                problems.append(
                    ImportProblem(line, f"INS already on line {seen_ins[key]} of this file")
                )
                continue
            seen_ins[key] = line
        patients.append(patient)
    return patients, problems
