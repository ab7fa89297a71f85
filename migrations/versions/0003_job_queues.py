"""job queues: job.queue (interactive or long; validate jobs are long), job.delivered_at (a
worker received the job's message), and jobs indexed by (queue, status, enqueued_at)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch mode: SQLite rebuilds the table, PostgreSQL alters it in place
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("queue", sa.String(length=16), server_default="interactive",
                                      nullable=False))
        batch_op.add_column(sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_check_constraint(op.f("ck_job_queue"), "queue IN ('interactive', 'long')")
        batch_op.create_index("ix_job_queue_status_enqueued_at", ["queue", "status", "enqueued_at"],
                              unique=False)
    # Jobs already in the database keep running where their kind belongs (batches: interactive).
    op.execute("UPDATE job SET queue = 'long' WHERE kind = 'validate'")


def downgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_index("ix_job_queue_status_enqueued_at")
        batch_op.drop_constraint(op.f("ck_job_queue"), type_="check")
        batch_op.drop_column("delivered_at")
        batch_op.drop_column("queue")
