"""Statements of the store path run on the DBAPI cursor (config.db.CompiledStatement)
write exactly what SQLAlchemy would: the same stored values (time stamps included, which
the forward queue compares in SQL), and rows read back through the ORM are equal."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import bindparam, insert, select, text, update

from cli.database import make_engine, upgrade
from config.db import CompiledStatement
from dicom_node.archive.models import Instance, Patient, Series, Study

WHEN = datetime(2026, 11, 29, 8, 30, 15, 123456, tzinfo=UTC)


def _instance(uid: str, series_pk: int) -> dict[str, object]:
    return {
        "series_pk": series_pk,
        "sop_instance_uid": uid,
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "instance_number": "1",
        "number_of_frames": 1,
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "size": 1234,
        "path": f"ab/{uid}.dcm",
        "calling_ae": "CT01",
        "received_at": WHEN,
    }


def test_rows_match_what_sqlalchemy_writes(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        with engine.begin() as conn:
            patient = conn.execute(
                insert(Patient).values(patient_id="P1", issuer="I").returning(Patient.id)
            ).scalar_one()
            study = conn.execute(
                insert(Study)
                .values(
                    patient_pk=patient,
                    study_instance_uid="1.2.3",
                    modalities="",
                    number_of_series=0,
                    number_of_instances=0,
                )
                .returning(Study.id)
            ).scalar_one()
            series = conn.execute(
                insert(Series)
                .values(study_pk=study, series_instance_uid="1.2.3.4", number_of_instances=0)
                .returning(Series.id)
            ).scalar_one()
        fast_insert = CompiledStatement(
            insert(Instance)
            .values({name: bindparam(name) for name in _instance("x", 0)})
            .returning(Instance.id),
            engine.dialect,
        )
        counter = CompiledStatement(
            update(Series)
            .where(Series.id == bindparam("pk"))
            .values(number_of_instances=Series.number_of_instances + 1),
            engine.dialect,
        )
        with engine.begin() as conn:
            by_sqlalchemy = conn.execute(
                insert(Instance).values(_instance("1.1", series)).returning(Instance.id)
            ).scalar_one()
            row = fast_insert.execute(conn, _instance("1.2", series))
            counter.execute(conn, {"pk": series})
            counter.execute(conn, {"pk": series})
        assert row is not None and int(row[0]) > by_sqlalchemy
        with engine.connect() as conn:
            stored = conn.execute(
                text("SELECT sop_instance_uid, received_at, size FROM archive_instance")
            ).all()
            assert len(stored) == 2
            assert stored[0][1:] == stored[1][1:]  # the same stored representation
            orm = conn.execute(select(Instance).order_by(Instance.id)).all()
            first, second = (r.received_at for r in orm)
            assert first == second
            assert conn.execute(
                select(Instance.id).where(Instance.received_at <= WHEN)
            ).scalars().all() == [by_sqlalchemy, int(row[0])]
            count = conn.execute(
                select(Series.number_of_instances).where(Series.id == series)
            ).scalar_one()
            assert count == 2
    finally:
        engine.dispose()
