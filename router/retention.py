"""Retention: what becomes of the local copy once a consent refusal has dropped its jobs.

``[router] retention`` chooses:

``keep`` (default)
    Nothing is deleted. The local copy stays in the archive; the care team's peers can
    still query and retrieve it.
``delete-unneeded``
    Each time a refusal or withdrawal of a patient's consent for a purpose is applied
    (:class:`router.consent_sync.ConsentSync`), every archived instance that has a
    *dropped* job for that patient and purpose, and no job that still needs its file, is
    deleted. A job needs the file while it is ``ready``, ``held``, ``sending`` or
    ``failed`` (a dead letter an operator may retry); ``done`` and ``dropped`` are final.
    So an instance the care team's PACS has acknowledged goes; one whose care-team job is
    still queued, being sent or dead-lettered stays.

What deleting means, in this order:

1. One transaction: the instances' forward jobs and index rows are deleted, the parents'
   counters (series and study ``number_of_instances``, study ``number_of_series``) are
   decremented, a series left empty is deleted (and its modality leaves the study's
   ``modalities`` unless another series of the study has it), then an empty study, then
   an empty patient; one audit entry per study (action ``retention.delete``) records what
   went, including a summary of the deleted forward jobs (destination/state counts), in
   the hash-chained audit log. The forward-job rows themselves are not kept: they name an
   instance that no longer exists (their foreign key cascades anyway).
2. The caller's ``forget_parents`` (the archive index's series cache) is called.
3. The files are removed. A crash before that leaves unindexed files, which are harmless;
   an index row never points to a removed file. A copy of the same SOP Instance UID that
   is stored again between the commit and the removal is recognised (it is another file)
   and left in place.

Jobs being sent when the refusal is applied are dropped by the forwarder's own consent
check a moment later; their instances, and those stored while the consent was already
refused (created dropped), are deleted at the next refusal or withdrawal applied for that
patient and purpose, since the selection covers every dropped job of the pair. Applying a
change twice (several nodes poll the same consent log) deletes nothing more.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Select, delete, exists, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from config.db import reading
from consent.audit import append_audit, lock_for_write
from consent.decision import refusal_in_force
from dicom_node.archive.files import InstanceFiles, fsync_directory
from dicom_node.archive.journal import IngestJournal
from dicom_node.archive.models import Instance, Patient, Series, Study
from router.models import ForwardJob, HoldReason, JobState

LOG = logging.getLogger(__name__)

#: Job states after which the instance's file is no longer needed by that job.
FINAL_STATES = (JobState.DONE.value, JobState.DROPPED.value)
AUDIT_ACTION = "retention.delete"
_CHUNK = 500  # ids per IN (...) list
_ATTEMPTS = 3  # a deadlock or a concurrent store into an emptied series: try again

T = TypeVar("T")


class RetentionPolicy(StrEnum):
    """The values of ``[router] retention``."""

    KEEP = "keep"
    DELETE_UNNEEDED = "delete-unneeded"


@dataclass(frozen=True)
class RetentionReport:
    """What one application of the policy deleted."""

    instances: int = 0
    studies: int = 0
    files_removed: int = 0
    bytes: int = 0
    audit_seqs: tuple[int, ...] = ()


@dataclass
class _StudyDeletion:
    study_uid: str
    instances: int = 0
    bytes: int = 0
    series: Counter[str] = field(default_factory=Counter)
    series_removed: int = 0
    study_removed: bool = False
    patient_removed: bool = False
    jobs: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class DoomedFile:
    """An instance being deleted: where its file is and which file it is."""

    relative_path: str
    #: (st_dev, st_ino, st_size, st_mtime_ns) when the row was deleted; None: no file
    identity: tuple[int, int, int, int] | None


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Retention:
    """Applies the retention policy after consent drops a patient's jobs for a purpose.

    Parameters
    ----------
    policy : str
        ``"keep"`` or ``"delete-unneeded"`` (``RouterSettings.retention``).
    sessions : sessionmaker
        The process's sessionmaker (archive index, forward queue and audit log share it).
    files : InstanceFiles
        The archive's file tree.
    forget_parents : callable, optional
        Called after index rows were deleted: ``ArchiveIndex.forget_parents`` of the
        process that stores instances (its series cache may name a deleted series).
    clock : callable, optional
        Timezone-aware "now" for the audit entries.
    actor : str, optional
        Who the audit entries name.
    journal : IngestJournal, optional
        The serving process's ingest journal: each deletion is recorded there first
        (:meth:`~dicom_node.archive.journal.IngestJournal.forget`).
    origin : str, optional
        This node's archive (``JobQueue.origin``): only the instances whose files it
        holds are deleted here; each node sharing the database applies the refusal to
        its own (``None``: every instance).
    """

    def __init__(
        self,
        policy: str,
        sessions: sessionmaker[Session],
        files: InstanceFiles,
        *,
        forget_parents: Callable[[], None] = lambda: None,
        clock: Callable[[], datetime] = _utcnow,
        actor: str = "system",
        journal: IngestJournal | None = None,
        origin: str | None = None,
    ) -> None:
        self.policy = RetentionPolicy(policy)
        self._journal = journal
        self._origin = origin
        self._sessions = sessions
        self._read_sessions = reading(sessions.kw["bind"])
        self._files = files
        self._forget_parents = forget_parents
        self._clock = clock
        self._actor = actor

    def after_consent_drop(self, patient_pk: int, purpose: str, reason: str) -> RetentionReport:
        """Delete the local copies no job needs any more, for this patient and purpose.

        Raises :class:`sqlalchemy.exc.SQLAlchemyError` when the index could not be
        changed (nothing was deleted then).
        """
        if self.policy is RetentionPolicy.KEEP:
            return RetentionReport()
        try:
            if not self._has_candidates(patient_pk, purpose):
                return RetentionReport()
            deleted = _retry(lambda: self._delete_rows(patient_pk, purpose, reason))
        finally:
            # even when another node did the deleting, or this attempt failed half-way:
            # a remembered series key may name a row that is gone
            self._forget_parents()
        if deleted is None:
            return RetentionReport()
        studies, doomed, seqs = deleted
        removed = sum(1 for d in doomed if remove_if_unchanged(self._files, d))
        instances = sum(s.instances for s in studies)
        size = sum(s.bytes for s in studies)
        LOG.info(
            "retention: %d instance(s) of %d study(ies) deleted after a consent refusal "
            "(purpose %s), %d file(s) removed",
            instances,
            len(studies),
            purpose,
            removed,
        )
        return RetentionReport(instances, len(studies), removed, size, tuple(seqs))

    # -- the index transaction ----------------------------------------------------------

    def _candidates(self, patient_pk: int, purpose: str) -> Select[tuple[int, int, str, int, str]]:
        """Instances with a dropped job of this patient and purpose and no job that still
        needs the file. A job held for reconciliation names a *candidate* patient whose
        identity did not match (its hold reason stays when an administrator rejects it):
        never this patient's data, so never deleted for this patient's refusal. Nothing
        is a candidate once the refusal no longer holds (a grant recorded since it was
        read)."""
        dropped_here = select(ForwardJob.instance_pk).where(
            ForwardJob.patient_pk == patient_pk,
            ForwardJob.purpose == purpose,
            ForwardJob.state == JobState.DROPPED.value,
            ForwardJob.hold_reason != HoldReason.RECONCILIATION.value,
        )
        if self._origin is not None:  # the instances whose files this node holds
            dropped_here = dropped_here.where(ForwardJob.origin.in_((self._origin, "")))
        still_needed = exists().where(
            ForwardJob.instance_pk == Instance.id, ForwardJob.state.not_in(FINAL_STATES)
        )
        return select(
            Instance.id, Instance.series_pk, Instance.path, Instance.size, Instance.sop_instance_uid
        ).where(refusal_in_force(patient_pk, purpose), Instance.id.in_(dropped_here), ~still_needed)

    def _has_candidates(self, patient_pk: int, purpose: str) -> bool:
        with self._read_sessions() as session:
            found = session.execute(self._candidates(patient_pk, purpose).limit(1)).first()
        return found is not None

    def _delete_rows(
        self, patient_pk: int, purpose: str, reason: str
    ) -> tuple[list[_StudyDeletion], list[DoomedFile], list[int]] | None:
        with self._sessions() as session, session.begin():
            lock_for_write(session)  # the audit chain's writers are serialised
            rows = session.execute(
                self._candidates(patient_pk, purpose).order_by(Instance.id).with_for_update()
            ).all()
            if not rows:
                return None  # another node got there first
            ids = [r.id for r in rows]
            doomed = [DoomedFile(r.path, _identity(self._files, r.path)) for r in rows]
            if self._journal is not None:
                # before the rows go: a replay after a crash must not index these again
                # from records of the ingest journal that are still live
                self._journal.forget([(r.sop_instance_uid, r.path) for r in rows])
            removed_per_series = Counter(r.series_pk for r in rows)
            series_info = {
                s.id: s
                for chunk in _chunks(sorted(removed_per_series))
                for s in session.execute(
                    select(Series.id, Series.series_instance_uid, Series.study_pk)
                    .where(Series.id.in_(chunk))
                    .with_for_update()
                )
            }
            study_info = {
                s.id: s
                for chunk in _chunks(sorted({s.study_pk for s in series_info.values()}))
                for s in session.execute(
                    select(Study.id, Study.study_instance_uid, Study.patient_pk)
                    .where(Study.id.in_(chunk))
                    .with_for_update()
                )
            }
            per_study = {pk: _StudyDeletion(s.study_instance_uid) for pk, s in study_info.items()}
            series_of_instance = {r.id: r.series_pk for r in rows}
            for r in rows:
                entry = per_study[series_info[r.series_pk].study_pk]
                entry.instances += 1
                entry.bytes += int(r.size)
                entry.series[series_info[r.series_pk].series_instance_uid] += 1
            job_columns = (ForwardJob.instance_pk, ForwardJob.destination, ForwardJob.state)
            for chunk in _chunks(ids):
                jobs = select(*job_columns).where(ForwardJob.instance_pk.in_(chunk))
                for instance_pk, destination, state in session.execute(jobs):
                    study_pk = series_info[series_of_instance[instance_pk]].study_pk
                    per_study[study_pk].jobs[f"{destination}/{state}"] += 1
                session.execute(delete(ForwardJob).where(ForwardJob.instance_pk.in_(chunk)))
                session.execute(delete(Instance).where(Instance.id.in_(chunk)))

            self._update_parents(session, removed_per_series, series_info, study_info, per_study)

            now = self._clock()
            seqs = []
            for study_pk in sorted(per_study):
                entry = per_study[study_pk]
                seqs.append(
                    append_audit(
                        session,
                        at=now,
                        actor=self._actor,
                        action=AUDIT_ACTION,
                        target=entry.study_uid,
                        details={
                            "reason": reason[:255],
                            "retention": self.policy.value,
                            "patient_pk": patient_pk,
                            "purpose": purpose,
                            "instances": entry.instances,
                            "bytes": entry.bytes,
                            "series": dict(sorted(entry.series.items())),
                            "series_removed": entry.series_removed,
                            "study_removed": entry.study_removed,
                            "patient_removed": entry.patient_removed,
                            "jobs_deleted": dict(sorted(entry.jobs.items())),
                        },
                    )
                )
            # forgotten before the commit too: an ingest reading the series cache from now
            # on looks the parents up after our commit (the caller forgets once more after
            # the commit, for an ingest that read it just before)
            self._forget_parents()
        return [per_study[pk] for pk in sorted(per_study)], doomed, seqs

    @staticmethod
    def _update_parents(
        session: Session,
        removed_per_series: Counter[int],
        series_info: dict[int, Any],
        study_info: dict[int, Any],
        per_study: dict[int, _StudyDeletion],
    ) -> None:
        """Counters down, empty series/study/patient rows out, modalities recomputed."""
        removed_per_study: Counter[int] = Counter()
        for series_pk, count in sorted(removed_per_series.items()):
            session.execute(
                update(Series)
                .where(Series.id == series_pk)
                .values(number_of_instances=Series.number_of_instances - count)
            )
            removed_per_study[series_info[series_pk].study_pk] += count
        has_instance = exists().where(Instance.series_pk == Series.id)
        emptied_series = [
            pk
            for chunk in _chunks(sorted(removed_per_series))
            for pk in session.scalars(select(Series.id).where(Series.id.in_(chunk), ~has_instance))
        ]
        series_removed: Counter[int] = Counter()
        for chunk in _chunks(emptied_series):
            session.execute(delete(Series).where(Series.id.in_(chunk)))
        for pk in emptied_series:
            series_removed[series_info[pk].study_pk] += 1
        for study_pk, count in sorted(removed_per_study.items()):
            gone = series_removed[study_pk]
            per_study[study_pk].series_removed = gone
            session.execute(
                update(Study)
                .where(Study.id == study_pk)
                .values(
                    number_of_instances=Study.number_of_instances - count,
                    number_of_series=Study.number_of_series - gone,
                )
            )
        has_series = exists().where(Series.study_pk == Study.id)
        emptied_studies = {
            pk
            for chunk in _chunks(sorted(study_info))
            for pk in session.scalars(select(Study.id).where(Study.id.in_(chunk), ~has_series))
        }
        for study_pk in sorted(set(series_removed) - emptied_studies):
            _recompute_modalities(session, study_pk)
        for chunk in _chunks(sorted(emptied_studies)):
            session.execute(delete(Study).where(Study.id.in_(chunk)))
        for study_pk in emptied_studies:
            per_study[study_pk].study_removed = True
        patients = sorted({study_info[pk].patient_pk for pk in emptied_studies})
        has_study = exists().where(Study.patient_pk == Patient.id)
        emptied_patients = {
            pk
            for chunk in _chunks(patients)
            for pk in session.scalars(select(Patient.id).where(Patient.id.in_(chunk), ~has_study))
        }
        for chunk in _chunks(sorted(emptied_patients)):
            session.execute(delete(Patient).where(Patient.id.in_(chunk)))
        for study_pk in emptied_studies:
            if study_info[study_pk].patient_pk in emptied_patients:
                per_study[study_pk].patient_removed = True


def _recompute_modalities(session: Session, study_pk: int) -> None:
    """Keep, in their order, the study's modalities that a remaining series still has."""
    current = session.scalar(select(Study.modalities).where(Study.id == study_pk)) or ""
    remaining = set(session.scalars(select(Series.modality).where(Series.study_pk == study_pk)))
    kept = [m for m in current.split("\\") if m and m in remaining]
    session.execute(
        update(Study).where(Study.id == study_pk).values(modalities="\\".join(kept)[:128])
    )


def _retry(operation: Callable[[], T]) -> T:
    """Run a transaction again after a deadlock or a concurrent store into a series it
    emptied (both leave nothing changed)."""
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            return operation()
        except (OperationalError, IntegrityError) as exc:
            if attempt == _ATTEMPTS:
                raise
            LOG.warning("retention: transaction failed (%s), trying again", type(exc).__name__)
    raise AssertionError("unreachable")  # pragma: no cover


def _chunks(values: Sequence[int]) -> Iterator[Sequence[int]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


# -- files ---------------------------------------------------------------------------------


def _identity(files: InstanceFiles, relative_path: str) -> tuple[int, int, int, int] | None:
    """Which file the index row names now, or None if it is missing.

    Device and inode tell a file renamed into place since; size and modification time a
    file rewritten in place (a rename does not change them; truncating or writing does).
    """
    try:
        path = files.absolute(relative_path)
        return _identity_of(path) if stat.S_ISREG(os.stat(path).st_mode) else None
    except (OSError, ValueError):
        return None


def remove_if_unchanged(files: InstanceFiles, doomed: DoomedFile) -> bool:
    """Remove the file of a deleted instance, unless it has been replaced since.

    The file is first moved to the staging area (atomically, whatever is at the path now),
    then compared with the file the index named when its row was deleted. A different file
    (another inode, or the same one rewritten) is a copy of the same SOP Instance UID
    stored again after the deletion: it is put back (hard link, directory fsync'd) and
    kept. A staging-area leftover of a crash is removed at the next start. Returns whether
    a file was removed.
    """
    if doomed.identity is None:
        return False
    try:
        path = files.absolute(doomed.relative_path)
    except ValueError:
        return False
    trash = files.tmp / f"{secrets.token_hex(12)}.part"
    try:
        try:
            os.rename(path, trash)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # the archive is on another file system than the staging area
            trash = path.with_name(f".{secrets.token_hex(12)}.part")
            os.rename(path, trash)
    except FileNotFoundError:
        return False
    except OSError as exc:
        LOG.warning("retention: cannot remove an archive file (%s)", exc.strerror)
        return False
    if _identity_of(trash) != doomed.identity:
        try:
            os.link(trash, path)
            fsync_directory(path.parent)
        except FileExistsError:
            pass  # yet another copy was placed meanwhile: it is the one indexed
        trash.unlink(missing_ok=True)
        return False
    trash.unlink(missing_ok=True)
    return True


def _identity_of(path: Path) -> tuple[int, int, int, int]:
    info = os.stat(path)
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
