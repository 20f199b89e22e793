"""Telling the rest of the gateway that consent changed.

Two ways: in-process listeners, called after each change made through the same store
(:meth:`ChangeFeed.subscribe`), and a poll of the consent log that also sees changes made by
other processes (:meth:`ChangeFeed.changes_since`). Polling relies on consent event ids
growing in commit order, which the store's write lock guarantees
(:meth:`consent.context.StoreContext.write`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from consent.context import LOG
from consent.decision import ConsentChange, decision_from_state
from consent.models import ConsentEvent, ConsentState, Purpose


class ChangeFeed:
    """The listeners of one store, and the poll of the consent log.

    Thread-safe: listeners may be added and removed while changes are notified.
    """

    def __init__(self, read_sessions: sessionmaker[Session]) -> None:
        self._read_sessions = read_sessions
        self._listeners: list[Callable[[ConsentChange], None]] = []
        self._listeners_lock = threading.Lock()

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

    def notify(self, changes: Iterable[ConsentChange]) -> None:
        """Call every listener with each change; only after the change is committed."""
        with self._listeners_lock:
            listeners = list(self._listeners)
        for change in changes:
            for listener in listeners:
                try:
                    listener(change)
                except Exception as exc:  # a listener must not undo a committed change
                    LOG.error("consent change listener failed: %s", type(exc).__name__)

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
            ConsentChange(patient_pk, code, decision_from_state(decision, model).outcome, last)
            for patient_pk, code, model, decision, last in rows
        ]
