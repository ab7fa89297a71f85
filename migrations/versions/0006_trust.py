"""attributions a rights holder can trust: the score that ranks, both scores and p-values per
entry, significance and the copy check per attribution

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_UNIQUE = ["generation_id", "method", "metric", "top_k", "verify_top_k"]
ENTRY_FLOATS = ("influence", "exact_influence", "resemblance", "exact_resemblance", "p_value",
                "exact_p_value")


def upgrade() -> None:
    # Every attribution before this one was ranked by influence (the paper's score).
    with op.batch_alter_table("attribution", schema=None) as batch_op:
        batch_op.add_column(sa.Column("score", sa.String(length=16), nullable=False,
                                      server_default="influence"))
        batch_op.add_column(sa.Column("attributable", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("significance", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("near_copy", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("copy_of_item_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(op.f("fk_attribution_copy_of_item_id_training_item"), "training_item",
                                    ["copy_of_item_id"], ["id"], ondelete="SET NULL")
        batch_op.create_check_constraint(op.f("ck_attribution_score"),
                                         "score IN ('influence', 'resemblance')")
        batch_op.drop_constraint(op.f("uq_attribution_" + "_".join(OLD_UNIQUE)), type_="unique")
        batch_op.create_unique_constraint(op.f("uq_attribution_" + "_".join([*OLD_UNIQUE, "score"])),
                                          [*OLD_UNIQUE, "score"])
    with op.batch_alter_table("attribution_entry", schema=None) as batch_op:
        for name in ENTRY_FLOATS:
            batch_op.add_column(sa.Column(name, sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("significant", sa.Boolean(), nullable=True))
    # The old entries' score was their influence (exact_score: verified).
    op.execute("UPDATE attribution_entry SET influence = score, exact_influence = exact_score")


def downgrade() -> None:
    op.execute("DELETE FROM attribution WHERE score <> 'influence'")
    with op.batch_alter_table("attribution_entry", schema=None) as batch_op:
        batch_op.drop_column("significant")
        for name in reversed(ENTRY_FLOATS):
            batch_op.drop_column(name)
    with op.batch_alter_table("attribution", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("uq_attribution_" + "_".join([*OLD_UNIQUE, "score"])), type_="unique")
        batch_op.create_unique_constraint(op.f("uq_attribution_" + "_".join(OLD_UNIQUE)), OLD_UNIQUE)
        batch_op.drop_constraint(op.f("ck_attribution_score"), type_="check")
        batch_op.drop_constraint(op.f("fk_attribution_copy_of_item_id_training_item"), type_="foreignkey")
        for name in ("copy_of_item_id", "near_copy", "significance", "attributable", "score"):
            batch_op.drop_column(name)
