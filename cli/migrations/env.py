"""Alembic environment: migrations run on the engine handed in by consentgate."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

from consent.models import ConsentBase
from dicom_node.archive.models import ArchiveBase
from router import models as router_models  # noqa: F401  (registers router tables)

target_metadata = [ArchiveBase.metadata, ConsentBase.metadata]


def run_migrations() -> None:
    engine: Engine = context.config.attributes["engine"]
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run_migrations()
