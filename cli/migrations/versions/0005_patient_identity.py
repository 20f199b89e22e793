"""archive patient identity

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 03:55:00

Each archived patient row keeps the stored identity of the instance that created it
(whose name and demographics the row shows), so that the consent checks of
query/retrieve decide on that identity, INS included. Rows created before this revision
have none (NULL): the checks resolve the row's issuer, Patient ID, birth date and sex.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("archive_patient") as batch:
        batch.add_column(sa.Column("identity", sa.String(length=512), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("archive_patient") as batch:
        batch.drop_column("identity")
