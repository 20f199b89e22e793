"""Errors of the consent store.

Every error a caller can act on derives from :class:`ConsentError`; the message is one
line meant for the person who made the request (the CLI prints it as is)::

    ConsentError
    ├── UnknownPatient      no patient with that identifier / primary key
    ├── UnknownPurpose      no purpose with that code
    ├── UnknownEvent        no consent event with that id
    ├── InvalidIdentity     bad identity data (INS matricule, strict traits, contact data)
    ├── InvalidTransition   the request contradicts the consent log (withdraw without permit, ...)
    ├── InvalidRequest      a malformed argument (purpose code, channel, empty notice, ...)
    ├── DuplicatePatient    an identifier (IPP or INS) already belongs to a patient
    └── DuplicatePurpose    a purpose with that code already exists

Database failures are not wrapped: they surface as :class:`sqlalchemy.exc.SQLAlchemyError`.
"""

from __future__ import annotations


class ConsentError(Exception):
    """Base class of every error of the consent store."""


class UnknownPatient(ConsentError, LookupError):
    """No patient matches the given identifier or primary key."""


class UnknownPurpose(ConsentError, LookupError):
    """No purpose has the given code."""


class UnknownEvent(ConsentError, LookupError):
    """No consent event has the given id."""


class InvalidIdentity(ConsentError, ValueError):
    """Identity data is malformed or inconsistent (INS key, test OID, date, sex...)."""


class InvalidTransition(ConsentError):
    """The requested change is not allowed from the current consent state."""


class InvalidRequest(ConsentError, ValueError):
    """An argument is malformed (purpose code, model, channel, empty text...)."""


class DuplicatePatient(ConsentError):
    """An identifier given for a new patient already belongs to a patient."""


class DuplicatePurpose(ConsentError):
    """A purpose with this code already exists."""
