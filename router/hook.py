"""The router's part of storing an instance: plan forward jobs, write them with the index
row (one transaction), then wake the forwarders of destinations that have work."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from sqlalchemy import Connection

from dicom_node.archive.attributes import ReceivedAttributes
from dicom_node.archive.header import InstanceHeader
from dicom_node.archive.identity import PatientIdentity
from router.facts import route_attributes
from router.models import JobState
from router.planner import Plan, Planner
from router.queue import JobQueue


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


class RoutingHook:
    """Implements the archive's ``StoreHook`` with the configured routes."""

    def __init__(self, planner: Planner, queue: JobQueue, wakeups: Wakeups) -> None:
        self._planner = planner
        self._queue = queue
        self._wakeups = wakeups
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
        return plan if plan.jobs else None

    def persist(self, connection: Connection, instance_pk: int, prepared: object) -> None:
        assert isinstance(prepared, Plan)
        self._queue.insert_jobs(connection, instance_pk, prepared.jobs)

    def committed(self, prepared: object) -> None:
        assert isinstance(prepared, Plan)
        ready = {job.destination for job in prepared.jobs if job.state is JobState.READY}
        if ready:
            self._wakeups.notify(ready)
