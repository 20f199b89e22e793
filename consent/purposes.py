"""Purposes ("traitements") and the versioned texts of their notices.

A purpose is never deleted and never changes model, so its code → primary key and model
mapping can be cached (:class:`PurposeKeys`); notices are inserted only, one row per
version with the SHA-256 of the UTF-8 text.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from consent.context import StoreContext, require_actor
from consent.errors import DuplicatePurpose, InvalidRequest, UnknownPurpose
from consent.models import PURPOSE_MODELS, NoticeVersion, Purpose

_PURPOSE_CODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class PurposeInfo:
    """A purpose as returned by :meth:`Purposes.add_purpose` and ``list_purposes``.

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
class PurposeKey:
    """A purpose's primary key and model (``opt-in`` or ``opt-out``)."""

    pk: int
    model: str


def require_purpose(session: Session, code: str) -> Purpose:
    """The purpose with this code.

    Raises
    ------
    UnknownPurpose
    """
    purpose = session.scalars(select(Purpose).where(Purpose.code == code)).first()
    if purpose is None:
        raise UnknownPurpose(f"unknown purpose '{code}'")
    return purpose


def latest_notice(session: Session, purpose_pk: int) -> NoticeVersion | None:
    """The purpose's notice with the highest version, or ``None``."""
    return session.scalars(
        select(NoticeVersion)
        .where(NoticeVersion.purpose_pk == purpose_pk)
        .order_by(NoticeVersion.version.desc())
        .limit(1)
    ).first()


def find_notice(session: Session, purpose_pk: int, version: int) -> NoticeVersion | None:
    """The purpose's notice with this version number, or ``None``."""
    return session.scalars(
        select(NoticeVersion).where(
            NoticeVersion.purpose_pk == purpose_pk, NoticeVersion.version == version
        )
    ).first()


class PurposeKeys:
    """Purpose code → :class:`PurposeKey`, cached once found.

    Only known purposes are cached: an unknown code is looked up again on each call, as
    it may be added later, by any process.
    """

    def __init__(self, read_sessions: sessionmaker[Session]) -> None:
        self._read_sessions = read_sessions
        self._keys: dict[str, PurposeKey] = {}

    def get(self, code: str) -> PurposeKey | None:
        """The key of the purpose with this code, or ``None`` when there is none (yet)."""
        key = self._keys.get(code)
        if key is not None:
            return key
        with self._read_sessions() as session:
            row = session.execute(
                select(Purpose.id, Purpose.model).where(Purpose.code == code)
            ).first()
        if row is None:
            return None  # not cached: it may be added later, by any process
        key = PurposeKey(row[0], row[1])
        self._keys[code] = key
        return key

    def remember(self, code: str, key: PurposeKey) -> None:
        """Cache the key of a purpose just committed."""
        self._keys[code] = key


class Purposes:
    """Adds and reads purposes and their notices.

    Parameters
    ----------
    context : StoreContext
    keys : PurposeKeys
        The store's cache, filled with each purpose added here.
    """

    def __init__(self, context: StoreContext, keys: PurposeKeys) -> None:
        self._context = context
        self._keys = keys

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
        actor = require_actor(actor)
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
        with self._context.write() as session:
            if session.scalar(select(Purpose.id).where(Purpose.code == code)) is not None:
                raise DuplicatePurpose(f"purpose '{code}' already exists")
            now = self._context.now()
            purpose = Purpose(
                code=code, name=name, reference=reference.strip(), model=model, created_at=now
            )
            session.add(purpose)
            session.flush()
            notice: NoticeVersion | None = None
            if notice_text is not None:
                notice = self._insert_notice(session, purpose.id, 1, notice_text, now)
            self._context.audit(
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
        self._keys.remember(code, PurposeKey(info.pk, info.model))
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
        actor = require_actor(actor)
        if not text.strip():
            raise InvalidRequest("notice text is empty")
        with self._context.write() as session:
            purpose = require_purpose(session, code)
            latest = latest_notice(session, purpose.id)
            version = (latest.version if latest else 0) + 1
            notice = self._insert_notice(session, purpose.id, version, text, self._context.now())
            self._context.audit(
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
        with self._context.read_sessions() as session:
            purpose = require_purpose(session, code)
            if version is None:
                notice = latest_notice(session, purpose.id)
            else:
                notice = find_notice(session, purpose.id, version)
            if notice is None:
                raise UnknownPurpose(f"purpose '{code}' has no notice version {version or ''}")
            return NoticeInfo(code, notice.version, notice.text, notice.sha256, notice.created_at)

    def list_purposes(self) -> list[PurposeInfo]:
        """Every purpose, by code, with its latest notice version."""
        with self._context.read_sessions() as session:
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
