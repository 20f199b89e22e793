"""Which consent-store patient a DICOM dataset designates.

A dataset names its patient by Patient ID within an issuer (the IPP) and possibly by INS
(Other Patient IDs Sequence); its birth date and sex must agree with the stored identity.
Anything doubtful is a ``mismatch`` or ``unknown`` :class:`consent.decision.Resolution`,
which the router holds for reconciliation instead of forwarding.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from consent.context import LOG
from consent.decision import Resolution
from consent.identity import INS_KINDS, parse_dicom_date
from consent.models import Patient, PatientIdentifier
from consent.patients import patient_pk


class PatientResolver:
    """Answers ``resolve_dicom_patient``."""

    def __init__(self, read_sessions: sessionmaker[Session]) -> None:
        self._read_sessions = read_sessions

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
            ``mismatch`` when INS and IPP designate different patients, when two INS
            of the dataset designate different patients, when an INS of the dataset is
            stored for another patient (whatever that identity's status), when an INS
            of the dataset contradicts the patient's stored one (same OID), or when a
            non-empty birth date or sex contradicts the stored one (unreadable birth date
            included); ``unknown`` when nothing matches or on error.
        """
        try:
            with self._read_sessions() as session:
                return self._resolve(session, issuer, patient_id, ins_values, birth_date, sex)
        except Exception as exc:
            LOG.error("patient resolution failed: %s", type(exc).__name__)
            return Resolution(None, "unknown", f"error: {type(exc).__name__}")

    @staticmethod
    def _resolve(
        session: Session,
        issuer: str,
        patient_id: str,
        ins_values: Sequence[tuple[str, str]],
        birth_date: str,
        sex: str,
    ) -> Resolution:
        # every qualified INS the dataset carries must designate the same patient; an INS
        # the store holds for a patient whose identity is not qualified designates no
        # one, but must not belong to another patient than the one designated
        by_ins_found: dict[int, Patient] = {}
        ins_owners: set[int] = set()
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
                    PatientIdentifier.kind.in_(INS_KINDS),
                )
            ).first()
            if candidate is None:
                continue
            ins_owners.add(candidate.id)
            if candidate.identity_status == "QUAL":
                by_ins_found[candidate.id] = candidate
        if len(by_ins_found) > 1:
            return Resolution(None, "mismatch", "INS values designate different patients")
        by_ins = next(iter(by_ins_found.values()), None)
        by_ipp: Patient | None = None
        if issuer.strip() and patient_id.strip():
            pk = patient_pk(session, issuer, patient_id)
            by_ipp = session.get(Patient, pk) if pk is not None else None
        if by_ins is not None and by_ipp is not None and by_ins.id != by_ipp.id:
            return Resolution(None, "mismatch", "INS and patient id designate different patients")
        patient = by_ins or by_ipp
        if patient is None:
            return Resolution(None, "unknown", "no patient with these identifiers")
        if ins_owners - {patient.id}:
            return Resolution(None, "mismatch", "an INS of the data set is another patient's")
        how = "INS" if by_ins is not None else "patient id"
        if ins_values:
            # an INS of the dataset that the patient's stored one (same OID) contradicts
            rows = session.execute(
                select(PatientIdentifier.system, PatientIdentifier.value).where(
                    PatientIdentifier.patient_pk == patient.id,
                    PatientIdentifier.kind.in_(INS_KINDS),
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
