"""Prometheus metrics of the DICOM node, registered on a registry handed in."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class NodeMetrics:
    """Counters and gauges exported on ``/metrics``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.associations = Counter(
            "consentgate_associations",
            "Associations requested, by result",
            ["result"],
            registry=registry,
        )
        self.active_associations = Gauge(
            "consentgate_active_associations", "Associations in progress", registry=registry
        )
        self.instances_received = Counter(
            "consentgate_instances_received",
            "Instances acknowledged by C-STORE, by outcome (stored, duplicate)",
            ["outcome"],
            registry=registry,
        )
        self.bytes_received = Counter(
            "consentgate_bytes_received",
            "Bytes archived for newly stored instances (file size, meta included)",
            registry=registry,
        )
        self.errors = Counter(
            "consentgate_errors",
            "Requests answered with a failure status, by service and status",
            ["service", "status"],
            registry=registry,
        )
        self.queries = Counter(
            "consentgate_queries", "C-FIND requests, by level", ["level"], registry=registry
        )
        self.forwarded = Counter(
            "consentgate_instances_forwarded",
            "Instances acknowledged by a forward destination",
            ["destination"],
            registry=registry,
        )
        self.retrieved = Counter(
            "consentgate_instances_sent",
            "Instances sent by C-MOVE/C-GET sub-operations",
            ["service"],
            registry=registry,
        )
