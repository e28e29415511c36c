"""The event contract as Python values.

Every class here mirrors one ``schemas/io.jobsched.<Name>.avsc`` record field for field
(a unit test holds them together).  Events are frozen, keyword-only values; names are
past tense for facts (``RunStarted``) and imperative-sounding only where they are
requests (``JobCancelRequested``).

Topics and keys::

    jobs.commands  key job_id     JobSubmitted, JobCancelRequested, SchedulePaused,
                                  ScheduleResumed, DependencyRegistered (key upstream),
                                  UpstreamResolved (key downstream)
    jobs.reports   key job_id     RunStarted, RunHeartbeat, RunFinished        (workers)
    jobs.ready.*   key job_id     RunReady                                     (scheduler)
    jobs.events    key job_id     JobStatusChanged, RunStatusChanged           (scheduler;
                                  a job change made with a run's rides on it)
    jobs.logs      key run_id     LogChunk                                     (workers)
    jobs.control   key worker_id  RunCancelRequested                           (scheduler)
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import ClassVar, Iterable, Literal

JobStatus = Literal["pending", "queued", "running", "completed", "failed", "cancelled", "paused"]
JOB_STATUSES: tuple[str, ...] = ("pending", "queued", "running", "completed", "failed", "cancelled", "paused")
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
PRIORITIES: tuple[str, ...] = ("high", "normal", "low")
EXECUTOR_KINDS: tuple[str, ...] = ("shell", "http", "python")
OVERLAP_POLICIES: tuple[str, ...] = ("allow", "forbid", "replace")
CATCHUP_POLICIES: tuple[str, ...] = ("skip", "latest", "all")
RUN_OUTCOMES: tuple[str, ...] = ("succeeded", "failed", "timed_out", "cancelled", "refused")


#: ``RunCancelRequested.worker_id`` that every worker obeys: cancel of a queued run that
#: no worker has started yet.
ANY_WORKER = "*"


def now_ms() -> int:
    """Wall-clock epoch milliseconds (UTC)."""
    return time.time_ns() // 1_000_000


def new_id() -> str:
    """A fresh random identifier (UUID4, 36 characters)."""
    return str(uuid.uuid4())


_EVENT_PREFIX = f"{uuid.uuid4().hex[:16]}-"
_EVENT_COUNTER = itertools.count()


def _new_event_prefix() -> None:
    """A forked child must not repeat its parent's ids: it draws a prefix of its own."""
    global _EVENT_PREFIX
    _EVENT_PREFIX = f"{uuid.uuid4().hex[:16]}-"


os.register_at_fork(after_in_child=_new_event_prefix)


def next_event_id() -> str:
    """A unique event id, cheaper than a UUID: a random per-process prefix and a counter."""
    return f"{_EVENT_PREFIX}{next(_EVENT_COUNTER)}"


def run_id_for(job_id: str, nominal_ms: int) -> str:
    """A run's identity: the job and the nominal time it was due."""
    return f"{job_id}@{nominal_ms}"


# --- nested values -----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class ShellSpec:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class HttpSpec:
    url: str
    method: str = "GET"
    headers: dict[str, str] = field(default_factory=dict)
    body: str | None = None
    success_codes: list[int] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True, slots=True)
class PythonSpec:
    target: str
    kwargs_json: str = "{}"


@dataclass(frozen=True, kw_only=True, slots=True)
class ExecutorSpec:
    kind: str
    shell: ShellSpec | None = None
    http: HttpSpec | None = None
    python: PythonSpec | None = None

    @classmethod
    def of_shell(cls, argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> "ExecutorSpec":
        return cls(kind="shell", shell=ShellSpec(argv=list(argv), env=dict(env or {}), cwd=cwd))


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleSpec:
    at_ms: int | None = None
    cron: str | None = None
    timezone: str = "UTC"
    overlap: str = "forbid"
    catchup: str = "latest"
    catchup_window_ms: int = 86_400_000
    end_ms: int | None = None

    @property
    def recurring(self) -> bool:
        return self.cron is not None


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    max_retries: int = 0
    backoff_ms: int = 1000
    backoff_max_ms: int = 300_000


@dataclass(frozen=True, kw_only=True, slots=True)
class JobSpec:
    job_id: str
    name: str
    user_id: str
    executor: ExecutorSpec
    submitted_at_ms: int
    tenant_id: str = "default"
    queue: str = "default"
    priority: str = "normal"
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    after: list[str] = field(default_factory=list)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_ms: int | None = None
    lease_ms: int = 30_000
    labels: dict[str, str] = field(default_factory=dict)


# --- events --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Event:
    """Fields every event carries."""

    #: Avro full name of the record; set on each concrete class.
    avro_name: ClassVar[str] = ""

    user_id: str
    event_id: str = field(default_factory=next_event_id)
    occurred_at_ms: int = field(default_factory=now_ms)
    tenant_id: str = "default"


@dataclass(frozen=True, kw_only=True, slots=True)
class JobSubmitted(Event):
    avro_name: ClassVar[str] = "io.jobsched.JobSubmitted"
    spec: JobSpec
    batch_id: str | None = None

    @property
    def job_id(self) -> str:
        return self.spec.job_id


@dataclass(frozen=True, kw_only=True, slots=True)
class JobCancelRequested(Event):
    avro_name: ClassVar[str] = "io.jobsched.JobCancelRequested"
    job_id: str
    reason: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class SchedulePaused(Event):
    avro_name: ClassVar[str] = "io.jobsched.SchedulePaused"
    job_id: str


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleResumed(Event):
    avro_name: ClassVar[str] = "io.jobsched.ScheduleResumed"
    job_id: str


@dataclass(frozen=True, kw_only=True, slots=True)
class DependencyRegistered(Event):
    avro_name: ClassVar[str] = "io.jobsched.DependencyRegistered"
    upstream_id: str
    downstream_id: str


@dataclass(frozen=True, kw_only=True, slots=True)
class UpstreamResolved(Event):
    avro_name: ClassVar[str] = "io.jobsched.UpstreamResolved"
    upstream_id: str
    downstream_id: str
    outcome: str  # completed | failed | cancelled | unknown
    run_id: str | None = None
    nominal_ms: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class RunEvent(Event):
    job_id: str
    run_id: str
    attempt: int


@dataclass(frozen=True, kw_only=True, slots=True)
class RunReady(RunEvent):
    avro_name: ClassVar[str] = "io.jobsched.RunReady"
    name: str
    nominal_ms: int
    queue: str
    priority: str
    executor: ExecutorSpec
    timeout_ms: int | None = None
    lease_ms: int = 30_000
    #: Set when the scheduler dispatched the run ahead of its due time: start it then.
    not_before_ms: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class RunStarted(RunEvent):
    avro_name: ClassVar[str] = "io.jobsched.RunStarted"
    worker_id: str


@dataclass(frozen=True, kw_only=True, slots=True)
class RunHeartbeat(RunEvent):
    avro_name: ClassVar[str] = "io.jobsched.RunHeartbeat"
    worker_id: str


@dataclass(frozen=True, kw_only=True, slots=True)
class RunFinished(RunEvent):
    avro_name: ClassVar[str] = "io.jobsched.RunFinished"
    worker_id: str
    outcome: str
    exit_code: int | None = None
    reason: str | None = None
    started_at_ms: int | None = None
    finished_at_ms: int | None = None
    log_bytes: int = 0
    log_truncated: bool = False
    #: No RunStarted was sent (the attempt ended within the worker's start-report delay):
    #: this record also stands for RunStarted(worker_id, occurred_at_ms=started_at_ms).
    implies_start: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class RunCancelRequested(RunEvent):
    avro_name: ClassVar[str] = "io.jobsched.RunCancelRequested"
    worker_id: str
    reason: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class LogChunk(RunEvent):
    avro_name: ClassVar[str] = "io.jobsched.LogChunk"
    seq: int
    stream: str
    data: str
    eof: bool = False
    worker_id: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class JobStatusChanged(Event):
    avro_name: ClassVar[str] = "io.jobsched.JobStatusChanged"
    job_id: str
    status: str
    reason: str | None = None
    attempts: int = 0
    run_id: str | None = None
    next_fire_ms: int | None = None
    spec: JobSpec | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class RunStatusChanged(RunEvent):
    avro_name: ClassVar[str] = "io.jobsched.RunStatusChanged"
    status: str
    nominal_ms: int
    worker_id: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    started_at_ms: int | None = None
    finished_at_ms: int | None = None
    retry_at_ms: int | None = None
    #: Set when the job's status changed in the same step as this attempt's: the event
    #: then also stands for a :class:`JobStatusChanged` (see :meth:`job_change`).
    job_status: str | None = None
    job_reason: str | None = None
    job_attempts: int | None = None
    job_next_fire_ms: int | None = None

    def job_change(self) -> JobStatusChanged | None:
        """The job status change this event carries, as a :class:`JobStatusChanged`, or None."""
        if self.job_status is None:
            return None
        return JobStatusChanged(
            event_id=self.event_id, occurred_at_ms=self.occurred_at_ms, user_id=self.user_id,
            tenant_id=self.tenant_id, job_id=self.job_id, status=self.job_status, reason=self.job_reason,
            attempts=self.job_attempts or 0, run_id=self.run_id, next_fire_ms=self.job_next_fire_ms)


def job_changes(events: Iterable[Event]) -> list[JobStatusChanged]:
    """Every job status change in ``events``, in order: each ``JobStatusChanged``, and the
    change a ``RunStatusChanged`` carries (``job_status``)."""
    out: list[JobStatusChanged] = []
    for e in events:
        change = e.job_change() if isinstance(e, RunStatusChanged) else e
        if isinstance(change, JobStatusChanged):
            out.append(change)
    return out


#: Every concrete event class, by Avro full name.
EVENT_TYPES: dict[str, type[Event]] = {
    cls.avro_name: cls
    for cls in (
        JobSubmitted,
        JobCancelRequested,
        SchedulePaused,
        ScheduleResumed,
        DependencyRegistered,
        UpstreamResolved,
        RunReady,
        RunStarted,
        RunHeartbeat,
        RunFinished,
        RunCancelRequested,
        LogChunk,
        JobStatusChanged,
        RunStatusChanged,
    )
}

#: Nested record types, by Avro full name.
VALUE_TYPES: dict[str, type] = {
    "io.jobsched.ShellSpec": ShellSpec,
    "io.jobsched.HttpSpec": HttpSpec,
    "io.jobsched.PythonSpec": PythonSpec,
    "io.jobsched.ExecutorSpec": ExecutorSpec,
    "io.jobsched.ScheduleSpec": ScheduleSpec,
    "io.jobsched.RetryPolicy": RetryPolicy,
    "io.jobsched.JobSpec": JobSpec,
}


# --- scheduler changelog (internal, but versioned like the rest) ----------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class SchedulerRunState:
    avro_name: ClassVar[str] = "io.jobsched.SchedulerRunState"
    run_id: str
    nominal_ms: int
    attempt: int
    execution: int
    status: str
    worker_id: str | None = None
    started_at_ms: int | None = None
    retry_at_ms: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class SchedulerJobState:
    avro_name: ClassVar[str] = "io.jobsched.SchedulerJobState"
    job_id: str
    status: str
    reason: str | None = None
    spec: JobSpec | None = None
    waiting: list[str] = field(default_factory=list)
    downstream: list[str] = field(default_factory=list)
    next_fire_ms: int | None = None
    attempts: int = 0
    paused: bool = False
    finished_at_ms: int | None = None
    runs: list[SchedulerRunState] = field(default_factory=list)


VALUE_TYPES["io.jobsched.SchedulerRunState"] = SchedulerRunState
#: Top-level records that are not events.
STATE_TYPES: dict[str, type] = {"io.jobsched.SchedulerJobState": SchedulerJobState}
