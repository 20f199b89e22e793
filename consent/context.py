"""What the parts of one consent store share: sessions, the clock, write transactions.

Every write of the consent store goes through :meth:`StoreContext.write`: one transaction
that first takes the store's write lock (:func:`consent.audit.lock_for_write`), in which
the change writes its rows and its audit entry (:meth:`StoreContext.audit`). Reads use
:attr:`StoreContext.read_sessions`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from config.db import reading
from consent.audit import append_audit, lock_for_write
from consent.errors import InvalidRequest

LOG = logging.getLogger("consentgate.consent")


def utc_now() -> datetime:
    """The default clock: the current time, timezone-aware UTC."""
    return datetime.now(UTC)


def require_actor(actor: str) -> str:
    """``actor`` stripped of surrounding white space.

    Raises
    ------
    InvalidRequest
        Empty or longer than 128 characters.
    """
    value = actor.strip()
    if not value or len(value) > 128:
        raise InvalidRequest("actor must be 1-128 characters")
    return value


class StoreContext:
    """The database access, clock and options of one consent store, shared by its parts.

    Parameters
    ----------
    sessions : sessionmaker
        The process's sessionmaker, bound to its engine.
    clock : callable
        Returns the current time as an aware ``datetime``.
    allow_test_ins : bool
        Accept INS under the test/demo OIDs.

    Attributes
    ----------
    sessions : sessionmaker
        For writes (use :meth:`write`).
    read_sessions : sessionmaker
        For units of work that only read (:func:`config.db.reading`).
    engine : Engine
        The engine ``sessions`` is bound to.
    allow_test_ins : bool

    Raises
    ------
    TypeError
        ``sessions`` is not bound to an :class:`~sqlalchemy.Engine`.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        clock: Callable[[], datetime],
        *,
        allow_test_ins: bool,
    ) -> None:
        bind = sessions.kw.get("bind")
        if not isinstance(bind, Engine):
            raise TypeError("ConsentStore needs a sessionmaker bound to an Engine")
        self.sessions = sessions
        self.read_sessions = reading(bind)
        self.engine = bind
        self._clock = clock
        self.allow_test_ins = allow_test_ins

    def now(self) -> datetime:
        """The clock's current time, in UTC.

        Raises
        ------
        ValueError
            The clock returned a naive ``datetime``.
        """
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("the clock must return timezone-aware datetimes")
        return now.astimezone(UTC)

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session in a transaction holding the store's write lock; commits on exit,
        rolls back on an exception."""
        with self.sessions() as session, session.begin():
            lock_for_write(session)
            yield session

    def audit(
        self,
        session: Session,
        actor: str,
        action: str,
        target: str,
        details: Mapping[str, Any] | None = None,
    ) -> int:
        """Append an audit entry, stamped with :meth:`now`, in ``session``'s transaction
        (opened with :meth:`write`); return its ``seq``."""
        return append_audit(
            session, at=self.now(), actor=actor, action=action, target=target, details=details
        )
