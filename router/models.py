"""The durable forward queue: one job per (instance, destination).

Jobs live in the archive's metadata because each references an archived instance and is
created in the same transaction as the instance's index row. ``patient_pk`` refers to the
consent store's patient (no foreign key: the consent store is a separate schema part).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import DateTime, ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from dicom_node.archive.models import ArchiveBase


class JobState(StrEnum):
    """Life cycle of a forward job."""

    READY = "ready"  # may be sent now (or at next_attempt_at)
    HELD = "held"  # waiting for consent or for identity reconciliation
    SENDING = "sending"  # claimed by a forwarder under a lease
    DONE = "done"  # the destination acknowledged it
    FAILED = "failed"  # dead letter: attempts exhausted or permanent refusal
    DROPPED = "dropped"  # consent refused/withdrawn, or rejected at reconciliation


class HoldReason(StrEnum):
    """Why a job is held."""

    CONSENT = "consent"
    RECONCILIATION = "reconciliation"


class ForwardJob(ArchiveBase):
    """Send one archived instance to one destination peer."""

    __tablename__ = "router_job"
    __table_args__ = (
        UniqueConstraint("instance_pk", "destination", name="uq_router_job_instance_dest"),
        Index("ix_router_job_claim", "state", "destination", "next_attempt_at"),
        Index("ix_router_job_consent", "patient_pk", "purpose", "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_pk: Mapped[int] = mapped_column(
        ForeignKey("archive_instance.id", ondelete="CASCADE"), index=True
    )
    destination: Mapped[str] = mapped_column(String(64))
    route: Mapped[str] = mapped_column(String(64))
    purpose: Mapped[str] = mapped_column(String(64), default="")
    patient_pk: Mapped[int | None] = mapped_column(Integer, nullable=True)
    state: Mapped[str] = mapped_column(String(16))
    hold_reason: Mapped[str] = mapped_column(String(32), default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    lease_owner: Mapped[str] = mapped_column(String(64), default="")
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_error: Mapped[str] = mapped_column(String(255), default="")
    #: the archive holding the instance (``dicom_node.archive.files.node_identity``):
    #: only a node with that archive claims the job; "" (jobs made before it was
    #: recorded): any node
    origin: Mapped[str] = mapped_column(String(36), default="", server_default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
