"""The PostgreSQL read model: SQLAlchemy 2 declarative tables.

These classes describe the projection that :mod:`consumers.projections.pg_projector`
writes and :mod:`consumers.projections.queries` reads.  The schema itself is created
and evolved only by the Alembic migrations in ``infra/migrations`` (run them with
:func:`consumers.projections.migrate.migrate`); a test holds the two together.

Everything here can be dropped and rebuilt by replaying ``jobs.events``: no table is
a source of truth.  There are no foreign keys on purpose: a run may be projected
before its job (or without it, once topic retention has dropped the job's first
event), and the projector never has to order its writes across tables.

Each ``jobs``/``runs`` row remembers the position (partition, offset) of the last
event applied to it, so applying an event twice, or an older one, changes nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Index, Integer, MetaData, Text, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: A run attempt in one of these states is over; a late ``queued``/``running`` for the
#: same attempt is stale and ignored.
RUN_FINAL_STATUSES: frozenset[str] = frozenset(
    {"succeeded", "failed", "timed_out", "cancelled", "lost", "refused"}
)
RUN_STATUSES: tuple[str, ...] = (
    "queued", "running", "succeeded", "failed", "timed_out", "cancelled", "lost", "refused", "retry_scheduled",
)

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "pk": "pk_%(table_name)s",
}

TZ = DateTime(timezone=True)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Job(Base):
    """One row per job: its latest status and the fields of its spec people filter on."""

    __tablename__ = "jobs"

    job_id: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(Text)
    user_id: Mapped[str] = mapped_column(Text)
    name: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    last_run_id: Mapped[str | None] = mapped_column(Text)
    queue: Mapped[str | None] = mapped_column(Text)
    priority: Mapped[str | None] = mapped_column(Text)
    executor_kind: Mapped[str | None] = mapped_column(Text)
    #: One line saying what the job runs (``echo hi``, ``GET https://…``, ``pkg.mod:fn``).
    command: Mapped[str | None] = mapped_column(Text)
    schedule_at: Mapped[datetime | None] = mapped_column(TZ)
    cron: Mapped[str | None] = mapped_column(Text)
    timezone: Mapped[str | None] = mapped_column(Text)
    #: The whole JobSpec as accepted, for the API and audits.
    spec: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    labels: Mapped[dict[str, str] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(TZ)
    updated_at: Mapped[datetime] = mapped_column(TZ)
    next_fire_at: Mapped[datetime | None] = mapped_column(TZ)
    finished_at: Mapped[datetime | None] = mapped_column(TZ)
    #: Position of the last event applied to this row (idempotency guard).
    event_partition: Mapped[int] = mapped_column(Integer)
    event_offset: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (
        Index("ix_jobs_created", "created_at", "job_id"),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at", "job_id"),
        Index("ix_jobs_tenant_status_created", "tenant_id", "status", "created_at", "job_id"),
        Index("ix_jobs_user_created", "user_id", "created_at", "job_id"),
        Index("ix_jobs_status_created", "status", "created_at", "job_id"),
    )


class Run(Base):
    """One row per attempt of a run; a run is (job, nominal fire time)."""

    __tablename__ = "runs"

    run_id: Mapped[str] = mapped_column(Text, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(Text)
    nominal_at: Mapped[datetime] = mapped_column(TZ)
    status: Mapped[str] = mapped_column(Text)
    worker_id: Mapped[str | None] = mapped_column(Text)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text)
    queued_at: Mapped[datetime | None] = mapped_column(TZ)
    started_at: Mapped[datetime | None] = mapped_column(TZ)
    finished_at: Mapped[datetime | None] = mapped_column(TZ)
    retry_at: Mapped[datetime | None] = mapped_column(TZ)
    updated_at: Mapped[datetime] = mapped_column(TZ)
    event_partition: Mapped[int] = mapped_column(Integer)
    event_offset: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_runs_job_nominal", "job_id", "nominal_at", "attempt"),)


class Dependency(Base):
    """``job_id`` runs after ``upstream_id`` (from the spec's ``after`` list)."""

    __tablename__ = "dependencies"

    job_id: Mapped[str] = mapped_column(Text, primary_key=True)
    upstream_id: Mapped[str] = mapped_column(Text, primary_key=True)

    __table_args__ = (Index("ix_dependencies_upstream", "upstream_id"),)


class AuditEntry(Base):
    """Every applied event, as JSON, for audits ("who cancelled this, and when?")."""

    __tablename__ = "audit"

    event_id: Mapped[str] = mapped_column(Text, primary_key=True)
    job_id: Mapped[str] = mapped_column(Text)
    run_id: Mapped[str | None] = mapped_column(Text)
    type: Mapped[str] = mapped_column(Text)
    status: Mapped[str | None] = mapped_column(Text)
    user_id: Mapped[str] = mapped_column(Text)
    tenant_id: Mapped[str] = mapped_column(Text)
    occurred_at: Mapped[datetime] = mapped_column(TZ)
    topic: Mapped[str] = mapped_column(Text)
    partition: Mapped[int] = mapped_column(Integer)
    offset: Mapped[int] = mapped_column(BigInteger)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)

    __table_args__ = (Index("ix_audit_job_occurred", "job_id", "occurred_at"),)


class ProjectorOffset(Base):
    """The next offset to apply, per consumer and partition: the projector's progress.

    Written in the same transaction as the rows it covers, so the database never
    holds rows without their offset nor an offset without its rows.
    """

    __tablename__ = "projector_offsets"

    consumer: Mapped[str] = mapped_column(Text, primary_key=True)
    topic: Mapped[str] = mapped_column(Text, primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    next_offset: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(TZ, server_default=text("now()"))


metadata = Base.metadata
