"""The state machine against a small reference model, under random interleavings.

Each example submits a few one-off jobs (now or delayed, with or without retries) and
then mixes worker reports (good, duplicated, stale, future, from a second worker),
heartbeats, cancels, the passage of time and, at random points, a crash of the owner:
a fresh :class:`PartitionState` restored from the compacted changelog.  A twin that never
restores gets the same inputs.  Finally every remaining run is answered and time runs
past every backoff, so every job must end.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producers.client import build_spec
from scheduler.coldstore import MemoryColdStore
from scheduler.state import Output, PartitionState, SchedulerConfig, snapshot
from scheduler.timing import backoff_ms
from schemas.codec import default_codec
from schemas.events import (
    ANY_WORKER,
    TERMINAL_STATUSES,
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
    SchedulerJobState,
    run_id_for,
)

T0 = 1_767_225_600_000
LEASE = 30_000
JOBS = ("a", "b", "c")
WORKERS = ("w1", "w2", "w3")

Kill = tuple[str, str, int]  # worker, run id, attempt


# --------------------------------------------------------------------------- the model


@dataclass
class ModelJob:
    """What should be true of one job, from the inputs alone."""

    spec: JobSpec
    run_id: str | None = None       # the one run of a one-off job, once dispatched
    attempt: int = 0                # of the latest RunReady
    phase: str = "pending"          # pending | queued | running | retry_wait | terminal
    worker: str | None = None       # who runs (or ran) the current attempt
    last_beat: int = 0
    retry_at: int = 0
    terminal: str | None = None

    @property
    def due(self) -> int | None:
        """When time alone will change this job."""
        if self.phase == "pending":
            return self.spec.schedule.at_ms if self.spec.schedule.at_ms is not None else self.spec.submitted_at_ms
        if self.phase == "running":
            return self.last_beat + self.spec.lease_ms
        if self.phase == "retry_wait":
            return self.retry_at
        return None


class Expect:
    """Outputs the model predicts for one step."""

    def __init__(self) -> None:
        self.ready: set[tuple[str, int]] = set()
        self.terminal: dict[str, str] = {}
        self.kills: Counter[Kill] = Counter()


class Model:
    def __init__(self) -> None:
        self.jobs: dict[str, ModelJob] = {}

    # time
    def advance(self, now: int, exp: Expect) -> None:
        while True:
            due = [(j.due, jid) for jid, j in self.jobs.items() if j.due is not None and j.due <= now]
            if not due:
                return
            _, jid = min(due)
            job = self.jobs[jid]
            if job.phase == "pending":
                job.run_id = run_id_for(jid, job.due or 0)
                self._dispatch(jid, job, exp)
            elif job.phase == "running":
                assert job.worker is not None
                exp.kills[(job.worker, job.run_id or "", job.attempt)] += 1
                self._failed(jid, job, now, exp)
            else:  # retry_wait
                self._dispatch(jid, job, exp)

    def _dispatch(self, jid: str, job: ModelJob, exp: Expect) -> None:
        job.attempt += 1
        job.phase = "queued"
        job.worker = None
        exp.ready.add((job.run_id or "", job.attempt))

    def _failed(self, jid: str, job: ModelJob, now: int, exp: Expect) -> None:
        policy = job.spec.retry
        if job.attempt <= policy.max_retries:
            job.phase = "retry_wait"
            job.retry_at = now + backoff_ms(job.attempt, policy.backoff_ms, policy.backoff_max_ms, job.run_id or "")
        else:
            self._end(jid, job, "failed", exp)

    def _end(self, jid: str, job: ModelJob, status: str, exp: Expect) -> None:
        job.phase = "terminal"
        job.terminal = status
        exp.terminal[jid] = status

    # inputs
    def submit(self, spec: JobSpec, now: int, exp: Expect) -> None:
        if spec.job_id in self.jobs:
            return
        self.jobs[spec.job_id] = ModelJob(spec=spec)
        self.advance(now, exp)

    def started(self, jid: str, run_id: str, attempt: int, worker: str, now: int, exp: Expect) -> None:
        job = self.jobs.get(jid)
        if job is None or job.phase in ("terminal", "pending") or run_id != job.run_id or attempt < job.attempt:
            exp.kills[(worker, run_id, attempt)] += 1
            return
        if attempt > job.attempt or job.worker == worker:
            return
        if job.phase == "retry_wait":
            exp.kills[(worker, run_id, attempt)] += 1
            return
        if job.phase == "running":
            assert job.worker is not None
            exp.kills[(job.worker, run_id, attempt)] += 1
        job.phase, job.worker, job.last_beat = "running", worker, now

    def heartbeat(self, jid: str, run_id: str, attempt: int, worker: str, now: int) -> None:
        job = self.jobs.get(jid)
        if job and job.phase == "running" and run_id == job.run_id and attempt == job.attempt and worker == job.worker:
            job.last_beat = now

    def finished(self, jid: str, run_id: str, attempt: int, worker: str, outcome: str, now: int, exp: Expect) -> None:
        job = self.jobs.get(jid)
        if job is None or run_id != job.run_id or attempt != job.attempt:
            return
        accepted = (job.phase == "running" and worker == job.worker) or (job.phase == "queued" and outcome == "refused")
        if not accepted:
            return
        if outcome == "succeeded":
            self._end(jid, job, "completed", exp)
        elif outcome in ("failed", "timed_out"):
            self._failed(jid, job, now, exp)
        else:
            self._end(jid, job, "failed", exp)

    def finished_unannounced(self, jid: str, run_id: str, attempt: int, worker: str, outcome: str, now: int,
                             exp: Expect) -> None:
        """A RunFinished with ``implies_start``: its start, unless stale (no kill then:
        the attempt is over), then the finish."""
        job = self.jobs.get(jid)
        if (job is not None and job.phase in ("queued", "running") and run_id == job.run_id
                and attempt == job.attempt and worker != job.worker):
            if job.phase == "running":
                assert job.worker is not None
                exp.kills[(job.worker, run_id, attempt)] += 1
            job.phase, job.worker, job.last_beat = "running", worker, now
        self.finished(jid, run_id, attempt, worker, outcome, now, exp)

    def cancel(self, jid: str, exp: Expect) -> None:
        job = self.jobs.get(jid)
        if job is None or job.phase == "terminal":
            return
        if job.phase in ("queued", "running", "retry_wait"):
            exp.kills[(job.worker or ANY_WORKER, job.run_id or "", job.attempt)] += 1
        self._end(jid, job, "cancelled", exp)


# ------------------------------------------------------------------------- the system


class Owner:
    """A partition owner that keeps its changelog and may crash and be replaced."""

    def __init__(self, config: SchedulerConfig, *, cold: bool = False) -> None:
        self.config = config
        self.cold = cold
        self.codec = default_codec()
        self.ps = self._new_state()
        self.changelog: dict[str, SchedulerJobState | None] = {}
        #: With a cold store: job id -> due time of the jobs whose last record was written cold.
        self.cold_due: dict[str, int] = {}

    def _new_state(self) -> PartitionState:
        if not self.cold:
            return PartitionState(0, self.config)
        return PartitionState(0, self.config, cold=MemoryColdStore(), decode=self.codec.decode_state)

    def step(self, event: Event | None, now: int) -> list[Output]:
        out = self.ps.fire_due(now) if event is None else self.ps.apply(event, now)
        dirty = self.ps.take_dirty()
        if self.cold:
            encoded = {jid: self.codec.encode(rec) for jid, rec in dirty if rec is not None}
            cooled = self.ps.settle(now, encoded)
            for jid, rec in dirty:
                if jid in cooled:
                    assert rec is not None and rec.next_fire_ms is not None
                    self.cold_due[jid] = rec.next_fire_ms
                else:
                    self.cold_due.pop(jid, None)
        self.changelog.update(dirty)
        return out

    def check_changelog(self) -> None:
        """The changelog says exactly what the state holds (nothing changed unrecorded)."""
        for jid, job in self.ps.jobs.items():
            assert self.changelog.get(jid) == snapshot(job), jid
        for jid, (status, at) in self.ps.outcomes.items():
            rec = self.changelog.get(jid)
            assert rec is not None and rec.spec is None and (rec.status, rec.finished_at_ms) == (status, at), jid
        cold = self.ps.cold if self.ps.cold is not None else ()
        for jid in cold_ids(self.ps):
            assert jid not in self.ps.jobs and self.cold_due.get(jid) is not None, jid
        for jid, rec in self.changelog.items():
            if jid not in self.ps.jobs and jid not in self.ps.outcomes and jid not in cold:
                assert rec is None, jid

    def crash_and_restore(self, now: int) -> None:
        codec = self.codec
        self.ps = self._new_state()
        records = []
        for jid, rec in self.changelog.items():
            due = self.cold_due.get(jid)
            if rec is not None and due is not None and due > now + self.config.cold_horizon_ms:
                assert self.ps.cold is not None
                self.ps.cold.put(jid, due, codec.encode(rec))  # filed cold, not decoded
            else:
                records.append((jid, None if rec is None else codec.decode_state(codec.encode(rec))))
        self.ps.restore(records, now)


def cold_ids(ps: PartitionState) -> list[str]:
    assert ps.cold is None or isinstance(ps.cold, MemoryColdStore)
    return [] if ps.cold is None else ps.cold.ids()


def norm(out: list[Output]) -> Counter[str]:
    return Counter(repr((d, replace(e, event_id=""))) for d, e in out)


class Invariants:
    """Safety properties over everything the system produced."""

    def __init__(self) -> None:
        self.dispatched: set[tuple[str, int]] = set()
        self.last_attempt: dict[str, int] = {}
        self.terminal: dict[str, str] = {}
        self.job_attempts: dict[str, int] = {}
        self.executions: dict[str, int] = {}

    def see(self, out: list[Output]) -> tuple[set[tuple[str, int]], dict[str, str], Counter[Kill]]:
        ready: set[tuple[str, int]] = set()
        ended: dict[str, str] = {}
        kills: Counter[Kill] = Counter()
        for _, e in out:
            if isinstance(e, RunReady):
                key = (e.run_id, e.attempt)
                assert key not in self.dispatched, f"{key} dispatched twice"
                assert e.job_id not in self.terminal, f"{e.run_id} dispatched after {self.terminal.get(e.job_id)}"
                assert e.attempt > self.last_attempt.get(e.run_id, 0), "attempts go up"
                self.dispatched.add(key)
                self.last_attempt[e.run_id] = e.attempt
                ready.add(key)
            elif isinstance(e, (JobStatusChanged, RunStatusChanged)):
                if isinstance(e, RunStatusChanged):
                    assert e.job_id not in self.terminal, "run event after the job ended"
                    assert e.attempt >= self.executions.get(e.run_id, 0), "executions never decrease"
                    self.executions[e.run_id] = e.attempt
                change = e if isinstance(e, JobStatusChanged) else e.job_change()
                if change is not None:  # a job change on its own, or riding on the run's
                    assert change.job_id not in self.terminal, \
                        f"{change.job_id}: {change.status} after {self.terminal[change.job_id]}"
                    assert change.attempts >= self.job_attempts.get(change.job_id, 0), "job attempts never decrease"
                    self.job_attempts[change.job_id] = change.attempts
                    if change.status in TERMINAL_STATUSES:
                        self.terminal[change.job_id] = change.status
                        ended[change.job_id] = change.status
            elif isinstance(e, RunCancelRequested):
                kills[(e.worker_id, e.run_id, e.attempt)] += 1
        return ready, ended, kills


# ---------------------------------------------------------------------------- scenarios

job_params = st.fixed_dictionaries({
    "delay_ms": st.sampled_from([None, 0, 5_000, 60_000, 600_000]),
    "retries": st.integers(0, 2),
    "backoff": st.sampled_from([1_000, 5_000, 20_000]),
})

submit_op = st.tuples(st.just("submit"), st.sampled_from(JOBS), job_params)
advance_op = st.tuples(st.just("advance"), st.sampled_from([0, 1_000, 5_000, 15_000, 31_000, 120_000, 700_000]))
start_op = st.tuples(st.just("start"), st.sampled_from(JOBS), st.sampled_from([0, 0, 0, -1, 1]),
                     st.sampled_from(WORKERS))
beat_op = st.tuples(st.just("beat"), st.sampled_from(JOBS), st.sampled_from([0, 0, -1]), st.sampled_from(WORKERS))
finish_op = st.tuples(st.just("finish"), st.sampled_from(JOBS), st.sampled_from([0, 0, 0, -1]),
                      st.sampled_from(WORKERS),
                      st.sampled_from(["succeeded", "failed", "failed", "timed_out", "refused"]))
#: A worker's RunFinished for an attempt whose start it never reported (``implies_start``).
quick_op = st.tuples(st.just("quick"), st.sampled_from(JOBS), st.sampled_from([0, 0, 0, -1, 1]),
                     st.sampled_from(WORKERS), st.sampled_from(["succeeded", "failed", "timed_out"]))
cancel_op = st.tuples(st.just("cancel"), st.sampled_from(JOBS))
restore_op = st.tuples(st.just("restore"))
#: Reports and time more often than submissions, cancels and crashes.
_BY_KIND = {"submit": submit_op, "advance": advance_op, "start": start_op, "beat": beat_op, "finish": finish_op,
            "quick": quick_op, "cancel": cancel_op, "restore": restore_op}
ops = st.sampled_from(["submit", "advance", "advance", "advance", "start", "start", "start", "beat", "finish",
                       "finish", "finish", "quick", "quick", "cancel", "restore"]).flatmap(_BY_KIND.__getitem__)


class World:
    def __init__(self, *, cold: bool = False) -> None:
        config = SchedulerConfig()
        self.now = T0
        self.model = Model()
        self.twin = Owner(config)      # never restores
        # Restores at random points; with ``cold``, jobs due over 10 s ahead leave memory.
        self.owner = Owner(SchedulerConfig(cold_horizon_ms=10_000), cold=True) if cold else Owner(config)
        self.inv = Invariants()
        self.submitted: set[str] = set()

    def feed(self, event: Event | None, exp: Expect) -> None:
        out_twin = self.twin.step(event, self.now)
        out = self.owner.step(event, self.now)
        assert norm(out) == norm(out_twin), ("restore changed the future", event)
        ready, ended, kills = self.inv.see(out)
        assert ready == exp.ready, ("dispatches", event, ready, exp.ready)
        assert ended == exp.terminal, ("endings", event, ended, exp.terminal)
        assert kills == exp.kills, ("kills", event, kills, exp.kills)
        self.owner.check_changelog()

    def run_ref(self, jid: str, offset: int) -> tuple[str, int]:
        job = self.model.jobs.get(jid)
        if job is None or job.run_id is None:
            return run_id_for(jid, T0 - 1), 1  # no such run
        return job.run_id, max(1, job.attempt + offset) if offset >= 0 else job.attempt + offset

    def do(self, op: tuple[Any, ...]) -> None:
        exp = Expect()
        kind = op[0]
        if kind == "submit":
            _, jid, p = op
            spec = build_spec(["true"], user_id="u", job_id=jid, now=self.now, delay=p["delay_ms"],
                              retries=p["retries"], backoff=p["backoff"], backoff_max=60_000, lease=LEASE)
            self.submitted.add(jid)
            self.model.submit(spec, self.now, exp)
            self.feed(JobSubmitted(user_id="u", spec=spec, occurred_at_ms=self.now), exp)
        elif kind == "advance":
            self.now += op[1]
            self.model.advance(self.now, exp)
            self.feed(None, exp)
        elif kind in ("start", "beat", "finish", "quick"):
            jid, offset, worker = op[1], op[2], op[3]
            run_id, attempt = self.run_ref(jid, offset)
            if attempt < 1:
                return
            common = dict(user_id="u", job_id=jid, run_id=run_id, attempt=attempt, worker_id=worker,
                          occurred_at_ms=self.now)
            event: Event
            if kind == "start":
                self.model.started(jid, run_id, attempt, worker, self.now, exp)
                event = RunStarted(**common)
            elif kind == "beat":
                self.model.heartbeat(jid, run_id, attempt, worker, self.now)
                event = RunHeartbeat(**common)
            elif kind == "quick":
                self.model.finished_unannounced(jid, run_id, attempt, worker, op[4], self.now, exp)
                event = RunFinished(**common, outcome=op[4], started_at_ms=self.now - 1, implies_start=True)
            else:
                self.model.finished(jid, run_id, attempt, worker, op[4], self.now, exp)
                event = RunFinished(**common, outcome=op[4])
            self.feed(event, exp)
        elif kind == "cancel":
            self.model.cancel(op[1], exp)
            self.feed(JobCancelRequested(user_id="u", job_id=op[1], occurred_at_ms=self.now), exp)
        elif kind == "restore":
            # Heartbeats are not in the changelog: a new owner restarts every lease.  Let every
            # running attempt beat now, in all three, so the twin's leases agree with it.
            for jid, job in self.model.jobs.items():
                if job.phase == "running":
                    assert job.worker is not None
                    self.do(("beat", jid, 0, job.worker))
            self.owner.crash_and_restore(self.now)
            self.owner.check_changelog()

    def drain(self, succeed: bool) -> None:
        """Answer every run, let time pass: all jobs must end."""
        for _ in range(40):
            live = {jid: j for jid, j in self.model.jobs.items() if j.phase != "terminal"}
            if not live:
                break
            for jid, job in live.items():
                if job.phase == "queued":
                    self.do(("start", jid, 0, "w1"))
                if job.phase == "running":
                    assert job.worker is not None
                    self.do(("finish", jid, 0, job.worker, "succeeded" if succeed else "failed"))
            self.do(("advance", 120_000))
        assert all(j.phase == "terminal" for j in self.model.jobs.values())
        assert set(self.inv.terminal) == self.submitted
        assert self.owner.ps.jobs == {} and self.twin.ps.jobs == {} and self.owner.ps.live_count == 0
        # A day later the retained outcomes are gone too: tombstones, no timers left.
        self.do(("advance", SchedulerConfig().outcome_retention_ms))
        for owner in (self.owner, self.twin):
            assert owner.ps.outcomes == {} and owner.ps.timer_count == 0
            assert set(owner.changelog) == self.submitted and all(v is None for v in owner.changelog.values())


first_submits = st.lists(submit_op, min_size=1, max_size=3)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(submits=first_submits, script=st.lists(ops, min_size=20, max_size=80), succeed=st.booleans())
def test_state_machine_agrees_with_the_model_and_survives_restores(
        submits: list[tuple[Any, ...]], script: list[tuple[Any, ...]], succeed: bool) -> None:
    world = World()
    for op in [*submits, *script]:
        world.do(op)
    world.drain(succeed)
    # The outcome of each job is what the model says it is.
    assert world.inv.terminal == {jid: j.terminal for jid, j in world.model.jobs.items()}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(submits=first_submits, script=st.lists(ops, min_size=20, max_size=80), succeed=st.booleans())
def test_a_cold_store_changes_nothing_the_system_does(
        submits: list[tuple[Any, ...]], script: list[tuple[Any, ...]], succeed: bool) -> None:
    # The owner files jobs due over 10 s ahead in a cold store and restores them from
    # their undecoded records; its outputs must equal the twin's, which keeps all in memory.
    world = World(cold=True)
    for op in [*submits, *script]:
        world.do(op)
    world.drain(succeed)
    assert world.inv.terminal == {jid: j.terminal for jid, j in world.model.jobs.items()}


@settings(max_examples=60, deadline=None)
@given(delays=st.lists(st.sampled_from([0, 1_000, 30_000, 60_000]), min_size=1, max_size=3),
       restore_after=st.integers(0, 12), succeed=st.booleans())
def test_one_off_jobs_always_end_even_with_a_crash(delays: list[int], restore_after: int, succeed: bool) -> None:
    world = World()
    for jid, delay in zip(JOBS, delays):
        world.do(("submit", jid, {"delay_ms": delay, "retries": 2, "backoff": 1_000}))
    steps = 0
    for _ in range(30):
        for jid in JOBS[: len(delays)]:
            steps += 1
            if steps == restore_after:
                world.do(("restore",))
            job = world.model.jobs[jid]
            if job.phase == "queued":
                world.do(("start", jid, 0, "w2"))
            if job.phase == "running":
                world.do(("finish", jid, 0, "w2", "succeeded" if succeed else "failed"))
        world.do(("advance", 65_000))
    expected = "completed" if succeed else "failed"
    assert world.inv.terminal == {jid: expected for jid in JOBS[: len(delays)]}
    assert all(world.inv.last_attempt[run_id_for(jid, T0 + d)] == (1 if succeed else 3)
               for jid, d in zip(JOBS, delays))
