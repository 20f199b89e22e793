"""Consent store, decision function and consent web module (issue #3 onwards).

Knows nothing of DICOM networking. Modules:

* :mod:`consent.service`: :class:`~consent.service.ConsentStore`, the one entry point, a
  facade composing the parts below (and the entry point to the audit log);
* :mod:`consent.context`: what the parts share (sessions, clock, write transactions);
* :mod:`consent.purposes`: purposes and their versioned notices;
* :mod:`consent.patients`: patients and their identifiers (add, CSV import, find, show);
* :mod:`consent.records`: recording consent events (grant, refuse, withdraw,
  entered-in-error) and the state cache;
* :mod:`consent.decider`: ``decide``, ``decide_many``, ``current``;
* :mod:`consent.history`: the consent log read back, and its FHIR export;
* :mod:`consent.feed`: change notification (listeners, ``changes_since``);
* :mod:`consent.resolution`: which patient a DICOM dataset designates;
* :mod:`consent.decision`: ``Outcome``, ``Decision``, ``Resolution``, ``ConsentChange``, the
  rule giving a decision from the stored consent, and the fast read path of ``decide``;
* :mod:`consent.models`: the ``consent_*`` tables (append-only log, state cache);
* :mod:`consent.audit`: the hash-chained audit log;
* :mod:`consent.identity`, :mod:`consent.patients_csv`: identity rules (INS), CSV import;
* :mod:`consent.fhir`: FHIR R4 ``Consent`` export;
* :mod:`consent.errors`: the exception tree.
"""
