"""Sending C-STORE requests without pynetdicom's per-message machinery.

For each instance, pynetdicom's ``send_c_store`` builds a pydicom dataset for the command
set, encodes it, splits the data set into P-DATA primitives, hands them one by one to the
DUL thread's state machine, and decodes the response into a dataset on the association
thread: a few milliseconds of CPU per instance, which a forwarder sharing the GIL with the
receiving side cannot afford.

:class:`StoreSender` sends on an association established by pynetdicom (so negotiation,
release and abort stay pynetdicom's), but writes each C-STORE-RQ straight to the socket:
the command set encoded from a template (implicit VR little endian, as the standard
requires), then the stored file's data set streamed from disk in PDVs no larger than the
peer's maximum PDU. It then reads the C-STORE-RSP itself, on its own thread, while the
DUL reactor leaves the connection alone
(:meth:`dicom_node.reactor.GatewayDUL.reading`): no hand-off to the reactor thread and
back per instance. Only the response's status is read; anything else that arrives
(an abort, another message) is given back to the reactor, and the send reports no
response.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from pathlib import Path
from typing import Protocol, cast

from pynetdicom.association import Association

from dicom_node.reactor import GatewayDUL, store_response_status, ui_element

#: data set bytes per PDU when the peer sets no maximum (0 = unlimited)
_UNLIMITED_CHUNK = 1024 * 1024
_PREAMBLE_AND_MAGIC = 132
#: bytes of the file read and sent at a time
_BLOCK_BYTES = 4 * 1024 * 1024


class _LockedSender(Protocol):
    def send_raw(self, *buffers: bytes | bytearray | memoryview) -> None: ...

    def recv(self, nr_bytes: int) -> bytearray: ...

    def unread(self, data: bytes | bytearray) -> None: ...

    @property
    def socket(self) -> socket.socket | None: ...


def store_request_command(sop_class_uid: str, message_id: int, sop_instance_uid: str) -> bytes:
    """The C-STORE-RQ command set (elements in tag order, UIDs padded with NUL)."""
    body = b"".join(
        (
            ui_element(0x0002, sop_class_uid),
            struct.pack("<HHIH", 0, 0x0100, 2, 0x0001),  # C-STORE-RQ
            struct.pack("<HHIH", 0, 0x0110, 2, message_id),
            struct.pack("<HHIH", 0, 0x0700, 2, 0x0000),  # medium priority
            struct.pack("<HHIH", 0, 0x0800, 2, 0x0001),  # a data set follows
            ui_element(0x1000, sop_instance_uid),
        )
    )
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def _pdu_header(context_id: int, control: int, length: int) -> bytes:
    """P-DATA-TF header with one PDV item of ``length`` value bytes."""
    return struct.pack(">BBIIBB", 4, 0, length + 6, length + 2, context_id, control)


class StoreSender:
    """Sends stored files over one established association, one request at a time."""

    def __init__(self, assoc: Association, timeout: float) -> None:
        self._assoc = assoc
        self._timeout = timeout
        self._contexts = {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0])): int(cx.context_id)
            for cx in assoc.accepted_contexts
            if cx.context_id is not None
        }
        peer_max = int(assoc.acceptor.maximum_length or 0)
        self._chunk = (peer_max - 6) if peer_max > 16 else _UNLIMITED_CHUNK
        # the file is read a block (whole PDUs) at a time, each block sent in one call
        self._block = bytearray(max(1, _BLOCK_BYTES // self._chunk) * self._chunk)
        self._message_id = 0
        # a C-STORE-RSP is a few hundred bytes; a longer PDU is not one
        self._max_response = 64 * 1024

    def accepts(self, sop_class_uid: str, transfer_syntax_uid: str) -> bool:
        """Whether the peer accepted this SOP class in this transfer syntax."""
        return (sop_class_uid, transfer_syntax_uid) in self._contexts

    def send(
        self, path: Path, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str
    ) -> int | None:
        """Send the data set of the Part 10 file at ``path``; the response status, or
        ``None`` when none came in time (or the association went away).

        Raises :class:`OSError` when the file cannot be read or the socket written.
        """
        dul = self._assoc.dul
        if not isinstance(dul, GatewayDUL) or not hasattr(dul.socket, "unread"):
            raise OSError("association without the fast send path")
        context_id = self._contexts[(sop_class_uid, transfer_syntax_uid)]
        self._message_id = self._message_id % 0xFFFF + 1
        deadline = time.monotonic() + self._timeout
        with dul.reading() as lent:
            if lent is None or not self._assoc.is_established:
                return None
            sender = cast(_LockedSender, lent)
            self._send_file(sender, path, context_id, sop_class_uid, sop_instance_uid)
            status = self._read_response(sender, deadline)
        if status is not None:
            dul.restart_idle_timer()
        return status

    def _send_file(
        self,
        sender: _LockedSender,
        path: Path,
        context_id: int,
        sop_class_uid: str,
        sop_instance_uid: str,
    ) -> None:
        """Write the C-STORE-RQ: command set, then the file's data set in PDUs."""
        command = store_request_command(sop_class_uid, self._message_id, sop_instance_uid)
        with path.open("rb") as fh:
            head = fh.read(_PREAMBLE_AND_MAGIC + 12)
            if len(head) < _PREAMBLE_AND_MAGIC + 12 or head[128:132] != b"DICM":
                raise OSError(f"{path.name}: not a Part 10 file")
            (meta_length,) = struct.unpack_from("<I", head, 140)
            start = _PREAMBLE_AND_MAGIC + 12 + meta_length
            remaining = os.fstat(fh.fileno()).st_size - start
            if remaining <= 0:
                raise OSError(f"{path.name}: no data set")
            fh.seek(start)
            block = memoryview(self._block)
            buffers: list[bytes | memoryview] = [
                _pdu_header(context_id, 0x03, len(command)) + command
            ]
            while remaining > 0:
                got = fh.readinto(block[: min(len(block), remaining)])
                if not got:
                    raise OSError(f"{path.name}: file shrank while being sent")
                remaining -= got
                for offset in range(0, got, self._chunk):
                    piece = block[offset : min(got, offset + self._chunk)]
                    last = remaining <= 0 and offset + len(piece) >= got
                    buffers.append(_pdu_header(context_id, 0x02 if last else 0x00, len(piece)))
                    buffers.append(piece)
                sender.send_raw(*buffers)
                buffers = []

    def _read_response(self, sender: _LockedSender, deadline: float) -> int | None:
        """The status of the C-STORE-RSP to the request just sent; ``None`` when the
        connection closes, nothing comes before ``deadline``, or something else comes
        (given back to the reactor, which acts on it: an abort, a release)."""
        raw = sender.socket
        if raw is None:
            return None
        previous = raw.gettimeout()
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            raw.settimeout(remaining)
            header = sender.recv(6)
            if len(header) < 6:
                sender.unread(header)
                return None
            pdu_type, _, length = struct.unpack(">BBL", header)
            if pdu_type != 0x04 or length > self._max_response:
                sender.unread(header)  # not a response: the reactor reads the rest
                return None
            raw.settimeout(max(0.001, deadline - time.monotonic()))
            body = sender.recv(length)
            status = store_response_status(body, self._message_id) if len(body) == length else None
            if status is None:
                sender.unread(header + body)
            return status
        except (TimeoutError, OSError):
            return None  # the caller aborts the association (the stream may be cut)
        finally:
            with contextlib.suppress(OSError):
                raw.settimeout(previous)
