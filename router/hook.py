"""The router's part of storing an instance: plan forward jobs, write them with the index
row (one transaction), then wake the forwarders of destinations that have work."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqlalchemy import Connection

from dicom_node.archive.attributes import ReceivedAttributes
from dicom_node.archive.header import InstanceHeader
from dicom_node.archive.identity import PatientIdentity
from router.facts import route_attributes
from router.models import JobState
from router.planner import Plan, Planner
from router.queue import JobQueue, JobSpec

LOG = logging.getLogger(__name__)


class Wakeups:
    """Who to tell that destinations have ready jobs (the forwarders, once started)."""

    def __init__(self) -> None:
        self._listeners: list[Callable[[str], None]] = []
        self._lock = threading.Lock()

    def subscribe(self, listener: Callable[[str], None]) -> None:
        with self._lock:
            self._listeners.append(listener)

    def notify(self, destinations: Iterable[str]) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for destination in destinations:
            for listener in listeners:
                listener(destination)


#: An instance's refusal is audited once per study, destination and purpose while its
#: instances keep arriving (this long since the entry, in this process).
_DROP_AUDIT_SECONDS = 600.0
_DROP_AUDIT_KEYS = 4096

Audit = Callable[..., object]


@dataclass(frozen=True)
class _Routed:
    """A plan and the instance it was made for (what ``committed`` audits)."""

    plan: Plan
    study_instance_uid: str
    sop_instance_uid: str


class RoutingHook:
    """Implements the archive's ``StoreHook`` with the configured routes.

    A job dropped when planned (the patient refused the route's purpose) is audited
    (``routing.drop``, ``audit`` being :meth:`consent.service.ConsentStore.audit`): one
    entry per study, destination and purpose, naming its first instance, rather than
    one per instance (a refused patient's CT study would otherwise write hundreds of
    synced audit transactions on the receiving thread).
    """

    def __init__(
        self,
        planner: Planner,
        queue: JobQueue,
        wakeups: Wakeups,
        audit: Audit | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._planner = planner
        self._queue = queue
        self._wakeups = wakeups
        self._audit = audit
        self._clock = clock
        self._audited: dict[tuple[str, str, str], float] = {}
        self._audited_lock = threading.Lock()
        self._route_keywords = planner.keywords()
        self._enabled = bool(planner.routes.routes)

    def keywords(self) -> frozenset[str]:
        # the identity attributes the archive reads for every data set anyway
        return self._route_keywords if self._enabled else frozenset()

    def prepare(
        self,
        attributes: ReceivedAttributes,
        header: InstanceHeader,
        calling_ae: str,
        identity: PatientIdentity,
    ) -> object | None:
        if not self._enabled:
            return None
        plan = self._planner.plan(
            route_attributes(attributes, self._route_keywords),
            calling_ae,
            identity,
        )
        if not plan.jobs:
            return None
        return _Routed(plan, header.study_instance_uid, header.sop_instance_uid)

    def persist(self, connection: Connection, instance_pk: int, prepared: object) -> None:
        assert isinstance(prepared, _Routed)
        self._queue.insert_jobs(connection, instance_pk, prepared.plan.jobs)

    def committed(self, prepared: object) -> None:
        assert isinstance(prepared, _Routed)
        jobs = prepared.plan.jobs
        ready = {job.destination for job in jobs if job.state is JobState.READY}
        if ready:
            self._wakeups.notify(ready)
        for job in jobs:
            if job.state is JobState.DROPPED:
                self._audit_drop(prepared, job)

    def _audit_drop(self, routed: _Routed, job: JobSpec) -> None:
        if self._audit is None:
            return
        key = (routed.study_instance_uid, job.destination, job.purpose)
        now = self._clock()
        with self._audited_lock:
            last = self._audited.get(key)
            if last is not None and now - last < _DROP_AUDIT_SECONDS:
                return
            if len(self._audited) >= _DROP_AUDIT_KEYS:
                self._audited.clear()
            self._audited[key] = now
        try:
            self._audit(
                actor="router",
                action="routing.drop",
                target=f"study:{routed.study_instance_uid}"[:128],
                details={
                    "patient": job.patient_pk,
                    "purpose": job.purpose,
                    "destination": job.destination,
                    "route": job.route,
                    "reason": job.note,
                    "first_instance": routed.sop_instance_uid,
                },
            )
        except Exception as exc:  # the drop stands; the failure is reported
            LOG.error("audit of a routing refusal failed: %s", type(exc).__name__)
            with self._audited_lock:
                self._audited.pop(key, None)
