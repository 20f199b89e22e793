"""archive instance identity

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 03:10:00

Each archived instance keeps the patient identity it carries (issuer, Patient ID, INS,
birth date, sex; see dicom_node/archive/identity.py), for the consent checks of
query/retrieve. Instances stored before this revision have none (NULL): the checks read
their files instead.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("archive_instance") as batch:
        batch.add_column(sa.Column("identity", sa.String(length=512), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("archive_instance") as batch:
        batch.drop_column("identity")
