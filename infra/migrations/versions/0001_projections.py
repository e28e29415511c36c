"""Projections: jobs, runs, dependencies, audit, projector_offsets.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("job_id", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_run_id", sa.Text(), nullable=True),
        sa.Column("queue", sa.Text(), nullable=True),
        sa.Column("priority", sa.Text(), nullable=True),
        sa.Column("executor_kind", sa.Text(), nullable=True),
        sa.Column("command", sa.Text(), nullable=True),
        sa.Column("schedule_at", TZ, nullable=True),
        sa.Column("cron", sa.Text(), nullable=True),
        sa.Column("timezone", sa.Text(), nullable=True),
        sa.Column("spec", JSONB(), nullable=True),
        sa.Column("labels", JSONB(), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.Column("next_fire_at", TZ, nullable=True),
        sa.Column("finished_at", TZ, nullable=True),
        sa.Column("event_partition", sa.Integer(), nullable=False),
        sa.Column("event_offset", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", name="pk_jobs"),
    )
    op.create_index("ix_jobs_created", "jobs", ["created_at", "job_id"])
    op.create_index("ix_jobs_tenant_created", "jobs", ["tenant_id", "created_at", "job_id"])
    op.create_index("ix_jobs_tenant_status_created", "jobs", ["tenant_id", "status", "created_at", "job_id"])
    op.create_index("ix_jobs_user_created", "jobs", ["user_id", "created_at", "job_id"])
    op.create_index("ix_jobs_status_created", "jobs", ["status", "created_at", "job_id"])

    op.create_table(
        "runs",
        sa.Column("run_id", sa.Text(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Text(), nullable=False),
        sa.Column("nominal_at", TZ, nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("worker_id", sa.Text(), nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("queued_at", TZ, nullable=True),
        sa.Column("started_at", TZ, nullable=True),
        sa.Column("finished_at", TZ, nullable=True),
        sa.Column("retry_at", TZ, nullable=True),
        sa.Column("updated_at", TZ, nullable=False),
        sa.Column("event_partition", sa.Integer(), nullable=False),
        sa.Column("event_offset", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "attempt", name="pk_runs"),
    )
    op.create_index("ix_runs_job_nominal", "runs", ["job_id", "nominal_at", "attempt"])

    op.create_table(
        "dependencies",
        sa.Column("job_id", sa.Text(), nullable=False),
        sa.Column("upstream_id", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "upstream_id", name="pk_dependencies"),
    )
    op.create_index("ix_dependencies_upstream", "dependencies", ["upstream_id"])

    op.create_table(
        "audit",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("job_id", sa.Text(), nullable=False),
        sa.Column("run_id", sa.Text(), nullable=True),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=True),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("occurred_at", TZ, nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("payload", JSONB(), nullable=False),
        sa.PrimaryKeyConstraint("event_id", name="pk_audit"),
    )
    op.create_index("ix_audit_job_occurred", "audit", ["job_id", "occurred_at"])

    op.create_table(
        "projector_offsets",
        sa.Column("consumer", sa.Text(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("next_offset", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", TZ, server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("consumer", "topic", "partition", name="pk_projector_offsets"),
    )


def downgrade() -> None:
    op.drop_table("projector_offsets")
    op.drop_table("audit")
    op.drop_table("dependencies")
    op.drop_table("runs")
    op.drop_table("jobs")
