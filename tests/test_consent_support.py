"""Helpers shared by the consent tests (no tests here): a migrated store, a clock, INS."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import Engine

from cli.database import make_engine, make_sessions, upgrade
from consent.service import ConsentStore

NOTICE_V1 = "Vos images sont partagées avec la plateforme régionale Grand Est.\n"
NOTICE_V2 = "Vos images sont partagées avec la plateforme régionale Grand Est (v2).\n"


class StepClock:
    """A clock that moves one second forward at each reading."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 3, 1, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


def ins_key(body: str) -> str:
    """The matricule INS for a 13-character body (2A/2B counted as 19/18)."""
    numeric = body.replace("2A", "19") if body[5:7] == "2A" else body
    numeric = numeric.replace("2B", "18") if body[5:7] == "2B" else numeric
    return f"{body}{97 - int(numeric) % 97:02d}"


# a woman born in May 1985 in Paris (75), and a man born in 1960
INS_F_1985 = ins_key("2850575123456")
INS_M_1960 = ins_key("1600257001002")


@contextmanager
def migrated_store(db_url: str, **kwargs: object) -> Iterator[tuple[ConsentStore, Engine]]:
    """A :class:`ConsentStore` on ``db_url`` after ``upgrade``; disposed at exit."""
    engine = make_engine(db_url, pool_size=4)
    try:
        upgrade(engine)
        store = ConsentStore(make_sessions(engine), StepClock(), **kwargs)  # type: ignore[arg-type]
        yield store, engine
    finally:
        engine.dispose()


def add_alice(store: ConsentStore, **overrides: object) -> int:
    """Register the test patient CHR-METZ/IPP001 (F, 1985-05-12)."""
    fields: dict[str, object] = {
        "issuer": "CHR-METZ",
        "patient_id": "IPP001",
        "birth_name": "Dupont",
        "first_name": "Alice",
        "birth_date": date(1985, 5, 12),
        "sex": "F",
        "actor": "admission",
    }
    fields.update(overrides)
    return store.add_patient(**fields)  # type: ignore[arg-type]
