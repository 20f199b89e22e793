"""Forwarders: one worker thread per destination, sending queued instances.

Each worker claims a batch of jobs under a lease, re-checks consent immediately before
each send, keeps one association to its destination open while work flows (TCP_NODELAY
set) and sends the stored bytes; an instance is decompressed to Explicit VR Little Endian
only when the destination accepts none of its stored transfer syntax. A missing response
(network fault, pynetdicom's reactor race) costs a retry with backoff, never a lost job.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from config.settings import NodeSettings, PeerSettings, Settings
from dicom_node.archive.files import InstanceFiles
from dicom_node.scu import ScuError, connect
from dicom_node.store_scu import StoreSender
from router.decisions import Decide, Outcome, failed
from router.models import HoldReason
from router.queue import CONSENT_DROP_PREFIX, ClaimedJob, JobQueue

LOG = logging.getLogger(__name__)
#: acknowledged jobs recorded together (bounded by the batch: all are recorded at its end)
_ACK_BATCH = 16
_UNCOMPRESSED = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))


@dataclass(frozen=True)
class ForwarderOptions:
    """Tuning of the forwarders."""

    batch_size: int = 64
    poll_interval: float = 0.5
    idle_release: float = 5.0
    batch_linger: float = 0.05


class _Link:
    """One open association to a destination and the contexts it accepted."""

    def __init__(
        self, assoc: Association, proposed: set[tuple[str, str]], dimse_timeout: float
    ) -> None:
        self.assoc = assoc
        self.sender = StoreSender(assoc, dimse_timeout)
        self.proposed = proposed
        self.accepted = {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts
        }
        self.last_used = time.monotonic()

    def close(self) -> None:
        try:
            if self.assoc.is_established:
                self.assoc.release()
        except Exception:  # the peer may already be gone
            self.assoc.abort()


class DestinationWorker(threading.Thread):
    """Sends the jobs of one destination."""

    def __init__(
        self,
        node: NodeSettings,
        peer: PeerSettings,
        queue: JobQueue,
        files: InstanceFiles,
        decide: Decide,
        options: ForwarderOptions,
        owner: str,
        on_sent: Callable[[str, int], None] | None = None,
    ) -> None:
        super().__init__(name=f"forward-{peer.name}", daemon=True)
        self._node = node
        self._peer = peer
        self._queue = queue
        self._files = files
        self._decide = decide
        self._options = options
        self._owner = owner
        self._on_sent = on_sent
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._link: _Link | None = None
        # sent and acknowledged, not yet recorded: written in one transaction per few
        # jobs (a crash before that resends them; destinations keep one copy per UID)
        self._acknowledged: list[int] = []
        self._unreachable = ""

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                jobs = self._queue.claim(self._peer.name, self._owner, self._options.batch_size)
            except Exception as exc:
                LOG.error(
                    "forwarder %s: cannot claim jobs: %s", self._peer.name, type(exc).__name__
                )
                jobs = []
            if not jobs:
                self._release_if_idle()
                self._wake.wait(self._options.poll_interval)
                self._wake.clear()
                continue
            started = time.monotonic()
            self._process(jobs)
            spent = time.monotonic() - started
            if len(jobs) < self._options.batch_size and spent < self._options.batch_linger:
                # claims at most every batch_linger seconds while jobs trickle in: one
                # claim and one acknowledgement for several (a batch that took longer
                # gave the next jobs that long to gather already)
                self._stopping.wait(self._options.batch_linger - spent)
        self._close_link()

    def _record_acknowledged(self) -> None:
        done, self._acknowledged = self._acknowledged, []
        if not done:
            return
        try:
            self._queue.complete_many(done, self._owner)
        except Exception as exc:  # the lease expires and the jobs are sent again
            LOG.error(
                "forwarder %s: cannot record sent jobs: %s", self._peer.name, type(exc).__name__
            )
            return
        if self._on_sent is not None:
            self._on_sent(self._peer.name, len(done))

    def _process(self, jobs: list[ClaimedJob]) -> None:
        try:
            self._process_batch(jobs)
        finally:
            self._record_acknowledged()

    def _process_batch(self, jobs: list[ClaimedJob]) -> None:
        self._unreachable = ""  # set when the destination cannot be reached in this batch
        for index, job in enumerate(jobs):
            if self._stopping.is_set():
                for rest in jobs[index:]:
                    self._queue.requeue(rest, self._owner)
                return
            try:
                self._process_one(job, jobs)
            except Exception as exc:  # never let one job kill the worker
                LOG.error(
                    "forwarder %s: job %d failed: %s", self._peer.name, job.id, type(exc).__name__
                )
                self._drop_link()
                self._queue.retry_later(job, self._owner, f"internal error: {type(exc).__name__}")

    def _consent_allows(self, job: ClaimedJob) -> bool:
        """Decide the job's consent now; a job that may not leave is dropped or held.

        The purpose decided is the job's, except when the destination peer is bound to
        another purpose: the job was planned under an earlier configuration (the
        configuration check makes every route to a purpose-bound peer carry its purpose),
        and what reaches that peer needs consent to the peer's purpose. Such a job
        becomes a job of the peer's purpose; one planned without a resolved patient is
        held for reconciliation.
        """
        purpose, repurposed = job.purpose, None
        bound = self._peer.purpose
        if bound and purpose != bound:
            purpose = repurposed = bound
            if job.patient_pk is None:
                self._queue.hold(
                    job,
                    self._owner,
                    f"peer {self._peer.name} now needs purpose {bound}: patient not resolved",
                    hold_reason=HoldReason.RECONCILIATION,
                    purpose=bound,
                )
                return False
        if not purpose:
            return True
        decision = self._decide(job.patient_pk, purpose)
        if decision.outcome is Outcome.PERMIT:
            return True
        reason = f"{CONSENT_DROP_PREFIX}: {decision.reason}"
        if decision.outcome is Outcome.DENY and not failed(decision):
            self._queue.drop(job, self._owner, reason, purpose=repurposed)
        else:
            self._queue.hold(job, self._owner, reason, purpose=repurposed)
        return False

    def _retry_later(self, job: ClaimedJob, reason: str, *, permanent: bool = False) -> None:
        """A send that did not happen (destination down, refused, no answer) is retried
        only while consent still allows it: a withdrawal applied while this job was
        claimed drops it now, not when the destination answers again."""
        if self._consent_allows(job):
            self._queue.retry_later(job, self._owner, reason, permanent=permanent)

    def _process_one(self, job: ClaimedJob, batch: list[ClaimedJob]) -> None:
        path = self._files.absolute(job.path, size=job.size)
        if self._unreachable:  # one connection attempt per batch, not one per job
            self._retry_later(job, self._unreachable)
            return
        try:
            link = self._ensure_link(job, batch)
        except ScuError as exc:
            self._unreachable = str(exc)
            self._retry_later(job, str(exc))
            return
        code: int | None
        try:
            payload = None
            if not link.sender.accepts(job.sop_class_uid, job.transfer_syntax_uid):
                payload = _decompressed(path, job, link)
                if payload is None:
                    self._retry_later(
                        job,
                        "destination accepts neither the stored nor an uncompressed syntax",
                        permanent=True,
                    )
                    return
            # consent is decided here, immediately before the bytes leave: a withdrawal
            # committed while the file was awaited, the association opened or the
            # instance decompressed is honoured
            if not self._consent_allows(job):
                return
            if payload is None:
                # the stored bytes, straight from the file (dicom_node.store_scu)
                code = link.sender.send(
                    path, job.sop_class_uid, job.sop_instance_uid, job.transfer_syntax_uid
                )
            else:
                status = link.assoc.send_c_store(payload)
                code = int(status.Status) if status is not None and "Status" in status else None
        except (OSError, ValueError, AttributeError, RuntimeError) as exc:
            self._drop_link()
            self._retry_later(job, f"send failed: {type(exc).__name__}")
            return
        link.last_used = time.monotonic()
        if code is None:
            # no response: association lost or the response went astray; resend later
            self._drop_link()
            self._retry_later(job, "no C-STORE response")
        elif code == 0x0000 or (code & 0xF000) == 0xB000:
            self._acknowledged.append(job.id)
            if len(self._acknowledged) >= _ACK_BATCH:
                self._record_acknowledged()
        else:
            self._retry_later(job, f"destination answered 0x{code:04X}")

    def _ensure_link(self, job: ClaimedJob, batch: list[ClaimedJob]) -> _Link:
        link = self._link
        wanted = {(j.sop_class_uid, j.transfer_syntax_uid) for j in batch}
        if (
            link is not None
            and link.assoc.is_established
            and ((job.sop_class_uid, job.transfer_syntax_uid) in link.proposed)
        ):
            return link
        self._close_link()
        if link is not None:
            wanted |= link.proposed
        contexts = _contexts(wanted)
        assoc = connect(self._node, self._peer, contexts)
        proposed = {(str(cx.abstract_syntax), ts) for cx in contexts for ts in cx.transfer_syntax}
        self._link = _Link(assoc, proposed | wanted, self._node.dimse_timeout)
        return self._link

    def _release_if_idle(self) -> None:
        link = self._link
        if link is not None and time.monotonic() - link.last_used > self._options.idle_release:
            self._close_link()

    def _close_link(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None

    def _drop_link(self) -> None:
        if self._link is not None:
            try:
                self._link.assoc.abort()
            finally:
                self._link = None


def new_owner() -> str:
    """A lease owner name for one run of a set of forwarders."""
    return f"node-{uuid.uuid4().hex[:12]}"


def forwarded_destinations(settings: Settings) -> list[str]:
    """The peers that routes send to, sorted: one forwarder each."""
    return sorted({d for r in settings.routes for d in r.destinations})


def _contexts(wanted: set[tuple[str, str]]) -> list[PresentationContext]:
    """One context per (SOP class, transfer syntax), plus uncompressed fall-backs."""
    pairs: list[tuple[str, str]] = []
    for sop_class, syntax in sorted(wanted):
        for ts in (syntax, *_UNCOMPRESSED):
            if (sop_class, ts) not in pairs:
                pairs.append((sop_class, ts))
    return [build_context(sop_class, [ts]) for sop_class, ts in pairs[:128]]


def _decompressed(path: Path, job: ClaimedJob, link: _Link) -> Any:
    """The instance decoded to Explicit VR Little Endian, if the destination takes it."""
    if (job.sop_class_uid, str(ExplicitVRLittleEndian)) not in link.accepted:
        return None
    dataset = dcmread(path)
    if dataset.file_meta.TransferSyntaxUID.is_compressed:
        # same instance, same UID: pydicom would otherwise mint a new SOP Instance UID
        dataset.decompress(generate_instance_uid=False)
    else:
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return dataset


class ForwarderPool:
    """A worker per destination peer named by a route."""

    def __init__(
        self,
        settings: Settings,
        queue: JobQueue,
        files: InstanceFiles,
        decide: Decide,
        options: ForwarderOptions | None = None,
        on_sent: Callable[[str, int], None] | None = None,
        owner: str = "",
    ) -> None:
        self.owner = owner or new_owner()
        options = options or ForwarderOptions()
        self._workers: dict[str, DestinationWorker] = {}
        for name in forwarded_destinations(settings):
            peer = settings.peer_by_name(name)
            if peer is None:  # settings validation makes this impossible
                continue
            self._workers[name] = DestinationWorker(
                settings.node, peer, queue, files, decide, options, self.owner, on_sent
            )
        self._queue = queue

    def start(self) -> None:
        recovered = self._queue.recover_stale()
        if recovered:
            LOG.info("recovered %d forward job(s) whose lease had expired", recovered)
        for worker in self._workers.values():
            worker.start()

    def wake(self, destination: str | None = None) -> None:
        """Tell a worker (or all) that jobs may be ready."""
        if destination is None:
            for worker in self._workers.values():
                worker.wake()
        elif destination in self._workers:
            self._workers[destination].wake()

    def stop(self, timeout: float = 10.0) -> None:
        for worker in self._workers.values():
            worker.stop()
        deadline = time.monotonic() + timeout
        for worker in self._workers.values():
            if worker.is_alive():
                worker.join(max(0.1, deadline - time.monotonic()))
        self._queue.release_own_leases(self.owner)
