"""Test peers' associations, free of pynetdicom's pause race.

The tests play modalities and PACS with pynetdicom's own ``AE``.  Its association reactor
has a race (upstream #842/#850/#875, ../shared/REFERENCE.md): between two requests on one
association, the reactor may take the response meant for ``send_c_store`` (or any other
``send_*``) off the DIMSE queue; the test then sees no response after the DIMSE timeout
and fails although the node answered.  consentgate's own associations close the race in
:mod:`dicom_node.reactor`; here the test side gets the same fix, kept independent of the
product's code: :func:`associate` builds the association with a checkpoint whose ``wait``
returns only while the checkpoint is still set after the reactor has marked itself as
running, so a thread that paused the reactor is never passed by it.
"""

from __future__ import annotations

import threading
from typing import Any
from unittest import mock

import pynetdicom.ae
from pynetdicom import AE
from pynetdicom.association import Association


class _Checkpoint(threading.Event):
    """The reactor's pause checkpoint, re-checked after the reactor clears ``_is_paused``.

    pynetdicom's reactor does ``_is_paused = True; checkpoint.wait(); _is_paused = False``
    and a sender does ``checkpoint.clear(); while not _is_paused: sleep``.  A sender that
    clears the checkpoint just after ``wait`` returned still sees the stale ``True`` and
    goes on while the reactor runs.  Here ``wait`` (called by the reactor only) marks the
    reactor running first and returns only if the checkpoint is still set; otherwise it
    marks it paused again and waits on.

    The reactor also waits on the checkpoint before answering a network timeout with an
    A-RELEASE, and expects ``_is_paused`` to stay set: that path must not be used with
    this checkpoint (the tests keep pynetdicom's default answer, A-ABORT).
    """

    def __init__(self, assoc: Association) -> None:
        super().__init__()
        self._assoc = assoc

    def wait(self, timeout: float | None = None) -> bool:
        while True:
            if not super().wait(timeout):
                return False
            self._assoc._is_paused = False
            if self.is_set():
                return True
            self._assoc._is_paused = True


class RaceFreeAssociation(Association):
    """pynetdicom's association with the race-free checkpoint above."""

    def __init__(self, ae: AE, mode: str) -> None:
        super().__init__(ae, mode)
        self._reactor_checkpoint = _Checkpoint(self)
        self._reactor_checkpoint.set()


def associate(ae: AE, *args: Any, **kwargs: Any) -> Association:
    """``ae.associate(*args, **kwargs)``, returning a :class:`RaceFreeAssociation`."""
    with mock.patch.object(pynetdicom.ae, "Association", RaceFreeAssociation):
        return ae.associate(*args, **kwargs)
