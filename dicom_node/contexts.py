"""Presentation contexts the node accepts, grouped by the service a peer may be allowed."""

from __future__ import annotations

from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_context
from pynetdicom.presentation import PresentationContext

VERIFICATION = "1.2.840.10008.1.1"

#: Transfer syntaxes accepted for storage: uncompressed, deflate, JPEG, JPEG-LS,
#: JPEG 2000, RLE and the other syntaxes pynetdicom knows.
STORAGE_TRANSFER_SYNTAXES: list[str] = list(ALL_TRANSFER_SYNTAXES)

STORAGE_SOP_CLASSES: tuple[str, ...] = tuple(
    str(cx.abstract_syntax) for cx in AllStoragePresentationContexts
)

QR_SOP_CLASSES: dict[str, tuple[str, ...]] = {
    # (Patient Root, Study Root) query/retrieve information models, PS3.4 C.6
    "find": ("1.2.840.10008.5.1.4.1.2.1.1", "1.2.840.10008.5.1.4.1.2.2.1"),
    "move": ("1.2.840.10008.5.1.4.1.2.1.2", "1.2.840.10008.5.1.4.1.2.2.2"),
    "get": ("1.2.840.10008.5.1.4.1.2.1.3", "1.2.840.10008.5.1.4.1.2.2.3"),
}


def service_of(abstract_syntax: str) -> str | None:
    """The peer service (``echo``, ``store``, ``find``, ``move``, ``get``) of a SOP class."""
    if abstract_syntax == VERIFICATION:
        return "echo"
    for service, classes in QR_SOP_CLASSES.items():
        if abstract_syntax in classes:
            return service
    if abstract_syntax in STORAGE_SOP_CLASSES:
        return "store"
    return None


def supported_contexts() -> list[PresentationContext]:
    """Every context the node can accept (filtered per peer at association time)."""
    contexts = [build_context(VERIFICATION, ALL_TRANSFER_SYNTAXES)]
    for classes in QR_SOP_CLASSES.values():
        contexts.extend(build_context(uid) for uid in classes)
    for uid in STORAGE_SOP_CLASSES:
        cx = build_context(uid, STORAGE_TRANSFER_SYNTAXES)
        # SCP role for C-GET sub-operations on the requestor's side (role selection)
        cx.scp_role = True
        cx.scu_role = False
        contexts.append(cx)
    return contexts


def contexts_for_services(
    contexts: list[PresentationContext], services: frozenset[str]
) -> list[PresentationContext]:
    """Keep the contexts a peer allowed ``services`` may negotiate.

    Storage contexts serve both ``store`` (the peer sends to us) and ``get`` (we send
    the retrieved instances back over the same association).
    """
    kept = []
    for cx in contexts:
        service = service_of(str(cx.abstract_syntax))
        if service == "store":
            if services & {"store", "get"}:
                kept.append(cx)
        elif service in services:
            kept.append(cx)
    return kept
