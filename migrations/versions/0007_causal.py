"""the authors' causal measures per attribution: the counterfactual radius over the verified
sources and whether dropping the top source changes the generation's nearest training image

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08 03:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("attribution", schema=None) as batch_op:
        batch_op.add_column(sa.Column("causal", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("attribution", schema=None) as batch_op:
        batch_op.drop_column("causal")
