"""Consent store, decision function and consent web module (issue #3 onwards).

Knows nothing of DICOM networking. Modules:

* :mod:`consent.service`: :class:`~consent.service.ConsentStore`, the one entry point
  (purposes and notices, patients, consent events, ``decide``, DICOM patient resolution,
  change notification, audit);
* :mod:`consent.decision`: ``Outcome``, ``Decision``, ``Resolution``, ``ConsentChange`` and
  the fast read path of ``decide``;
* :mod:`consent.models`: the ``consent_*`` tables (append-only log, state cache);
* :mod:`consent.audit`: the hash-chained audit log;
* :mod:`consent.identity`, :mod:`consent.patients_csv`: identity rules (INS), CSV import;
* :mod:`consent.fhir`: FHIR R4 ``Consent`` export;
* :mod:`consent.errors`: the exception tree.
"""
