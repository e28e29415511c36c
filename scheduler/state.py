"""The scheduler as a pure state machine over one partition of jobs.

It owns every live job whose id hashes to its partition: jobs waiting for a time,
for upstream jobs, for a worker, or for a retry.  Inputs are events (commands from
users, reports from workers, dependency messages from other partitions' owners) and
the passage of time (``fire_due(now)``).  Outputs are events to produce; the Kafka
loop in :mod:`scheduler.service` writes them, the changelog of every job touched, and
the consumed offsets in one transaction, so a crash anywhere replays cleanly.

Nothing here reads a clock, a socket or a random source: the same inputs give the
same outputs, which the property tests rely on.

Run identity is ``job_id@nominal_ms``.  Within a run, ``attempt`` is the dispatch
number written in ``RunReady`` (it fences worker reports, with the worker id), and
``execution`` is the attempt number users see: every retry, every lease loss and
every redelivery of a run to another worker counts one more.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

from infra.errors import ValidationError
from scheduler.coldstore import ColdStore
from scheduler.timing import backoff_ms, fires_between, next_cron_ms
from scheduler.validation import validate_spec
from schemas.events import (
    ANY_WORKER,
    DependencyRegistered,
    Event,
    JobCancelRequested,
    JobSpec,
    JobStatusChanged,
    JobSubmitted,
    RunCancelRequested,
    RunFinished,
    RunHeartbeat,
    RunReady,
    RunStarted,
    RunStatusChanged,
    SchedulePaused,
    ScheduleResumed,
    SchedulerJobState,
    SchedulerRunState,
    UpstreamResolved,
    run_id_for,
)

#: Cold jobs taken back into memory per call of ``fire_due`` at most.
WARM_PER_STEP = 500

# Timer kinds.
FIRE, RETRY, LEASE, EXPIRE = 0, 1, 2, 3

#: Where an output goes; the service maps these to topics.
READY, EVENTS, COMMANDS, CONTROL = "ready", "events", "commands", "control"



@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Tunables of the state machine (times in milliseconds)."""

    #: How long a finished job's outcome is kept to answer late dependency registrations.
    outcome_retention_ms: int = 86_400_000
    #: A recurring firing later than this is "missed" and subject to the catch-up policy.
    misfire_grace_ms: int = 60_000
    #: Added to a run's timeout before the scheduler declares a silent attempt lost.
    timeout_grace_ms: int = 30_000
    #: Runs due (or retries due) within this many ms are dispatched ahead of time with
    #: ``RunReady.not_before_ms`` set: the worker holds such a run and starts it at that
    #: instant, so firing precision does not depend on the scheduler's transaction and the
    #: fetch latency.  0 dispatches at the due time.  A recurring job whose previous run is
    #: still active and whose overlap policy is not ``allow`` is never dispatched early
    #: (the policy is judged at the due time).
    dispatch_lookahead_ms: int = 0
    #: With a cold store, a pending job with nothing to do until a time further ahead than
    #: this is moved out of memory into the store, and taken back this long before it.
    cold_horizon_ms: int = 60_000

    def __post_init__(self) -> None:
        if self.dispatch_lookahead_ms < 0:
            raise ValueError("dispatch_lookahead_ms must be >= 0")
        if self.cold_horizon_ms <= self.dispatch_lookahead_ms:
            raise ValueError("cold_horizon_ms must be greater than dispatch_lookahead_ms")


@dataclass(slots=True)
class Run:
    run_id: str
    nominal_ms: int
    attempt: int = 1
    execution: int = 1
    status: str = "queued"  # queued | running | retry_wait
    worker_id: str | None = None
    started_at_ms: int | None = None
    retry_at_ms: int | None = None
    last_beat_ms: int = 0


@dataclass(slots=True)
class Job:
    spec: JobSpec
    status: str = "pending"
    reason: str | None = None
    waiting: set[str] = field(default_factory=set)
    downstream: list[str] = field(default_factory=list)
    next_fire_ms: int | None = None
    attempts: int = 0
    paused: bool = False
    runs: dict[str, Run] = field(default_factory=dict)

    @property
    def job_id(self) -> str:
        return self.spec.job_id


Output = tuple[str, Event]


class Rejected(ValidationError):
    """A command was understood but cannot be applied; its record belongs in the DLQ.

    ``outputs`` holds what must still be produced (e.g. the job's "failed" status).
    """

    outputs: list[Output] = []


class PartitionState:
    """Live jobs, retained outcomes and timers of one partition."""

    def __init__(self, partition: int, config: SchedulerConfig | None = None, *,
                 cold: ColdStore | None = None,
                 decode: Callable[[bytes], SchedulerJobState] | None = None) -> None:
        if (cold is None) != (decode is None):
            raise ValueError("a cold store needs a decode function for its records, and vice versa")
        self.partition = partition
        self.config = config or SchedulerConfig()
        #: Jobs in memory ("hot").  Jobs in ``cold`` are just as live: see :meth:`settle`.
        self.jobs: dict[str, Job] = {}
        self.cold = cold
        self._decode = decode
        #: Jobs armed this step for a time beyond the horizon: :meth:`settle` cools them.
        self._to_cool: set[str] = set()
        #: job_id -> (terminal status, finished_at_ms): answers for late dependents.
        self.outcomes: dict[str, tuple[str, int]] = {}
        #: Timers judged at their due time (leases, outcome expiry, deferred firings).
        self._timers: list[tuple[int, int, int, str, str, int]] = []
        #: Firings and retries: taken up to ``dispatch_lookahead_ms`` ahead of their due time.
        self._early: list[tuple[int, int, int, str, str, int]] = []
        self._seq = 0
        #: Job ids whose changelog record must be rewritten in the current transaction.
        self.dirty: set[str] = set()

    # -- timers -----------------------------------------------------------------------

    def _push(self, due_ms: int, kind: int, job_id: str, run_id: str = "", token: int = 0) -> None:
        self._seq += 1
        heap = self._early if kind in (FIRE, RETRY) and self.config.dispatch_lookahead_ms else self._timers
        heapq.heappush(heap, (due_ms, self._seq, kind, job_id, run_id, token))

    def next_due_ms(self) -> int | None:
        """The earliest instant at which :meth:`fire_due` has something to do."""
        cands = []
        if self._timers:
            cands.append(self._timers[0][0])
        if self._early:
            cands.append(self._early[0][0] - self.config.dispatch_lookahead_ms)
        if self.cold is not None:
            c = self.cold.next_due_ms()
            if c is not None:
                cands.append(c - self.config.cold_horizon_ms)
        return min(cands) if cands else None

    @property
    def timer_count(self) -> int:
        return len(self._timers) + len(self._early) + (len(self.cold) if self.cold is not None else 0)

    @property
    def live_count(self) -> int:
        """Live jobs, in memory or cold."""
        return len(self.jobs) + (len(self.cold) if self.cold is not None else 0)

    # -- cold jobs ----------------------------------------------------------------------

    def _job(self, job_id: str) -> Job | None:
        """A live job by id, taken back from the cold store if it is there."""
        job = self.jobs.get(job_id)
        if job is None and self.cold is not None:
            data = self.cold.take(job_id)
            if data is not None:
                job = self._warm(job_id, data)
        return job

    def _warm(self, job_id: str, data: bytes) -> Job:
        assert self._decode is not None
        job = from_snapshot(self._decode(data))
        self.jobs[job_id] = job
        # A cold job has no runs, waits for nothing and is not paused: its one timer is its firing.
        if job.next_fire_ms is not None:
            self._push(job.next_fire_ms, FIRE, job_id)
        return job

    def _coolable(self, job: Job, now: int) -> bool:
        return (job.next_fire_ms is not None and job.next_fire_ms > now + self.config.cold_horizon_ms
                and not job.runs and not job.waiting and not job.downstream and not job.paused
                and job.status == "pending")

    def settle(self, now: int, encoded: dict[str, bytes]) -> set[str]:
        """End of a step: move the jobs armed for beyond the horizon into the cold store.

        ``encoded`` holds the changelog value written this step for each job id (what
        :meth:`take_dirty` returned, encoded); the store keeps those bytes.  Returns the
        ids cooled.  A job that stopped qualifying during the step gets its timer instead.
        """
        cooled: set[str] = set()
        if not self._to_cool:
            return cooled
        for jid in self._to_cool:
            job = self.jobs.get(jid)
            if job is None:
                continue
            data = encoded.get(jid)
            if data is not None and self._coolable(job, now):
                assert self.cold is not None and job.next_fire_ms is not None
                self.cold.put(jid, job.next_fire_ms, data)
                del self.jobs[jid]
                cooled.add(jid)
            elif job.next_fire_ms is not None and not job.paused and not job.waiting:
                self._push(job.next_fire_ms, FIRE, jid)
        self._to_cool.clear()
        return cooled

    def _warm_due(self, now: int) -> None:
        if self.cold is None:
            return
        # A bounded number per step: when many jobs come within the horizon at once (a
        # restore, a burst of submissions), decoding them all would delay this step's firings.
        for jid in self.cold.due_until(now + self.config.cold_horizon_ms, WARM_PER_STEP):
            data = self.cold.take(jid)
            if data is not None:
                self._warm(jid, data)

    def _may_fire_early(self, job: Job, kind: int) -> bool:
        if kind == RETRY or not job.runs:
            return True
        return job.spec.schedule.overlap == "allow"

    def fire_due(self, now: int, *, check_leases: bool = True) -> list[Output]:
        """Handle every timer due at or before ``now``.

        ``check_leases=False`` when the caller is behind on its input: the heartbeats and
        results that would keep a lease are probably waiting unread in the backlog, so no
        attempt is declared lost until the input is caught up.
        """
        out: list[Output] = []
        self._warm_due(now)
        early = self._early
        horizon = now + self.config.dispatch_lookahead_ms
        while early and early[0][0] <= horizon:
            item = heapq.heappop(early)
            due, _, kind, job_id, _, _ = item
            job = self.jobs.get(job_id)
            if job is None:
                continue
            if due > now and not self._may_fire_early(job, kind):
                heapq.heappush(self._timers, item)  # judged at its due time instead
                continue
            self._handle_timer(item, now, check_leases, out)
        timers = self._timers
        while timers and timers[0][0] <= now:
            self._handle_timer(heapq.heappop(timers), now, check_leases, out)
        return out

    def _handle_timer(self, item: tuple[int, int, int, str, str, int], now: int, check_leases: bool,
                      out: list[Output]) -> None:
        due, _, kind, job_id, run_id, token = item
        if kind == EXPIRE:
            o = self.outcomes.get(job_id)
            if o is not None and o[1] + self.config.outcome_retention_ms <= now:
                del self.outcomes[job_id]
                self.dirty.add(job_id)
            return
        job = self.jobs.get(job_id)
        if job is None:
            return
        if kind == FIRE:
            if job.next_fire_ms == due and not job.paused and not job.waiting:
                self._on_fire(job, due, now, out)
        elif kind == RETRY:
            run = job.runs.get(run_id)
            if run is not None and run.status == "retry_wait" and run.attempt == token:
                self._redispatch(job, run, now, out)
        elif kind == LEASE:
            if not check_leases:
                self._push(now + 1000, LEASE, job_id, run_id, token)
                return
            run = job.runs.get(run_id)
            if run is not None and run.status == "running" and run.execution == token:
                self._check_lease(job, run, now, out)

    # -- inputs -----------------------------------------------------------------------

    def apply(self, event: Event, now: int) -> list[Output]:
        """Apply one input event; return what to produce.  Raises :class:`Rejected`."""
        out: list[Output] = []
        try:
            self._dispatch_event(event, now, out)
        except Rejected as e:
            e.outputs = out
            raise
        return out

    def _dispatch_event(self, event: Event, now: int, out: list[Output]) -> None:
        if isinstance(event, JobSubmitted):
            self._on_submitted(event, now, out)
        elif isinstance(event, (RunStarted, RunHeartbeat, RunFinished)):
            self._on_report(event, now, out)
        elif isinstance(event, JobCancelRequested):
            self._on_cancel(event, now, out)
        elif isinstance(event, DependencyRegistered):
            self._on_dependency(event, now, out)
        elif isinstance(event, UpstreamResolved):
            self._on_upstream(event, now, out)
        elif isinstance(event, SchedulePaused):
            self._on_pause(event, now, out)
        elif isinstance(event, ScheduleResumed):
            self._on_resume(event, now, out)
        else:
            raise Rejected(f"the scheduler does not consume {type(event).__name__}")

    def _on_submitted(self, ev: JobSubmitted, now: int, out: list[Output]) -> None:
        spec = ev.spec
        jid = spec.job_id
        if jid in self.jobs or jid in self.outcomes or (self.cold is not None and jid in self.cold):
            return  # a resubmission of the same id (client retry): already known
        try:
            validate_spec(spec)
        except ValidationError as e:
            reason = f"rejected: {e}"
            out.append((EVENTS, self._job_event(spec.user_id, spec.tenant_id, jid, "failed", now,
                                                reason=reason, spec=spec)))
            self._retain(jid, "failed", now)
            raise Rejected(reason) from e
        job = Job(spec=spec, waiting=_waiting(spec.after))
        self.jobs[jid] = job
        self.dirty.add(jid)
        sched = spec.schedule
        if sched.cron is not None:
            job.next_fire_ms = next_cron_ms(sched.cron, sched.timezone, spec.submitted_at_ms)
        elif sched.at_ms is not None:
            job.next_fire_ms = sched.at_ms
        else:
            job.next_fire_ms = now
        out.append((EVENTS, self._job_event(spec.user_id, spec.tenant_id, jid, "pending", now,
                                            spec=spec, next_fire_ms=job.next_fire_ms,
                                            reason=("waiting for " + ", ".join(sorted(job.waiting))) if job.waiting else None)))
        for up in spec.after:
            out.append((COMMANDS, DependencyRegistered(user_id=spec.user_id, tenant_id=spec.tenant_id,
                                                       occurred_at_ms=now, upstream_id=up, downstream_id=jid)))
        if not job.waiting:
            self._arm(job, now, out)

    def _arm(self, job: Job, now: int, out: list[Output]) -> None:
        """Fire now if due, else set the timer."""
        if job.next_fire_ms is None or job.paused or job.waiting:
            return
        if job.next_fire_ms <= now:
            self._on_fire(job, job.next_fire_ms, now, out)
        elif self.cold is not None and self._coolable(job, now):
            self._to_cool.add(job.job_id)  # settle() cools it, or arms it if it no longer qualifies
        else:
            self._push(job.next_fire_ms, FIRE, job.job_id)

    def _on_fire(self, job: Job, due: int, now: int, out: list[Output]) -> None:
        sched = job.spec.schedule
        self.dirty.add(job.job_id)
        if sched.cron is None:
            job.next_fire_ms = None
            self._dispatch_new(job, due, now, out)
            return
        # Recurring: every nominal time up to now, filtered by the catch-up policy.
        window_start = now - max(sched.catchup_window_ms, self.config.misfire_grace_ms)
        # Only list firings inside the window: after a long gap the full list is huge, and
        # fires_between's limit would cut off the newest ones, which are the ones kept.
        due_list = [due, *fires_between(sched.cron, sched.timezone, max(due, window_start - 1), now)]
        last = due_list[-1]
        due_list = [t for t in due_list if t >= window_start]
        missed = [t for t in due_list if t < now - self.config.misfire_grace_ms]
        on_time = [t for t in due_list if t >= now - self.config.misfire_grace_ms]
        if missed:
            if sched.catchup == "skip":
                due_list = on_time
            elif sched.catchup == "latest":
                due_list = due_list[-1:]
        if sched.end_ms is not None:
            due_list = [t for t in due_list if t <= sched.end_ms]
        for t in due_list:
            self._fire_recurring(job, t, now, out)
        nxt = next_cron_ms(sched.cron, sched.timezone, max(last, now))
        if sched.end_ms is not None and nxt > sched.end_ms:
            job.next_fire_ms = None
            if not job.runs:
                self._finish(job, "completed", now, out, reason="schedule ended")
            return
        job.next_fire_ms = nxt
        self._push(nxt, FIRE, job.job_id)

    def _fire_recurring(self, job: Job, nominal: int, now: int, out: list[Output]) -> None:
        overlap = job.spec.schedule.overlap
        active = list(job.runs.values())
        if active and overlap == "forbid":
            spec = job.spec
            out.append((EVENTS, RunStatusChanged(
                user_id=spec.user_id, tenant_id=spec.tenant_id, occurred_at_ms=now, job_id=job.job_id,
                run_id=run_id_for(job.job_id, nominal), attempt=0, status="skipped", nominal_ms=nominal,
                reason="previous run still active (overlap=forbid)")))
            return
        if active and overlap == "replace":
            for run in active:
                self._cancel_run(job, run, now, out, reason=f"replaced by the run due at {nominal}")
        self._dispatch_new(job, nominal, now, out)

    def _dispatch_new(self, job: Job, nominal: int, now: int, out: list[Output]) -> None:
        run_id = run_id_for(job.job_id, nominal)
        if run_id in job.runs:
            return  # the same nominal time fires once, whatever happens
        run = Run(run_id=run_id, nominal_ms=nominal)
        job.runs[run_id] = run
        job.attempts += 1
        self._emit_dispatch(job, run, now, out)

    def _emit_dispatch(self, job: Job, run: Run, now: int, out: list[Output]) -> None:
        spec = job.spec
        # Dispatched ahead of its time (see SchedulerConfig.dispatch_lookahead_ms): the
        # worker starts it at this instant.
        due = run.retry_at_ms if run.status == "retry_wait" else run.nominal_ms
        not_before = due if due is not None and due > now else None
        run.status = "queued"
        run.worker_id = None
        run.started_at_ms = None
        run.retry_at_ms = None
        out.append((READY, RunReady(
            user_id=spec.user_id, tenant_id=spec.tenant_id, occurred_at_ms=now, job_id=job.job_id,
            run_id=run.run_id, attempt=run.attempt, name=spec.name, nominal_ms=run.nominal_ms,
            queue=spec.queue, priority=spec.priority, executor=spec.executor, timeout_ms=spec.timeout_ms,
            lease_ms=spec.lease_ms, not_before_ms=not_before)))
        out.append((EVENTS, self._run_event(job, run, "queued", now)))
        self._set_status(job, "queued", now, out, run_id=run.run_id)

    def _redispatch(self, job: Job, run: Run, now: int, out: list[Output]) -> None:
        run.attempt += 1
        run.execution += 1
        job.attempts += 1
        self.dirty.add(job.job_id)
        self._emit_dispatch(job, run, now, out)

    # -- worker reports ----------------------------------------------------------------

    def _kill(self, ev: RunStarted | RunHeartbeat | RunFinished, worker_id: str, now: int, out: list[Output],
              reason: str) -> None:
        out.append((CONTROL, RunCancelRequested(
            user_id=ev.user_id, tenant_id=ev.tenant_id, occurred_at_ms=now, job_id=ev.job_id, run_id=ev.run_id,
            attempt=ev.attempt, worker_id=worker_id, reason=reason)))

    def _on_report(self, ev: RunStarted | RunHeartbeat | RunFinished, now: int, out: list[Output]) -> None:
        job = self._job(ev.job_id)
        run = job.runs.get(ev.run_id) if job is not None else None
        if job is None or run is None or ev.attempt < run.attempt:
            # A report for a run that is over or superseded.  If something just started
            # it, it is a stale delivery: stop it rather than let it run twice.
            if isinstance(ev, RunStarted):
                self._kill(ev, ev.worker_id, now, out, reason="superseded attempt")
            return
        if ev.attempt > run.attempt:
            return  # cannot happen: only this partition's owner issues attempts
        if run.status == "retry_wait":
            # This attempt already has its verdict (failed, timed out or lost): a late report
            # must not give it a second one, and a late start elsewhere is a stale delivery.
            if isinstance(ev, RunStarted) and run.worker_id != ev.worker_id:
                self._kill(ev, ev.worker_id, now, out, reason="superseded attempt")
            return
        if isinstance(ev, RunStarted):
            if run.worker_id != ev.worker_id:  # else a duplicate report
                self._start(job, run, ev, ev.occurred_at_ms, now, out, announce=True)
            return
        if isinstance(ev, RunFinished) and ev.implies_start and run.worker_id != ev.worker_id:
            # The attempt ended before its start was reported: take the start as read, as
            # if its RunStarted had come first, without a "running" that would be stale at
            # once (the final event carries started_at_ms).
            self._start(job, run, ev, ev.started_at_ms if ev.started_at_ms is not None else ev.occurred_at_ms,
                        now, out, announce=False)
        refused = isinstance(ev, RunFinished) and ev.outcome == "refused" and run.status == "queued"
        if run.worker_id != ev.worker_id and not refused:
            return  # fenced: not the execution we track (a refusal comes without a start)
        if isinstance(ev, RunHeartbeat):
            run.last_beat_ms = now  # not persisted: after a restore the lease restarts
            return
        self._on_finished(job, run, ev, now, out)

    def _start(self, job: Job, run: Run, ev: RunStarted | RunFinished, started_at_ms: int, now: int,
               out: list[Output], *, announce: bool) -> None:
        """``ev.worker_id`` started the attempt: it becomes the execution tracked.

        ``announce`` emits the "running" events and arms the lease; without it the caller
        ends the attempt in the same step."""
        if run.worker_id is not None:
            # Kafka redelivered the run to another worker: the first one is gone (or a
            # zombie, which we stop).  That execution is lost; this one counts anew.
            out.append((EVENTS, self._run_event(job, run, "lost", now,
                                                reason=f"worker {run.worker_id} replaced by {ev.worker_id}")))
            out.append((CONTROL, RunCancelRequested(
                user_id=ev.user_id, tenant_id=ev.tenant_id, occurred_at_ms=now, job_id=ev.job_id,
                run_id=ev.run_id, attempt=ev.attempt, worker_id=run.worker_id, reason="superseded")))
            run.execution += 1
            job.attempts += 1
        run.status = "running"
        run.worker_id = ev.worker_id
        run.started_at_ms = started_at_ms
        run.last_beat_ms = now
        self.dirty.add(job.job_id)
        if announce:
            out.append((EVENTS, self._run_event(job, run, "running", now)))
            self._set_status(job, "running", now, out, run_id=run.run_id)
            self._push(self._lease_deadline(job, run), LEASE, job.job_id, run.run_id, run.execution)

    def _lease_deadline(self, job: Job, run: Run) -> int:
        deadline = run.last_beat_ms + job.spec.lease_ms
        if job.spec.timeout_ms is not None and run.started_at_ms is not None:
            deadline = min(deadline, max(run.last_beat_ms, run.started_at_ms + job.spec.timeout_ms
                                         + self.config.timeout_grace_ms))
        return deadline

    def _check_lease(self, job: Job, run: Run, now: int, out: list[Output]) -> None:
        deadline = self._lease_deadline(job, run)
        if now < deadline:
            self._push(deadline, LEASE, job.job_id, run.run_id, run.execution)
            return
        assert run.worker_id is not None
        out.append((CONTROL, RunCancelRequested(
            user_id=job.spec.user_id, tenant_id=job.spec.tenant_id, occurred_at_ms=now, job_id=job.job_id,
            run_id=run.run_id, attempt=run.attempt, worker_id=run.worker_id, reason="lease expired")))
        if run.last_beat_ms + job.spec.lease_ms <= now:
            why = f"no heartbeat from worker {run.worker_id} within the lease ({job.spec.lease_ms} ms)"
        else:
            why = f"no result from worker {run.worker_id} within the timeout plus {self.config.timeout_grace_ms} ms"
        self._failed_attempt(job, run, "lost", why, None, now, out)

    def _on_finished(self, job: Job, run: Run, ev: RunFinished, now: int, out: list[Output]) -> None:
        self.dirty.add(job.job_id)
        if ev.outcome == "succeeded":
            del job.runs[run.run_id]
            out.append((EVENTS, self._run_event(job, run, "succeeded", now, exit_code=ev.exit_code,
                                                finished_at_ms=ev.finished_at_ms, reason=ev.reason)))
            self._run_done(job, run, True, None, now, out)
        elif ev.outcome in ("failed", "timed_out"):
            self._failed_attempt(job, run, ev.outcome, ev.reason, ev.exit_code, now, out,
                                 finished_at_ms=ev.finished_at_ms)
        else:  # cancelled (we asked) or refused (no worker of this queue may run it)
            del job.runs[run.run_id]
            out.append((EVENTS, self._run_event(job, run, ev.outcome, now, exit_code=ev.exit_code,
                                                finished_at_ms=ev.finished_at_ms, reason=ev.reason)))
            self._run_done(job, run, False, f"{ev.outcome}: {ev.reason}" if ev.reason else ev.outcome, now, out)

    def _failed_attempt(self, job: Job, run: Run, status: str, reason: str | None, exit_code: int | None,
                        now: int, out: list[Output], finished_at_ms: int | None = None) -> None:
        self.dirty.add(job.job_id)
        policy = job.spec.retry
        if run.attempt <= policy.max_retries:
            delay = backoff_ms(run.attempt, policy.backoff_ms, policy.backoff_max_ms, run.run_id)
            run.status = "retry_wait"
            run.retry_at_ms = now + delay
            out.append((EVENTS, self._run_event(job, run, status, now, exit_code=exit_code, reason=reason,
                                                finished_at_ms=finished_at_ms or now, retry_at_ms=run.retry_at_ms)))
            self._set_status(job, "pending", now, out, run_id=run.run_id,
                             reason=f"retry {run.attempt}/{policy.max_retries} after {status}"
                                    + (f" (exit code {exit_code})" if exit_code is not None else ""))
            self._push(run.retry_at_ms, RETRY, job.job_id, run.run_id, run.attempt)
            return
        del job.runs[run.run_id]
        out.append((EVENTS, self._run_event(job, run, status, now, exit_code=exit_code, reason=reason,
                                            finished_at_ms=finished_at_ms or now)))
        detail = status + (f" (exit code {exit_code})" if exit_code is not None else "")
        if reason:
            detail += f": {reason}"
        self._run_done(job, run, False, detail, now, out)

    def _run_done(self, job: Job, run: Run, ok: bool, reason: str | None, now: int, out: list[Output]) -> None:
        """A run ended for good: tell the dependents, then finish or wait for the next firing."""
        self._resolve_downstream(job, "completed" if ok else "failed", now, out, run=run)
        if job.spec.schedule.cron is None:
            self._finish(job, "completed" if ok else "failed", now, out, reason=reason, notify=False)
            return
        if job.next_fire_ms is None and not job.runs:
            self._finish(job, "completed", now, out, reason="schedule ended", notify=False)
            return
        if not job.runs:
            self._set_status(job, "paused" if job.paused else "pending", now, out,
                             reason=None if ok else f"last run failed: {reason}")

    # -- dependencies -----------------------------------------------------------------

    def _resolve_downstream(self, job: Job, outcome: str, now: int, out: list[Output], run: Run | None = None) -> None:
        spec = job.spec
        for d in job.downstream:
            out.append((COMMANDS, UpstreamResolved(
                user_id=spec.user_id, tenant_id=spec.tenant_id, occurred_at_ms=now, upstream_id=job.job_id,
                downstream_id=d, outcome=outcome, run_id=run.run_id if run else None,
                nominal_ms=run.nominal_ms if run else None)))
        job.downstream = []

    def _on_dependency(self, ev: DependencyRegistered, now: int, out: list[Output]) -> None:
        up = self._job(ev.upstream_id)
        if up is not None:
            if ev.downstream_id not in up.downstream:
                up.downstream.append(ev.downstream_id)
                self.dirty.add(up.job_id)
            return
        known = self.outcomes.get(ev.upstream_id)
        out.append((COMMANDS, UpstreamResolved(
            user_id=ev.user_id, tenant_id=ev.tenant_id, occurred_at_ms=now, upstream_id=ev.upstream_id,
            downstream_id=ev.downstream_id, outcome=known[0] if known else "unknown")))

    def _on_upstream(self, ev: UpstreamResolved, now: int, out: list[Output]) -> None:
        job = self._job(ev.downstream_id)
        if job is None or ev.upstream_id not in job.waiting:
            return
        self.dirty.add(job.job_id)
        if ev.outcome == "completed":
            job.waiting.discard(ev.upstream_id)
            if not job.waiting:
                self._set_status(job, "paused" if job.paused else "pending", now, out, reason=None,
                                 force=True, next_fire_ms=job.next_fire_ms)
                self._arm(job, now, out)
        elif ev.outcome == "cancelled":
            self._finish(job, "cancelled", now, out, reason=f"upstream_cancelled: {ev.upstream_id}")
        elif ev.outcome == "unknown":
            self._finish(job, "failed", now, out, reason=f"upstream_unknown: {ev.upstream_id}")
        else:
            self._finish(job, "failed", now, out, reason=f"upstream_failed: {ev.upstream_id}")

    # -- user commands ----------------------------------------------------------------

    def _cancel_run(self, job: Job, run: Run, now: int, out: list[Output], reason: str) -> None:
        spec = job.spec
        out.append((CONTROL, RunCancelRequested(
            user_id=spec.user_id, tenant_id=spec.tenant_id, occurred_at_ms=now, job_id=job.job_id,
            run_id=run.run_id, attempt=run.attempt, worker_id=run.worker_id or ANY_WORKER, reason=reason)))
        out.append((EVENTS, self._run_event(job, run, "cancelled", now, reason=reason, finished_at_ms=now)))
        del job.runs[run.run_id]
        self.dirty.add(job.job_id)

    def _on_cancel(self, ev: JobCancelRequested, now: int, out: list[Output]) -> None:
        job = self._job(ev.job_id)
        if job is None:
            return  # already over (or unknown): cancelling is a no-op
        reason = ev.reason or f"cancelled by {ev.user_id}"
        for run in list(job.runs.values()):
            self._cancel_run(job, run, now, out, reason)
        self._finish(job, "cancelled", now, out, reason=reason)

    def _on_pause(self, ev: SchedulePaused, now: int, out: list[Output]) -> None:
        job = self._job(ev.job_id)
        if job is None or job.paused:
            return
        job.paused = True
        self.dirty.add(job.job_id)
        if not job.runs:
            self._set_status(job, "paused", now, out, reason=f"paused by {ev.user_id}")

    def _on_resume(self, ev: ScheduleResumed, now: int, out: list[Output]) -> None:
        job = self._job(ev.job_id)
        if job is None or not job.paused:
            return
        job.paused = False
        self.dirty.add(job.job_id)
        sched = job.spec.schedule
        if sched.cron is not None:
            # Firings missed while paused are skipped: a pause means "not those".
            job.next_fire_ms = next_cron_ms(sched.cron, sched.timezone, now)
            if sched.end_ms is not None and job.next_fire_ms > sched.end_ms:
                job.next_fire_ms = None
        if not job.runs:
            self._set_status(job, "pending", now, out, reason=None, next_fire_ms=job.next_fire_ms, force=True)
        self._arm(job, now, out)

    # -- bookkeeping ------------------------------------------------------------------

    def _finish(self, job: Job, status: str, now: int, out: list[Output], reason: str | None = None,
                notify: bool = True) -> None:
        if notify:
            self._resolve_downstream(job, status, now, out)
        self._set_status(job, status, now, out, reason=reason, force=True)
        del self.jobs[job.job_id]
        self._retain(job.job_id, status, now)

    def _retain(self, job_id: str, status: str, now: int) -> None:
        self.outcomes[job_id] = (status, now)
        self.dirty.add(job_id)
        self._push(now + self.config.outcome_retention_ms, EXPIRE, job_id)

    def _set_status(self, job: Job, status: str, now: int, out: list[Output], *, run_id: str | None = None,
                    reason: str | None = None, force: bool = False, next_fire_ms: int | None = None) -> None:
        if job.status == status and job.reason == reason and not force:
            return
        job.status = status
        job.reason = reason
        self.dirty.add(job.job_id)
        nxt = next_fire_ms if next_fire_ms is not None else job.next_fire_ms
        # A job change made together with a change of one of its attempts rides on that
        # attempt's RunStatusChanged (the last event out, same job): one record instead of
        # two, which on a no-op job is three of seven events.
        last = next((i for i in range(len(out) - 1, -1, -1) if out[i][0] == EVENTS), None)
        ev = out[last][1] if last is not None else None
        if (isinstance(ev, RunStatusChanged) and ev.job_id == job.job_id and ev.job_status is None
                and (run_id is None or run_id == ev.run_id)):
            out[last] = (EVENTS, replace(ev, job_status=status, job_reason=reason, job_attempts=job.attempts,
                                         job_next_fire_ms=nxt))
            return
        out.append((EVENTS, self._job_event(job.spec.user_id, job.spec.tenant_id, job.job_id, status, now,
                                            reason=reason, attempts=job.attempts, run_id=run_id,
                                            next_fire_ms=nxt)))

    @staticmethod
    def _job_event(user_id: str, tenant_id: str, job_id: str, status: str, now: int, *, reason: str | None = None,
                   attempts: int = 0, run_id: str | None = None, next_fire_ms: int | None = None,
                   spec: JobSpec | None = None) -> JobStatusChanged:
        return JobStatusChanged(user_id=user_id, tenant_id=tenant_id, occurred_at_ms=now, job_id=job_id,
                                status=status, reason=reason, attempts=attempts, run_id=run_id,
                                next_fire_ms=next_fire_ms, spec=spec)

    @staticmethod
    def _run_event(job: Job, run: Run, status: str, now: int, **extra: Any) -> RunStatusChanged:
        return RunStatusChanged(
            user_id=job.spec.user_id, tenant_id=job.spec.tenant_id, occurred_at_ms=now, job_id=job.job_id,
            run_id=run.run_id, attempt=run.execution, status=status, nominal_ms=run.nominal_ms,
            worker_id=run.worker_id, started_at_ms=run.started_at_ms, **extra)

    # -- changelog ----------------------------------------------------------------------

    def take_dirty(self) -> list[tuple[str, SchedulerJobState | None]]:
        """(job id, record or None for a tombstone) for every job changed since the last call."""
        out: list[tuple[str, SchedulerJobState | None]] = []
        for jid in self.dirty:
            job = self.jobs.get(jid)
            if job is not None:
                out.append((jid, snapshot(job)))
            elif jid in self.outcomes:
                status, at = self.outcomes[jid]
                out.append((jid, SchedulerJobState(job_id=jid, status=status, finished_at_ms=at)))
            else:
                out.append((jid, None))
        self.dirty.clear()
        return out

    def restore(self, records: Iterable[tuple[str, SchedulerJobState | None]], now: int) -> None:
        """Rebuild from changelog records (oldest first), then re-arm every timer."""
        for jid, rec in records:
            self.jobs.pop(jid, None)
            self.outcomes.pop(jid, None)
            if self.cold is not None:
                self.cold.discard(jid)
            if rec is None:
                continue
            if rec.spec is None:
                self.outcomes[jid] = (rec.status, rec.finished_at_ms or now)
            else:
                self.jobs[jid] = from_snapshot(rec)
        self._timers.clear()
        self._early.clear()
        self._to_cool.clear()
        for jid, (_, at) in self.outcomes.items():
            self._push(at + self.config.outcome_retention_ms, EXPIRE, jid)
        for job in self.jobs.values():
            if job.next_fire_ms is not None and not job.paused and not job.waiting:
                self._push(job.next_fire_ms, FIRE, job.job_id)
            for run in job.runs.values():
                if run.status == "retry_wait" and run.retry_at_ms is not None:
                    self._push(run.retry_at_ms, RETRY, job.job_id, run.run_id, run.attempt)
                elif run.status == "running":
                    run.last_beat_ms = now  # heartbeats are not persisted: the lease restarts
                    self._push(self._lease_deadline(job, run), LEASE, job.job_id, run.run_id, run.execution)
        self.dirty.clear()


_NOTHING: frozenset[str] = frozenset()


def _waiting(ids: list[str]) -> set[str]:
    """The upstream ids a job waits for; the common "none" is one shared empty frozenset
    (an empty set costs 216 bytes per pending job, and is never added to)."""
    return set(ids) if ids else _NOTHING  # type: ignore[return-value]


def snapshot(job: Job) -> SchedulerJobState:
    return SchedulerJobState(
        job_id=job.job_id, status=job.status, reason=job.reason, spec=job.spec, waiting=sorted(job.waiting),
        downstream=list(job.downstream), next_fire_ms=job.next_fire_ms, attempts=job.attempts, paused=job.paused,
        runs=[SchedulerRunState(run_id=r.run_id, nominal_ms=r.nominal_ms, attempt=r.attempt, execution=r.execution,
                                status=r.status, worker_id=r.worker_id, started_at_ms=r.started_at_ms,
                                retry_at_ms=r.retry_at_ms) for r in job.runs.values()])


def from_snapshot(rec: SchedulerJobState) -> Job:
    assert rec.spec is not None
    return Job(spec=rec.spec, status=rec.status, reason=rec.reason, waiting=_waiting(rec.waiting),
               downstream=list(rec.downstream), next_fire_ms=rec.next_fire_ms, attempts=rec.attempts,
               paused=rec.paused,
               runs={r.run_id: Run(run_id=r.run_id, nominal_ms=r.nominal_ms, attempt=r.attempt, execution=r.execution,
                                   status=r.status, worker_id=r.worker_id, started_at_ms=r.started_at_ms,
                                   retry_at_ms=r.retry_at_ms) for r in rec.runs})
