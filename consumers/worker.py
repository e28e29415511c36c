"""The worker: consumes ``RunReady`` records, runs them, reports and streams their logs.

::

    jobs.ready.<q>.high ┐                      ┌─► jobs.reports  RunStarted, RunHeartbeat, RunFinished (key job_id)
    jobs.ready.<q>      ├─► consuming thread ──┤
    jobs.ready.<q>.low  ┘   (polls every 0.1s) │    job threads (N = concurrency)
                              │  ReadyBuffer   └─► jobs.logs     LogChunk (key run_id)
    jobs.control ──► (assigned, from the end) RunCancelRequested for this worker_id or "*"

Threads
    The *consuming thread* (the caller of :meth:`Worker.run`) owns both consumers.  It
    polls every 0.1 s whatever happens, so a ten-minute job never exceeds
    ``max.poll.interval.ms``; it buffers records, starts them on a pool of
    ``concurrency`` job threads (highest priority first), pauses partitions when the
    buffer is full, and commits offsets.  Job threads run executors, produce reports
    and log chunks, and send heartbeats every ``heartbeat_interval`` seconds.

Consumer group
    One group per set of queues served: ``jobsched-workers-<q1>+<q2>…`` (queue names
    sorted, ``+``-joined; ``jobsched-workers-default`` for the default queue).  When the
    topic prefix is not ``jobs`` it is part of the id (``jobsched-<prefix>-workers-…``),
    so test or staging systems on the same cluster never share a group.  The assignor
    is ``cooperative-sticky``: a rebalance only takes the partitions that move, so
    jobs running on the others are still committed.

Runs dispatched ahead
    The scheduler sends timed runs up to its dispatch lookahead (1 s by default)
    before they are due, with ``not_before_ms`` set.  Such a record is held (not counted
    against ``prefetch``), handed to a job thread 20 ms before that instant, and the
    job thread starts it on the instant: the consuming thread's poll timeout shrinks to
    the next hand-over time.  So a run starts on time however long
    the scheduler's transaction or the fetch took, as long as they took less than the
    lookahead.  The worker's clock decides; keep hosts NTP-synchronised.

Start reports
    An attempt's ``RunStarted`` goes out ``start_report_delay`` seconds (0.2 by default)
    after it started, if it still runs then (or with its first heartbeat).  One that
    ends sooner sends only its ``RunFinished``, with ``implies_start`` and
    ``started_at_ms``: the scheduler takes it as the start and the end at once.  Short
    jobs cost one report and one status event less; the started time is exact either
    way.  ``0`` reports every start at once.

Offsets (at-least-once)
    A record's offset counts as finished once the ``RunFinished`` for it has been
    acknowledged by Kafka (or it went to the dead-letter topic).  Per partition the
    worker commits the lowest offset not yet finished — never past a record that is
    buffered, held or running: asynchronously, at most every 0.2 s, while it runs (a
    failed commit is retried), and synchronously when partitions are revoked and at
    shutdown.  Offsets of partitions this worker no longer owns are never committed.
    A worker killed with SIGKILL therefore gets its running and buffered records
    redelivered to another member; the scheduler fences results of superseded attempts.

Cancel
    A ``RunCancelRequested`` on ``jobs.control`` addressed to this worker's id, or to
    ``*`` (any worker), stops the attempt if it runs here (process group SIGTERM, SIGKILL
    after ``kill_grace``) and reports ``cancelled``.  A request for an attempt that is not
    running here is remembered (the last 10 000), and that attempt, if it arrives, is
    answered ``cancelled`` without running.  The control topic is read from its end as of
    the worker's start, outside any group: every worker sees every request.

Shutdown
    When ``stop`` is set the worker takes no new records (all partitions paused), lets
    running jobs finish for ``grace`` seconds, then kills the rest.  A killed attempt
    gets a system log line saying it was interrupted, no ``RunFinished`` and no commit,
    so it runs again on another worker.  Finished work is committed, the producer
    flushed, and the consumer closed (it leaves the group at once).

See ``docs/workers.md`` for the operator's view.
"""

from __future__ import annotations

import heapq
import itertools
import os
import queue
import socket
import threading
import time
import uuid
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import structlog
from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from consumers.executors import (
    DEFAULT_KILL_GRACE,
    Executor,
    Outcome,
    RunContext,
    default_executors,
)
from consumers.logstream import DEFAULT_CHUNK_BYTES, DEFAULT_FLUSH_INTERVAL, LogStream
from infra.config import Settings
from infra.errors import DecodeError
from infra.kafka import (
    DeadLetters,
    KafkaError,
    KafkaException,
    Message,
    make_consumer,
    make_producer,
    raise_for_message,
)
from infra.service import run_until_signalled
from schemas.codec import Codec, default_codec
from schemas.events import (
    ANY_WORKER,
    EXECUTOR_KINDS,
    PRIORITIES,
    Event,
    LogChunk,
    RunCancelRequested,
    RunFinished,
    RunHeartbeat,
    RunReady,
    RunStarted,
    now_ms,
)

__all__ = [
    "Worker",
    "JobThreads",
    "main",
    "ANY_WORKER",
    "DEFAULT_ALLOW",
    "OffsetTracker",
    "ReadyBuffer",
    "HeldRuns",
    "paused_priorities",
    "worker_group_id",
    "new_worker_id",
    "WorkerMetrics",
]

#: Executor kinds a worker runs unless told otherwise.  ``python`` is left out: it runs
#: code importable in the worker's own process, which an operator should opt into.
DEFAULT_ALLOW: frozenset[str] = frozenset({"shell", "http"})
#: Rank of each priority; lower starts first.
PRIORITY_RANK: dict[str, int] = {p: i for i, p in enumerate(PRIORITIES)}  # high 0, normal 1, low 2
#: Cancel requests remembered for attempts not received yet.
_CANCELLED_MEMORY = 10_000
#: Consumer settings the worker relies on and will not let an override change.
_FIXED_CONSUMER_KEYS = frozenset({"group.id", "enable.auto.commit", "enable.auto.offset.store", "isolation.level"})
_POLL_TIMEOUT = 0.1
#: Runs dispatched ahead go to a job thread this many ms before they are due; it waits
#: for the instant itself (see "Runs dispatched ahead" above).
_HANDOFF_AHEAD_MS = 20
#: Seconds before a running attempt's start is reported (see "Start reports" above).
DEFAULT_START_REPORT_DELAY = 0.2
#: Routine (asynchronous) offset commits at most this often, in seconds.
_COMMIT_INTERVAL = 0.2

TP = tuple[str, int]


def new_worker_id() -> str:
    """``hostname-pid-shortuuid``: unique per worker process (and per Worker object)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def worker_group_id(settings: Settings, queues: Iterable[str]) -> str:
    """The consumer group of the workers serving exactly these queues."""
    return settings.group_id("workers-" + "+".join(sorted(set(queues))))


# --- pure logic: offsets, priorities ---------------------------------------------------------


@dataclass
class _PartitionOffsets:
    epoch: int
    inflight: set[int] = field(default_factory=set)
    highest: int = -1
    committed: int | None = None


class OffsetTracker:
    """Which offsets of each partition may be committed.

    Every record is :meth:`track`-ed when it is received and :meth:`finish`-ed when its
    work is done (reported).  :meth:`committable` gives, per partition, the offset to
    commit: the lowest offset still in flight, or one past the highest seen when none
    is — i.e. never beyond an unfinished record.  :meth:`forget` drops a partition when
    it is revoked; a later :meth:`finish` for its old records (an *epoch* ago) is ignored,
    even if the partition comes back and the same offset is received again.
    """

    def __init__(self) -> None:
        self._parts: dict[TP, _PartitionOffsets] = {}
        self._epochs = itertools.count(1)

    def track(self, tp: TP, offset: int) -> int:
        """Note a received record; returns the epoch to pass to :meth:`finish`."""
        st = self._parts.get(tp)
        if st is None:
            st = self._parts[tp] = _PartitionOffsets(epoch=next(self._epochs))
        st.inflight.add(offset)
        st.highest = max(st.highest, offset)
        return st.epoch

    def finish(self, tp: TP, offset: int, epoch: int) -> bool:
        """The record's work is done; False if the partition was forgotten meanwhile."""
        st = self._parts.get(tp)
        if st is None or st.epoch != epoch or offset not in st.inflight:
            return False
        st.inflight.discard(offset)
        return True

    def committable(self, only: Iterable[TP] | None = None) -> dict[TP, int]:
        """Offsets (next to read) that are ahead of the last commit, per partition."""
        out = {}
        for tp, st in self._parts.items():
            if only is not None and tp not in only:
                continue
            if st.highest < 0:
                continue
            nxt = min(st.inflight) if st.inflight else st.highest + 1
            if st.committed is None or nxt > st.committed:
                out[tp] = nxt
        return out

    def committed(self, tp: TP, offset: int) -> None:
        st = self._parts.get(tp)
        if st is not None and (st.committed is None or offset > st.committed):
            st.committed = offset

    def commit_failed(self, tp: TP) -> None:
        """A commit did not happen: offer the partition's offset again."""
        st = self._parts.get(tp)
        if st is not None:
            st.committed = None

    def forget(self, tps: Iterable[TP]) -> None:
        for tp in tps:
            self._parts.pop(tp, None)

    def inflight(self, tp: TP) -> int:
        st = self._parts.get(tp)
        return len(st.inflight) if st else 0

    def partitions(self) -> set[TP]:
        return set(self._parts)


@dataclass(frozen=True, kw_only=True, slots=True)
class Record:
    """A ``RunReady`` received from a ready topic, with where it came from."""

    tp: TP
    offset: int
    epoch: int
    priority: str
    ready: RunReady


class ReadyBuffer:
    """Received records waiting for a free slot: highest priority first, FIFO within one."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Record]] = []
        self._seq = itertools.count()
        self._counts: dict[str, int] = {p: 0 for p in PRIORITIES}

    def push(self, rec: Record) -> None:
        heapq.heappush(self._heap, (PRIORITY_RANK[rec.priority], next(self._seq), rec))
        self._counts[rec.priority] += 1

    def pop(self) -> Record:
        rec = heapq.heappop(self._heap)[2]
        self._counts[rec.priority] -= 1
        return rec

    def __len__(self) -> int:
        return len(self._heap)

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def drop(self, tps: Iterable[TP]) -> list[Record]:
        """Remove (and return) the records of these partitions (they were revoked)."""
        gone = set(tps)
        kept: list[tuple[int, int, Record]] = []
        dropped: list[tuple[int, int, Record]] = []
        for item in self._heap:
            (dropped if item[2].tp in gone else kept).append(item)
        heapq.heapify(kept)
        self._heap = kept
        for _, _, rec in dropped:
            self._counts[rec.priority] -= 1
        return [rec for _, _, rec in dropped]

    def clear(self) -> None:
        self._heap.clear()
        self._counts = {p: 0 for p in PRIORITIES}


class HeldRuns:
    """Records dispatched ahead of their due time (``RunReady.not_before_ms``), held until then.

    They are tracked by the offset tracker like buffered records (nothing past them is
    committed), but do not count against ``prefetch``: the scheduler sends them at most
    its dispatch lookahead early, so how many there are is bounded by the due rate.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Record]] = []
        self._seq = itertools.count()

    def push(self, due_ms: int, rec: Record) -> None:
        heapq.heappush(self._heap, (due_ms, next(self._seq), rec))

    def next_due_ms(self) -> int | None:
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: int) -> list[Record]:
        """The records due at or before ``now``, earliest first."""
        out: list[Record] = []
        while self._heap and self._heap[0][0] <= now:
            out.append(heapq.heappop(self._heap)[2])
        return out

    def __len__(self) -> int:
        return len(self._heap)

    def drop(self, tps: Iterable[TP]) -> list[Record]:
        gone = set(tps)
        kept = [item for item in self._heap if item[2].tp not in gone]
        dropped = [item[2] for item in self._heap if item[2].tp in gone]
        heapq.heapify(kept)
        self._heap = kept
        return dropped

    def clear(self) -> None:
        self._heap.clear()


def paused_priorities(counts: Mapping[str, int], prefetch: int) -> frozenset[str]:
    """The priorities whose partitions stop fetching, given what the buffer holds.

    A priority is paused once the buffer holds ``prefetch`` records *of that priority or
    higher*.  Lower-priority records therefore never stop higher ones from being fetched:
    a buffer full of ``low`` records pauses only ``low``; ``high`` pauses only when
    ``prefetch`` high records are waiting (the buffer is "really full").
    """
    paused: set[str] = set()
    total = 0
    for prio in PRIORITIES:
        total += counts.get(prio, 0)
        if total >= prefetch:
            paused.add(prio)
    return frozenset(paused)


# --- metrics ----------------------------------------------------------------------------------


class WorkerMetrics:
    """Prometheus metrics of the workers of one process (one set per registry)."""

    _by_registry: "weakref.WeakKeyDictionary[CollectorRegistry, WorkerMetrics]" = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = Counter("jobsched_worker_runs_started", "Attempts a worker started.",
                               ["queue", "executor"], registry=registry)
        self.finished = Counter("jobsched_worker_runs_finished",
                                "Attempts that ended, by outcome (interrupted: killed by a worker shutdown).",
                                ["queue", "executor", "outcome"], registry=registry)
        self.running = Gauge("jobsched_worker_runs_running", "Attempts running now.", ["worker_id"],
                             registry=registry)
        self.buffered = Gauge("jobsched_worker_runs_buffered", "Records received and waiting for a slot.",
                              ["worker_id"], registry=registry)
        self.duration = Histogram("jobsched_worker_run_duration_seconds", "Wall time of an attempt.",
                                  ["executor", "outcome"],
                                  buckets=(0.05, 0.25, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
                                  registry=registry)
        self.start_lateness = Histogram(
            "jobsched_worker_start_lateness_seconds",
            "Start time minus not_before_ms of runs dispatched ahead of their due time.",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, 30), registry=registry)
        self.dead_letters = Counter("jobsched_worker_dead_letters", "Ready records sent to the dead-letter topic.",
                                    registry=registry)
        self.commits = Counter("jobsched_worker_offset_commits", "Synchronous offset commits.", registry=registry)

    @classmethod
    def for_registry(cls, registry: CollectorRegistry) -> "WorkerMetrics":
        with cls._lock:
            m = cls._by_registry.get(registry)
            if m is None:
                m = cls._by_registry[registry] = cls(registry)
            return m


# --- the worker -------------------------------------------------------------------------------


class _Deliveries:
    """Counts one attempt's log chunks not yet acknowledged by Kafka, and runs a
    continuation (the ``RunFinished``) once the last one is."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.pending = 0
        self.failed = 0
        self._then: Callable[[], None] | None = None

    def callback(self) -> Callable[[KafkaError | None, Message], None]:
        with self._lock:
            self.pending += 1

        def done(err: KafkaError | None, _msg: Message) -> None:
            with self._lock:
                self.pending -= 1
                if err is not None:
                    self.failed += 1
                then = self._then if self.pending <= 0 else None
                if then is not None:
                    self._then = None
            if then is not None:
                then()

        return done

    def then(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` when every chunk so far is acknowledged (now, if they are)."""
        with self._lock:
            if self.pending > 0:
                self._then = fn
                return
        fn()

    def wait(self, producer: Producer, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self.pending <= 0:
                    return True
            if time.monotonic() >= deadline:
                return False
            producer.poll(0.05)


@dataclass(eq=False)
class _Run:
    record: Record
    ctx: RunContext
    log: LogStream
    deliveries: _Deliveries
    bound: Any  # structlog logger with the run's fields
    heartbeat_interval: float
    last_heartbeat: float = field(default_factory=time.monotonic)
    #: When the attempt started (worker clock), and whether its RunStarted went out; the
    #: lock makes "report the start" and "end without reporting it" mutually exclusive.
    started_ms: int = 0
    start_sent: bool = False
    start_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def ready(self) -> RunReady:
        return self.record.ready


class JobThreads:
    """Threads that run ``target(item)`` for the items one thread hands over.

    Lighter per job than a ``ThreadPoolExecutor``, which builds a Future, a Condition
    and a lock for each item and takes two more locks to hand it over: on no-op jobs
    that was a third of the worker's CPU.  Here an item goes through one C queue, and
    its token comes back through another (:meth:`done`).  Threads start as the work in
    flight needs them, up to ``size``, and stay.  Only the handing-over thread calls
    :meth:`submit` and :meth:`done`.
    """

    def __init__(self, target: Callable[[Any], None], size: int, name: str = "jobsched-job") -> None:
        self._target = target
        self._size = size
        self._name = name
        self._todo: queue.SimpleQueue[tuple[int, Any] | None] = queue.SimpleQueue()
        self._finished: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._busy = 0
        self._log = structlog.get_logger("jobsched.worker")

    def submit(self, token: int, item: Any) -> None:
        self._busy += 1
        if self._busy > len(self._threads) and len(self._threads) < self._size:
            t = threading.Thread(target=self._serve, name=f"{self._name}_{len(self._threads)}", daemon=True)
            self._threads.append(t)
            t.start()
        self._todo.put((token, item))

    def done(self, timeout: float | None = None) -> list[int]:
        """Tokens of the items finished since the last call; with ``timeout``, wait that
        long for at least one."""
        out: list[int] = []
        get = self._finished.get_nowait
        try:
            if timeout is not None:
                out.append(self._finished.get(timeout=timeout))
            while True:
                out.append(get())
        except queue.Empty:
            pass
        self._busy -= len(out)
        return out

    def _serve(self) -> None:
        get, target, finished = self._todo.get, self._target, self._finished
        while True:
            work = get()
            if work is None:
                return
            token, item = work
            try:
                target(item)
            except BaseException as e:  # noqa: BLE001 - the target reports its own errors; this is a bug
                self._log.error("job thread failed", error=repr(e))
            finally:
                work = item = None  # an idle thread holds nothing of the last job
                finished.put(token)

    def shutdown(self, wait: bool, timeout: float = 30.0) -> None:
        """Let every thread exit once idle; with ``wait``, join them (up to ``timeout``)."""
        for _ in self._threads:
            self._todo.put(None)
        if wait:
            deadline = time.monotonic() + timeout
            for t in self._threads:
                t.join(max(0.0, deadline - time.monotonic()))


class Worker:
    """Runs jobs from the ready topics of some queues; see the module docstring.

    ``allow`` is the set of executor kinds this worker runs (default ``shell`` and
    ``http``); other attempts are answered ``refused`` without running.  A ``python``
    target may further be limited to modules under ``python_modules``.  ``prefetch`` is
    the local buffer: how many records per priority level (counting higher levels) are
    fetched ahead while all slots are busy.
    """

    name = "worker"

    def __init__(
        self,
        settings: Settings,
        *,
        queues: tuple[str, ...] = ("default",),
        concurrency: int = 4,
        allow: frozenset[str] = DEFAULT_ALLOW,
        heartbeat_interval: float = 5.0,
        start_report_delay: float = DEFAULT_START_REPORT_DELAY,
        log_cap_bytes: int = 10 * 1024 * 1024,
        grace: float = 30.0,
        worker_id: str | None = None,
        consumer_overrides: dict[str, Any] | None = None,
        prefetch: int = 32,
        kill_grace: float = DEFAULT_KILL_GRACE,
        python_modules: tuple[str, ...] | None = None,
        group_id: str | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        executors: Mapping[str, Executor] | None = None,
        registry: CollectorRegistry | None = None,
        metrics_port: int | None = None,
        codec: Codec | None = None,
    ) -> None:
        if isinstance(queues, str) or not queues:
            raise ValueError("queues must be a non-empty tuple of queue names, e.g. ('default',)")
        for q in queues:
            if not isinstance(q, str) or not q or not all(c.isalnum() or c in "-_" for c in q):
                raise ValueError(f"queue name {q!r} may only hold letters, digits, '-' and '_'")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be an integer >= 1, got {concurrency!r}")
        if isinstance(allow, str):
            raise ValueError("allow must be a set of executor kinds, e.g. frozenset({'shell', 'http'}), not a string")
        allow = frozenset(allow)
        if not allow:
            raise ValueError(f"allow must name at least one executor kind ({', '.join(EXECUTOR_KINDS)})")
        unknown = sorted(allow - set(EXECUTOR_KINDS))
        if unknown:
            raise ValueError(f"unknown executor kind(s) in allow: {', '.join(unknown)}; "
                             f"known: {', '.join(EXECUTOR_KINDS)}")
        if not heartbeat_interval > 0:
            raise ValueError(f"heartbeat_interval must be > 0 seconds, got {heartbeat_interval!r}")
        if not start_report_delay >= 0:
            raise ValueError(f"start_report_delay must be >= 0 seconds, got {start_report_delay!r}")
        if isinstance(log_cap_bytes, bool) or not isinstance(log_cap_bytes, int) or log_cap_bytes < 0:
            raise ValueError(f"log_cap_bytes must be an integer >= 0, got {log_cap_bytes!r}")
        if not grace >= 0:
            raise ValueError(f"grace must be >= 0 seconds, got {grace!r}")
        if not kill_grace >= 0:
            raise ValueError(f"kill_grace must be >= 0 seconds, got {kill_grace!r}")
        if worker_id is not None and (not isinstance(worker_id, str) or not worker_id.strip()):
            raise ValueError("worker_id must be a non-empty string when given")
        overrides = dict(consumer_overrides or {})
        fixed = sorted(_FIXED_CONSUMER_KEYS & set(overrides))
        if fixed:
            raise ValueError(f"consumer_overrides may not change {', '.join(fixed)}: the worker's "
                             "offset handling depends on them (use group_id= for the group)")
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch must be an integer >= 1, got {prefetch!r}")
        if chunk_bytes < 1 or not flush_interval > 0:
            raise ValueError("chunk_bytes must be >= 1 and flush_interval > 0")
        if python_modules is not None and (isinstance(python_modules, str)
                                           or not all(isinstance(m, str) and m for m in python_modules)):
            raise ValueError("python_modules must be a tuple of module name prefixes, e.g. ('myjobs',)")
        if metrics_port is not None and not (0 <= metrics_port <= 65535):
            raise ValueError(f"metrics_port must be a TCP port number, got {metrics_port!r}")

        self.settings = settings
        self.queues = tuple(queues)
        self.concurrency = concurrency
        self.allow = allow
        self.heartbeat_interval = float(heartbeat_interval)
        self.start_report_delay = float(start_report_delay)
        self.log_cap_bytes = log_cap_bytes
        self.grace = float(grace)
        self.worker_id = worker_id or new_worker_id()
        self.group_id = group_id or worker_group_id(settings, self.queues)
        self.prefetch = prefetch
        self._consumer_overrides = overrides
        self._chunk_bytes = chunk_bytes
        self._flush_interval = flush_interval
        self._kill_grace = float(kill_grace)
        self._executors: dict[str, Executor] = dict(
            executors if executors is not None
            else default_executors(kill_grace=kill_grace, python_modules=python_modules)
        )
        self._codec = codec or default_codec()
        self._registry = registry if registry is not None else REGISTRY
        self._metrics = WorkerMetrics.for_registry(self._registry)
        self._metrics_port = metrics_port
        self._log = structlog.get_logger("jobsched.worker").bind(worker_id=self.worker_id)

        self._topic_priority: dict[str, str] = {
            settings.ready_topic(q, p): p for q in self.queues for p in PRIORITIES
        }
        self._topic_queue: dict[str, str] = {
            settings.ready_topic(q, p): q for q in self.queues for p in PRIORITIES
        }
        # Owned by the consuming thread.
        self._tracker = OffsetTracker()
        self._buffer = ReadyBuffer()
        self._held = HeldRuns()
        self._running: dict[int, _Run] = {}
        self._pool: JobThreads | None = None
        # Started attempts whose RunStarted is not out yet, oldest first: (when to send it, run).
        self._unreported: deque[tuple[float, _Run]] = deque()
        self._tokens = itertools.count()
        self._paused: set[TP] = set()
        self._flow_key: tuple[frozenset[str], frozenset[TP]] | None = None
        self._stopping = False
        self._commit_after = 0.0
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._dead_letters: DeadLetters | None = None
        # Filled by delivery callbacks on any thread, drained by the consuming thread.
        self._events: queue.SimpleQueue[tuple[str, Any, Record]] = queue.SimpleQueue()
        self._assigned: frozenset[TP] = frozenset()
        # Cancel requests for attempts that were not running here when they came.
        self._cancelled: OrderedDict[tuple[str, int], str] = OrderedDict()
        self._used = False
        #: Set once the worker has subscribed and is polling.
        self.ready = threading.Event()

    # -- read-only views (any thread) -------------------------------------------------------

    @property
    def topics(self) -> list[str]:
        """The ready topics this worker consumes."""
        return list(self._topic_priority)

    @property
    def assigned(self) -> frozenset[TP]:
        """The ready-topic partitions this worker owns now."""
        return self._assigned

    # -- the service loop -------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Consume and run jobs until ``stop`` is set, then shut down gracefully."""
        if self._used:
            raise RuntimeError("a Worker runs once; create a new one")
        self._used = True
        log = self._log
        producer = self._producer = make_producer(self.settings)
        self._dead_letters = DeadLetters(producer, self.settings, "worker")
        # KIP-848 group protocol with the broker's range assignor: each worker gets a share of
        # *every* priority topic (a count-balanced assignor could give one worker all the
        # normal partitions), and rebalances are incremental, so running jobs on partitions
        # that stay put are never handed to another worker.
        conf = {"group.protocol": "consumer", "group.remote.assignor": "range", "on_commit": self._on_commit,
                **self._consumer_overrides}
        consumer = self._consumer = make_consumer(self.settings, self.group_id, **conf)
        # Cancel requests are rare: a fetch that waits up to 100 ms for one (instead of the
        # default 10 ms) still passes it on at once, with a tenth of the empty requests.
        control = make_consumer(self.settings, f"jobsched-worker-control-{self.worker_id}",
                                **{"auto.offset.reset": "latest", "fetch.wait.max.ms": 100})
        pool = self._pool = JobThreads(self._execute, self.concurrency)
        metrics_server = None
        if self._metrics_port is not None:
            metrics_server = start_http_server(self._metrics_port, registry=self._registry)
        clean = False
        try:
            self._assign_control(control)
            consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                               on_lost=self._on_lost)
            log.info("worker started", queues=self.queues, group_id=self.group_id, concurrency=self.concurrency,
                     allow=sorted(self.allow))
            self.ready.set()
            while not stop.is_set():
                self._step(consumer, control, pool)
            self._shutdown(consumer, control, pool)
            clean = True
        finally:
            if not clean:  # an error escaped: do not leave job processes behind
                for r in self._running.values():
                    r.ctx.request_stop("shutdown", "worker crashed")
            pool.shutdown(wait=clean and not self._running)
            producer.flush(30)
            consumer.close()
            control.close()
            if metrics_server is not None:
                server, thread = metrics_server
                server.shutdown()
                server.server_close()
                thread.join(5)
            for gauge in (self._metrics.running, self._metrics.buffered):
                try:
                    gauge.remove(self.worker_id)
                except KeyError:
                    pass
            log.info("worker stopped")

    def _step(self, consumer: Consumer, control: Consumer, pool: JobThreads | None) -> None:
        """One turn of the consuming thread (never blocks for more than ~0.1 s)."""
        accept = pool is not None
        timeout = _POLL_TIMEOUT
        held_due = self._held.next_due_ms()
        if held_due is not None and accept:
            # Wake up when the next held run is to be handed to a job thread.
            timeout = max(0.0, min(timeout, (held_due - _HANDOFF_AHEAD_MS - now_ms()) / 1000))
        msgs = consumer.consume(num_messages=self.prefetch, timeout=timeout)
        if pool is not None and self._take_due_held():
            self._dispatch(pool)  # first: the records just consumed are not due yet
        for msg in msgs:
            self._on_message(msg, accept=accept)
        self._poll_control(control)
        self._reap()
        self._report_starts()
        self._drain_events()
        if pool is not None:
            self._take_due_held()
            self._dispatch(pool)
        self._flow_control(consumer)
        self._commit(consumer)
        assert self._producer is not None
        self._producer.poll(0)
        self._metrics.buffered.labels(self.worker_id).set(len(self._buffer) + len(self._held))

    def _take_due_held(self) -> bool:
        """Moves the held runs whose instant is near into the buffer, for job threads to
        start on it; True if there were any."""
        due = self._held.pop_due(now_ms() + _HANDOFF_AHEAD_MS)
        for rec in due:
            self._buffer.push(rec)
        return bool(due)

    def _shutdown(self, consumer: Consumer, control: Consumer, pool: JobThreads) -> None:
        log = self._log
        self._stopping = True
        log.info("worker stopping", running=len(self._running), buffered=len(self._buffer), grace=self.grace)
        # Buffered records stay tracked as unfinished: nothing past them is committed and
        # the partition's next owner receives them.
        self._buffer.clear()
        self._held.clear()
        deadline = time.monotonic() + self.grace
        while self._running and time.monotonic() < deadline:
            self._step(consumer, control, None)
        if self._running:
            log.warning("killing jobs still running after the grace period", running=len(self._running))
            for r in self._running.values():
                r.ctx.request_stop("shutdown", "worker shutdown")
            deadline = time.monotonic() + self._kill_grace + 10.0
            while self._running and time.monotonic() < deadline:
                self._step(consumer, control, None)
        assert self._producer is not None
        self._producer.flush(30)
        self._drain_events()
        self._commit(consumer, force=True)

    # -- records in -------------------------------------------------------------------------

    def _on_message(self, msg: Message, *, accept: bool) -> None:
        if not raise_for_message(msg):
            err = msg.error()
            if err is not None and err.code() != KafkaError._PARTITION_EOF:
                self._log.warning("consumer error", error=err.str())
            return
        if not accept:
            return  # shutting down: the partition's next owner gets it (never committed)
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        assert topic is not None and partition is not None and offset is not None
        tp = (topic, partition)
        epoch = self._tracker.track(tp, offset)
        try:
            event = self._codec.decode(msg.value())  # type: ignore[arg-type]
            if not isinstance(event, RunReady):
                raise DecodeError(f"{type(event).__name__} does not belong on a ready topic")
        except DecodeError as e:
            self._log.warning("undecodable ready record sent to the dead-letter topic", topic=topic,
                              partition=partition, offset=offset, error=str(e))
            assert self._dead_letters is not None and self._producer is not None
            self._dead_letters.send(msg, e)
            # Rare; make sure the dead letter is stored before its offset may be committed.
            self._producer.flush(5)
            self._tracker.finish(tp, offset, epoch)
            self._metrics.dead_letters.inc()
            return
        rec = Record(tp=tp, offset=offset, epoch=epoch, priority=self._topic_priority[topic], ready=event)
        if event.not_before_ms is not None and event.not_before_ms > now_ms():
            self._held.push(event.not_before_ms, rec)  # dispatched ahead: start it on the instant
        else:
            self._buffer.push(rec)

    def _assign_control(self, control: Consumer, timeout: float = 15.0) -> None:
        """Read the control topic from its current end, without a group.

        The end offsets are looked up now, not left to ``OFFSET_END``, so that a cancel
        request produced after this worker started can never be skipped.  A topic that
        was just created may have no leader for a moment: retry for ``timeout`` seconds,
        then fall back to ``OFFSET_END``.
        """
        topic = self.settings.control_topic
        deadline = time.monotonic() + timeout
        parts = [0]  # the control topic has one partition; metadata says for sure
        while True:
            try:
                md = control.list_topics(topic, timeout=5)
                tmeta = md.topics.get(topic)
                if tmeta is None or tmeta.error is not None or not tmeta.partitions:
                    raise KafkaException(tmeta.error if tmeta is not None and tmeta.error else "no partitions")
                parts = sorted(tmeta.partitions)
                tps = []
                for p in parts:
                    _, high = control.get_watermark_offsets(TopicPartition(topic, p), timeout=5)
                    tps.append(TopicPartition(topic, p, high))
                control.assign(tps)
                return
            except KafkaException as e:
                if time.monotonic() >= deadline:
                    self._log.warning("control topic end offsets unavailable; reading from its end when it is",
                                      topic=topic, error=str(e))
                    control.assign([TopicPartition(topic, p, OFFSET_END) for p in parts])
                    return
                time.sleep(0.2)

    def _poll_control(self, control: Consumer) -> None:
        for msg in control.consume(num_messages=100, timeout=0):
            if not raise_for_message(msg):
                err = msg.error()
                if err is not None and err.code() != KafkaError._PARTITION_EOF:
                    self._log.warning("control consumer error", error=err.str())
                continue
            try:
                event = self._codec.decode(msg.value())  # type: ignore[arg-type]
            except DecodeError as e:
                self._log.warning("undecodable control record ignored", offset=msg.offset(), error=str(e))
                continue
            if not isinstance(event, RunCancelRequested) or event.worker_id not in (self.worker_id, ANY_WORKER):
                continue
            reason = event.reason or "cancel requested"
            matched = 0
            for r in self._running.values():
                if r.ready.run_id == event.run_id and r.ready.attempt == event.attempt:
                    if r.ctx.request_stop("cancel", reason):
                        matched += 1
            if not matched:
                # Queued here, or not received yet: it will be answered without running.
                self._cancelled[(event.run_id, event.attempt)] = reason
                while len(self._cancelled) > _CANCELLED_MEMORY:
                    self._cancelled.popitem(last=False)
            self._log.info("cancel requested", job_id=event.job_id, run_id=event.run_id, attempt=event.attempt,
                           running=bool(matched), addressed_to=event.worker_id)

    # -- running ----------------------------------------------------------------------------

    def _refusal(self, ready: RunReady) -> str | None:
        kind = ready.executor.kind
        if kind not in self.allow or kind not in self._executors:
            return f"executor {kind!r} not allowed on worker {self.worker_id}"
        return self._executors[kind].check(ready.executor)

    def _answer_unrun(self, rec: Record, outcome: str, reason: str | None) -> None:
        """Report an attempt that ends without running (cancelled before it started, refused)."""
        ready = rec.ready
        self._report_finished(rec, self._finished(ready, outcome=outcome, reason=reason))
        self._metrics.finished.labels(self._topic_queue[rec.tp[0]], ready.executor.kind, outcome).inc()

    def _dispatch(self, pool: JobThreads) -> None:
        while len(self._running) < self.concurrency and self._buffer:
            rec = self._buffer.pop()
            ready = rec.ready
            bound = self._log.bind(job_id=ready.job_id, run_id=ready.run_id, attempt=ready.attempt)
            cancelled = self._cancelled.pop((ready.run_id, ready.attempt), None)
            if cancelled is not None:
                bound.info("run cancelled before it started", reason=cancelled)
                self._answer_unrun(rec, "cancelled", cancelled)
                continue
            refusal = self._refusal(ready)
            if refusal is not None:
                bound.warning("run refused", reason=refusal)
                self._answer_unrun(rec, "refused", refusal)
                continue
            run = self._new_run(rec, bound)
            token = next(self._tokens)
            self._running[token] = run
            pool.submit(token, run)

    def _new_run(self, rec: Record, bound: Any) -> _Run:
        """The state of an attempt about to start: its log stream, context and heartbeat pace."""
        ready = rec.ready
        deliveries = _Deliveries()
        logs_topic, key = self.settings.logs_topic, ready.run_id

        def sink(chunk: LogChunk) -> None:
            self._produce(logs_topic, key, chunk, deliveries.callback())

        stream = LogStream(ready, sink, cap_bytes=self.log_cap_bytes, chunk_bytes=self._chunk_bytes,
                           flush_interval=self._flush_interval, worker_id=self.worker_id)
        timeout = ready.timeout_ms / 1000.0 if ready.timeout_ms and ready.timeout_ms > 0 else None
        # Beat at least three times per lease, so one late heartbeat never looks like a dead worker.
        interval = self.heartbeat_interval
        if ready.lease_ms and ready.lease_ms > 0:
            interval = min(interval, ready.lease_ms / 3000.0)
        ctx = RunContext(log=stream, timeout=timeout, env=self._job_env(ready))
        run = _Run(record=rec, ctx=ctx, log=stream, deliveries=deliveries, bound=bound, heartbeat_interval=interval)
        ctx.on_tick = lambda: self._heartbeat(run)
        return run

    def _execute(self, run: _Run) -> None:
        """A job thread: run one attempt and report it."""
        self._metrics.running.labels(self.worker_id).inc()
        try:
            self._attempt(run)
        except Exception:  # noqa: BLE001 - a bug here must not stall the partition's commits
            run.bound.exception("job thread failed; its record counts as finished")
            self._events.put(("done", None, run.record))
        finally:
            # run -> ctx -> on_tick -> run is a cycle: broken here, the attempt's objects are
            # freed as soon as the last reference goes, not by the cycle collector, whose full
            # collections of them stalled every thread of the worker for up to ~100 ms.
            run.ctx.on_tick = None
            self._metrics.running.labels(self.worker_id).dec()

    def _attempt(self, run: _Run) -> None:
        ready, rec, log = run.ready, run.record, run.bound
        kind = ready.executor.kind
        queue_name = self._topic_queue[rec.tp[0]]
        if ready.not_before_ms is not None:
            # Handed over up to _HANDOFF_AHEAD_MS early: the job thread starts it on the
            # instant, whatever the consuming thread is busy with then.
            stopped = run.ctx.pause((ready.not_before_ms - now_ms()) / 1000)
            if stopped is not None:
                if stopped == "cancel":  # before it started: answered without running
                    self._answer_unrun(rec, "cancelled", run.ctx.stop_message)
                # On shutdown: neither run nor reported; its next owner runs it.
                return
        started_ms = run.started_ms = now_ms()
        t0 = time.monotonic()
        self._metrics.started.labels(queue_name, kind).inc()
        if ready.not_before_ms is not None:
            self._metrics.start_lateness.observe(max(0, started_ms - ready.not_before_ms) / 1000)
        if self.start_report_delay > 0:
            # Reported by the consuming thread once the delay is over, unless the attempt
            # has ended by then: its RunFinished then stands for the start too.
            self._unreported.append((t0 + self.start_report_delay, run))
        else:
            self._send_start(run)
        # Per-run lines are DEBUG: at thousands of jobs per second they cost more CPU than
        # the jobs; outcomes are in jobs.events, counts in the metrics, failures below.
        log.debug("run started", executor=kind, timeout_ms=ready.timeout_ms)
        run.last_heartbeat = time.monotonic()
        try:
            outcome = self._executors[kind].execute(ready.executor, run.ctx)
        except Exception as e:  # noqa: BLE001 - an executor bug must not lose the report
            log.exception("executor raised")
            outcome = Outcome(outcome="failed", reason=f"worker error: {type(e).__name__}: {e}")
        finished_ms = now_ms()
        assert self._producer is not None
        if run.ctx.stop_reason == "shutdown":
            run.log.note(f"[interrupted: worker {self.worker_id} shut down before the attempt ended; "
                         "it was not reported and will be delivered again]")
            run.log.close(eof=False)
            run.deliveries.wait(self._producer, 30.0)
            self._metrics.finished.labels(queue_name, kind, "interrupted").inc()
            log.warning("run interrupted by shutdown; offset left uncommitted for redelivery")
            return
        run.log.close(eof=True)
        with run.start_lock:
            implies_start = not run.start_sent
            run.start_sent = True  # no RunStarted after this
        finished = self._finished(
            ready, outcome=outcome.outcome, exit_code=outcome.exit_code, reason=outcome.reason,
            started_at_ms=started_ms, finished_at_ms=finished_ms,
            log_bytes=run.log.kept_bytes, log_truncated=run.log.truncated, implies_start=implies_start,
        )
        deliveries = run.deliveries

        def report() -> None:
            if deliveries.failed:
                log.warning("log chunks not all delivered", failed=deliveries.failed)
            self._report_finished(rec, finished)

        # The RunFinished goes out once Kafka has every log chunk (a delivery callback
        # produces it), so a finished run's log is complete; the job slot is free now.
        deliveries.then(report)
        self._metrics.finished.labels(queue_name, kind, outcome.outcome).inc()
        self._metrics.duration.labels(kind, outcome.outcome).observe(time.monotonic() - t0)
        (log.debug if outcome.outcome == "succeeded" else log.info)(
            "run finished", outcome=outcome.outcome, exit_code=outcome.exit_code, reason=outcome.reason,
            log_bytes=run.log.kept_bytes, log_truncated=run.log.truncated)

    def _job_env(self, ready: RunReady) -> dict[str, str]:
        """What a shell job is told about itself (for idempotent outputs, logs, metrics)."""
        return {
            "JOBSCHED_JOB_ID": ready.job_id,
            "JOBSCHED_RUN_ID": ready.run_id,
            "JOBSCHED_ATTEMPT": str(ready.attempt),
            "JOBSCHED_NOMINAL_MS": str(ready.nominal_ms),
            "JOBSCHED_JOB_NAME": ready.name,
            "JOBSCHED_WORKER_ID": self.worker_id,
        }

    def _send_start(self, run: _Run) -> None:
        """Report the attempt's start, unless it is out already or the attempt has ended."""
        with run.start_lock:
            if run.start_sent:
                return
            run.start_sent = True
            self._produce(self.settings.reports_topic, run.ready.job_id,
                          RunStarted(**self._ids(run.ready), worker_id=self.worker_id, occurred_at_ms=run.started_ms))

    def _report_starts(self) -> None:
        """RunStarted for the attempts still running past the start-report delay."""
        pending = self._unreported
        if not pending:
            return
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            self._send_start(pending.popleft()[1])

    def _heartbeat(self, run: _Run) -> None:
        now = time.monotonic()
        if now - run.last_heartbeat >= run.heartbeat_interval:
            run.last_heartbeat = now
            self._send_start(run)  # never a heartbeat before the start
            self._produce(self.settings.reports_topic, run.ready.job_id,
                          RunHeartbeat(**self._ids(run.ready), worker_id=self.worker_id))

    def _reap(self) -> None:
        if self._pool is not None:
            for token in self._pool.done():
                self._running.pop(token, None)

    # -- reports out ------------------------------------------------------------------------

    @staticmethod
    def _ids(ready: RunReady) -> dict[str, Any]:
        return {"job_id": ready.job_id, "run_id": ready.run_id, "attempt": ready.attempt,
                "user_id": ready.user_id, "tenant_id": ready.tenant_id}

    def _finished(self, ready: RunReady, **fields: Any) -> RunFinished:
        fields.setdefault("finished_at_ms", now_ms())
        return RunFinished(**self._ids(ready), worker_id=self.worker_id, **fields)

    def _produce(self, topic: str, key: str, event: Event,
                 on_delivery: Callable[[KafkaError | None, Message], None] | None = None) -> None:
        producer = self._producer
        assert producer is not None
        value = self._codec.encode(event)
        while True:
            try:
                if on_delivery is None:
                    producer.produce(topic, key=key.encode(), value=value)
                else:
                    producer.produce(topic, key=key.encode(), value=value, on_delivery=on_delivery)
                return
            except BufferError:  # local queue full: let deliveries drain it
                producer.poll(0.05)

    def _report_finished(self, rec: Record, finished: RunFinished) -> None:
        """Produce the RunFinished; its offset counts as finished once Kafka has it."""

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            self._events.put(("done", None, rec) if err is None else ("retry", finished, rec))

        self._produce(self.settings.reports_topic, finished.job_id, finished, delivered)

    def _drain_events(self) -> None:
        while True:
            try:
                what, finished, rec = self._events.get_nowait()
            except queue.Empty:
                return
            if what == "done":
                self._tracker.finish(rec.tp, rec.offset, rec.epoch)
            else:
                self._log.warning("RunFinished not delivered; producing it again", job_id=finished.job_id,
                                  run_id=finished.run_id, attempt=finished.attempt)
                self._report_finished(rec, finished)

    # -- offsets and flow control -------------------------------------------------------------

    def _commit(self, consumer: Consumer, *, only: set[TP] | None = None, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._commit_after:
            return
        offsets = self._tracker.committable(only)
        if not offsets:
            return
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        if not force:
            # Routine commits are asynchronous and paced: a synchronous round trip would stall
            # the consuming thread, and with it the start of held runs, for its duration.
            # A failure reported to _on_commit makes the next step commit those offsets again.
            self._commit_after = now + _COMMIT_INTERVAL
            for tp, offset in offsets.items():
                self._tracker.committed(tp, offset)
            try:
                consumer.commit(offsets=tps, asynchronous=True)
            except KafkaException as e:
                self._log.warning("offset commit failed; will retry", error=str(e))
                for tp in offsets:
                    self._tracker.commit_failed(tp)
                self._commit_after = now + 1.0
                return
            self._metrics.commits.inc()
            return
        try:
            result = consumer.commit(offsets=tps, asynchronous=False)
        except KafkaException as e:
            self._log.warning("offset commit failed; will retry", error=str(e))
            self._commit_after = time.monotonic() + 1.0
            return
        self._metrics.commits.inc()
        for tp in result or []:
            if tp.error is not None:
                self._log.warning("offset commit failed for a partition", topic=tp.topic, partition=tp.partition,
                                  error=str(tp.error))
                self._commit_after = time.monotonic() + 1.0
            else:
                self._tracker.committed((tp.topic, tp.partition), tp.offset)

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """Result of a commit (called on the consuming thread, inside consume/poll)."""
        if err is not None and err.code() == KafkaError._NO_OFFSET:
            return
        failed = [tp for tp in partitions if err is not None or tp.error is not None]
        if failed:
            self._log.warning("offset commit failed; will retry", error=str(err) if err is not None else None,
                              partitions=[(tp.topic, tp.partition) for tp in failed][:10])
            for tp in failed:
                self._tracker.commit_failed((tp.topic, tp.partition))
            self._commit_after = time.monotonic() + 1.0

    def _flow_control(self, consumer: Consumer) -> None:
        if self._stopping:
            paused = frozenset(PRIORITIES)
        else:
            paused = paused_priorities(self._buffer.counts(), self.prefetch)
        if (paused, self._assigned) == self._flow_key:
            return  # nothing changed since the last step (the common case)
        self._flow_key = (paused, self._assigned)
        desired = {tp for tp in self._assigned if self._topic_priority[tp[0]] in paused}
        to_pause = desired - self._paused
        to_resume = self._paused - desired
        if to_pause:
            consumer.pause([TopicPartition(t, p) for t, p in sorted(to_pause)])
        if to_resume:
            consumer.resume([TopicPartition(t, p) for t, p in sorted(to_resume)])
        self._paused = desired

    # -- rebalance callbacks (run inside consumer.consume on the consuming thread) -------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = {(p.topic, p.partition) for p in partitions}
        self._assigned = self._assigned | tps
        self._log.info("partitions assigned", count=len(tps), owned=len(self._assigned))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = {(p.topic, p.partition) for p in partitions}
        self._drain_events()
        self._commit(consumer, only=tps, force=True)
        self._release(tps, "revoked")

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._release({(p.topic, p.partition) for p in partitions}, "lost")

    def _release(self, tps: set[TP], how: str) -> None:
        dropped = self._buffer.drop(tps) + self._held.drop(tps)
        self._tracker.forget(tps)
        self._assigned = self._assigned - tps
        self._paused -= tps
        still_running = sum(1 for r in self._running.values() if r.record.tp in tps)
        self._log.info("partitions released", how=how, count=len(tps), owned=len(self._assigned),
                       dropped_buffered=len(dropped), still_running=still_running)


def main(settings: Settings, **kwargs: Any) -> None:
    """Run a worker in the foreground until SIGTERM/SIGINT (the CLI's ``jobsched worker``)."""
    run_until_signalled(Worker(settings, **kwargs))
