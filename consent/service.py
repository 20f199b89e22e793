"""The consent store: patients, purposes and notices, the consent log, decisions, audit.

:class:`ConsentStore` is the one entry point; it is built once per process from the
process's sessionmaker and handed to whoever needs it (router, DICOM handlers, web, CLI).
It only composes the parts below, each in its own module, and exposes their methods.

Writes
    Each change is one transaction that first takes the store's write lock
    (:func:`consent.audit.lock_for_write`), then writes its rows and one audit entry
    (:meth:`consent.context.StoreContext.write`). So writers are serialised on SQLite and
    PostgreSQL alike, and consent event ids grow in commit order (what
    :meth:`ConsentStore.changes_since` relies on).

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

Where each method lives
    ========================================================  =============================
    methods                                                   module
    ========================================================  =============================
    ``add_purpose``, ``add_notice``, ``notice``,              :mod:`consent.purposes`
    ``list_purposes``
    ``add_patient``, ``import_patients_csv``,                 :mod:`consent.patients`
    ``find_patient``, ``search_patients``, ``show_patient``
    ``record_consent``, ``grant``, ``refuse``, ``withdraw``,  :mod:`consent.records`
    ``mark_entered_in_error``, ``rebuild_state``
    ``decide``, ``decide_many``, ``current``, ``close``       :mod:`consent.decider`
    ``history``, ``export_fhir``, ``retracted_window``        :mod:`consent.history`
    ``subscribe``, ``last_event_id``, ``changes_since``       :mod:`consent.feed`
    ``resolve_dicom_patient``                                 :mod:`consent.resolution`
    ``audit``, ``verify_audit``                               here, on :mod:`consent.audit`
    ========================================================  =============================

    Sessions, the clock and write transactions are shared through
    :class:`consent.context.StoreContext`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from consent.audit import AuditReport, verify_audit
from consent.context import StoreContext, require_actor, utc_now
from consent.decider import Decider
from consent.decision import (
    DENIED,
    NO_DECISION,
    NON_OPPOSITION,
    PERMITTED,
    UNKNOWN_PATIENT,
    UNKNOWN_PURPOSE,
)
from consent.errors import InvalidRequest
from consent.feed import ChangeFeed
from consent.history import ConsentHistory
from consent.integrity import check_consent_records
from consent.patients import Patients
from consent.purposes import NoticeInfo, PurposeInfo, PurposeKeys, Purposes
from consent.records import ConsentRecorder
from consent.resolution import PatientResolver

__all__ = [
    "DENIED",
    "NON_OPPOSITION",
    "NO_DECISION",
    "PERMITTED",
    "UNKNOWN_PATIENT",
    "UNKNOWN_PURPOSE",
    "ConsentStore",
    "NoticeInfo",
    "PurposeInfo",
    "utc_now",
]


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

    Raises
    ------
    TypeError
        ``sessions`` is not bound to an :class:`~sqlalchemy.Engine`.

    Notes
    -----
    Thread-safe: no session is shared between calls. Listeners registered with
    :meth:`subscribe` belong to this instance and run in the thread that made the change,
    after its commit.

    The methods are those of the parts the store is composed of (see the table in
    :mod:`consent.service`), bound at construction; their documentation is there.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        clock: Callable[[], datetime] = utc_now,
        *,
        allow_test_ins: bool = False,
    ) -> None:
        context = StoreContext(sessions, clock, allow_test_ins=allow_test_ins)
        keys = PurposeKeys(context.read_sessions)
        feed = ChangeFeed(context.read_sessions)
        purposes = Purposes(context, keys)
        patients = Patients(context)
        recorder = ConsentRecorder(context, feed)
        decider = Decider(context, keys)
        history = ConsentHistory(context.read_sessions)
        resolver = PatientResolver(context.read_sessions)
        self._context = context

        self.add_purpose = purposes.add_purpose
        self.add_notice = purposes.add_notice
        self.notice = purposes.notice
        self.list_purposes = purposes.list_purposes

        self.add_patient = patients.add_patient
        self.import_patients_csv = patients.import_patients_csv
        self.find_patient = patients.find_patient
        self.search_patients = patients.search_patients
        self.show_patient = patients.show_patient

        self.record_consent = recorder.record_consent
        self.grant = recorder.grant
        self.refuse = recorder.refuse
        self.withdraw = recorder.withdraw
        self.mark_entered_in_error = recorder.mark_entered_in_error
        self.rebuild_state = recorder.rebuild_state

        self.decide = decider.decide
        self.decide_many = decider.decide_many
        self.current = decider.current
        self.close = decider.close

        self.history = history.history
        self.export_fhir = history.export_fhir
        self.retracted_window = history.retracted_window

        self.subscribe = feed.subscribe
        self.last_event_id = feed.last_event_id
        self.changes_since = feed.changes_since

        self.resolve_dicom_patient = resolver.resolve_dicom_patient

    def audit(
        self, *, actor: str, action: str, target: str, details: Mapping[str, Any] | None = None
    ) -> int:
        """Append an entry to the audit log in its own transaction; return its ``seq``.

        For other parts of the gateway (routing decisions, accesses by people). Keep
        ``details`` free of patient data beyond primary keys. Inside a transaction of
        your own, use :func:`consent.audit.lock_for_write` then
        :func:`consent.audit.append_audit` instead.
        """
        actor = require_actor(actor)
        if not action or len(action) > 64 or len(target) > 128:
            raise InvalidRequest("audit action must be 1-64 characters, target at most 128")
        with self._context.write() as session:
            return self._context.audit(session, actor, action, target, details)

    def verify_audit(self, *, known_head: tuple[int, str] | None = None) -> AuditReport:
        """Verify the audit chain (see :func:`consent.audit.verify_audit`), then the
        consent records it vouches for (:func:`consent.integrity.check_consent_records`):
        ``ok`` only when both hold; ``record_problems`` lists what disagrees."""
        with self._context.read_sessions() as session:
            report = verify_audit(session, known_head=known_head)
            if not report.ok:
                return report
            problems = check_consent_records(session)
        if not problems:
            return report
        return replace(report, ok=False, problem=problems[0], record_problems=tuple(problems))
