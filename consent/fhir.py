"""FHIR R4 ``Consent`` resources built from consent events (plain JSON-ready dicts).

One resource per decision event. Its ``status`` is the event's derived status (``active``,
``inactive`` or ``entered-in-error``); retraction rows are not resources of their own, they
show as the ``entered-in-error`` status of the decision they retract.

Mapping:

* ``scope``: ``patient-privacy`` (consentscope); ``category``: LOINC 59284-0.
* ``patient``: a logical reference by identifier: the INS (``urn:oid:<OID>``) of a QUAL
  identity, else the IPP within its issuer (``urn:oid:`` when the issuer is an OID, else
  ``urn:consentgate:issuer:<issuer>``).
* ``performer``: the patient, or the representative (display only).
* ``policy``: the notice version shown, as ``urn:consentgate:notice:<code>:<version>``
  with ``#sha256=<hex>`` of its exact text; ``policyRule``: v3-ActCode ``OPTIN`` or
  ``OPTOUT`` per the purpose's model (so a refusal without notice still satisfies ppc-1).
* ``provision``: ``type`` permit/deny, ``purpose`` ``urn:consentgate:purpose`` + code.
* Who recorded it, and through which channel: extensions under ``urn:consentgate:fhir:``.
"""

from __future__ import annotations

import re
import urllib.parse
from datetime import UTC, datetime
from typing import Any

CONSENT_SCOPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentscope"
LOINC_SYSTEM = "http://loinc.org"
ACT_CODE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
PURPOSE_SYSTEM = "urn:consentgate:purpose"
EVENT_SYSTEM = "urn:consentgate:consent-event"
_OID_RE = re.compile(r"^[0-2](?:\.(?:0|[1-9][0-9]*))+$")


def identifier_system(system: str) -> str:
    """A FHIR ``Identifier.system`` URI for an INS OID or an IPP issuer."""
    if _OID_RE.match(system):
        return f"urn:oid:{system}"
    return f"urn:consentgate:issuer:{urllib.parse.quote(system, safe='')}"


def fhir_datetime(value: datetime) -> str:
    """An R4 ``dateTime`` in UTC (``Z``), with microseconds when there are any."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def consent_resource(
    *,
    event: dict[str, Any],
    patient_system: str,
    patient_value: str,
    purpose_code: str,
    purpose_name: str,
    purpose_model: str,
    establishment: str | None,
) -> dict[str, Any]:
    """One R4 ``Consent`` resource for a decision event.

    Parameters
    ----------
    event : dict
        One entry of :meth:`consent.service.ConsentStore.history` (a decision, not a
        retraction).
    patient_system, patient_value : str
        The identifier the resource refers to the patient by (system as stored).
    purpose_code, purpose_name, purpose_model : str
        The purpose of the event.
    establishment : str or None
        The patient's establishment, exported as ``organization`` when known.
    """
    patient_identifier = {"system": identifier_system(patient_system), "value": patient_value}
    if event["performed_by"] == "representative":
        performer: dict[str, Any] = {"display": event["representative_name"] or "representative"}
    else:
        performer = {"identifier": patient_identifier, "display": "patient"}
    resource: dict[str, Any] = {
        "resourceType": "Consent",
        "id": f"cg-event-{event['id']}",
        "identifier": [{"system": EVENT_SYSTEM, "value": str(event["id"])}],
        "status": event["effective_status"],
        "scope": {
            "coding": [
                {
                    "system": CONSENT_SCOPE_SYSTEM,
                    "code": "patient-privacy",
                    "display": "Privacy Consent",
                }
            ]
        },
        "category": [
            {"coding": [{"system": LOINC_SYSTEM, "code": "59284-0", "display": "Patient Consent"}]}
        ],
        "patient": {"identifier": patient_identifier},
        "dateTime": event["recorded_at"],
        "performer": [performer],
        "policyRule": {
            "coding": [
                {
                    "system": ACT_CODE_SYSTEM,
                    "code": "OPTIN" if purpose_model == "opt-in" else "OPTOUT",
                }
            ]
        },
        "provision": {
            "type": event["decision"],
            "period": {"start": event["recorded_at"]},
            "purpose": [{"system": PURPOSE_SYSTEM, "code": purpose_code, "display": purpose_name}],
        },
        "extension": [
            {"url": "urn:consentgate:fhir:recorded-by", "valueString": event["recorded_by"]},
            {"url": "urn:consentgate:fhir:channel", "valueCode": event["channel"]},
            {"url": "urn:consentgate:fhir:action", "valueCode": event["action"]},
        ],
    }
    if event["notice_version"] is not None:
        resource["policy"] = [
            {
                "uri": f"urn:consentgate:notice:{urllib.parse.quote(purpose_code, safe='')}:"
                f"{event['notice_version']}#sha256={event['notice_sha256']}"
            }
        ]
    if establishment:
        resource["organization"] = [{"display": establishment}]
    return resource
