"""The hash-chained audit log: append and verify.

Each entry has a sequence number ``seq`` (1, 2, 3, ... with no gap), and
``hash = sha256(prev_hash + canonical_json(entry))`` where ``prev_hash`` is the hash of the
entry before (64 zeros for the first one) and the canonical JSON covers ``seq``, ``at``,
``actor``, ``action``, ``target`` and ``details`` (keys sorted, no spaces, UTF-8).

What :func:`verify_audit` detects:

* an edited entry: its recomputed hash differs from the stored one;
* an inserted entry: it either breaks the ``seq`` sequence, or its successor's
  ``prev_hash`` no longer matches (an entry renumbered to make room fails its own hash);
* a removed entry: a gap in ``seq`` (or a broken ``prev_hash`` link after renumbering).

The chain carries no secret: someone able to rewrite the whole table can recompute every
hash, and removing the last entries leaves a valid, shorter chain. Both are caught by
checking against a head recorded elsewhere earlier (``known_head``: ``audit verify`` prints
the head to keep).

Appends must be serialised, or two writers would chain to the same predecessor:
:func:`lock_for_write` takes a transaction-scoped advisory lock on PostgreSQL; on SQLite
the engine's ``BEGIN IMMEDIATE`` already admits one writer at a time. The consent store
takes that lock at the start of each of its write transactions, which also serialises its
consent events (their ids then grow in commit order).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from consent.models import AuditEntry

GENESIS_HASH = "0" * 64
# pg_advisory_xact_lock key shared by every writer of the consent store ("consent" in hex)
_PG_LOCK_KEY = 0x636F6E73656E74


@dataclass(frozen=True)
class AuditReport:
    """Result of :func:`verify_audit`.

    Attributes
    ----------
    ok : bool
        Whether the whole chain verified.
    first_bad_seq : int or None
        The first entry found wrong (for a removed entry: the missing ``seq``).
    problem : str
        One line describing the first problem, ``""`` when ``ok``.
    entries : int
        Number of entries read.
    head_seq, head_hash : int and str
        The last entry's ``seq`` and ``hash`` (0 and the genesis hash when empty): record
        them elsewhere to detect a later truncation or full rewrite.
    record_problems : tuple of str
        With an intact chain, the consent records that disagree with it
        (:func:`consent.integrity.check_consent_records`; ``ok`` is then false).
    """

    ok: bool
    first_bad_seq: int | None
    problem: str
    entries: int
    head_seq: int = 0
    head_hash: str = GENESIS_HASH
    record_problems: tuple[str, ...] = ()


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, non-ASCII kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _timestamp(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def entry_hash(
    prev_hash: str, *, seq: int, at: datetime, actor: str, action: str, target: str, details: str
) -> str:
    """The hash of one entry given its predecessor's hash."""
    body = canonical_json(
        {
            "seq": seq,
            "at": _timestamp(at),
            "actor": actor,
            "action": action,
            "target": target,
            "details": details,
        }
    )
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


def lock_for_write(session: Session) -> None:
    """Serialise writers of the consent store until the end of the transaction.

    On PostgreSQL this takes ``pg_advisory_xact_lock``; on SQLite the transaction already
    began with ``BEGIN IMMEDIATE`` (see :func:`cli.database.make_engine`), which admits a
    single writer.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})


def append_audit(
    session: Session,
    *,
    at: datetime,
    actor: str,
    action: str,
    target: str,
    details: Mapping[str, Any] | None = None,
) -> int:
    """Append one entry in the caller's transaction and return its ``seq``.

    The caller must hold the write lock (:func:`lock_for_write`) since the start of its
    transaction. ``details`` must not carry more patient data than the entry needs: use
    primary keys, not names.
    """
    if at.tzinfo is None:
        raise ValueError("audit timestamps must be timezone-aware")
    at = at.astimezone(UTC)
    last = session.execute(
        select(AuditEntry.seq, AuditEntry.hash).order_by(AuditEntry.seq.desc()).limit(1)
    ).first()
    seq, prev_hash = (last[0] + 1, last[1]) if last is not None else (1, GENESIS_HASH)
    details_json = canonical_json(dict(details or {}))
    digest = entry_hash(
        prev_hash,
        seq=seq,
        at=at,
        actor=actor,
        action=action,
        target=target,
        details=details_json,
    )
    session.add(
        AuditEntry(
            seq=seq,
            at=at,
            actor=actor,
            action=action,
            target=target,
            details=details_json,
            prev_hash=prev_hash,
            hash=digest,
        )
    )
    session.flush()
    return seq


def verify_audit(
    session: Session, *, known_head: tuple[int, str] | None = None, batch: int = 5000
) -> AuditReport:
    """Walk the whole chain and report the first inconsistency.

    Parameters
    ----------
    session : Session
        Any session; only reads.
    known_head : (int, str), optional
        A ``(seq, hash)`` pair recorded earlier (for instance from a previous report's
        ``head_seq``/``head_hash``): the entry ``seq`` must still exist with that hash.
    batch : int
        Rows fetched per round trip.

    Returns
    -------
    AuditReport
    """
    expected_seq = 1
    prev_hash = GENESIS_HASH
    count = 0
    head_found = known_head is None
    last_seq = 0
    while True:
        rows = session.execute(
            select(
                AuditEntry.seq,
                AuditEntry.at,
                AuditEntry.actor,
                AuditEntry.action,
                AuditEntry.target,
                AuditEntry.details,
                AuditEntry.prev_hash,
                AuditEntry.hash,
            )
            .where(AuditEntry.seq > last_seq)
            .order_by(AuditEntry.seq)
            .limit(batch)
        ).all()
        if not rows:
            break
        for row in rows:
            count += 1
            if row.seq != expected_seq:
                if row.seq > expected_seq:
                    return _bad(expected_seq, f"entry {expected_seq} is missing", count)
                return _bad(row.seq, f"entry {row.seq} is out of sequence", count)
            if row.prev_hash != prev_hash:
                return _bad(row.seq, f"entry {row.seq} does not chain to its predecessor", count)
            recomputed = entry_hash(
                prev_hash,
                seq=row.seq,
                at=row.at,
                actor=row.actor,
                action=row.action,
                target=row.target,
                details=row.details,
            )
            if recomputed != row.hash:
                return _bad(row.seq, f"entry {row.seq} has been altered", count)
            if known_head is not None and row.seq == known_head[0]:
                if row.hash != known_head[1]:
                    return _bad(row.seq, f"entry {row.seq} differs from the recorded head", count)
                head_found = True
            prev_hash = row.hash
            expected_seq += 1
            last_seq = row.seq
    if not head_found and known_head is not None:
        return _bad(
            known_head[0], f"recorded head entry {known_head[0]} is missing (truncated?)", count
        )
    return AuditReport(True, None, "", count, last_seq, prev_hash)


def _bad(seq: int, problem: str, count: int) -> AuditReport:
    return AuditReport(False, seq, problem, count)
