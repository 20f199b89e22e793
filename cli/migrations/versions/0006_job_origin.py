"""forward job origin

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 10:20:00

Each forward job records the archive that holds its instance (the ``node-id`` of the
receiving node's data directory): nodes sharing one database but not one data directory
claim only the jobs whose files they hold. Jobs made before this revision have none
("") and stay claimable by any node, as before.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("router_job") as batch:
        batch.add_column(
            sa.Column("origin", sa.String(length=36), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("router_job") as batch:
        batch.drop_column("origin")
