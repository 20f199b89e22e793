"""Identity rules: INS matricule and OIDs, strict traits, contact data, search keys.

Pure functions, no database. Every check raises :class:`consent.errors.InvalidIdentity`
with a one-line message that names the field (never the rejected value of a name).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

from consent.errors import InvalidIdentity
from consent.models import IDENTITY_STATUSES, SEXES

INS_NIR_OID = "1.2.250.1.213.1.4.8"
INS_NIA_OID = "1.2.250.1.213.1.4.9"
INS_TEST_OID = "1.2.250.1.213.1.4.10"
INS_DEMO_OID = "1.2.250.1.213.1.4.11"
TEST_INS_OIDS = frozenset({INS_TEST_OID, INS_DEMO_OID})
INS_KINDS = ("INS-NIR", "INS-NIA")  # identifier kinds of an INS (the other kind is IPP)
_INS_KIND = {
    INS_NIR_OID: "INS-NIR",
    INS_NIA_OID: "INS-NIA",
    INS_TEST_OID: "INS-NIR",
    INS_DEMO_OID: "INS-NIR",
}

_MATRICULE_RE = re.compile(r"^[0-9]{5}(?:[0-9]{2}|2[AB])[0-9]{8}$")
_BIRTHPLACE_RE = re.compile(r"^(?:[0-9]{5}|2[AB][0-9]{3})$")
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_PHONE_RE = re.compile(r"^\+?[0-9][0-9 .-]{5,30}$")
_ISSUER_RE = re.compile(r"^[\x21-\x7e][\x20-\x7e]{0,63}$")


@dataclass(frozen=True)
class StrictTraits:
    """The validated strict traits of an identity (names trimmed, sex upper-case)."""

    birth_name: str
    first_names: tuple[str, ...]
    birth_date: date
    sex: str
    birthplace_code: str | None

    @property
    def first_name(self) -> str:
        """The first birth given name."""
        return self.first_names[0]


def ins_kind(oid: str, *, allow_test_ins: bool = False) -> str:
    """The identifier kind (``INS-NIR`` or ``INS-NIA``) of an INS OID.

    Raises
    ------
    InvalidIdentity
        The OID is not an INS OID, or is a test/demo OID and ``allow_test_ins`` is false.
    """
    if oid in TEST_INS_OIDS and not allow_test_ins:
        raise InvalidIdentity(f"INS OID {oid} is a test/demo OID, refused in production")
    kind = _INS_KIND.get(oid)
    if kind is None:
        raise InvalidIdentity(f"{oid!r} is not an INS OID")
    return kind


def validate_matricule(matricule: str) -> str:
    """Check a matricule INS (NIR or NIA) and return it normalised (no spaces).

    Fifteen characters: thirteen digits (Corsican departments ``2A``/``2B`` accepted in
    positions 6-7) and a two-digit key equal to ``97 - (number mod 97)``, where ``2A`` counts
    as ``19`` and ``2B`` as ``18``.

    Raises
    ------
    InvalidIdentity
        Wrong length or characters, or a wrong key.
    """
    value = matricule.replace(" ", "").upper()
    if not _MATRICULE_RE.match(value):
        raise InvalidIdentity("INS matricule must be 15 characters: 13 digits and a 2-digit key")
    body = value[:13].replace("2A", "19", 1) if value[5:7] == "2A" else value[:13]
    body = body.replace("2B", "18", 1) if value[5:7] == "2B" else body
    key = 97 - (int(body) % 97)
    if key != int(value[13:]):
        raise InvalidIdentity("INS matricule has a wrong control key")
    return value


def check_matricule_traits(matricule: str, sex: str, birth_date: date) -> None:
    """Cross-check a NIR-style matricule against sex and birth year.

    The first digit is 1 (male) or 2 (female) for a NIR, the next two the year of birth.
    Other first digits (temporary numbers) are not cross-checked.
    """
    first = matricule[0]
    if first not in "12":
        return
    if sex in ("M", "F") and sex != ("M" if first == "1" else "F"):
        raise InvalidIdentity("INS matricule contradicts the sex")
    if int(matricule[1:3]) != birth_date.year % 100:
        raise InvalidIdentity("INS matricule contradicts the birth year")


def validate_traits(
    *,
    birth_name: str,
    first_name: str,
    birth_date: date,
    sex: str,
    first_names: Sequence[str] | None = None,
    birthplace_code: str | None = None,
    today: date | None = None,
) -> StrictTraits:
    """Validate strict traits and return them normalised.

    Raises
    ------
    InvalidIdentity
        An empty name, a first name that is not the first of ``first_names``, a birth
        date in the future, a sex other than F/M/U, a malformed INSEE birthplace code.
    """
    birth_name = check_printable(" ".join(birth_name.split()), "birth name")
    first_name = check_printable(" ".join(first_name.split()), "first name")
    if not birth_name:
        raise InvalidIdentity("birth name is required")
    if not first_name:
        raise InvalidIdentity("first name is required")
    if len(birth_name) > 100 or len(first_name) > 100:
        raise InvalidIdentity("names are limited to 100 characters")
    names = (
        tuple(check_printable(" ".join(n.split()), "first names") for n in first_names)
        if first_names
        else (first_name,)
    )
    names = tuple(n for n in names if n)
    if not names or names[0] != first_name:
        raise InvalidIdentity("first name must be the first of the birth given names")
    if len(" ".join(names)) > 200:
        raise InvalidIdentity("birth given names are limited to 200 characters")
    if today is not None and birth_date > today:
        raise InvalidIdentity("birth date is in the future")
    sex = sex.strip().upper()
    if sex not in SEXES:
        raise InvalidIdentity("sex must be F, M or U")
    if birthplace_code is not None:
        birthplace_code = birthplace_code.strip().upper() or None
        if birthplace_code is not None and not _BIRTHPLACE_RE.match(birthplace_code):
            raise InvalidIdentity("birthplace must be a 5-character INSEE code")
    return StrictTraits(birth_name, names, birth_date, sex, birthplace_code)


def validate_identity_status(status: str) -> str:
    """Return the identity status upper-cased, or raise :class:`InvalidIdentity`."""
    value = status.strip().upper()
    if value not in IDENTITY_STATUSES:
        raise InvalidIdentity(f"identity status must be one of {', '.join(IDENTITY_STATUSES)}")
    return value


def validate_issuer(issuer: str) -> str:
    """An IPP issuer: 1-64 printable ASCII characters, no leading space."""
    value = issuer.strip()
    if not _ISSUER_RE.match(value):
        raise InvalidIdentity("issuer must be 1-64 printable ASCII characters")
    return value


def validate_patient_id(patient_id: str) -> str:
    """An IPP: 1-64 printable ASCII characters (DICOM LO without backslash)."""
    value = patient_id.strip()
    if not _ISSUER_RE.match(value) or "\\" in value:
        raise InvalidIdentity("patient id must be 1-64 printable ASCII characters")
    return value


def validate_email(email: str | None) -> str | None:
    """A plausible e-mail address or ``None``."""
    if email is None or not email.strip():
        return None
    value = email.strip()
    if len(value) > 254 or not _EMAIL_RE.match(value):
        raise InvalidIdentity("e-mail address is malformed")
    return value


def validate_phone(phone: str | None) -> str | None:
    """A phone number (digits, optional leading +, spaces, dots, dashes) or ``None``."""
    if phone is None or not phone.strip():
        return None
    value = phone.strip()
    if not _PHONE_RE.match(value):
        raise InvalidIdentity("phone number is malformed")
    return value


def parse_iso_date(value: str, field: str = "birth date") -> date:
    """Parse ``YYYY-MM-DD`` or raise :class:`InvalidIdentity` naming ``field``."""
    try:
        if len(value.strip()) != 10:
            raise ValueError(value)
        return date.fromisoformat(value.strip())
    except ValueError:
        raise InvalidIdentity(f"{field} must be a valid date YYYY-MM-DD") from None


def parse_dicom_date(value: str) -> date | None:
    """Parse a DICOM DA value ``YYYYMMDD``; ``None`` when empty or unreadable."""
    value = value.strip()
    if len(value) != 8 or not value.isdigit():
        return None
    try:
        return date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return None


def check_printable(value: str, what: str) -> str:
    """``value`` unchanged when it holds no control or format character (Unicode
    categories Cc and Cf: terminal escape sequences, DEL, bidirectional overrides), which
    would reach operators' terminals, exports and letters as is.

    Raises
    ------
    InvalidIdentity
        ``value`` holds one.
    """
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in value):
        raise InvalidIdentity(f"{what} must not contain control characters")
    return value


def clean_text(value: str | None, what: str, limit: int, *, lines: bool = False) -> str | None:
    """A free-text field: white space collapsed (``lines``: within each line, empty lines
    dropped), printable, at most ``limit`` characters; ``None`` when empty.

    Raises
    ------
    InvalidIdentity
        A control character, or longer than ``limit``.
    """
    if value is None:
        return None
    if lines:
        kept = [" ".join(line.split()) for line in value.splitlines()]
        text = "\n".join(line for line in kept if line)
        check_printable(text.replace("\n", " "), what)
    else:
        text = check_printable(" ".join(value.split()), what)
    if len(text) > limit:
        raise InvalidIdentity(f"{what} is limited to {limit} characters")
    return text or None


def search_key(*parts: str | None) -> str:
    """Upper-case, accent-free, single-spaced text used for patient search."""
    text = " ".join(p for p in parts if p)
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(stripped.upper().replace("-", " ").replace("'", " ").split())
