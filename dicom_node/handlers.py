"""Event handlers of the DICOM node: thin, never raising, every failure a DIMSE status.

Handlers receive everything through :class:`NodeHandlers` (settings, archive, sessions,
metrics); they hold no state of their own between requests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from sqlalchemy import ColumnElement, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from config.settings import PeerSettings, Settings
from dicom_node.archive.identity import PatientIdentity, load_identity
from dicom_node.archive.models import Instance, Patient, Series, Study
from dicom_node.archive.service import Archive, StoreOutcome
from dicom_node.contexts import QR_SOP_CLASSES, VERIFICATION, contexts_for_services
from dicom_node.errors import NodeError
from dicom_node.metrics import NodeMetrics
from dicom_node.qr.matching import IdentifierError, Level, Root, build_query, response_identifier
from dicom_node.reactor import await_send_room

LOG = logging.getLogger(__name__)

_PATIENT_ROOT = {
    QR_SOP_CLASSES["find"][0],
    QR_SOP_CLASSES["move"][0],
    QR_SOP_CLASSES["get"][0],
}
_REFUSED = 0x0124
_UNABLE = 0xC000
_MAX_SUBOPERATIONS = 65535


@dataclass(frozen=True)
class _Match:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    patient: PatientKey
    calling_ae: str  # who sent it
    identity: str | None  # the stored identity it carries (None: read the file)
    study_instance_uid: str


class PatientAccess(Protocol):
    """Consent at the query/retrieve exits (implemented by the router's access gate)."""

    def permits(
        self, purpose: str, issuer: str, patient_id: str, birth_date: str, sex: str
    ) -> bool:
        """Whether ``purpose`` may see this archived patient's data; fails closed."""
        ...

    def stored_identities(
        self, path: Path, default_issuers: Sequence[str]
    ) -> tuple[PatientIdentity, ...]:
        """The patient identity an archived file carries (one per default issuer when it
        names none); raises when unreadable."""
        ...

    def permits_identity(self, purpose: str, identity: PatientIdentity) -> bool:
        """Whether ``purpose`` may see the data of that identity's patient; fails closed."""
        ...


#: Where an archived instance's identity is read: its stored form (the index column), or
#: its file and the issuers that may have applied to it when it was stored, its patient
#: row's and those of every peer with the AE title that sent it (instances indexed
#: before schema 0004, or whose identity had no stored form): all must be permitted.
IdentitySource = str | tuple[Path, tuple[str, ...]]


#: An archived patient row as the checks see it: issuer, Patient ID, birth date, sex, and
#: the stored identity of the instance that created it (``None`` for rows created before
#: schema 0005).
PatientKey = tuple[str, str, str, str, str | None]

#: ``audit(actor, action, target, details)``: appends to the tamper-evident audit log.
AuditSink = Callable[[str, str, str, Mapping[str, Any]], None]


class _RequestAccess:
    """The consent checks of one request (cached per patient and per identity): every
    purpose named must permit the patient. A C-FIND or C-GET answers to the requesting
    peer, so its purpose applies; a C-MOVE sends to its destination, so the destination
    peer's purpose applies too (a care-team peer must not move a study to a purpose-bound
    destination the patient has not consented to).

    The archived patient row is checked first, then the identities the instances concerned
    carry (:meth:`allows`): an instance filed under a consented patient's row or study
    while naming someone else is withheld, and so is a patient, study or series holding
    one."""

    def __init__(self, access: PatientAccess | None, *purposes: str) -> None:
        self._access = access
        self.purposes = tuple(dict.fromkeys(p for p in purposes if p))
        self._cache: dict[PatientKey, bool] = {}
        self._identities: dict[PatientIdentity, bool] = {}
        self.permitted = 0
        self.withheld = 0

    def allows(self, patient: PatientKey, sources: Sequence[IdentitySource]) -> bool:
        """Whether the archived ``patient`` may be seen, and every identity ``sources``
        give (the instances concerned: none, and nothing vouches for the patient row, so
        it is withheld); counted as permitted or withheld."""
        if not self.purposes:
            return True
        allowed = (
            bool(sources)
            and self._patient_allowed(patient)
            and all(self._identity_allowed(source) for source in sources)
        )
        if allowed:
            self.permitted += 1
        else:
            self.withheld += 1
        return allowed

    def _patient_allowed(self, patient: PatientKey) -> bool:
        """The row, on the identity of the instance that created it (whose name and
        demographics it shows), INS included; rows older than that on their attributes."""
        allowed = self._cache.get(patient)
        if allowed is None:
            access = self._access
            issuer, patient_id, birth_date, sex, identity = patient
            if identity is not None:
                allowed = self._identity_allowed(identity)
            else:
                allowed = access is not None and all(
                    access.permits(purpose, issuer, patient_id, birth_date, sex)
                    for purpose in self.purposes
                )
            self._cache[patient] = allowed
        return allowed

    def _identity_allowed(self, source: IdentitySource) -> bool:
        access = self._access
        if access is None:
            return False
        try:
            if isinstance(source, str):
                identities: tuple[PatientIdentity, ...] = (load_identity(source),)
            else:
                identities = access.stored_identities(*source)
        except Exception as exc:  # unreadable: nothing to show, nothing leaves
            LOG.error("archived instance identity unreadable: %s", type(exc).__name__)
            return False
        if not identities:
            return False
        for identity in identities:
            allowed = self._identities.get(identity)
            if allowed is None:
                allowed = all(access.permits_identity(p, identity) for p in self.purposes)
                self._identities[identity] = allowed
            if not allowed:
                return False
        return True


class NodeHandlers:
    """The node's pynetdicom event handlers, bound to the services they use."""

    def __init__(
        self,
        settings: Settings,
        archive: Archive,
        sessions: sessionmaker[Session],
        metrics: NodeMetrics,
        contexts: list[PresentationContext],
        access: PatientAccess | None = None,
        audit: AuditSink | None = None,
    ) -> None:
        self._settings = settings
        self._archive = archive
        self._sessions = sessions
        self._metrics = metrics
        self._contexts = contexts
        self._access = access
        self._audit = audit

    def bindings(self) -> list[tuple[Any, Any]]:
        """The ``evt_handlers`` list for ``AE.start_server``."""
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_CONN_OPEN, self.on_conn_open),
            (evt.EVT_CONN_CLOSE, self.on_conn_close),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_MOVE, self.on_move),
            (evt.EVT_C_GET, self.on_get),
        ]

    # -- association ------------------------------------------------------------------

    def _peer(self, event: Event) -> PeerSettings | None:
        requestor = event.assoc.requestor
        calling = requestor.ae_title
        if not calling and requestor.primitive is not None:  # not yet set in EVT_REQUESTED
            calling = requestor.primitive.calling_ae_title
        return self._settings.peers_for_association(str(calling).strip(), str(requestor.address))

    def on_requested(self, event: Event) -> None:
        """Closed by default: refuse unknown peers, offer only their allowed services."""
        peer = self._peer(event)
        if peer is None:
            requestor = event.assoc.requestor
            LOG.warning(
                "association refused: calling AE %r from %s is not a configured peer",
                str(getattr(requestor.primitive, "calling_ae_title", "")).strip(),
                requestor.address,
            )
            # rejected-permanent, service user, calling AE title not recognised; kill()
            # waits until the DUL has sent the rejection before the socket is closed
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)
            event.assoc.kill()
            return
        event.assoc.acceptor.supported_contexts = contexts_for_services(
            self._contexts, peer.services
        )

    def on_accepted(self, event: Event) -> None:
        self._metrics.associations.labels("accepted").inc()

    def on_rejected(self, event: Event) -> None:
        self._metrics.associations.labels("rejected").inc()

    def on_conn_open(self, event: Event) -> None:
        self._metrics.active_associations.inc()

    def on_conn_close(self, event: Event) -> None:
        self._metrics.active_associations.dec()

    # -- verification -----------------------------------------------------------------

    def on_echo(self, event: Event) -> int:
        peer = self._peer(event)
        if peer is None or not peer.allows("echo"):
            self._metrics.errors.labels("echo", hex(_REFUSED)).inc()
            return _REFUSED
        return 0x0000

    # -- storage ----------------------------------------------------------------------

    def on_store(self, event: Event) -> int:
        """Store the bytes as received; success only once file and index are durable."""
        try:
            peer = self._peer(event)
            if peer is None or not peer.allows("store"):
                self._metrics.errors.labels("store", hex(_REFUSED)).inc()
                return _REFUSED
            request: Any = event.request
            result = self._archive.store(
                event.encoded_dataset(include_meta=False),
                transfer_syntax_uid=str(event.context.transfer_syntax),
                command_sop_class_uid=str(request.AffectedSOPClassUID or ""),
                command_sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
                calling_ae=peer.ae_title,
                default_issuer=peer.issuer,
            )
        except NodeError as exc:
            LOG.warning("C-STORE refused with 0x%04X: %s", exc.status, exc)
            self._metrics.errors.labels("store", hex(exc.status)).inc()
            return exc.status
        except Exception as exc:  # a handler must answer, whatever happened
            LOG.error("C-STORE failed unexpectedly: %s", type(exc).__name__)
            self._metrics.errors.labels("store", hex(0xA700)).inc()
            return 0xA700
        self._metrics.instances_received.labels(result.outcome.value).inc()
        if result.outcome is StoreOutcome.STORED:
            self._metrics.bytes_received.inc(result.size)
        return 0x0000

    # -- query ------------------------------------------------------------------------

    def on_find(self, event: Event) -> Iterator[tuple[int, Dataset | None]]:
        """Answer C-FIND from the index, streaming matches."""
        peer = self._peer(event)
        if peer is None or not peer.allows("find"):
            self._metrics.errors.labels("find", hex(_REFUSED)).inc()
            self._audit_refused("find", peer, _REFUSED)
            yield _REFUSED, None
            return
        root = self._root(event)
        try:
            query = build_query(event.identifier, root)
        except IdentifierError as exc:
            self._metrics.errors.labels("find", hex(exc.status)).inc()
            self._audit_refused("find", peer, exc.status)
            yield exc.status, None
            return
        except Exception as exc:
            LOG.warning("C-FIND identifier cannot be read: %s", type(exc).__name__)
            self._metrics.errors.labels("find", hex(0xC310)).inc()
            self._audit_refused("find", peer, 0xC310)
            yield 0xC310, None  # unable to process: cannot decode the identifier
            return
        self._metrics.queries.labels(query.level.name).inc()
        checks = _RequestAccess(self._access, peer.purpose)
        study_sources: dict[int, list[IdentitySource]] = {}  # per study, for this request
        accessed = _Accessed()
        status = 0x0000
        try:
            for row in self._find_rows(query.statement):
                # the responses already queued cannot be recalled by a C-CANCEL
                await_send_room(event.assoc)
                if event.is_cancelled:
                    status = 0xFE00
                    yield 0xFE00, None
                    return
                patient = next(o for o in row if isinstance(o, Patient))
                sources = (
                    self._identity_sources(row, query.level, study_sources)
                    if checks.purposes
                    else []
                )
                if not checks.allows(_patient_key(patient), sources):
                    continue
                if checks.purposes:
                    study = next((o for o in row if isinstance(o, Study)), None)
                    accessed.add(
                        patient.issuer,
                        patient.patient_id,
                        study.study_instance_uid if study is not None else "",
                    )
                yield (
                    0xFF00,
                    response_identifier(row, query, retrieve_ae=self._settings.node.ae_title),
                )
        except SQLAlchemyError as exc:
            LOG.error("C-FIND index query failed: %s", type(exc).__name__)
            self._metrics.errors.labels("find", hex(_UNABLE)).inc()
            status = _UNABLE
            yield _UNABLE, None
            return
        finally:
            self._audit_access(
                "find",
                peer,
                checks,
                {"level": query.level.name, "status": _hex(status), **accessed.details()},
            )
        yield 0x0000, None

    def _identity_sources(
        self, row: Any, level: Level, per_study: dict[int, list[IdentitySource]]
    ) -> list[IdentitySource]:
        """Where to read the identities of the instances a C-FIND row stands for: every
        instance of its patient (PATIENT level), else of its study (a distinct stored
        identity once; a file for each instance without one).

        A SERIES or IMAGE row is checked on its whole study, not on its series or
        instance alone: it shows study attributes (description, accession number, date,
        ``ModalitiesInStudy``, the study's counts) and, at IMAGE level, series ones, which
        the instance that created the row wrote and every instance of the study counts;
        an instance of someone else in the study must not show through them (so a study
        is withheld at every level alike). ``per_study`` caches a study's sources for the
        request."""
        if level is Level.PATIENT:
            patient = next(o for o in row if isinstance(o, Patient))
            studies = select(Study.id).where(Study.patient_pk == patient.id)
            return self._scope_sources(
                Instance.series_pk.in_(select(Series.id).where(Series.study_pk.in_(studies)))
            )
        study = next(o for o in row if isinstance(o, Study))
        cached = per_study.get(study.id)
        if cached is None:
            cached = per_study[study.id] = self._scope_sources(
                Instance.series_pk.in_(select(Series.id).where(Series.study_pk == study.id))
            )
        return cached

    def _scope_sources(self, scope: ColumnElement[bool]) -> list[IdentitySource]:
        """The identity sources of the instances ``scope`` selects."""
        with self._sessions() as session:
            stored = session.scalars(
                select(Instance.identity).where(scope, Instance.identity.is_not(None)).distinct()
            ).all()
            legacy = session.execute(
                select(Instance.path, Patient.issuer, Instance.calling_ae)
                .join(Series, Instance.series_pk == Series.id)
                .join(Study, Series.study_pk == Study.id)
                .join(Patient, Study.patient_pk == Patient.id)
                .where(scope, Instance.identity.is_(None))
            ).all()
        sources: list[IdentitySource] = [text for text in stored if text is not None]
        sources.extend(
            self._source(None, self._archive.files.absolute(path), issuer, ae)
            for path, issuer, ae in legacy
        )
        return sources

    def _source(
        self, identity: str | None, path: Path, row_issuer: str, calling_ae: str
    ) -> IdentitySource:
        """An instance's stored identity, else its file and every issuer that may have
        applied when it was stored: its patient row's (which a reused Study Instance UID
        can make another patient's) and that of each peer with the AE title that sent it
        (a peer's issuer can have changed since, and AE titles can be shared)."""
        if identity is not None:
            return identity
        peers = (p.issuer for p in self._settings.peers if p.ae_title == calling_ae)
        return (path, tuple(dict.fromkeys((row_issuer, *peers))))

    def _find_rows(self, statement: Any) -> Iterator[Any]:
        """The index rows of a C-FIND, streamed in chunks. The sessions handed to the
        handlers only read (on SQLite a deferred transaction on a WAL snapshot), so a slow
        reader neither blocks stores nor the consent checks made while streaming."""
        with self._sessions() as session:
            yield from session.execute(statement.execution_options(yield_per=500))

    # -- retrieve ---------------------------------------------------------------------

    def on_move(self, event: Event) -> Iterator[Any]:
        """C-MOVE to a configured peer; the first yield is the destination."""
        requested = str(event.move_destination).strip()
        destination = self._settings.peer_by_ae_title(requested)
        if destination is None:
            self._metrics.errors.labels("move", hex(0xA801)).inc()
            self._audit_refused("move", self._peer(event), 0xA801, destination_ae=requested)
            yield None, None
            return
        matches, withheld, failure = self._prepare(event, "move", destination)
        kwargs: dict[str, Any] = {"ae_title": destination.ae_title}
        if matches:
            kwargs["contexts"] = _contexts_for(matches)
        else:
            kwargs["contexts"] = [build_context(VERIFICATION)]
        yield destination.host, destination.port, kwargs
        yield from self._send_matches(event, matches, withheld, failure, "move")

    def on_get(self, event: Event) -> Iterator[Any]:
        """C-GET: send matches back over the requestor's association."""
        matches, withheld, failure = self._prepare(event, "get", None)
        yield from self._send_matches(event, matches, withheld, failure, "get")

    def _prepare(
        self, event: Event, service: str, destination: PeerSettings | None
    ) -> tuple[list[_Match], int, int | None]:
        """The permitted instances to send, how many were withheld, or a failure status."""
        peer = self._peer(event)
        status: int
        where = {"destination": destination.name if destination is not None else ""}
        if peer is None or not peer.allows(service):
            status = _REFUSED
        else:
            try:
                matches = self._matches(event.identifier, self._root(event))
            except NodeError as exc:
                status = exc.status
            except Exception as exc:
                LOG.warning("C-%s cannot be processed: %s", service.upper(), type(exc).__name__)
                status = _UNABLE
            else:
                destination_purpose = destination.purpose if destination is not None else ""
                checks = _RequestAccess(self._access, peer.purpose, destination_purpose)
                permitted = [
                    m
                    for m in matches
                    if checks.allows(
                        m.patient, [self._source(m.identity, m.path, m.patient[0], m.calling_ae)]
                    )
                ]
                accessed = _Accessed()
                for m in permitted:
                    accessed.add(m.patient[0], m.patient[1], m.study_instance_uid)
                self._audit_access(service, peer, checks, {**where, **accessed.details()})
                # A purpose-bound requester learns nothing of what it may not see: the
                # instances withheld from it are not counted (neither as failed
                # sub-operations nor in a refusal), so the answer is the one it would get
                # if they did not exist. Otherwise a retrieve whose keys match only a
                # refused patient's data (a name, a birth date range) would tell, by its
                # status, whether such data is archived. The audit entry has the counts.
                # A care-team requester (no purpose: it may query everything) is told
                # what the destination's purpose withheld.
                visible = permitted if peer.purpose else matches
                if len(visible) <= _MAX_SUBOPERATIONS:
                    if peer.purpose:
                        return permitted, 0, None
                    if matches and not permitted:
                        status = _REFUSED  # nothing the destination's purpose permits
                        self._metrics.errors.labels(service, hex(status)).inc()
                        return [], len(matches), status
                    return permitted, checks.withheld, None
                status = 0xA702  # out of resources: too many sub-operations
        self._metrics.errors.labels(service, hex(status)).inc()
        self._audit_refused(service, peer, status, **where)
        return [], 0, status

    def _send_matches(
        self,
        event: Event,
        matches: list[_Match],
        withheld: int,
        failure: int | None,
        service: str,
    ) -> Iterator[Any]:
        if failure is not None:
            yield max(1, withheld)
            yield failure, None
            return
        # withheld instances (only counted for a requester without purpose, see
        # _prepare) are failed sub-operations: after the permitted ones a warning ends
        # the operation and pynetdicom counts the remainder as failed. Their UIDs are not
        # listed.
        yield len(matches) + withheld
        for match in matches:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            try:
                dataset = dcmread(match.path)
            except (OSError, ValueError) as exc:
                LOG.error("archived file unreadable: %s", type(exc).__name__)
                failed = Dataset()
                failed.FailedSOPInstanceUIDList = [match.sop_instance_uid]
                yield 0xA702, failed
                return
            self._metrics.retrieved.labels(service).inc()
            yield 0xFF00, dataset
        if withheld:
            yield 0xB000, None

    def _audit_refused(
        self, service: str, peer: PeerSettings | None, status: int, **details: Any
    ) -> None:
        """Trace a purpose-bound peer's request that was refused or failed (nothing
        listed or sent; the status it got)."""
        if peer is None or not peer.purpose:
            return
        self._write_audit(
            service, peer, {"purpose": peer.purpose, "status": _hex(status), **details}
        )

    def _audit_access(
        self,
        service: str,
        peer: PeerSettings,
        checks: _RequestAccess,
        details: Mapping[str, Any],
    ) -> None:
        """Trace a query/retrieve under a purpose in the audit log."""
        if not checks.purposes:
            return
        self._write_audit(
            service,
            peer,
            {
                "purpose": ",".join(checks.purposes),
                "permitted": checks.permitted,
                "withheld": checks.withheld,
                **details,
            },
        )

    def _write_audit(self, service: str, peer: PeerSettings, details: Mapping[str, Any]) -> None:
        """One ``dicom.<service>`` entry for ``peer``; a failure is logged (the answer
        already given stands)."""
        if self._audit is None:
            return
        try:
            self._audit(peer.name, f"dicom.{service}", peer.ae_title, details)
        except Exception as exc:
            LOG.error("audit write failed: %s", type(exc).__name__)

    def _matches(self, identifier: Dataset, root: Root) -> list[_Match]:
        query = build_query(identifier, root, for_retrieve=True)
        stmt = query.statement.with_only_columns(
            Instance.path,
            Instance.sop_class_uid,
            Instance.sop_instance_uid,
            Instance.transfer_syntax_uid,
            Patient.issuer,
            Patient.patient_id,
            Patient.birth_date,
            Patient.sex,
            Patient.identity,
            Instance.calling_ae,
            Instance.identity,
            Study.study_instance_uid,
        )
        try:
            with self._sessions() as session:
                rows = session.execute(stmt).all()
        except SQLAlchemyError as exc:
            LOG.error("retrieve index query failed: %s", type(exc).__name__)
            raise NodeError("index unavailable", 0xC000) from None
        return [
            _Match(
                self._archive.files.absolute(r[0]),
                r[1],
                r[2],
                r[3],
                (r[4], r[5], r[6], r[7], r[8]),
                r[9],
                r[10],
                r[11],
            )
            for r in rows
        ]

    @staticmethod
    def _root(event: Event) -> Root:
        sop_class = str(event.request.AffectedSOPClassUID)
        return Root.PATIENT if sop_class in _PATIENT_ROOT else Root.STUDY


#: At most this many patients and studies are named in one audit entry (with the count)
_AUDIT_NAMED = 200


class _Accessed:
    """The patients and studies a request listed or sent, for its audit entry: whose
    data a purpose-bound peer saw or received."""

    def __init__(self) -> None:
        self._patients: set[str] = set()
        self._studies: set[str] = set()

    def add(self, issuer: str, patient_id: str, study_instance_uid: str) -> None:
        self._patients.add(f"{issuer}/{patient_id}")
        if study_instance_uid:
            self._studies.add(study_instance_uid)

    def details(self) -> dict[str, Any]:
        patients, studies = sorted(self._patients), sorted(self._studies)
        return {
            "patients": patients[:_AUDIT_NAMED],
            "patient_count": len(patients),
            "studies": studies[:_AUDIT_NAMED],
            "study_count": len(studies),
        }


def _hex(status: int) -> str:
    return f"0x{status:04X}"


def _contexts_for(matches: list[_Match]) -> list[PresentationContext]:
    """One context per SOP class and stored syntax (sent as stored, never transcoded).

    The acceptor accepts a single transfer syntax per context, so two stored syntaxes of
    one SOP class must not share a context: the instances in the syntax it did not pick
    could not be sent. Uncompressed instances can go in either uncompressed syntax.
    """
    uncompressed = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    contexts: list[PresentationContext] = []
    proposed: set[tuple[str, tuple[str, ...]]] = set()
    for match in matches:
        syntax = match.transfer_syntax_uid
        offered = uncompressed if syntax in uncompressed else (syntax,)
        key = (match.sop_class_uid, offered)
        if key in proposed:
            continue
        proposed.add(key)
        contexts.append(build_context(match.sop_class_uid, list(offered)))
    return contexts[:128]


def _patient_key(patient: Patient) -> PatientKey:
    return (patient.issuer, patient.patient_id, patient.birth_date, patient.sex, patient.identity)
