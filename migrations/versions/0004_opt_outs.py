"""opt-outs: opt_out and opt_out_effect; ensemble versions (lineage, parent, served members,
withdrawn works, member manifests, status 'superseded'); job kind 'retrain'

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 00:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _check(table: str, name: str, condition: str) -> None:
    # batch mode: SQLite rebuilds the table, PostgreSQL alters it in place
    with op.batch_alter_table(table, schema=None) as batch_op:
        batch_op.drop_constraint(op.f(f"ck_{table}_{name}"), type_="check")
        batch_op.create_check_constraint(op.f(f"ck_{table}_{name}"), condition)


def upgrade() -> None:
    op.create_table(
        "opt_out",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("training_item_id", sa.Integer(), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["owner_id"], ["owner.id"], name=op.f("fk_opt_out_owner_id_owner"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["training_item_id"],
            ["training_item.id"],
            name=op.f("fk_opt_out_training_item_id_training_item"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_opt_out")),
        sa.UniqueConstraint("training_item_id", name=op.f("uq_opt_out_training_item_id")),
    )
    op.create_table(
        "opt_out_effect",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("opt_out_id", sa.Integer(), nullable=False),
        sa.Column("lineage_id", sa.Integer(), nullable=False),
        sa.Column("trained_version_id", sa.Integer(), nullable=False),
        sa.Column("members", sa.BigInteger(), nullable=False),
        sa.Column("masked_version_id", sa.Integer(), nullable=False),
        sa.Column("restored_version_id", sa.Integer(), nullable=True),
        sa.Column("job_id", sa.String(length=36), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("restored_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "state IN ('masked', 'retraining', 'restored')", name=op.f("ck_opt_out_effect_state")
        ),
        sa.ForeignKeyConstraint(
            ["masked_version_id"],
            ["ensemble.id"],
            name=op.f("fk_opt_out_effect_masked_version_id_ensemble"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["opt_out_id"],
            ["opt_out.id"],
            name=op.f("fk_opt_out_effect_opt_out_id_opt_out"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["restored_version_id"],
            ["ensemble.id"],
            name=op.f("fk_opt_out_effect_restored_version_id_ensemble"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["trained_version_id"],
            ["ensemble.id"],
            name=op.f("fk_opt_out_effect_trained_version_id_ensemble"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_opt_out_effect")),
        sa.UniqueConstraint("opt_out_id", "lineage_id", name=op.f("uq_opt_out_effect_opt_out_id_lineage_id")),
    )
    with op.batch_alter_table("opt_out_effect", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_opt_out_effect_lineage_id"), ["lineage_id"], unique=False)

    # Every registered ensemble is the first version of its own lineage and serves all members.
    with op.batch_alter_table("ensemble", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lineage_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("parent_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("served_members", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("withdrawn", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("manifests", sa.JSON(), nullable=True))
    op.execute(
        "UPDATE ensemble SET lineage_id = id, served_members = (CAST(1 AS BIGINT) << n) - 1, withdrawn = '[]'"
    )
    with op.batch_alter_table("ensemble", schema=None) as batch_op:
        batch_op.alter_column("served_members", existing_type=sa.BigInteger(), nullable=False)
        batch_op.alter_column("withdrawn", existing_type=sa.JSON(), nullable=False)
        batch_op.create_index(batch_op.f("ix_ensemble_lineage_id"), ["lineage_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_ensemble_parent_id_ensemble"),
            "ensemble",
            ["parent_id"],
            ["id"],
            ondelete="SET NULL",
        )
    _check("ensemble", "status", "status IN ('training', 'ready', 'retired', 'superseded')")
    _check("job", "kind", "kind IN ('generate', 'attribute', 'validate', 'retrain')")


def downgrade() -> None:
    op.execute("DELETE FROM job WHERE kind = 'retrain'")
    _check("job", "kind", "kind IN ('generate', 'attribute', 'validate')")
    # Versions lose their lineage: a superseded one is retired, the serving one stays ready.
    op.execute("UPDATE ensemble SET status = 'retired' WHERE status = 'superseded'")
    _check("ensemble", "status", "status IN ('training', 'ready', 'retired')")
    with op.batch_alter_table("ensemble", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_ensemble_parent_id_ensemble"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_ensemble_lineage_id"))
        batch_op.drop_column("manifests")
        batch_op.drop_column("withdrawn")
        batch_op.drop_column("served_members")
        batch_op.drop_column("parent_id")
        batch_op.drop_column("lineage_id")
    with op.batch_alter_table("opt_out_effect", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_opt_out_effect_lineage_id"))
    op.drop_table("opt_out_effect")
    op.drop_table("opt_out")
