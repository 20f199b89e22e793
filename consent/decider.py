"""The decision function: may a patient's data be used for a purpose now?

:meth:`Decider.decide` fails closed. Unknown patient: ``UNDECIDED`` (hold). Unknown purpose:
``DENY``. No event: ``UNDECIDED`` for an opt-in purpose, ``PERMIT`` (non-opposition) for an
opt-out one. Any error: ``DENY``. Only the purpose code → primary key mapping is cached
(:class:`consent.purposes.PurposeKeys`); consent state is read from the database on every
call, through :class:`consent.decision.StateReader`.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select

from consent.context import LOG, StoreContext
from consent.decision import (
    UNKNOWN_PATIENT,
    UNKNOWN_PURPOSE,
    Decision,
    Outcome,
    StateReader,
    decision_from_state,
)
from consent.models import ConsentState, Purpose
from consent.patients import require_patient
from consent.purposes import PurposeKeys


class Decider:
    """Answers ``decide``, ``decide_many`` and ``current``.

    Parameters
    ----------
    context : StoreContext
    keys : PurposeKeys
        The store's purpose cache.
    """

    def __init__(self, context: StoreContext, keys: PurposeKeys) -> None:
        self._context = context
        self._keys = keys
        self._reader = StateReader(context.engine)

    def close(self) -> None:
        """Release connections the store holds of its own (the decision reader's)."""
        self._reader.close()

    def decide(self, patient_pk: int | None, purpose_code: str) -> Decision:
        """May this patient's data be used for this purpose now? Never raises.

        Parameters
        ----------
        patient_pk : int or None
            The consent-store patient (``None`` when the data's patient is not resolved).
        purpose_code : str

        Returns
        -------
        Decision
            ``UNDECIDED`` for an unknown patient or an opt-in purpose without decision;
            ``DENY`` for an unknown purpose, a refusal/withdrawal or any error
            (reason ``"error: <exception type>"``); ``PERMIT`` for a permit or an opt-out
            purpose without opposition.
        """
        try:
            if patient_pk is None:
                return UNKNOWN_PATIENT
            key = self._keys.get(purpose_code)
            if key is None:
                return UNKNOWN_PURPOSE
            exists, decision = self._reader.lookup(patient_pk, key.pk)
            if not exists:
                return UNKNOWN_PATIENT
            return decision_from_state(decision, key.model)
        except Exception as exc:  # fail closed, whatever happened
            LOG.error("consent decision failed, denying: %s", type(exc).__name__)
            return Decision(Outcome.DENY, f"error: {type(exc).__name__}")

    def decide_many(
        self, patient_pks: Iterable[int | None], purpose_code: str
    ) -> dict[int, Decision]:
        """:meth:`decide` for many patients at once (one query per 500 patients).

        ``None`` entries are skipped (they are ``UNDECIDED``, like :meth:`decide` says).
        Never raises: on error every patient gets ``DENY``.
        """
        pks = list(dict.fromkeys(pk for pk in patient_pks if pk is not None))
        try:
            key = self._keys.get(purpose_code)
            if key is None:
                return dict.fromkeys(pks, UNKNOWN_PURPOSE)
            found = self._reader.lookup_many(pks, key.pk)
            return {
                pk: decision_from_state(found[pk], key.model) if pk in found else UNKNOWN_PATIENT
                for pk in pks
            }
        except Exception as exc:
            LOG.error("consent decision failed, denying: %s", type(exc).__name__)
            return dict.fromkeys(pks, Decision(Outcome.DENY, f"error: {type(exc).__name__}"))

    def current(self, issuer: str, patient_id: str) -> dict[str, Decision]:
        """The decision for every purpose, by purpose code.

        Raises
        ------
        UnknownPatient
        """
        with self._context.read_sessions() as session:
            pk = require_patient(session, issuer, patient_id)
            rows = session.execute(
                select(Purpose.code, Purpose.model, ConsentState.decision)
                .outerjoin(
                    ConsentState,
                    (ConsentState.purpose_pk == Purpose.id) & (ConsentState.patient_pk == pk),
                )
                .order_by(Purpose.code)
            ).all()
        return {code: decision_from_state(decision, model) for code, model, decision in rows}
