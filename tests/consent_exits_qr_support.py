"""Helpers of tests/test_consent_exits_qr.py: the DCMTK query/retrieve tools run as a peer of
a test node (findscu, getscu, movescu), each writing into its own directory."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.conftest import RunningNode, run_tool

_counter = itertools.count()
_FINAL = re.compile(r"Received (?:Final Move Response|C-GET Response) \(([^)]*)\)")


def _out_dir(tmp: Path, name: str) -> Path:
    path = tmp / f"{name}-{next(_counter)}"
    path.mkdir()
    return path


def _key_args(keys: tuple[str, ...]) -> list[str]:
    args: list[str] = []
    for key in keys:
        args += ["-k", key]
    return args


def findscu(node: RunningNode, tmp: Path, calling_ae: str, model: str, *keys: str) -> list[Dataset]:
    """The C-FIND matches findscu receives (``model``: ``-P`` or ``-S``); fails unless the
    final status is Success."""
    out = _out_dir(tmp, "find")
    result = run_tool(
        "/usr/bin/findscu",
        "-v",
        "-X",
        "-od",
        out,
        "-aet",
        calling_ae,
        "-aec",
        node.ae_title,
        model,
        *_key_args(keys),
        node.host,
        node.port,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-2000:]
    assert "Received Final Find Response (Success)" in output, output[-2000:]
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


@dataclass(frozen=True)
class Retrieved:
    """What a C-GET / C-MOVE peer saw: the final status text DCMTK printed, the SOP
    Instance UIDs it received, and the sub-operation counts of the final response."""

    status: str
    received: frozenset[str]
    counts: str

    def seen_by_peer(self) -> tuple[str, str]:
        """Everything the peer learns besides the instances it receives."""
        return self.status, self.counts


def _counts(output: str) -> str:
    """The sub-operation counts DCMTK prints in its final status report."""
    found = re.findall(
        r"Number of (Remaining|Completed|Failed|Warning) Suboperations\s*:\s*(\S+)", output
    )
    last: dict[str, str] = {}
    for name, value in found:
        last[name] = value
    return ",".join(f"{k}={v}" for k, v in sorted(last.items()))


def _received(directory: Path) -> frozenset[str]:
    return frozenset(
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in directory.iterdir()
    )


def _final(output: str) -> str:
    found = _FINAL.findall(output)
    assert found, output[-2000:]
    return str(found[-1]).strip()


def getscu(node: RunningNode, tmp: Path, calling_ae: str, model: str, *keys: str) -> Retrieved:
    """C-GET with DCMTK getscu (``model``: ``-P`` or ``-S``)."""
    out = _out_dir(tmp, "get")
    result = run_tool(
        "/usr/bin/getscu",
        "-v",
        "-aet",
        calling_ae,
        "-aec",
        node.ae_title,
        model,
        "-od",
        out,
        *_key_args(keys),
        node.host,
        node.port,
    )
    output = result.stdout + result.stderr
    return Retrieved(_final(output), _received(out), _counts(output))


def movescu(
    node: RunningNode,
    tmp: Path,
    calling_ae: str,
    destination_ae: str,
    port: int,
    model: str,
    *keys: str,
) -> Retrieved:
    """C-MOVE with DCMTK movescu, which receives the sub-operations itself on ``port``
    (the configured port of the destination peer ``destination_ae``)."""
    out = _out_dir(tmp, "move")
    result = run_tool(
        "/usr/bin/movescu",
        "-v",
        "-aet",
        calling_ae,
        "-aem",
        destination_ae,
        "+P",
        port,
        "-od",
        out,
        "-aec",
        node.ae_title,
        model,
        *_key_args(keys),
        node.host,
        node.port,
    )
    output = result.stdout + result.stderr
    return Retrieved(_final(output), _received(out), _counts(output))
