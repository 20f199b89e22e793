"""Route matching: which configured routes apply to one received instance.

Conditions are data from the configuration (equals / one-of / glob / regex); no code
string is ever evaluated. A multi-valued attribute matches when any of its values does.
All conditions of a route must hold; a route without conditions matches everything.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from config.settings import MatchCondition, RouteSettings


@dataclass(frozen=True)
class _Compiled:
    condition: MatchCondition
    pattern: re.Pattern[str] | None


class RouteTable:
    """The configured routes, compiled once."""

    def __init__(self, routes: Sequence[RouteSettings]) -> None:
        self.routes = tuple(routes)
        self._compiled = [
            (
                route,
                [
                    _Compiled(c, re.compile(c.values[0]) if c.operator == "regex" else None)
                    for c in route.match
                ],
            )
            for route in self.routes
        ]

    def keywords(self) -> frozenset[str]:
        """The DICOM attribute keywords the routes look at (``calling_ae`` excluded)."""
        return frozenset(
            c.keyword for r in self.routes for c in r.match if c.keyword != "calling_ae"
        )

    def matching(
        self, attributes: Mapping[str, Sequence[str]], calling_ae: str
    ) -> list[RouteSettings]:
        """The routes whose every condition holds for these attribute values."""
        matched = []
        for route, conditions in self._compiled:
            if all(_holds(c, attributes, calling_ae) for c in conditions):
                matched.append(route)
        return matched


def _holds(compiled: _Compiled, attributes: Mapping[str, Sequence[str]], calling_ae: str) -> bool:
    cond = compiled.condition
    values: Sequence[str] = (
        (calling_ae,) if cond.keyword == "calling_ae" else attributes.get(cond.keyword, ())
    )
    for value in values:
        if cond.operator == "equals" and value == cond.values[0]:
            return True
        if cond.operator == "one_of" and value in cond.values:
            return True
        if cond.operator == "glob" and fnmatchcase(value, cond.values[0]):
            return True
        if (
            cond.operator == "regex"
            and compiled.pattern is not None
            and compiled.pattern.search(value)
        ):
            return True
    return False
