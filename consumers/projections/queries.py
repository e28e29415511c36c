"""The read side: jobs and runs from PostgreSQL, logs from MongoDB, as JSON-ready dicts.

The CLI, the API and the console read here and nowhere else.  Every timestamp leaves as
an ISO-8601 string in UTC (``2025-01-31T12:00:00.000Z``) or None.  Driver errors leave as
:class:`~infra.errors.StoreUnavailable` naming the store (never its password); an
unknown job as :class:`~infra.errors.JobNotFound`; a bad argument as
:class:`~infra.errors.ValidationError`.

Both classes open their connections on first use and release them in :meth:`close`
(or use them as context managers).
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from typing import Any, Iterator, Sequence

from pymongo.collection import Collection
from pymongo.errors import PyMongoError
from sqlalchemy import Engine, Row, literal, select, tuple_
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from consumers.projections.migrate import LOG_CHUNKS, create_pg_engine, mongo_client, mongo_error, store_error
from consumers.projections.models import RUN_FINAL_STATUSES, TZ, AuditEntry, Dependency, Job, Run
from infra.config import Settings
from infra.errors import JobNotFound, StoreUnavailable, ValidationError
from schemas.events import JOB_STATUSES, TERMINAL_STATUSES

__all__ = ["JobQueries", "LogQueries", "iso", "run_sort_key"]

MAX_LIMIT = 1000
jobs_t = Job.__table__
runs_t = Run.__table__
deps_t = Dependency.__table__
audit_t = AuditEntry.__table__


def iso(dt: datetime | None) -> str | None:
    """An aware datetime as ISO-8601 UTC with milliseconds and a ``Z``; None stays None."""
    if dt is None:
        return None
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_time(value: datetime | str | int | float) -> datetime | None:
    """A cursor given as datetime, ISO string or epoch ms; None if it is not a time."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.fromtimestamp(value / 1000, tz=timezone.utc)
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def _db_errors(settings: Settings, e: SQLAlchemyError, doing: str) -> Exception:
    """The error to raise for a driver error: StoreUnavailable when the store is the cause."""
    if isinstance(e, (OperationalError, InterfaceError)):
        return store_error(settings, e, doing)
    if isinstance(e, DBAPIError) and getattr(getattr(e.orig, "diag", None), "sqlstate", None) == "42P01":
        return store_error(settings, e, doing)
    return e


class JobQueries:
    """Jobs, runs, dependencies and audit entries from the PostgreSQL projection."""

    def __init__(self, settings: Settings, *, engine: Engine | None = None) -> None:
        self.settings = settings
        self._engine = engine
        self._own_engine = engine is None
        self._lock = threading.Lock()

    @property
    def engine(self) -> Engine:
        with self._lock:
            if self._engine is None:
                self._engine = create_pg_engine(self.settings, pool_size=5, max_overflow=5)
            return self._engine

    def close(self) -> None:
        """Release the connection pool (if this object created it)."""
        with self._lock:
            if self._engine is not None and self._own_engine:
                self._engine.dispose()
                self._engine = None

    def __enter__(self) -> "JobQueries":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- jobs ----------------------------------------------------------------------------

    def get_job(self, job_id: str) -> dict[str, Any]:
        """A job with its upstream ids and runs (ordered by nominal time, then attempt)."""
        try:
            with self.engine.connect() as conn:
                row = conn.execute(select(jobs_t).where(jobs_t.c.job_id == job_id)).first()
                if row is None:
                    raise JobNotFound(job_id)
                after = conn.execute(
                    select(deps_t.c.upstream_id).where(deps_t.c.job_id == job_id).order_by(deps_t.c.upstream_id)
                ).scalars().all()
                runs = conn.execute(
                    select(runs_t).where(runs_t.c.job_id == job_id).order_by(runs_t.c.nominal_at, runs_t.c.attempt)
                ).all()
        except SQLAlchemyError as e:
            raise _db_errors(self.settings, e, f"reading job {job_id}") from e
        job = self._job_dict(row)
        job["after"] = self._after(row, list(after))
        job["runs"] = [self._run_dict(r) for r in runs]
        return job

    def list_jobs(
        self,
        tenant_id: str | None = None,
        user_id: str | None = None,
        status: str | Sequence[str] | None = None,
        limit: int = 50,
        before: datetime | str | int | None = None,
    ) -> list[dict[str, Any]]:
        """Jobs newest first, filtered; without runs.

        ``before`` pages backwards: a job id (the last one of the previous page: exact
        even when jobs share a creation time) or a time (datetime, ISO-8601 string, epoch ms)
        that every returned job was created before.
        """
        if not 1 <= limit <= MAX_LIMIT:
            raise ValidationError(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
        statuses = [status] if isinstance(status, str) else list(status or [])
        for s in statuses:
            if s not in JOB_STATUSES:
                raise ValidationError(f"unknown status {s!r}; one of {', '.join(JOB_STATUSES)}")
        q = select(jobs_t)
        if tenant_id is not None:
            q = q.where(jobs_t.c.tenant_id == tenant_id)
        if user_id is not None:
            q = q.where(jobs_t.c.user_id == user_id)
        if len(statuses) == 1:
            q = q.where(jobs_t.c.status == statuses[0])
        elif statuses:
            q = q.where(jobs_t.c.status.in_(statuses))
        when = _parse_time(before) if before is not None and before != "" else None
        if when is not None:
            q = q.where(jobs_t.c.created_at < when)
        q = q.order_by(jobs_t.c.created_at.desc(), jobs_t.c.job_id.desc()).limit(limit)
        try:
            with self.engine.connect() as conn:
                if when is None and before:
                    cursor = conn.execute(
                        select(jobs_t.c.created_at, jobs_t.c.job_id).where(jobs_t.c.job_id == str(before))
                    ).first()
                    if cursor is None:
                        raise JobNotFound(str(before))
                    # Keyset paging on (created_at, job_id): exact even when times tie.
                    q = q.where(tuple_(jobs_t.c.created_at, jobs_t.c.job_id)
                                < tuple_(literal(cursor.created_at, TZ), literal(cursor.job_id)))
                rows = conn.execute(q).all()
        except SQLAlchemyError as e:
            raise _db_errors(self.settings, e, "listing jobs") from e
        return [self._job_dict(r) for r in rows]

    def get_runs(self, job_id: str) -> list[dict[str, Any]]:
        """A job's run attempts ordered by nominal time, then attempt (empty if none yet)."""
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    select(runs_t).where(runs_t.c.job_id == job_id).order_by(runs_t.c.nominal_at, runs_t.c.attempt)
                ).all()
        except SQLAlchemyError as e:
            raise _db_errors(self.settings, e, f"reading runs of {job_id}") from e
        return [self._run_dict(r) for r in rows]

    def get_audit(self, job_id: str, limit: int = 1000) -> list[dict[str, Any]]:
        """The events applied to a job, oldest first, each with its full payload."""
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    select(audit_t).where(audit_t.c.job_id == job_id)
                    .order_by(audit_t.c.occurred_at, audit_t.c.partition, audit_t.c.offset).limit(limit)
                ).all()
        except SQLAlchemyError as e:
            raise _db_errors(self.settings, e, f"reading the audit of {job_id}") from e
        return [{"event_id": r.event_id, "type": r.type, "job_id": r.job_id, "run_id": r.run_id,
                 "status": r.status, "user_id": r.user_id, "tenant_id": r.tenant_id,
                 "occurred_at": iso(r.occurred_at), "payload": r.payload} for r in rows]

    def run_state(self, job_id: str, run_id: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """(job status fields or None, attempts of one run): what ``follow`` needs to stop."""
        try:
            with self.engine.connect() as conn:
                job = conn.execute(
                    select(jobs_t.c.status, jobs_t.c.last_run_id, jobs_t.c.attempts).where(jobs_t.c.job_id == job_id)
                ).first()
                attempts = conn.execute(
                    select(runs_t.c.attempt, runs_t.c.status).where(runs_t.c.run_id == run_id)
                    .order_by(runs_t.c.attempt)
                ).all()
        except SQLAlchemyError as e:
            raise _db_errors(self.settings, e, f"reading run {run_id}") from e
        return (dict(job._mapping) if job is not None else None), [dict(a._mapping) for a in attempts]

    # -- rendering -----------------------------------------------------------------------

    @staticmethod
    def _after(row: Row[Any], deps: list[str]) -> list[str]:
        spec_after = (row.spec or {}).get("after") if row.spec else None
        if spec_after:  # keep the order the user gave
            return list(dict.fromkeys([*spec_after, *deps]))
        return deps

    @staticmethod
    def _job_dict(r: Row[Any]) -> dict[str, Any]:
        spec = r.spec or {}
        return {
            "job_id": r.job_id,
            "name": r.name,
            "status": r.status,
            "reason": r.reason,
            "attempts": r.attempts,
            "user_id": r.user_id,
            "tenant_id": r.tenant_id,
            "queue": r.queue,
            "priority": r.priority,
            "executor": r.executor_kind,
            "command": r.command,
            "schedule": {"at": iso(r.schedule_at), "cron": r.cron, "timezone": r.timezone},
            "labels": r.labels or {},
            "after": list(spec.get("after") or []),
            "timeout_ms": spec.get("timeout_ms"),
            "retry": spec.get("retry"),
            "last_run_id": r.last_run_id,
            "created_at": iso(r.created_at),
            "updated_at": iso(r.updated_at),
            "next_fire_at": iso(r.next_fire_at),
            "finished_at": iso(r.finished_at),
        }

    @staticmethod
    def _run_dict(r: Row[Any]) -> dict[str, Any]:
        return {
            "run_id": r.run_id,
            "attempt": r.attempt,
            "status": r.status,
            "nominal_at": iso(r.nominal_at),
            "queued_at": iso(r.queued_at),
            "started_at": iso(r.started_at),
            "finished_at": iso(r.finished_at),
            "retry_at": iso(r.retry_at),
            "exit_code": r.exit_code,
            "worker_id": r.worker_id,
            "reason": r.reason,
        }


# --- logs ---------------------------------------------------------------------------------


def run_sort_key(run_id: str) -> tuple[int, str]:
    """Runs in nominal order: ``run_id`` is ``<job_id>@<nominal ms>`` (by name otherwise)."""
    _, _, tail = run_id.rpartition("@")
    try:
        return int(tail), run_id
    except ValueError:
        return 0, run_id


def order_chunks(docs: list[dict[str, Any]]) -> None:
    """Sort chunks in place: runs by nominal time, then attempts, then sequence.

    An attempt redelivered to another worker (the first died) holds two sequences, one per
    worker: each worker's output stays whole, in the order the workers wrote first.
    """
    first: dict[tuple[str, int, str], float] = {}
    for d in docs:
        at = d.get("at")
        t = at.timestamp() if isinstance(at, datetime) else 0.0
        k = (d["run_id"], d["attempt"], d.get("worker_id") or "")
        first[k] = min(first.get(k, t), t)
    docs.sort(key=lambda d: (run_sort_key(d["run_id"]), d["attempt"],
                             first[(d["run_id"], d["attempt"], d.get("worker_id") or "")],
                             d.get("worker_id") or "", d["seq"]))


def _chunk_dict(d: dict[str, Any]) -> dict[str, Any]:
    at = d.get("at")
    return {
        "job_id": d["job_id"],
        "run_id": d["run_id"],
        "attempt": d["attempt"],
        "seq": d["seq"],
        "stream": d["stream"],
        "data": d["data"],
        "eof": d["eof"],
        "worker_id": d.get("worker_id"),
        "at": iso(at) if isinstance(at, datetime) else None,
    }


class LogQueries:
    """Log chunks from MongoDB, in order; ``follow`` tails a job like ``tail -f``.

    FerretDB answers equality filters well but sorts in memory, so chunks are sorted
    here: by run (nominal time), attempt, then sequence number.
    """

    def __init__(self, settings: Settings, *, jobs: JobQueries | None = None) -> None:
        self.settings = settings
        self._client: Any = None
        self._jobs = jobs
        self._own_jobs = jobs is None
        self._lock = threading.Lock()

    @property
    def collection(self) -> Collection[dict[str, Any]]:
        with self._lock:
            if self._client is None:
                self._client = mongo_client(self.settings)
            return self._client[self.settings.mongo_db][LOG_CHUNKS]  # type: ignore[no-any-return]

    @property
    def jobs(self) -> JobQueries:
        with self._lock:
            if self._jobs is None:
                self._jobs = JobQueries(self.settings)
            return self._jobs

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
            if self._jobs is not None and self._own_jobs:
                self._jobs.close()
                self._jobs = None

    def __enter__(self) -> "LogQueries":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _find(self, flt: dict[str, Any], projection: dict[str, int] | None = None) -> list[dict[str, Any]]:
        try:
            return list(self.collection.find(flt, projection))
        except PyMongoError as e:
            raise mongo_error(self.settings, e, "reading logs") from e

    @staticmethod
    def _filter(job_id: str, run_id: str | None, attempt: int | None) -> dict[str, Any]:
        flt: dict[str, Any] = {"job_id": job_id}
        if run_id is not None:
            flt["run_id"] = run_id
        if attempt is not None:
            flt["attempt"] = attempt
        return flt

    def get_logs(self, job_id: str, run_id: str | None = None, attempt: int | None = None) -> list[dict[str, Any]]:
        """A job's chunks (optionally of one run / attempt) in run, attempt, seq order."""
        docs = self._find(self._filter(job_id, run_id, attempt))
        order_chunks(docs)
        return [_chunk_dict(d) for d in docs]

    def purge_logs(self, older_than_ms: int) -> int:
        """Delete chunks written before ``older_than_ms`` (epoch ms); return how many."""
        from consumers.projections.logs_projector import purge_collection

        try:
            return purge_collection(self.collection, older_than_ms)
        except PyMongoError as e:
            raise mongo_error(self.settings, e, "purging logs") from e

    def follow(
        self,
        job_id: str,
        run_id: str | None = None,
        poll: float = 0.2,
        stop: threading.Event | None = None,
        settle: float = 5.0,
    ) -> Iterator[dict[str, Any]]:
        """Yield a job's chunks, those already stored first, then new ones as they arrive.

        The attempt followed is the latest one that has output (of ``run_id`` if given):
        a new attempt or run that starts writing takes over.  The generator ends when
        that attempt's ``eof`` chunk is stored *and* the PostgreSQL projection says the
        attempt is final and the job is not running it again.  If PostgreSQL does not
        know the run (or is down), it ends ``settle`` seconds after the eof instead; it
        also ends when ``stop`` is set.
        """
        flt = self._filter(job_id, run_id, None)
        seen: set[str] = set()
        target: tuple[tuple[int, str], int] | None = None
        eof_since: float | None = None
        started = time.monotonic()
        while stop is None or not stop.is_set():
            heads = self._find(flt, {"_id": 1, "run_id": 1, "attempt": 1, "seq": 1, "eof": 1})
            fresh = [h["_id"] for h in heads if h["_id"] not in seen]
            if fresh:
                docs = self._find({"_id": {"$in": fresh}})
                order_chunks(docs)
                for d in docs:
                    seen.add(d["_id"])
                    yield _chunk_dict(d)
            if heads:
                latest = max((run_sort_key(h["run_id"]), h["attempt"]) for h in heads)
                if latest != target:
                    target, eof_since = latest, None
                if eof_since is None and any(
                    h["eof"] and (run_sort_key(h["run_id"]), h["attempt"]) == target for h in heads
                ):
                    eof_since = time.monotonic()
                if eof_since is not None and target is not None:
                    over = self._attempt_over(job_id, target[0][1], target[1])
                    if over or (over is None and time.monotonic() - eof_since >= settle):
                        return
            elif time.monotonic() - started >= settle and self._job_over(job_id):
                return  # a finished job that wrote no output at all
            if stop is not None:
                if stop.wait(poll):
                    return
            else:
                time.sleep(poll)

    def _attempt_over(self, job_id: str, run_id: str, attempt: int) -> bool | None:
        """True/False from the projection; None when it does not know (yet) or is down."""
        try:
            job, attempts = self.jobs.run_state(job_id, run_id)
        except StoreUnavailable:
            return None
        mine = [a for a in attempts if a["attempt"] == attempt]
        if not mine:
            return None
        if any(a["attempt"] > attempt for a in attempts):
            return False  # a newer attempt exists: its output will come
        if mine[0]["status"] not in RUN_FINAL_STATUSES:
            return False
        if job is not None and job["status"] in ("queued", "running") and job["last_run_id"] == run_id:
            return False  # the job is still on this run: a next attempt, or its own status lags
        return True

    def _job_over(self, job_id: str) -> bool:
        try:
            job, _ = self.jobs.run_state(job_id, "")
        except StoreUnavailable:
            return False
        return job is not None and job["status"] in TERMINAL_STATUSES
