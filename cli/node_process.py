"""Everything ``consentgate serve`` runs, started and stopped in the right order.

Start: archive directories and ingest journal (replayed after a crash), DICOM node,
forwarders (threads, or a child process: ``[router] forwarders``), consent
synchronisation, HTTP endpoint. Stop: stop accepting associations and
let in-flight ones finish, then stop the forwarders (their claimed-but-unsent jobs go back
to the queue), then the rest; last, the journal's final checkpoint.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from cli.forward_process import ForwarderProcess
from cli.runtime import Ingest, Runtime, build_node
from router.consent_sync import ConsentSync
from router.forwarder import ForwarderOptions, ForwarderPool
from router.retention import Retention

LOG = logging.getLogger(__name__)


class ConfigurationMismatch(RuntimeError):
    """The configuration names something the database does not know."""


def check_purposes(runtime: Runtime) -> None:
    """Every purpose named by a route or a peer must exist in the consent store."""
    known = {p.code for p in runtime.consent.list_purposes()}
    named: Iterable[tuple[str, str]] = [
        *((f"routes '{r.name}'", r.purpose) for r in runtime.settings.routes if r.purpose),
        *((f"peers '{p.name}'", p.purpose) for p in runtime.settings.peers if p.purpose),
    ]
    for where, purpose in named:
        if purpose not in known:
            raise ConfigurationMismatch(
                f"{runtime.settings.source}: {where} names purpose '{purpose}', which is not "
                "defined: add it with 'consentgate purpose add'"
            )


class NodeProcess:
    """The running gateway: DICOM node, forwarders and consent synchronisation."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        forwarder_options: ForwarderOptions | None = None,
        sync_interval: float | None = None,
        sweep_interval: float | None = None,
    ) -> None:
        tuning = runtime.settings.router
        forwarder_options = forwarder_options or ForwarderOptions(
            batch_size=tuning.batch_size,
            poll_interval=tuning.poll_interval,
            idle_release=tuning.idle_release,
            batch_linger=tuning.batch_linger,
        )
        sync_interval = tuning.consent_poll_interval if sync_interval is None else sync_interval
        sweep_interval = tuning.consent_sweep_interval if sweep_interval is None else sweep_interval
        self.runtime = runtime
        self.ingest = Ingest(runtime)
        self.node = build_node(runtime)

        def on_sent(destination: str, count: int) -> None:
            runtime.metrics.forwarded.labels(destination).inc(count)

        self.forwarders: ForwarderPool | ForwarderProcess
        if tuning.forwarders == "process":
            self.forwarders = ForwarderProcess(
                runtime.settings, runtime.queue, forwarder_options, on_sent=on_sent
            )
        else:
            self.forwarders = ForwarderPool(
                runtime.settings,
                runtime.queue,
                runtime.files,
                runtime.consent.decide,
                forwarder_options,
                on_sent=on_sent,
            )
        self.sync = ConsentSync(
            runtime.queue,
            runtime.sessions,
            runtime.consent.decide,
            runtime.consent.changes_since,
            runtime.consent.last_event_id,
            wake=self.forwarders.wake,
            retention=Retention(
                tuning.retention,
                runtime.sessions,
                runtime.files,
                forget_parents=runtime.index.forget_parents,
                journal=runtime.journal,
                origin=runtime.queue.origin,
            ),
            audit=runtime.consent.audit,
        )
        self._sync_interval = sync_interval
        self._sweep_interval = sweep_interval
        self._stop = threading.Event()
        self._poll_now = threading.Event()
        self._unsubscribe = runtime.consent.subscribe(self._on_consent_change)
        runtime.wakeups.subscribe(self.forwarders.wake)
        self._sync_thread = threading.Thread(
            target=self._sync_loop, name="consent-sync", daemon=True
        )

    def start(self) -> tuple[str, int]:
        """Start forwarders, consent synchronisation and the DICOM node."""
        check_purposes(self.runtime)
        self.ingest.start()  # replay what a crash left before anything is received
        try:
            address = self.node.start()  # a busy port stops us before any worker runs
        except BaseException:
            self.ingest.stop()
            raise
        self.sync.sweep()
        self.forwarders.start()
        self._sync_thread.start()
        return address

    def health(self) -> dict[str, str]:
        """The node's checks of ``/healthz``: ingest journal, archive writes, forwarders."""
        checks = self.ingest.health()
        if isinstance(self.forwarders, ForwarderProcess):
            checks["forwarders"] = self.forwarders.health()
        return checks

    def _on_consent_change(self, change: object) -> None:
        # a change made in this process: poll now rather than at the next interval
        self._poll_now.set()

    def _sync_loop(self) -> None:
        waited = 0.0
        while not self._stop.is_set():
            try:
                self.sync.poll()
                waited += self._sync_interval
                if waited >= self._sweep_interval:
                    waited = 0.0
                    self.sync.sweep()
            except Exception as exc:
                LOG.error("consent synchronisation failed: %s", type(exc).__name__)
            self._poll_now.wait(self._sync_interval)
            self._poll_now.clear()

    def stop(self, grace: float | None = None) -> int:
        """Stop in order; returns how many associations had to be aborted."""
        aborted = self.node.stop(grace)
        self._stop.set()
        self._poll_now.set()
        self._unsubscribe()
        self.forwarders.stop()
        if self._sync_thread.is_alive():
            self._sync_thread.join(timeout=5)
        self.ingest.stop()
        return aborted
