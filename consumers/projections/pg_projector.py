"""The PostgreSQL projector: ``jobs.events`` → jobs, runs, dependencies, audit.

One loop, one consumer group (``jobsched-projector-pg``)::

    consume ≤ batch_size records
      └─ one database transaction
           lock this consumer's offset rows for the batch's partitions (fencing)
           drop records below the stored offsets (already applied)
           decode + fold the rest in memory (pure: :class:`Batch`)
           COPY rows to staging tables; INSERT … SELECT … ON CONFLICT DO UPDATE per table
           store next offset per partition
      └─ commit; then commit the same offsets to Kafka (lag monitoring only)

The database, not Kafka, holds the projector's progress: on assignment it seeks every
partition to the offset stored in ``projector_offsets``.  Rows and offsets commit
together, so a crash anywhere replays at most an uncommitted batch, and replaying is
harmless anyway: every ``jobs``/``runs`` row carries the position of the last event
applied to it and ignores anything not newer; audit and dependency rows are keyed.

A record that cannot be decoded or applied goes to the dead-letter topic and its
offset is passed: if the batch's statements fail on bad data, the batch is rolled back
to a savepoint and re-applied record by record, so only the bad record is left out.
Errors that are not about the data (PostgreSQL down, tables missing) stop the loop on
that batch and retry it with a back-off instead; nothing is skipped.
"""

from __future__ import annotations

import dataclasses
import shlex
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeVar

import orjson
import psycopg
import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, SQLAlchemyError

from consumers.projections.migrate import create_pg_engine, migrate_engine, redact_url, store_error
from consumers.projections.models import RUN_FINAL_STATUSES, RUN_STATUSES
from infra.config import Settings
from infra.errors import BrokerUnavailable, DecodeError, JobschedError, Unavailable
from infra.kafka import DeadLetters, Message, make_consumer, make_producer, raise_for_message
from schemas.codec import Codec, default_codec
from schemas.events import (
    JOB_STATUSES,
    TERMINAL_STATUSES,
    Event,
    ExecutorSpec,
    JobSpec,
    JobStatusChanged,
    RunStatusChanged,
)

__all__ = [
    "CONSUMER_GROUP",
    "Batch",
    "JobRow",
    "PostgresProjector",
    "ProjectionError",
    "RunRow",
    "command_summary",
    "job_row",
    "merge_job",
    "merge_run",
    "reset_projection",
    "run_row",
    "spec_json",
]

CONSUMER_GROUP = "jobsched-projector-pg"
_COMMAND_MAX = 1000
_ACTIVE_RUN = frozenset({"queued", "running"})

log = structlog.get_logger(__name__)
T = TypeVar("T")


class ProjectionError(JobschedError, ValueError):
    """A well-formed event that the projection cannot apply (e.g. an unknown status)."""


# --- pure mapping: events -> rows -----------------------------------------------------


@dataclass(slots=True)
class JobRow:
    """The ``jobs`` row an event (or a fold of several) leaves behind. Times in epoch ms."""

    job_id: str
    tenant_id: str
    user_id: str
    status: str
    reason: str | None
    attempts: int
    last_run_id: str | None
    updated_ms: int
    next_fire_ms: int | None
    finished_ms: int | None
    created_ms: int
    partition: int
    offset: int
    # From the spec; ``has_spec`` False means "keep what the row has".
    has_spec: bool = False
    name: str | None = None
    queue: str | None = None
    priority: str | None = None
    executor_kind: str | None = None
    command: str | None = None
    schedule_at_ms: int | None = None
    cron: str | None = None
    timezone: str | None = None
    spec_json: str | None = None
    labels_json: str | None = None
    after: tuple[str, ...] = ()


@dataclass(slots=True)
class RunRow:
    """The ``runs`` row of one attempt. Times in epoch ms."""

    run_id: str
    attempt: int
    job_id: str
    nominal_ms: int
    status: str
    worker_id: str | None
    exit_code: int | None
    reason: str | None
    queued_ms: int | None
    started_ms: int | None
    finished_ms: int | None
    retry_ms: int | None
    updated_ms: int
    partition: int
    offset: int


@dataclass(slots=True)
class AuditRow:
    event_id: str
    job_id: str
    run_id: str | None
    type: str
    status: str | None
    user_id: str
    tenant_id: str
    occurred_ms: int
    topic: str
    partition: int
    offset: int
    payload_json: str


def command_summary(executor: ExecutorSpec) -> str | None:
    """One line saying what a job runs, for listings (``echo hi``, ``POST https://…``)."""
    if executor.kind == "shell" and executor.shell is not None:
        s = shlex.join(executor.shell.argv)
    elif executor.kind == "http" and executor.http is not None:
        s = f"{executor.http.method} {executor.http.url}"
    elif executor.kind == "python" and executor.python is not None:
        s = executor.python.target
    else:
        return None
    return s if len(s) <= _COMMAND_MAX else s[: _COMMAND_MAX - 1] + "…"


def spec_json(spec: JobSpec) -> str:
    """The spec as JSON (what ``jobs.spec`` holds), nested records as objects."""
    return orjson.dumps(spec).decode()


def job_row(ev: JobStatusChanged, partition: int, offset: int) -> JobRow:
    """The row one ``JobStatusChanged`` describes on its own."""
    if ev.status not in JOB_STATUSES:
        raise ProjectionError(f"job {ev.job_id}: unknown job status {ev.status!r}")
    row = JobRow(
        job_id=ev.job_id, tenant_id=ev.tenant_id, user_id=ev.user_id, status=ev.status, reason=ev.reason,
        attempts=ev.attempts, last_run_id=ev.run_id, updated_ms=ev.occurred_at_ms, next_fire_ms=ev.next_fire_ms,
        finished_ms=ev.occurred_at_ms if ev.status in TERMINAL_STATUSES else None,
        created_ms=ev.occurred_at_ms, partition=partition, offset=offset,
    )
    spec = ev.spec
    if spec is not None:
        if spec.job_id != ev.job_id:
            raise ProjectionError(f"job {ev.job_id}: carries the spec of job {spec.job_id}")
        row.has_spec = True
        row.created_ms = spec.submitted_at_ms
        row.name = spec.name
        row.queue = spec.queue
        row.priority = spec.priority
        row.executor_kind = spec.executor.kind
        row.command = command_summary(spec.executor)
        row.schedule_at_ms = spec.schedule.at_ms
        row.cron = spec.schedule.cron
        row.timezone = spec.schedule.timezone
        row.spec_json = spec_json(spec)
        row.labels_json = orjson.dumps(spec.labels).decode()
        row.after = tuple(dict.fromkeys(spec.after))
    return row


_SPEC_FIELDS = ("name", "queue", "priority", "executor_kind", "command", "schedule_at_ms", "cron", "timezone",
                "spec_json", "labels_json", "after")


def merge_job(prev: JobRow | None, new: JobRow) -> JobRow:
    """Fold a newer event's row onto an older one of the same job (events in offset order).

    Status fields come from the newer event; spec fields and ``created`` stay unless the
    newer event carries a spec; ``finished`` is when the job first became terminal.
    The SQL upsert in :func:`_write_jobs` applies the same rule against the stored row.
    """
    if prev is None:
        return new
    if not new.has_spec:
        new.has_spec = prev.has_spec
        new.created_ms = prev.created_ms
        for f in _SPEC_FIELDS:
            setattr(new, f, getattr(prev, f))
    if new.last_run_id is None:
        new.last_run_id = prev.last_run_id
    if new.finished_ms is not None and prev.finished_ms is not None:
        new.finished_ms = prev.finished_ms
    return new


def run_row(ev: RunStatusChanged, partition: int, offset: int) -> RunRow:
    """The row one ``RunStatusChanged`` describes on its own."""
    if ev.status not in RUN_STATUSES:
        raise ProjectionError(f"run {ev.run_id}: unknown run status {ev.status!r}")
    if ev.attempt < 0:
        raise ProjectionError(f"run {ev.run_id}: negative attempt {ev.attempt}")
    at = ev.occurred_at_ms
    return RunRow(
        run_id=ev.run_id, attempt=ev.attempt, job_id=ev.job_id, nominal_ms=ev.nominal_ms, status=ev.status,
        worker_id=ev.worker_id, exit_code=ev.exit_code, reason=ev.reason,
        queued_ms=at if ev.status == "queued" else None,
        started_ms=ev.started_at_ms if ev.started_at_ms is not None else (at if ev.status == "running" else None),
        finished_ms=ev.finished_at_ms if ev.finished_at_ms is not None else (
            at if ev.status in RUN_FINAL_STATUSES else None),
        retry_ms=ev.retry_at_ms, updated_ms=at, partition=partition, offset=offset,
    )


def merge_run(prev: RunRow | None, new: RunRow) -> RunRow:
    """Fold a newer event's row onto the stored row of the same attempt.

    A final attempt (succeeded, failed, timed_out, cancelled, lost, refused) never goes
    back to queued/running: such a stale event returns ``prev`` unchanged.  Otherwise the
    newer status wins and missing values are kept from before (the first ``queued`` time
    stays).  The SQL upsert in :func:`_write_runs` applies the same rule.
    """
    if prev is None:
        return new
    if prev.status in RUN_FINAL_STATUSES and new.status in _ACTIVE_RUN:
        return prev
    return RunRow(
        run_id=new.run_id, attempt=new.attempt, job_id=new.job_id, nominal_ms=new.nominal_ms, status=new.status,
        worker_id=new.worker_id if new.worker_id is not None else prev.worker_id,
        exit_code=new.exit_code if new.exit_code is not None else prev.exit_code,
        reason=new.reason if new.reason is not None else prev.reason,
        queued_ms=prev.queued_ms if prev.queued_ms is not None else new.queued_ms,
        started_ms=new.started_ms if new.started_ms is not None else prev.started_ms,
        finished_ms=new.finished_ms if new.finished_ms is not None else prev.finished_ms,
        retry_ms=new.retry_ms if new.retry_ms is not None else prev.retry_ms,
        updated_ms=new.updated_ms, partition=new.partition, offset=new.offset,
    )


@dataclass
class Batch:
    """Events folded into the rows they leave, in the order they were added.

    Adding is pure (no I/O) so the mapping is unit-tested in memory; the projector
    writes the result with one statement per table.
    """

    codec: Codec | None = None
    jobs: dict[str, JobRow] = field(default_factory=dict)
    runs: dict[tuple[str, int], RunRow] = field(default_factory=dict)
    #: Highest attempt seen per run in this batch: lower attempts after it are stale.
    max_attempt: dict[str, int] = field(default_factory=dict)
    audit: dict[str, AuditRow] = field(default_factory=dict)
    ignored: int = 0

    def add(self, event: Event, topic: str, partition: int, offset: int) -> bool:
        """Fold one event in; False when it is not for this projection or is stale.

        Every job or run event is audited, stale or not: the audit says what was
        reported, the rows what won.  Raises :class:`ProjectionError` for an event that
        cannot be applied; the batch is then unchanged.
        """
        if isinstance(event, JobStatusChanged):
            row = job_row(event, partition, offset)
            self.jobs[row.job_id] = merge_job(self.jobs.get(row.job_id), row)
            applied = True
        elif isinstance(event, RunStatusChanged):
            new = run_row(event, partition, offset)
            change = event.job_change()
            job = job_row(change, partition, offset) if change is not None else None  # may raise: before any change
            applied = self._add_run(new)
            if job is not None:
                self.jobs[job.job_id] = merge_job(self.jobs.get(job.job_id), job)
                applied = True
        else:
            self.ignored += 1
            return False
        if event.event_id not in self.audit:
            payload = self.codec.to_json(event) if self.codec is not None else "{}"
            self.audit[event.event_id] = AuditRow(
                event_id=event.event_id, job_id=event.job_id, run_id=event.run_id,
                type=event.avro_name.rsplit(".", 1)[-1], status=event.status, user_id=event.user_id,
                tenant_id=event.tenant_id, occurred_ms=event.occurred_at_ms, topic=topic, partition=partition,
                offset=offset, payload_json=payload,
            )
        if not applied:
            self.ignored += 1
        return applied

    def _add_run(self, new: RunRow) -> bool:
        if new.attempt < self.max_attempt.get(new.run_id, -1):
            return False  # an older attempt after a newer one: superseded
        self.max_attempt[new.run_id] = new.attempt
        key = (new.run_id, new.attempt)
        prev = self.runs.get(key)
        merged = merge_run(prev, new)
        if merged is prev:
            return False
        self.runs[key] = merged
        return True

    @property
    def dependencies(self) -> list[tuple[str, str]]:
        return [(j.job_id, up) for j in self.jobs.values() for up in j.after]

    def __len__(self) -> int:
        return len(self.jobs) + len(self.runs) + len(self.audit)


# --- SQL: rows copied into staging tables, one statement per table ------------------------
#
# Each table's rows are COPYed (text format, formatted in C by psycopg) into a temporary
# staging table of this connection and applied from there with one INSERT … SELECT …
# ON CONFLICT per table, all four sent as one query.  Array parameters cost the projector
# a third of its CPU (every text element is quoted in Python); COPY costs a few percent.

_FINAL_SQL = ", ".join(f"'{s}'" for s in sorted(RUN_FINAL_STATUSES))


def _ts(col: str) -> str:
    return f"to_timestamp(v.{col} / 1000.0)"


# Temporary tables live as long as the session and are emptied at every commit; the
# statements below also empty them as they read (DELETE … RETURNING), so a batch re-applied
# record by record after a refused one starts from empty tables.  The projection can be
# rebuilt from Kafka and rows commit with their offsets, so a commit lost in a PostgreSQL
# crash is replayed: commits need not wait for the WAL flush.
_STAGE_DDL = """
SET LOCAL synchronous_commit = off;
CREATE TEMP TABLE IF NOT EXISTS jobs_stage (
    job_id text, tenant_id text, user_id text, name text, status text, reason text, attempts int,
    last_run_id text, queue text, priority text, executor_kind text, command text, schedule_at bigint, cron text,
    timezone text, spec text, labels text, created bigint, updated bigint, next_fire bigint, finished bigint,
    part int, off bigint, after text[]
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS runs_stage (
    run_id text, attempt int, job_id text, nominal bigint, status text, worker_id text, exit_code int, reason text,
    queued bigint, started bigint, finished bigint, retry bigint, updated bigint, part int, off bigint
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS audit_stage (
    event_id text, job_id text, run_id text, type text, status text, user_id text, tenant_id text,
    occurred bigint, topic text, part int, off bigint, payload text
) ON COMMIT DELETE ROWS
"""

_JOBS_SQL = f"""
WITH v AS (DELETE FROM jobs_stage RETURNING *),
deps AS (
    INSERT INTO dependencies (job_id, upstream_id)
    SELECT v.job_id, u.upstream_id FROM v, unnest(v.after) AS u(upstream_id) WHERE v.after IS NOT NULL
    ON CONFLICT DO NOTHING
)
INSERT INTO jobs AS j (job_id, tenant_id, user_id, name, status, reason, attempts, last_run_id, queue, priority,
                       executor_kind, command, schedule_at, cron, timezone, spec, labels, created_at, updated_at,
                       next_fire_at, finished_at, event_partition, event_offset)
SELECT v.job_id, v.tenant_id, v.user_id, v.name, v.status, v.reason, v.attempts, v.last_run_id, v.queue, v.priority,
       v.executor_kind, v.command, {_ts("schedule_at")}, v.cron, v.timezone, CAST(v.spec AS jsonb),
       CAST(v.labels AS jsonb), {_ts("created")}, {_ts("updated")}, {_ts("next_fire")}, {_ts("finished")},
       v.part, v.off
FROM v
ON CONFLICT (job_id) DO UPDATE SET
    tenant_id = excluded.tenant_id,
    user_id = excluded.user_id,
    name = CASE WHEN excluded.spec IS NULL THEN j.name ELSE excluded.name END,
    queue = CASE WHEN excluded.spec IS NULL THEN j.queue ELSE excluded.queue END,
    priority = CASE WHEN excluded.spec IS NULL THEN j.priority ELSE excluded.priority END,
    executor_kind = CASE WHEN excluded.spec IS NULL THEN j.executor_kind ELSE excluded.executor_kind END,
    command = CASE WHEN excluded.spec IS NULL THEN j.command ELSE excluded.command END,
    schedule_at = CASE WHEN excluded.spec IS NULL THEN j.schedule_at ELSE excluded.schedule_at END,
    cron = CASE WHEN excluded.spec IS NULL THEN j.cron ELSE excluded.cron END,
    timezone = CASE WHEN excluded.spec IS NULL THEN j.timezone ELSE excluded.timezone END,
    labels = CASE WHEN excluded.spec IS NULL THEN j.labels ELSE excluded.labels END,
    created_at = CASE WHEN excluded.spec IS NULL THEN j.created_at ELSE excluded.created_at END,
    spec = COALESCE(excluded.spec, j.spec),
    status = excluded.status,
    reason = excluded.reason,
    attempts = excluded.attempts,
    last_run_id = COALESCE(excluded.last_run_id, j.last_run_id),
    updated_at = excluded.updated_at,
    next_fire_at = excluded.next_fire_at,
    finished_at = CASE WHEN excluded.finished_at IS NULL THEN NULL
                       ELSE COALESCE(j.finished_at, excluded.finished_at) END,
    event_partition = excluded.event_partition,
    event_offset = excluded.event_offset
WHERE j.event_partition <> excluded.event_partition OR j.event_offset < excluded.event_offset
"""

_RUNS_SQL = f"""
WITH v AS (DELETE FROM runs_stage RETURNING *)
INSERT INTO runs AS r (run_id, attempt, job_id, nominal_at, status, worker_id, exit_code, reason, queued_at,
                       started_at, finished_at, retry_at, updated_at, event_partition, event_offset)
SELECT v.run_id, v.attempt, v.job_id, {_ts("nominal")}, v.status, v.worker_id, v.exit_code, v.reason,
       {_ts("queued")}, {_ts("started")}, {_ts("finished")}, {_ts("retry")}, {_ts("updated")}, v.part, v.off
FROM v
WHERE NOT EXISTS (SELECT 1 FROM runs o WHERE o.run_id = v.run_id AND o.attempt > v.attempt)
ON CONFLICT (run_id, attempt) DO UPDATE SET
    job_id = excluded.job_id,
    nominal_at = excluded.nominal_at,
    status = excluded.status,
    worker_id = COALESCE(excluded.worker_id, r.worker_id),
    exit_code = COALESCE(excluded.exit_code, r.exit_code),
    reason = COALESCE(excluded.reason, r.reason),
    queued_at = COALESCE(r.queued_at, excluded.queued_at),
    started_at = COALESCE(excluded.started_at, r.started_at),
    finished_at = COALESCE(excluded.finished_at, r.finished_at),
    retry_at = COALESCE(excluded.retry_at, r.retry_at),
    updated_at = excluded.updated_at,
    event_partition = excluded.event_partition,
    event_offset = excluded.event_offset
WHERE (r.event_partition <> excluded.event_partition OR r.event_offset < excluded.event_offset)
  AND NOT (r.status IN ({_FINAL_SQL}) AND excluded.status IN ('queued', 'running'))
"""

_AUDIT_SQL = """
WITH v AS (DELETE FROM audit_stage RETURNING *)
INSERT INTO audit (event_id, job_id, run_id, type, status, user_id, tenant_id, occurred_at, topic, partition,
                   "offset", payload)
SELECT v.event_id, v.job_id, v.run_id, v.type, v.status, v.user_id, v.tenant_id, to_timestamp(v.occurred / 1000.0),
       v.topic, v.part, v.off, CAST(v.payload AS jsonb)
FROM v
ON CONFLICT (event_id) DO NOTHING
"""

_LOCK_OFFSETS_SQL = text("""
SELECT partition, next_offset FROM projector_offsets
WHERE consumer = :consumer AND topic = :topic AND partition = ANY(CAST(:partitions AS int[]))
ORDER BY partition
FOR UPDATE
""")

_LOAD_OFFSETS_SQL = text("""
SELECT topic, partition, next_offset FROM projector_offsets WHERE consumer = :consumer
""")

_STORE_OFFSETS_SQL = text("""
INSERT INTO projector_offsets AS p (consumer, topic, partition, next_offset, updated_at)
SELECT :consumer, :topic, v.part, v.off, now()
FROM unnest(CAST(:partitions AS int[]), CAST(:offsets AS bigint[])) AS v(part, off)
ON CONFLICT (consumer, topic, partition) DO UPDATE
SET next_offset = GREATEST(p.next_offset, excluded.next_offset), updated_at = now()
""")


def _job_values(j: JobRow) -> tuple[Any, ...]:
    return (j.job_id, j.tenant_id, j.user_id, j.name, j.status, j.reason, j.attempts, j.last_run_id, j.queue,
            j.priority, j.executor_kind, j.command, j.schedule_at_ms, j.cron, j.timezone, j.spec_json, j.labels_json,
            j.created_ms, j.updated_ms, j.next_fire_ms, j.finished_ms, j.partition, j.offset,
            list(j.after) if j.after else None)


def _run_values(r: RunRow) -> tuple[Any, ...]:
    return (r.run_id, r.attempt, r.job_id, r.nominal_ms, r.status, r.worker_id, r.exit_code, r.reason, r.queued_ms,
            r.started_ms, r.finished_ms, r.retry_ms, r.updated_ms, r.partition, r.offset)


def _audit_values(a: AuditRow) -> tuple[Any, ...]:
    return (a.event_id, a.job_id, a.run_id, a.type, a.status, a.user_id, a.tenant_id, a.occurred_ms, a.topic,
            a.partition, a.offset, a.payload_json)


def write_batch(conn: Connection, batch: Batch) -> None:
    """Write a folded batch: rows COPYed to staging, then one guarded upsert per table."""
    stages = [(table, rows, values, sql) for table, rows, values, sql in (
        ("jobs_stage", batch.jobs, _job_values, _JOBS_SQL),
        ("runs_stage", batch.runs, _run_values, _RUNS_SQL),
        ("audit_stage", batch.audit, _audit_values, _AUDIT_SQL),
    ) if rows]
    if not stages:
        return
    raw = conn.connection.driver_connection  # the psycopg connection, inside our transaction
    apply = ";".join(sql for _, _, _, sql in stages)
    try:
        with raw.cursor() as cur:
            cur.execute(_STAGE_DDL)
            for table, rows, values, _ in stages:
                with cur.copy(f"COPY {table} FROM STDIN") as copy:
                    for row in rows.values():
                        copy.write_row(values(row))
            cur.execute(apply)
    except psycopg.Error as e:  # surface as SQLAlchemy's classes, like every other statement
        raise DBAPIError.instance(apply, None, e, psycopg.Error) from e


def load_offsets(conn: Connection, consumer: str) -> dict[tuple[str, int], int]:
    """Every stored (topic, partition) → next offset of one consumer."""
    rows = conn.execute(_LOAD_OFFSETS_SQL, {"consumer": consumer}).all()
    return {(r.topic, r.partition): r.next_offset for r in rows}


def reset_projection(engine: Engine, *, consumers: Iterable[str] = (CONSUMER_GROUP,), truncate: bool = True) -> None:
    """Forget a projector's progress (and by default its rows) so it rebuilds by replay."""
    with engine.begin() as conn:
        if truncate:
            conn.execute(text("TRUNCATE jobs, runs, dependencies, audit"))
        conn.execute(text("DELETE FROM projector_offsets WHERE consumer = ANY(CAST(:c AS text[]))"),
                     {"c": list(consumers)})


# --- the service ------------------------------------------------------------------------


@dataclass
class ProjectorStats:
    """Counters a running projector exposes (read them from another thread)."""

    records: int = 0
    applied: int = 0
    skipped: int = 0
    dead: int = 0
    batches: int = 0
    #: Batches PostgreSQL refused and that were re-applied record by record.
    isolated: int = 0


class PostgresProjector:
    """Applies ``jobs.events`` to the PostgreSQL projection (a :class:`~infra.service.Service`)."""

    name = "projector-pg"

    def __init__(
        self,
        settings: Settings,
        *,
        consumer_name: str | None = None,
        kafka_group: str | None = None,
        batch_size: int = 4000,
        poll_timeout: float = 0.2,
        run_migrations: bool = True,
        codec: Codec | None = None,
    ) -> None:
        self.settings = settings
        # Per topic prefix, so separate deployments never share (and rebalance) a group.
        self.consumer_name = consumer_name or settings.group_id("projector-pg")
        #: Kafka group membership; progress is stored under ``consumer_name`` in PostgreSQL,
        #: so a rebuild can join a group of its own and leave offsets the service resumes from.
        self.kafka_group = kafka_group or self.consumer_name
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        self.run_migrations = run_migrations
        self.codec = codec or default_codec()
        self.stats = ProjectorStats()
        #: Set once the first partitions are assigned and positioned (tests wait on it).
        self.assigned = threading.Event()
        self._engine: Engine | None = None
        self._dlq: DeadLetters | None = None
        self._producer: Producer | None = None
        self._stop = threading.Event()
        self._log = log.bind(service=self.name, consumer=self.consumer_name, topic=settings.events_topic)

    # -- lifecycle -------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        engine = self._engine = create_pg_engine(self.settings, pool_size=2, max_overflow=2)
        producer = self._producer = make_producer(self.settings)
        self._dlq = DeadLetters(producer, self.settings, self.consumer_name)
        consumer: Consumer | None = None
        try:
            if self.run_migrations and self._retry(lambda: migrate_engine(engine) or True, "migrating") is None:
                return  # stopped before PostgreSQL answered
            consumer = make_consumer(self.settings, self.kafka_group)
            consumer.subscribe([self.settings.events_topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
            self._log.info("projector started", db=redact_url(self.settings.postgres_url))
            while not stop.is_set():
                msgs = consumer.consume(self.batch_size, self.poll_timeout)
                producer.poll(0)
                records = [m for m in msgs if raise_for_message(m)]
                if not records:
                    continue
                done = self._retry(lambda: self._apply(records), "applying a batch")
                if done is None:  # stopped while retrying; the batch is replayed next time
                    break
                try:
                    consumer.commit(offsets=done, asynchronous=True)
                except Exception as e:  # Kafka's copy is for lag monitoring only
                    self._log.debug("kafka offset commit failed", error=str(e))
        finally:
            if consumer is not None:
                consumer.close()
            producer.flush(5)
            engine.dispose()
            self._log.info("projector stopped", **dataclasses.asdict(self.stats))

    def _retry(self, fn: Callable[[], T], doing: str) -> T | None:
        """Run ``fn`` until it succeeds or the service stops; back off on store errors."""
        delay = 0.2
        while True:
            try:
                return fn()
            except (SQLAlchemyError, Unavailable) as e:
                err = store_error(self.settings, e, doing) if isinstance(e, SQLAlchemyError) else e
                self._log.warning("retrying", doing=doing, error=str(err), delay=delay)
            if self._stop.wait(delay):
                return None
            delay = min(delay * 2, 5.0)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Position every assigned partition at the offset stored in PostgreSQL."""
        engine = self._engine
        assert engine is not None

        def load() -> dict[tuple[str, int], int]:
            with engine.connect() as conn:
                return load_offsets(conn, self.consumer_name)

        stored = self._retry(load, "loading offsets") or {}
        for tp in partitions:
            tp.offset = stored.get((tp.topic, tp.partition), OFFSET_BEGINNING)
        consumer.assign(partitions)
        self._log.info("partitions assigned", partitions=[(tp.partition, tp.offset) for tp in partitions])
        self.assigned.set()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Every batch commits with its offsets, so there is nothing to flush here.
        consumer.unassign()
        self._log.info("partitions revoked", partitions=[tp.partition for tp in partitions])

    # -- one batch -------------------------------------------------------------------------

    def _apply(self, records: list[Message]) -> list[TopicPartition]:
        """Apply a batch in one transaction; return the Kafka offsets to commit."""
        assert self._engine is not None and self._dlq is not None
        started = time.perf_counter()
        next_offsets: dict[tuple[str, int], int] = {}
        for m in records:
            key = (m.topic(), m.partition())
            next_offsets[key] = max(next_offsets.get(key, 0), m.offset() + 1)
        dead_before = self._dlq.count
        with self._engine.begin() as conn:
            stored = self._lock_offsets(conn, next_offsets)
            fresh = [m for m in records if m.offset() >= stored.get((m.topic(), m.partition()), -1)]
            entries: list[tuple[Message, Event]] = []
            batch = Batch(codec=self.codec)
            for m in fresh:
                try:
                    event = self.codec.decode(m.value())
                    batch.add(event, m.topic(), m.partition(), m.offset())
                except (DecodeError, ProjectionError) as e:
                    self._dead(m, e)
                    continue
                entries.append((m, event))
            try:
                with conn.begin_nested():
                    write_batch(conn, batch)
            except (DataError, IntegrityError) as e:
                self._log.warning("batch refused, applying record by record", error=str(e.orig or e)[:300])
                self.stats.isolated += 1
                self._apply_one_by_one(conn, entries)
            dead = self._dlq.count - dead_before
            if dead:
                self._flush_dead_letters()
            self._store_offsets(conn, next_offsets)
        self.stats.records += len(records)
        self.stats.skipped += len(records) - len(fresh)
        self.stats.applied += len(entries) - batch.ignored
        self.stats.dead += dead
        self.stats.batches += 1
        self._log.debug("batch applied", records=len(records), fresh=len(fresh), dead=dead,
                        ms=round((time.perf_counter() - started) * 1000, 1))
        return [TopicPartition(t, p, o) for (t, p), o in next_offsets.items()]

    def _lock_offsets(self, conn: Connection, keys: Iterable[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """Lock and read the stored offsets of the batch's partitions (fences a zombie twin)."""
        by_topic: dict[str, list[int]] = {}
        for topic, part in keys:
            by_topic.setdefault(topic, []).append(part)
        out: dict[tuple[str, int], int] = {}
        for topic, parts in by_topic.items():
            for r in conn.execute(_LOCK_OFFSETS_SQL, {"consumer": self.consumer_name, "topic": topic,
                                                      "partitions": sorted(parts)}):
                out[(topic, r.partition)] = r.next_offset
        return out

    def _store_offsets(self, conn: Connection, next_offsets: dict[tuple[str, int], int]) -> None:
        by_topic: dict[str, dict[int, int]] = {}
        for (topic, part), off in next_offsets.items():
            by_topic.setdefault(topic, {})[part] = off
        for topic, offs in by_topic.items():
            conn.execute(_STORE_OFFSETS_SQL, {"consumer": self.consumer_name, "topic": topic,
                                              "partitions": list(offs), "offsets": list(offs.values())})

    def _apply_one_by_one(self, conn: Connection, entries: list[tuple[Message, Event]]) -> None:
        for m, event in entries:
            single = Batch(codec=self.codec)
            single.add(event, m.topic(), m.partition(), m.offset())
            try:
                with conn.begin_nested():
                    write_batch(conn, single)
            except (DataError, IntegrityError) as e:
                self._dead(m, e.orig if e.orig is not None else e)

    def _dead(self, m: Message, error: BaseException) -> None:
        assert self._dlq is not None
        self._log.warning("dead letter", partition=m.partition(), offset=m.offset(), error=str(error)[:300])
        self._dlq.send(m, error)

    def _flush_dead_letters(self) -> None:
        assert self._dlq is not None
        assert self._producer is not None
        left = self._producer.flush(10)
        if left:
            raise BrokerUnavailable(f"{left} dead letters not acknowledged by Kafka; retrying the batch")
