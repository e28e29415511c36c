"""The partition state machine, one behaviour per test: inputs and time in, outputs out."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any, Callable, TypeVar

import pytest

from producers.client import build_spec
from scheduler.state import (
    COMMANDS,
    CONTROL,
    EVENTS,
    READY,
    Output,
    PartitionState,
    Rejected,
    SchedulerConfig,
)
from scheduler.coldstore import MemoryColdStore
from scheduler.timing import backoff_ms
from schemas.codec import default_codec
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
    UpstreamResolved,
    job_changes,
    run_id_for,
)

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
S = 1000
MIN = 60 * S
HOUR = 60 * MIN
DAY = 24 * HOUR

E = TypeVar("E", bound=Event)


# ------------------------------------------------------------------------------ harness


class Sim:
    """One partition driven by hand; every step's changelog records go to ``changelog``."""

    def __init__(self, config: SchedulerConfig | None = None, now: int = T0) -> None:
        self.ps = PartitionState(7, config)
        self.now = now
        self.changelog: dict[str, SchedulerJobState | None] = {}

    def _step(self, out: list[Output]) -> list[Output]:
        self.changelog.update(self.ps.take_dirty())
        return out

    def spec(self, job_id: str = "job", **options: Any) -> JobSpec:
        return build_spec(["echo", "hi"], user_id="alice", job_id=job_id, now=self.now, **options)

    def submit(self, job_id: str = "job", **options: Any) -> list[Output]:
        return self.submit_spec(self.spec(job_id, **options))

    def submit_spec(self, spec: JobSpec) -> list[Output]:
        return self.apply(JobSubmitted(user_id=spec.user_id, spec=spec, occurred_at_ms=self.now))

    def apply(self, event: Event) -> list[Output]:
        return self._step(self.ps.apply(event, self.now))

    def at(self, t: int) -> list[Output]:
        """Move the clock to ``t`` and fire what is due."""
        assert t >= self.now
        self.now = t
        return self._step(self.ps.fire_due(t))

    # worker reports
    def started(self, run_id: str, attempt: int = 1, worker: str = "w1", job_id: str = "job") -> list[Output]:
        return self.apply(RunStarted(user_id="alice", job_id=job_id, run_id=run_id, attempt=attempt,
                                     worker_id=worker, occurred_at_ms=self.now))

    def beat(self, run_id: str, attempt: int = 1, worker: str = "w1", job_id: str = "job") -> list[Output]:
        return self.apply(RunHeartbeat(user_id="alice", job_id=job_id, run_id=run_id, attempt=attempt,
                                       worker_id=worker, occurred_at_ms=self.now))

    def finished(self, run_id: str, attempt: int = 1, worker: str = "w1", outcome: str = "succeeded",
                 job_id: str = "job", exit_code: int | None = None, reason: str | None = None,
                 implies_start: bool = False, started_at: int | None = None) -> list[Output]:
        return self.apply(RunFinished(user_id="alice", job_id=job_id, run_id=run_id, attempt=attempt,
                                      worker_id=worker, outcome=outcome, exit_code=exit_code, reason=reason,
                                      started_at_ms=self.now if started_at is None else started_at,
                                      finished_at_ms=self.now, occurred_at_ms=self.now, implies_start=implies_start))

    def cancel(self, job_id: str = "job", reason: str | None = None) -> list[Output]:
        return self.apply(JobCancelRequested(user_id="bob", job_id=job_id, reason=reason, occurred_at_ms=self.now))

    def restored(self) -> "Sim":
        """A new owner of the partition, rebuilt from the changelog (through Avro, as in production)."""
        codec = default_codec()
        records = [(jid, None if rec is None else codec.decode_state(codec.encode(rec)))
                   for jid, rec in self.changelog.items()]
        twin = Sim(self.ps.config, self.now)
        twin.ps.restore(records, self.now)
        twin.changelog = dict(self.changelog)
        return twin


def of(out: list[Output], cls: type[E], dest: str | None = None) -> list[E]:
    return [e for d, e in out if isinstance(e, cls) and (dest is None or d == dest)]


def ready(out: list[Output]) -> list[RunReady]:
    rs = of(out, RunReady)
    assert all(d == READY for d, e in out if isinstance(e, RunReady))
    return rs


def job_status(out: list[Output], job_id: str = "job") -> list[str]:
    """The job's status changes, whether on their own or riding on a run event."""
    return [e.status for e in job_changes(e for d, e in out if d == EVENTS) if e.job_id == job_id]


def run_status(out: list[Output]) -> list[tuple[str, int]]:
    """(status, execution number users see) of every run event."""
    return [(e.status, e.attempt) for e in of(out, RunStatusChanged, EVENTS)]


def kills(out: list[Output]) -> list[tuple[str, str, int, str | None]]:
    """(worker, run, attempt, reason) of every kill order."""
    assert all(d == CONTROL for d, e in out if isinstance(e, RunCancelRequested))
    return [(e.worker_id, e.run_id, e.attempt, e.reason) for e in of(out, RunCancelRequested)]


def last_job_event(out: list[Output], job_id: str = "job") -> JobStatusChanged:
    return [e for e in job_changes(e for d, e in out if d == EVENTS) if e.job_id == job_id][-1]


def norm(out: list[Output]) -> Counter[str]:
    """Outputs without their random event ids, as a multiset (same-instant timers may swap order)."""
    return Counter(repr((d, replace(e, event_id=""))) for d, e in out)


RUN0 = run_id_for("job", T0)


# ------------------------------------------------------------------------- one-off jobs


def test_one_off_now_dispatches_immediately_exactly_once() -> None:
    sim = Sim()
    out = sim.submit()
    assert [(d, type(e).__name__) for d, e in out] == [
        (EVENTS, "JobStatusChanged"), (READY, "RunReady"), (EVENTS, "RunStatusChanged")]
    # The job's "queued" rides on the run's "queued": one event, not two.
    queued = of(out, RunStatusChanged)[0]
    assert (queued.status, queued.job_status, queued.job_attempts, queued.job_reason) == ("queued", "queued", 1, None)
    r = ready(out)[0]
    assert (r.job_id, r.run_id, r.attempt, r.nominal_ms) == ("job", RUN0, 1, T0)
    assert (r.queue, r.priority, r.lease_ms, r.name) == ("default", "normal", 30_000, "echo hi")
    assert r.executor.shell is not None and r.executor.shell.argv == ["echo", "hi"]
    pending = of(out, JobStatusChanged)[0]
    assert pending.status == "pending" and pending.spec is not None and pending.spec.job_id == "job"
    assert job_status(out) == ["pending", "queued"]
    assert run_status(out) == [("queued", 1)]
    # Time passing or a duplicate submission dispatches nothing more.
    assert ready(sim.at(T0 + DAY)) == []
    assert sim.submit() == []
    assert sim.ps.timer_count == 0


def test_delayed_job_dispatches_only_when_due() -> None:
    sim = Sim()
    at = T0 + 10 * MIN
    out = sim.submit(delay="10m")
    assert ready(out) == [] and job_status(out) == ["pending"]
    assert last_job_event(out).next_fire_ms == at
    assert sim.ps.next_due_ms() == at
    assert sim.at(at - 1) == []
    out = sim.at(at)
    assert [(r.run_id, r.attempt, r.nominal_ms) for r in ready(out)] == [(run_id_for("job", at), 1, at)]
    assert ready(sim.at(at + HOUR)) == []


def test_late_fire_of_a_delayed_job_still_dispatches_with_its_nominal_time() -> None:
    sim = Sim()
    sim.submit(at=T0 + MIN)
    out = sim.at(T0 + 3 * HOUR)  # the scheduler was away: a one-off job is never "missed"
    assert [(r.nominal_ms, r.occurred_at_ms) for r in ready(out)] == [(T0 + MIN, T0 + 3 * HOUR)]


def test_job_due_in_the_past_dispatches_at_submission() -> None:
    sim = Sim()
    out = sim.submit(at=T0 - HOUR)
    assert [r.nominal_ms for r in ready(out)] == [T0 - HOUR]


def test_success_completes_the_job() -> None:
    sim = Sim()
    sim.submit()
    out = sim.started(RUN0)
    assert run_status(out) == [("running", 1)] and job_status(out) == ["running"]
    assert sim.started(RUN0) == []  # duplicate report
    sim.now += 5 * S
    out = sim.finished(RUN0, exit_code=0)
    assert run_status(out) == [("succeeded", 1)]
    done = last_job_event(out)
    assert (done.status, done.attempts) == ("completed", 1)
    assert "job" not in sim.ps.jobs and sim.ps.outcomes["job"] == ("completed", sim.now)
    assert sim.finished(RUN0) == []  # duplicate report: nothing more


# ------------------------------------------------------------------------------ retries


def test_failures_retry_with_backoff_until_exhausted() -> None:
    sim = Sim()
    sim.submit(retries=2, backoff=1000, backoff_max=10_000)
    sim.started(RUN0)
    for attempt in (1, 2):
        out = sim.finished(RUN0, attempt, outcome="failed", exit_code=1, reason="boom")
        delay = backoff_ms(attempt, 1000, 10_000, RUN0)
        assert run_status(out) == [("failed", attempt)]
        assert of(out, RunStatusChanged)[0].retry_at_ms == sim.now + delay
        assert job_status(out) == ["pending"]
        assert last_job_event(out).reason == f"retry {attempt}/2 after failed (exit code 1)"
        assert sim.at(sim.now + delay - 1) == []  # the backoff is respected
        out = sim.at(sim.now + 1)
        assert [(r.run_id, r.attempt) for r in ready(out)] == [(RUN0, attempt + 1)]
        assert run_status(out) == [("queued", attempt + 1)]
        sim.started(RUN0, attempt + 1)
    out = sim.finished(RUN0, 3, outcome="failed", exit_code=2, reason="boom")
    assert run_status(out) == [("failed", 3)] and of(out, RunStatusChanged)[0].retry_at_ms is None
    failed = last_job_event(out)
    assert (failed.status, failed.attempts, failed.reason) == ("failed", 3, "failed (exit code 2): boom")
    assert ready(sim.at(sim.now + DAY)) == []


def test_success_after_a_retry_completes_with_attempts_counted() -> None:
    sim = Sim()
    sim.submit(retries=3, backoff=500)
    sim.started(RUN0)
    sim.finished(RUN0, outcome="timed_out", reason="after 10s")
    out = sim.at(sim.now + 1000)
    assert [r.attempt for r in ready(out)] == [2]
    sim.started(RUN0, 2, worker="w2")
    out = sim.finished(RUN0, 2, worker="w2")
    assert (last_job_event(out).status, last_job_event(out).attempts) == ("completed", 2)


def test_retry_timer_of_a_cancelled_job_does_nothing() -> None:
    sim = Sim()
    sim.submit(retries=1, backoff=1000)
    sim.started(RUN0)
    sim.finished(RUN0, outcome="failed")
    sim.cancel()
    assert ready(sim.at(sim.now + HOUR)) == []


def test_refused_without_a_start_fails_the_job() -> None:
    # Regression: a worker that may not run an executor answers RunFinished(refused) without
    # ever sending RunStarted (consumers/worker.py).  It used to be fenced out as "not the
    # execution we track", leaving the job queued forever.
    sim = Sim()
    sim.submit(retries=3)
    out = sim.finished(RUN0, worker="w9", outcome="refused", reason="executor 'shell' not allowed on worker w9")
    assert run_status(out) == [("refused", 1)]
    failed = last_job_event(out)
    assert failed.status == "failed"
    assert failed.reason == "refused: executor 'shell' not allowed on worker w9"
    assert "job" not in sim.ps.jobs


def test_refusal_from_another_worker_does_not_end_a_running_attempt() -> None:
    sim = Sim()
    sim.submit()
    sim.started(RUN0, worker="w1")
    assert sim.finished(RUN0, worker="w9", outcome="refused") == []
    assert run_status(sim.finished(RUN0, worker="w1")) == [("succeeded", 1)]


# ---------------------------------------------------------------- redelivery and fencing


def test_second_worker_start_loses_the_first_and_fences_its_reports() -> None:
    sim = Sim()
    sim.submit()
    sim.started(RUN0, worker="w1")
    sim.now += 10 * S
    out = sim.started(RUN0, worker="w2")
    assert run_status(out) == [("lost", 1), ("running", 2)]
    lost, running = of(out, RunStatusChanged)
    assert lost.worker_id == "w1" and "w1 replaced by w2" in (lost.reason or "")
    assert running.worker_id == "w2"
    assert kills(out) == [("w1", RUN0, 1, "superseded")]
    # The first worker's reports no longer count.
    assert sim.beat(RUN0, worker="w1") == []
    assert sim.finished(RUN0, worker="w1", outcome="failed") == []
    assert sim.finished(RUN0, worker="w1") == []
    assert "job" in sim.ps.jobs
    out = sim.finished(RUN0, worker="w2")
    assert run_status(out) == [("succeeded", 2)]
    assert (last_job_event(out).status, last_job_event(out).attempts) == ("completed", 2)


def test_an_attempt_that_ended_before_its_start_was_reported_counts_as_started() -> None:
    sim = Sim()
    sim.submit()
    out = sim.finished(RUN0, worker="w1", implies_start=True, started_at=T0 + 3)
    # One run event, no stale "running": queued -> succeeded, with the start time.
    assert run_status(out) == [("succeeded", 1)]
    (done,) = of(out, RunStatusChanged)
    assert (done.worker_id, done.started_at_ms, done.job_status, done.job_attempts) == ("w1", T0 + 3, "completed", 1)
    assert job_status(out) == ["completed"] and "job" not in sim.ps.jobs
    # Without the flag an unannounced worker's result is fenced, as before.
    sim.submit("other")
    assert sim.finished(run_id_for("other", T0), worker="w1", job_id="other") == []
    assert "other" in sim.ps.jobs


def test_an_implied_start_elsewhere_loses_the_first_worker_and_fails_into_a_retry() -> None:
    sim = Sim()
    sim.submit(retries=1, backoff=1000)
    sim.started(RUN0, worker="w1")
    sim.now += 10 * S
    out = sim.finished(RUN0, worker="w2", outcome="failed", exit_code=3, implies_start=True, started_at=sim.now - 5)
    # Exactly what a RunStarted from w2 and then its RunFinished would have done.
    assert run_status(out) == [("lost", 1), ("failed", 2)]
    assert kills(out) == [("w1", RUN0, 1, "superseded")]
    failed = of(out, RunStatusChanged)[1]
    assert (failed.worker_id, failed.started_at_ms, failed.exit_code) == ("w2", sim.now - 5, 3)
    assert job_status(out) == ["pending"]
    # The first worker's reports no longer count; the retry goes out when due.
    assert sim.finished(RUN0, worker="w1") == []
    assert [r.attempt for r in ready(sim.at(sim.now + 1000))] == [2]
    # A late implied start of the judged attempt judges nothing twice.
    assert sim.finished(RUN0, worker="w3", implies_start=True) == []


def test_an_implied_start_repeats_nothing_a_reported_start_did() -> None:
    sim = Sim()
    sim.submit()
    sim.started(RUN0, worker="w1")
    # The start was reported after all (a race between the two): a plain finish.
    out = sim.finished(RUN0, worker="w1", implies_start=True)
    assert run_status(out) == [("succeeded", 1)] and kills(out) == []


def test_stale_attempt_reports_are_ignored_and_a_stale_start_is_killed() -> None:
    sim = Sim()
    sim.submit(retries=1, backoff=1000)
    sim.started(RUN0, 1, worker="w1")
    sim.finished(RUN0, 1, worker="w1", outcome="failed")
    sim.at(sim.now + 1000)  # attempt 2 dispatched
    sim.started(RUN0, 2, worker="w2")
    assert sim.finished(RUN0, 1, worker="w1", outcome="succeeded") == []
    assert sim.beat(RUN0, 1, worker="w1") == []
    out = sim.started(RUN0, 1, worker="w3")  # a redelivery of attempt 1
    assert kills(out) == [("w3", RUN0, 1, "superseded attempt")]
    assert run_status(out) == [] and job_status(out) == []
    # Attempt 2 is untouched and decides.
    assert run_status(sim.finished(RUN0, 2, worker="w2")) == [("succeeded", 2)]


def test_reports_for_a_finished_or_unknown_job() -> None:
    sim = Sim()
    sim.submit()
    sim.started(RUN0)
    sim.finished(RUN0)
    assert sim.finished(RUN0, outcome="failed") == []
    assert sim.beat(RUN0) == []
    out = sim.started(RUN0, worker="w2")
    assert kills(out) == [("w2", RUN0, 1, "superseded attempt")]
    out = sim.started("ghost@1", job_id="ghost", worker="w5")
    assert kills(out) == [("w5", "ghost@1", 1, "superseded attempt")]
    assert sim.finished("ghost@1", job_id="ghost") == []


def test_report_for_a_future_attempt_is_ignored() -> None:
    sim = Sim()
    sim.submit()
    assert sim.started(RUN0, attempt=5) == []
    assert sim.finished(RUN0, attempt=5) == []
    assert run_status(sim.started(RUN0, attempt=1)) == [("running", 1)]


def test_late_reports_after_a_failed_attempt_do_not_judge_it_twice() -> None:
    # Regression: while a run waited for its retry, the failed attempt's worker could still
    # report (a duplicate, or "cancelled" after our lease-expired kill) and end the job,
    # throwing the remaining retries away.
    sim = Sim()
    sim.submit(retries=2, backoff=10_000)
    sim.started(RUN0)
    sim.finished(RUN0, outcome="failed", exit_code=1)
    assert sim.finished(RUN0, outcome="failed", exit_code=1) == []  # duplicate
    assert sim.finished(RUN0, outcome="cancelled") == []
    assert sim.finished(RUN0, outcome="succeeded") == []
    assert sim.started(RUN0) == []  # duplicate start of the same worker
    out = sim.started(RUN0, worker="w2")  # a redelivery of the failed attempt elsewhere
    assert kills(out) == [("w2", RUN0, 1, "superseded attempt")]
    out = sim.at(sim.now + 10_000)
    assert [r.attempt for r in ready(out)] == [2]


# ------------------------------------------------------------------------- leases


def test_lease_expiry_without_heartbeat_loses_the_attempt_and_retries() -> None:
    sim = Sim()
    sim.submit(retries=1, backoff=1000, lease="30s")
    sim.now += S
    sim.started(RUN0)
    assert sim.at(T0 + S + 30 * S - 1) == []
    out = sim.at(T0 + S + 30 * S)
    assert kills(out) == [("w1", RUN0, 1, "lease expired")]
    assert run_status(out) == [("lost", 1)]
    assert "within the lease" in (of(out, RunStatusChanged)[0].reason or "")
    assert job_status(out) == ["pending"]
    # The worker heard the kill and says so: that must not end the job (its retry is pending).
    assert sim.finished(RUN0, outcome="cancelled", reason="lease expired") == []
    out = sim.at(sim.now + backoff_ms(1, 1000, 300_000, RUN0))
    assert [r.attempt for r in ready(out)] == [2]


def test_lease_expiry_without_retries_fails_the_job() -> None:
    sim = Sim()
    sim.submit(lease="10s")
    sim.started(RUN0)
    out = sim.at(T0 + 10 * S)
    assert run_status(out) == [("lost", 1)]
    assert last_job_event(out).status == "failed"
    assert last_job_event(out).reason is not None and last_job_event(out).reason.startswith("lost")


def test_a_scheduler_behind_on_its_input_declares_no_lease_lost() -> None:
    # Under load the result that keeps a lease may be waiting unread in the backlog: a
    # lagging scheduler must not call the attempt lost; reading the backlog settles it.
    sim = Sim()
    sim.submit(lease="10s")
    sim.started(RUN0)
    sim.now = T0 + 15 * S
    assert sim._step(sim.ps.fire_due(sim.now, check_leases=False)) == []
    out = sim.finished(RUN0, outcome="succeeded", exit_code=0)
    assert run_status(out) == [("succeeded", 1)]
    assert last_job_event(out).status == "completed"


def test_a_lagging_scheduler_still_judges_the_lease_once_caught_up() -> None:
    sim = Sim()
    sim.submit(lease="10s")
    sim.started(RUN0)
    sim.now = T0 + 15 * S
    assert sim._step(sim.ps.fire_due(sim.now, check_leases=False)) == []
    out = sim.at(sim.now + S)  # caught up, and still no word from the worker
    assert run_status(out) == [("lost", 1)]


def test_heartbeats_extend_the_lease() -> None:
    sim = Sim()
    sim.submit(lease="30s")
    sim.started(RUN0)
    for t in range(20, 200, 20):
        sim.now = T0 + t * S
        assert sim.beat(RUN0) == []
        assert sim.at(T0 + t * S + 5 * S) == []
    last_beat = T0 + 180 * S
    assert sim.at(last_beat + 30 * S - 1) == []
    assert run_status(sim.at(last_beat + 30 * S)) == [("lost", 1)]


def test_heartbeats_of_a_queued_run_from_an_unknown_worker_do_nothing() -> None:
    sim = Sim()
    sim.submit(lease="10s")
    assert sim.beat(RUN0, worker="w1") == []
    assert sim.at(T0 + HOUR) == []  # a queued run has no lease: queues may be long
    assert "job" in sim.ps.jobs


def test_timeout_plus_grace_backs_up_a_worker_that_keeps_beating() -> None:
    # The worker enforces the timeout; if it does not (and keeps sending heartbeats), the
    # scheduler declares the attempt lost at timeout + grace.
    sim = Sim(SchedulerConfig(timeout_grace_ms=30 * S))
    sim.submit(timeout="60s", lease="30s")
    sim.started(RUN0)
    for t in range(10, 90, 10):
        sim.now = T0 + t * S
        sim.beat(RUN0)
        assert sim.at(sim.now) == [], t
    assert sim.at(T0 + 90 * S - 1) == []
    out = sim.at(T0 + 90 * S)
    assert run_status(out) == [("lost", 1)]
    assert kills(out) == [("w1", RUN0, 1, "lease expired")]


# ------------------------------------------------------------------------------- cancel


def test_cancel_of_a_pending_job_never_dispatches() -> None:
    sim = Sim()
    sim.submit(delay="1h")
    out = sim.cancel(reason="not needed")
    assert kills(out) == [] and run_status(out) == []
    assert (last_job_event(out).status, last_job_event(out).reason) == ("cancelled", "not needed")
    assert ready(sim.at(T0 + 2 * HOUR)) == []
    assert sim.cancel() == []  # cancelling again is a no-op


def test_cancel_of_a_queued_run_tells_every_worker() -> None:
    sim = Sim()
    sim.submit()
    out = sim.cancel()
    assert kills(out) == [(ANY_WORKER, RUN0, 1, "cancelled by bob")]
    assert run_status(out) == [("cancelled", 1)]
    assert job_status(out) == ["cancelled"]
    # A worker that picks it up anyway is stopped.
    assert kills(sim.started(RUN0)) == [("w1", RUN0, 1, "superseded attempt")]


def test_cancel_of_a_running_run_kills_it_on_its_worker() -> None:
    sim = Sim()
    sim.submit(retries=5)
    sim.started(RUN0, worker="w4")
    out = sim.cancel(reason="user asked")
    assert kills(out) == [("w4", RUN0, 1, "user asked")]
    assert run_status(out) == [("cancelled", 1)]
    assert (last_job_event(out).status, last_job_event(out).reason) == ("cancelled", "user asked")
    # The worker's confirmation changes nothing (no retry, no second verdict).
    assert sim.finished(RUN0, worker="w4", outcome="cancelled") == []
    assert sim.ps.outcomes["job"][0] == "cancelled"
    assert ready(sim.at(T0 + DAY)) == []


def test_cancel_of_an_unknown_job_is_a_no_op() -> None:
    assert Sim().cancel("nobody") == []


# ------------------------------------------------------------------------ recurring jobs


def test_cron_fires_each_nominal_time_and_completes_nothing_by_itself() -> None:
    sim = Sim()
    out = sim.submit(cron="0 * * * *")
    assert ready(out) == [] and last_job_event(out).next_fire_ms == T0 + HOUR
    for h in (1, 2, 3):
        out = sim.at(T0 + h * HOUR)
        run = run_id_for("job", T0 + h * HOUR)
        assert [r.run_id for r in ready(out)] == [run]
        sim.started(run, job_id="job")
        out = sim.finished(run)
        assert job_status(out) == ["pending"] and last_job_event(out).next_fire_ms == T0 + (h + 1) * HOUR
    assert "job" in sim.ps.jobs


def test_crons_sharing_an_expression_compute_their_next_instant_once_per_firing() -> None:
    # Every ``0 * * * *`` job fires at the top of the hour; croniter answering the same
    # question once per job made such a burst slow (60-160 µs each, in one transaction).
    from scheduler.timing import next_cron_ms

    sim = Sim()
    for i in range(200):
        sim.submit(f"cron-{i}", cron="0 * * * *")
    next_cron_ms.cache_clear()
    out = sim.at(T0 + HOUR)
    assert len(ready(out)) == 200
    assert {sim.ps.jobs[f"cron-{i}"].next_fire_ms for i in range(200)} == {T0 + 2 * HOUR}
    info = next_cron_ms.cache_info()
    assert (info.misses, info.hits) == (1, 199)


def test_cron_with_end_completes_after_the_last_run() -> None:
    sim = Sim()
    sim.submit(cron="0 * * * *", overlap="allow", end=T0 + 2 * HOUR + 30 * MIN)
    r1, r2 = run_id_for("job", T0 + HOUR), run_id_for("job", T0 + 2 * HOUR)
    sim.at(T0 + HOUR)
    out = sim.at(T0 + 2 * HOUR)  # the last firing before the end; two runs are active
    assert [r.run_id for r in ready(out)] == [r2] and "completed" not in job_status(out)
    assert sim.ps.next_due_ms() is None
    sim.started(r1)
    sim.started(r2, worker="w2")
    out = sim.finished(r1)
    assert "completed" not in job_status(out)
    out = sim.finished(r2, worker="w2")
    assert job_status(out) == ["completed"] and last_job_event(out).reason == "schedule ended"
    assert ready(sim.at(T0 + DAY)) == []


def test_pause_stops_firing_and_resume_skips_what_was_missed() -> None:
    sim = Sim()
    sim.submit(cron="0 * * * *", overlap="allow", catchup="all")
    r1 = run_id_for("job", T0 + HOUR)
    sim.at(T0 + HOUR)
    sim.started(r1)
    sim.finished(r1)
    sim.now = T0 + HOUR + 10 * MIN
    out = sim.apply(SchedulePaused(user_id="alice", job_id="job", occurred_at_ms=sim.now))
    assert job_status(out) == ["paused"]
    assert sim.apply(SchedulePaused(user_id="alice", job_id="job")) == []  # already paused
    assert ready(sim.at(T0 + 4 * HOUR + 30 * MIN)) == []
    out = sim.apply(ScheduleResumed(user_id="alice", job_id="job", occurred_at_ms=sim.now))
    assert ready(out) == []  # 2h, 3h and 4h are not caught up, whatever the catch-up policy
    assert job_status(out) == ["pending"] and last_job_event(out).next_fire_ms == T0 + 5 * HOUR
    assert sim.at(T0 + 5 * HOUR - 1) == []
    assert [r.nominal_ms for r in ready(sim.at(T0 + 5 * HOUR))] == [T0 + 5 * HOUR]
    assert sim.apply(ScheduleResumed(user_id="alice", job_id="job")) == []  # not paused


def test_pause_while_a_run_is_active_shows_paused_when_it_ends() -> None:
    sim = Sim()
    sim.submit(cron="0 * * * *")
    r1 = run_id_for("job", T0 + HOUR)
    sim.at(T0 + HOUR)
    sim.started(r1)
    assert job_status(sim.apply(SchedulePaused(user_id="alice", job_id="job"))) == []
    out = sim.finished(r1)
    assert job_status(out) == ["paused"]
    assert ready(sim.at(T0 + 10 * HOUR)) == []


def test_resume_before_the_next_fire_does_not_fire_twice() -> None:
    sim = Sim()
    sim.submit(cron="0 * * * *", overlap="allow")
    sim.now = T0 + 10 * MIN
    sim.apply(SchedulePaused(user_id="alice", job_id="job"))
    sim.apply(ScheduleResumed(user_id="alice", job_id="job"))
    out = sim.at(T0 + HOUR)
    assert [r.run_id for r in ready(out)] == [run_id_for("job", T0 + HOUR)]
    assert ready(sim.at(T0 + HOUR + 30 * MIN)) == []


def _busy_cron(overlap: str) -> tuple[Sim, str, str]:
    sim = Sim()
    sim.submit(cron="*/10 * * * *", overlap=overlap, lease="1h")
    first, second = run_id_for("job", T0 + 10 * MIN), run_id_for("job", T0 + 20 * MIN)
    sim.at(T0 + 10 * MIN)
    sim.started(first)
    return sim, first, second


def test_overlap_allow_runs_side_by_side() -> None:
    sim, first, second = _busy_cron("allow")
    out = sim.at(T0 + 20 * MIN)
    assert [r.run_id for r in ready(out)] == [second] and kills(out) == []
    assert run_status(sim.finished(first)) == [("succeeded", 1)]
    sim.started(second, worker="w2")
    assert run_status(sim.finished(second, worker="w2")) == [("succeeded", 1)]


def test_overlap_forbid_skips_while_a_run_is_active() -> None:
    sim, first, second = _busy_cron("forbid")
    out = sim.at(T0 + 20 * MIN)
    assert ready(out) == [] and kills(out) == []
    skipped = of(out, RunStatusChanged)
    assert [(e.run_id, e.status, e.attempt) for e in skipped] == [(second, "skipped", 0)]
    assert "overlap=forbid" in (skipped[0].reason or "")
    sim.finished(first)
    out = sim.at(T0 + 30 * MIN)
    assert [r.run_id for r in ready(out)] == [run_id_for("job", T0 + 30 * MIN)]


def test_overlap_forbid_counts_a_run_waiting_for_its_retry_as_active() -> None:
    sim = Sim()
    sim.submit(cron="*/10 * * * *", overlap="forbid", retries=1, backoff="30m", backoff_max="30m")
    first = run_id_for("job", T0 + 10 * MIN)
    sim.at(T0 + 10 * MIN)
    sim.started(first)
    sim.finished(first, outcome="failed")
    out = sim.at(T0 + 20 * MIN)
    assert ready(out) == [] and run_status(out) == [("skipped", 0)]


def test_overlap_replace_cancels_the_active_run() -> None:
    sim, first, second = _busy_cron("replace")
    out = sim.at(T0 + 20 * MIN)
    assert kills(out) == [("w1", first, 1, f"replaced by the run due at {T0 + 20 * MIN}")]
    assert [(e.run_id, e.status) for e in of(out, RunStatusChanged)] == [(first, "cancelled"), (second, "queued")]
    assert [r.run_id for r in ready(out)] == [second]
    # The replaced run's confirmation is fenced; the job lives on.
    assert sim.finished(first, outcome="cancelled") == []
    assert "job" in sim.ps.jobs


def _gap(catchup: str, window: str = "1d") -> list[RunReady]:
    sim = Sim()
    sim.submit(cron="0 * * * *", overlap="allow", catchup=catchup, catchup_window=window)
    out = sim.at(T0 + 5 * HOUR + 30 * MIN)  # the first fire was due at 1h: 4.5 hours late
    assert sim.ps.next_due_ms() == T0 + 6 * HOUR
    return ready(out)


def test_catchup_skip_runs_none_of_the_missed() -> None:
    assert _gap("skip") == []


def test_catchup_latest_runs_the_last_missed_once() -> None:
    assert [r.nominal_ms for r in _gap("latest")] == [T0 + 5 * HOUR]


def test_catchup_all_runs_every_missed_one_in_order() -> None:
    assert [r.nominal_ms for r in _gap("all")] == [T0 + h * HOUR for h in (1, 2, 3, 4, 5)]


def test_catchup_all_is_bounded_by_the_window() -> None:
    assert [r.nominal_ms for r in _gap("all", window="2h")] == [T0 + 4 * HOUR, T0 + 5 * HOUR]


def test_a_fire_within_the_misfire_grace_is_on_time_even_for_skip() -> None:
    sim = Sim(SchedulerConfig(misfire_grace_ms=MIN))
    sim.submit(cron="0 * * * *", catchup="skip")
    assert [r.nominal_ms for r in ready(sim.at(T0 + HOUR + 59 * S))] == [T0 + HOUR]


def test_catchup_after_a_very_long_gap_still_runs_the_latest() -> None:
    # Regression: all firings since the first missed one were listed before the window was
    # applied; past fires_between's limit of 10 000 the newest (the ones kept) were cut
    # off, so "latest" ran nothing, after ~30 s of cron arithmetic.
    sim = Sim()
    sim.submit(cron="* * * * *", catchup="latest", catchup_window="1h", overlap="allow")
    now = T0 + 8 * DAY + 30 * S
    out = sim.at(now)
    assert [r.nominal_ms for r in ready(out)] == [T0 + 8 * DAY]
    assert sim.ps.next_due_ms() == T0 + 8 * DAY + MIN


def test_catchup_all_after_a_very_long_gap_runs_the_window() -> None:
    sim = Sim()
    sim.submit(cron="* * * * *", catchup="all", catchup_window="1h", overlap="allow")
    now = T0 + 8 * DAY + 30 * S
    got = [r.nominal_ms for r in ready(sim.at(now))]
    assert got == [t for t in range(T0 + 8 * DAY - 59 * MIN, T0 + 8 * DAY + 1, MIN)]


# ------------------------------------------------------------------------- dependencies


def _dep(upstream: str, downstream: str) -> DependencyRegistered:
    return DependencyRegistered(user_id="alice", upstream_id=upstream, downstream_id=downstream)


def _resolved(upstream: str, downstream: str, outcome: str) -> UpstreamResolved:
    return UpstreamResolved(user_id="alice", upstream_id=upstream, downstream_id=downstream, outcome=outcome)


def _answers(out: list[Output]) -> list[tuple[str, str, str]]:
    assert all(d == COMMANDS for d, e in out if isinstance(e, UpstreamResolved))
    return [(e.upstream_id, e.downstream_id, e.outcome) for e in of(out, UpstreamResolved)]


def test_registration_on_a_live_upstream_is_answered_when_it_completes() -> None:
    sim = Sim()
    sim.submit("up", delay="1m")
    assert sim.apply(_dep("up", "down")) == []
    assert sim.apply(_dep("up", "down")) == []  # redelivered: recorded once
    rec = sim.changelog["up"]
    assert rec is not None and rec.downstream == ["down"]
    sim.at(T0 + MIN)
    run = run_id_for("up", T0 + MIN)
    sim.started(run, job_id="up")
    out = sim.finished(run, job_id="up")
    assert _answers(out) == [("up", "down", "completed")]
    ans = of(out, UpstreamResolved)[0]
    assert (ans.run_id, ans.nominal_ms) == (run, T0 + MIN)


@pytest.mark.parametrize(("ending", "outcome"), [("failed", "failed"), ("cancel", "cancelled")])
def test_live_upstream_that_fails_or_is_cancelled_tells_its_downstream(ending: str, outcome: str) -> None:
    sim = Sim()
    sim.submit("up")
    sim.apply(_dep("up", "d1"))
    sim.apply(_dep("up", "d2"))
    run = run_id_for("up", T0)
    sim.started(run, job_id="up")
    out = sim.cancel("up") if ending == "cancel" else sim.finished(run, job_id="up", outcome="failed")
    assert sorted(_answers(out)) == [("up", "d1", outcome), ("up", "d2", outcome)]


@pytest.mark.parametrize("status", ["completed", "failed", "cancelled"])
def test_registration_on_a_finished_upstream_is_answered_from_its_outcome(status: str) -> None:
    sim = Sim()
    sim.submit("up", delay="1h")
    if status == "cancelled":
        sim.cancel("up")
    else:
        sim.at(T0 + HOUR)
        run = run_id_for("up", T0 + HOUR)
        sim.started(run, job_id="up")
        sim.finished(run, job_id="up", outcome="succeeded" if status == "completed" else "failed")
    assert _answers(sim.apply(_dep("up", "late"))) == [("up", "late", status)]


def test_registration_on_an_unknown_upstream_is_answered_unknown() -> None:
    assert _answers(Sim().apply(_dep("nobody", "down"))) == [("nobody", "down", "unknown")]


def test_downstream_waits_for_all_upstreams_then_dispatches() -> None:
    sim = Sim()
    out = sim.submit("down", after=["b", "a"])
    assert ready(out) == []
    assert last_job_event(out, "down").reason == "waiting for a, b"
    regs = of(out, DependencyRegistered, COMMANDS)
    assert sorted((e.upstream_id, e.downstream_id) for e in regs) == [("a", "down"), ("b", "down")]
    assert sim.at(T0 + DAY) == []
    sim.now = T0 + DAY
    assert ready(sim.apply(_resolved("a", "down", "completed"))) == []
    assert sim.apply(_resolved("a", "down", "completed")) == []  # duplicate answer
    assert sim.apply(_resolved("zzz", "down", "failed")) == []  # not something it waits for
    out = sim.apply(_resolved("b", "down", "completed"))
    assert [r.run_id for r in ready(out)] == [run_id_for("down", T0)]
    assert job_status(out, "down")[0] == "pending" and job_status(out, "down")[-1] == "queued"


def test_delayed_downstream_keeps_its_time_after_upstreams_complete() -> None:
    sim = Sim()
    sim.submit("down", after=["a"], delay="1h")
    sim.now = T0 + 10 * MIN
    out = sim.apply(_resolved("a", "down", "completed"))
    assert ready(out) == [] and job_status(out, "down") == ["pending"]
    assert sim.at(T0 + HOUR - 1) == []
    assert [r.nominal_ms for r in ready(sim.at(T0 + HOUR))] == [T0 + HOUR]


@pytest.mark.parametrize(("outcome", "status", "reason"), [
    ("failed", "failed", "upstream_failed: a"),
    ("cancelled", "cancelled", "upstream_cancelled: a"),
    ("unknown", "failed", "upstream_unknown: a"),
])
def test_downstream_ends_when_an_upstream_does_not_complete(outcome: str, status: str, reason: str) -> None:
    sim = Sim()
    sim.submit("down", after=["a", "b"])
    sim.apply(_dep("down", "further"))  # a job that waits on the downstream
    out = sim.apply(_resolved("a", "down", outcome))
    assert ready(out) == []
    ev = last_job_event(out, "down")
    assert (ev.status, ev.reason) == (status, reason)
    assert _answers(out) == [("down", "further", status)]  # the failure travels down the DAG
    assert sim.apply(_resolved("b", "down", "completed")) == []
    assert ready(sim.at(T0 + DAY)) == []


# ----------------------------------------------------------------- rejection, retention


def test_invalid_submission_is_rejected_visibly_and_remembered() -> None:
    sim = Sim()
    bad = replace(sim.spec("bad"), priority="urgent")
    with pytest.raises(Rejected, match="rejected: priority must be one of") as info:
        sim.submit_spec(bad)
    outs = info.value.outputs
    assert [(d, e.status) for d, e in outs if isinstance(e, JobStatusChanged)] == [(EVENTS, "failed")]
    assert sim.ps.outcomes["bad"][0] == "failed"
    # The refusal is in the changelog, so a new owner remembers it too.
    dirty = sim.ps.take_dirty()
    assert dirty == [("bad", SchedulerJobState(job_id="bad", status="failed", finished_at_ms=T0))]
    sim.changelog.update(dirty)
    for owner in (sim, sim.restored()):
        assert _answers(owner.apply(_dep("bad", "down"))) == [("bad", "down", "failed")]
        assert owner.submit_spec(bad) == []  # known: a resubmission is not judged again


def test_events_the_scheduler_does_not_consume_are_rejected() -> None:
    sim = Sim()
    sim.submit()
    r = ready(sim.submit("other"))[0]
    with pytest.raises(Rejected, match="does not consume RunReady"):
        sim.apply(r)


def test_outcome_retention_expires_into_a_tombstone() -> None:
    sim = Sim(SchedulerConfig(outcome_retention_ms=HOUR))
    sim.submit()
    sim.started(RUN0)
    sim.now = T0 + MIN
    sim.finished(RUN0)
    rec = sim.changelog["job"]
    assert rec is not None and (rec.status, rec.spec, rec.finished_at_ms) == ("completed", None, T0 + MIN)
    sim.ps.fire_due(T0 + MIN + HOUR - 1)
    assert sim.ps.take_dirty() == [] and sim.ps.outcomes == {"job": ("completed", T0 + MIN)}
    sim.ps.fire_due(T0 + MIN + HOUR)
    assert sim.ps.take_dirty() == [("job", None)]
    assert sim.ps.outcomes == {}
    sim.now = T0 + MIN + HOUR
    assert _answers(sim.apply(_dep("job", "late"))) == [("job", "late", "unknown")]


def test_take_dirty_reports_each_change_once() -> None:
    sim = Sim()
    sim.ps.apply(JobSubmitted(user_id="alice", spec=sim.spec()), T0)
    first = sim.ps.take_dirty()
    assert [(jid, rec.status if rec else None) for jid, rec in first] == [("job", "queued")]
    assert first[0][1] is not None and [r.run_id for r in first[0][1].runs] == [RUN0]
    assert sim.ps.take_dirty() == []


# -------------------------------------------------------------------------------- restore


def _same_future(a: Sim, b: Sim, steps: list[Callable[[Sim], list[Output]]]) -> None:
    """Drive both with the same inputs; their outputs must agree step by step."""
    for step in steps:
        out_a, out_b = step(a), step(b)
        assert norm(out_a) == norm(out_b), step


def test_restore_reproduces_the_future_of_every_kind_of_job() -> None:
    sim = Sim(SchedulerConfig(outcome_retention_ms=6 * HOUR))
    # running, with retries left
    sim.submit("run", retries=2, backoff="10s", lease="30s")
    sim.started(run_id_for("run", T0), job_id="run")
    # waiting for its retry
    sim.submit("retry", retries=2, backoff="20m", backoff_max="20m")
    sim.started(run_id_for("retry", T0), job_id="retry")
    sim.finished(run_id_for("retry", T0), job_id="retry", outcome="failed")
    # delayed, recurring, paused recurring, waiting for an upstream, queued and never started
    sim.submit("later", delay="45m")
    sim.submit("cron", cron="*/20 * * * *", overlap="forbid")
    sim.submit("paused", cron="*/20 * * * *")
    sim.apply(SchedulePaused(user_id="alice", job_id="paused"))
    sim.submit("down", after=["later"])
    sim.apply(_dep("later", "down"))
    sim.submit("queued")
    # finished: a retained outcome
    sim.submit("done")
    sim.started(run_id_for("done", T0), job_id="done")
    sim.finished(run_id_for("done", T0), job_id="done")
    sim.now = T0 + 5 * MIN
    sim.beat(run_id_for("run", T0), job_id="run")
    assert sim.at(sim.now) == []

    twin = sim.restored()
    assert twin.ps.jobs.keys() == sim.ps.jobs.keys() and twin.ps.outcomes == sim.ps.outcomes

    def at(t: int) -> Callable[[Sim], list[Output]]:
        return lambda s: s.at(t)

    rr, qq, ll = run_id_for("run", T0), run_id_for("queued", T0), run_id_for("later", T0 + 45 * MIN)
    _same_future(sim, twin, [
        at(T0 + 20 * MIN),  # the cron fires; "run" lost its lease (last beat at 5m); "retry" retries
        lambda s: s.finished(rr, job_id="run", outcome="cancelled"),  # confirmation of the kill: ignored
        at(T0 + 25 * MIN),  # "run" retries
        at(T0 + 40 * MIN),  # the cron again: skipped, its first run is still queued
        lambda s: s.started(qq, job_id="queued", worker="w7"),
        lambda s: s.finished(qq, job_id="queued", worker="w7"),
        at(T0 + 45 * MIN),  # "later" fires
        lambda s: s.started(ll, job_id="later"),
        lambda s: s.finished(ll, job_id="later"),  # answers "down"
        lambda s: s.apply(_resolved("later", "down", "completed")),  # "down" dispatches
        lambda s: s.apply(ScheduleResumed(user_id="alice", job_id="paused")),
        lambda s: s.apply(_dep("done", "late")),
        at(T0 + 2 * HOUR),
        at(T0 + 7 * HOUR),  # retained outcomes expire
        lambda s: s.apply(_dep("done", "later-still")),
    ])
    assert twin.ps.jobs.keys() == sim.ps.jobs.keys()
    assert twin.ps.outcomes == sim.ps.outcomes
    assert twin.changelog == sim.changelog


def test_restore_restarts_the_lease_of_a_running_attempt() -> None:
    sim = Sim()
    sim.submit(lease="30s")
    sim.started(RUN0)
    sim.now = T0 + 20 * S
    twin = sim.restored()  # heartbeats are not persisted: the new owner gives a full lease
    assert twin.at(T0 + 50 * S - 1) == []
    out = twin.at(T0 + 50 * S)
    assert run_status(out) == [("lost", 1)] and kills(out) == [("w1", RUN0, 1, "lease expired")]


def test_restore_keeps_fencing_and_counting() -> None:
    sim = Sim()
    sim.submit(retries=1, backoff="1s")
    sim.started(RUN0, worker="w1")
    sim.started(RUN0, worker="w2")  # w1 lost, execution 2
    twin = sim.restored()
    assert twin.finished(RUN0, worker="w1") == []
    out = twin.finished(RUN0, worker="w2", outcome="failed")
    assert run_status(out) == [("failed", 2)]
    out = twin.at(twin.now + 1000)
    assert [(r.attempt) for r in ready(out)] == [2]
    assert run_status(out) == [("queued", 3)]


def test_restore_applies_tombstones_and_later_records() -> None:
    sim = Sim()
    sim.submit("a")
    rec_a = sim.changelog["a"]
    ps = PartitionState(0)
    ps.restore([("a", rec_a), ("gone", SchedulerJobState(job_id="gone", status="completed", finished_at_ms=T0)),
                ("gone", None), ("a", None), ("a", rec_a)], T0)
    assert set(ps.jobs) == {"a"} and ps.outcomes == {}
    assert ps.take_dirty() == []


# ------------------------------------------------------------- dispatch ahead of due time

AHEAD = 500


def ahead_sim() -> Sim:
    return Sim(SchedulerConfig(dispatch_lookahead_ms=AHEAD))


def test_lookahead_dispatches_a_delayed_job_early_with_its_due_time() -> None:
    sim = ahead_sim()
    at = T0 + 10 * MIN
    sim.submit(delay="10m")
    assert sim.ps.next_due_ms() == at - AHEAD  # when the scheduler must wake, not the due time
    assert sim.at(at - AHEAD - 1) == []
    out = sim.at(at - AHEAD)
    [r] = ready(out)
    assert (r.run_id, r.nominal_ms, r.not_before_ms, r.occurred_at_ms) == (run_id_for("job", at), at, at, at - AHEAD)
    assert job_status(out) == ["queued"]
    assert ready(sim.at(at)) == [] and ready(sim.at(at + HOUR)) == []  # once


def test_lookahead_leaves_not_before_unset_when_dispatch_is_not_early() -> None:
    sim = ahead_sim()
    [r] = ready(sim.submit())  # due now
    assert r.not_before_ms is None
    sim2 = ahead_sim()
    sim2.submit(at=T0 + MIN)
    [late] = ready(sim2.at(T0 + 2 * MIN))  # the scheduler was away: due is in the past
    assert late.not_before_ms is None


def test_lookahead_fires_a_job_due_within_it_at_submission() -> None:
    sim = ahead_sim()
    out = sim.submit(at=T0 + 200)
    assert ready(out) == []  # the submission's own step only arms the timer...
    [r] = ready(sim.at(T0))  # ...which the same scheduler step's timer pass takes at once
    assert r.not_before_ms == T0 + 200


def test_lookahead_dispatches_retries_early_with_the_retry_time() -> None:
    sim = ahead_sim()
    sim.submit(retries=1, backoff=10_000, backoff_max=10_000)
    sim.started(RUN0)
    out = sim.finished(RUN0, outcome="failed")
    retry_at = of(out, RunStatusChanged)[0].retry_at_ms
    assert retry_at is not None and sim.ps.next_due_ms() == retry_at - AHEAD
    assert ready(sim.at(retry_at - AHEAD - 1)) == []
    [r] = ready(sim.at(retry_at - AHEAD))
    assert (r.attempt, r.not_before_ms, r.nominal_ms) == (2, retry_at, T0)


def test_lookahead_cron_fires_each_time_once_and_computes_the_next_from_the_due_time() -> None:
    sim = ahead_sim()
    sim.submit(cron="0 * * * *", overlap="allow")
    for h in (1, 2, 3):
        due = T0 + h * HOUR
        [r] = ready(sim.at(due - AHEAD))
        assert (r.nominal_ms, r.not_before_ms) == (due, due)
        assert ready(sim.at(due)) == []
        assert sim.ps.jobs["job"].next_fire_ms == due + HOUR


def test_lookahead_judges_overlap_forbid_at_the_due_time_not_before() -> None:
    sim = Sim(SchedulerConfig(dispatch_lookahead_ms=AHEAD))
    sim.submit(cron="*/10 * * * *", overlap="forbid", lease="1h")
    first, second = run_id_for("job", T0 + 10 * MIN), run_id_for("job", T0 + 20 * MIN)
    sim.at(T0 + 10 * MIN - AHEAD)
    sim.now = T0 + 10 * MIN
    sim.started(first)
    # The first run is still active when the second is within the lookahead: not dispatched
    # early, and not skipped yet either: the run may end before the second is due.
    out = sim.at(T0 + 20 * MIN - AHEAD)
    assert ready(out) == [] and run_status(out) == []
    sim.now = T0 + 20 * MIN - 100
    sim.finished(first)
    [r] = ready(sim.at(T0 + 20 * MIN))  # judged on time: nothing active, so it runs
    assert (r.run_id, r.not_before_ms) == (second, None)


def test_lookahead_timers_survive_a_restore() -> None:
    sim = ahead_sim()
    sim.submit(at=T0 + MIN)
    twin = sim.restored()
    assert twin.ps.next_due_ms() == T0 + MIN - AHEAD
    [r] = ready(twin.at(T0 + MIN - AHEAD))
    assert r.not_before_ms == T0 + MIN


def test_lookahead_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="dispatch_lookahead_ms"):
        SchedulerConfig(dispatch_lookahead_ms=-1)


# ------------------------------------------------------------------------- cold jobs

HORIZON = MIN


class ColdSim(Sim):
    """A partition with a cold store, settled after every step as the service does."""

    def __init__(self, config: SchedulerConfig | None = None, now: int = T0) -> None:
        super().__init__(config or SchedulerConfig(cold_horizon_ms=HORIZON), now)
        codec = default_codec()
        self.codec = codec
        self.ps = PartitionState(7, self.ps.config, cold=MemoryColdStore(), decode=codec.decode_state)
        #: job id -> (encoded record, cold due time or None), as written to the changelog.
        self.written: dict[str, tuple[bytes | None, int | None]] = {}

    def _step(self, out: list[Output]) -> list[Output]:
        dirty = self.ps.take_dirty()
        encoded = {jid: self.codec.encode(rec) for jid, rec in dirty if rec is not None}
        cooled = self.ps.settle(self.now, encoded)
        for jid, rec in dirty:
            self.changelog[jid] = rec
            self.written[jid] = (encoded.get(jid), rec.next_fire_ms if jid in cooled and rec else None)
        return out

    def restored(self) -> "ColdSim":
        twin = ColdSim(self.ps.config, self.now)
        hot = []
        for jid, (data, cold_due) in self.written.items():
            if data is not None and cold_due is not None and cold_due > self.now + HORIZON:
                twin.ps.cold.put(jid, cold_due, data)  # type: ignore[union-attr]
            else:
                hot.append((jid, None if data is None else self.codec.decode_state(data)))
        twin.ps.restore(hot, self.now)
        twin.changelog, twin.written = dict(self.changelog), dict(self.written)
        return twin


def test_a_job_due_beyond_the_horizon_leaves_memory_and_fires_on_time_once() -> None:
    sim = ColdSim()
    at = T0 + HOUR
    out = sim.submit(at=at)
    assert job_status(out) == ["pending"]
    assert "job" not in sim.ps.jobs and "job" in sim.ps.cold  # type: ignore[operator]
    assert sim.ps.live_count == 1 and sim.ps.next_due_ms() == at - HORIZON
    assert sim.at(at - HORIZON - 1) == []
    assert sim.at(at - HORIZON) == [] and "job" in sim.ps.jobs  # back in memory, its timer armed
    assert sim.ps.next_due_ms() == at
    [r] = ready(sim.at(at))
    assert (r.run_id, r.nominal_ms) == (run_id_for("job", at), at)
    assert ready(sim.at(at + HOUR)) == []


def test_a_job_due_within_the_horizon_stays_in_memory() -> None:
    sim = ColdSim()
    sim.submit(at=T0 + HORIZON - 1)
    assert "job" in sim.ps.jobs and len(sim.ps.cold) == 0  # type: ignore[arg-type]


def test_commands_reach_a_cold_job() -> None:
    sim = ColdSim()
    sim.submit(at=T0 + HOUR)
    assert sim.submit(at=T0 + 2 * HOUR) == []  # the same id again: already known
    out = sim.cancel()
    assert job_status(out) == ["cancelled"] and sim.ps.live_count == 0
    assert ready(sim.at(T0 + 2 * HOUR)) == []


def test_pause_and_resume_of_a_cold_recurring_job() -> None:
    sim = ColdSim()
    sim.submit(cron="0 */6 * * *")  # next firing 6 h ahead: cold
    assert "job" in sim.ps.cold  # type: ignore[operator]
    out = sim.apply(SchedulePaused(user_id="alice", job_id="job", occurred_at_ms=sim.now))
    assert job_status(out) == ["paused"] and "job" in sim.ps.jobs
    assert ready(sim.at(T0 + 7 * HOUR)) == []
    sim.apply(ScheduleResumed(user_id="alice", job_id="job", occurred_at_ms=sim.now))
    assert "job" in sim.ps.cold  # type: ignore[operator]
    [r] = ready(sim.at(T0 + 12 * HOUR))
    assert r.nominal_ms == T0 + 12 * HOUR


def test_a_downstream_registering_on_a_cold_upstream_is_told_its_outcome() -> None:
    sim = ColdSim()
    sim.submit("up", at=T0 + HOUR)
    out = sim.submit("down", after=["up"])
    [reg] = of(out, DependencyRegistered)
    assert sim.apply(reg) == [] and "up" in sim.ps.jobs  # warmed, the dependency recorded
    [r] = ready(sim.at(T0 + HOUR))
    sim.started(r.run_id, job_id="up")
    out = sim.finished(r.run_id, job_id="up")
    assert [(u.downstream_id, u.outcome) for u in of(out, UpstreamResolved)] == [("down", "completed")]


def test_cold_jobs_are_restored_without_being_decoded_and_fire_the_same() -> None:
    sim = ColdSim()
    for i in range(5):
        sim.submit(f"j{i}", at=T0 + (i + 1) * HOUR)
    sim.submit("soon", at=T0 + 10 * S)
    twin = sim.restored()
    assert set(twin.ps.jobs) == {"soon"} and len(twin.ps.cold) == 5  # type: ignore[arg-type]
    for t in [T0 + 10 * S] + [T0 + (i + 1) * HOUR for i in range(5)]:
        a, b = sim.at(t), twin.at(t)
        assert [(r.run_id, r.nominal_ms) for r in ready(a)] == [(r.run_id, r.nominal_ms) for r in ready(b)]
        assert len(ready(a)) == 1


def test_a_cold_horizon_must_exceed_the_lookahead() -> None:
    with pytest.raises(ValueError, match="cold_horizon_ms"):
        SchedulerConfig(dispatch_lookahead_ms=500, cold_horizon_ms=500)
    with pytest.raises(ValueError, match="decode"):
        PartitionState(0, cold=MemoryColdStore())


def test_many_cold_jobs_coming_due_are_taken_back_a_bounded_number_per_step() -> None:
    from scheduler.state import WARM_PER_STEP

    sim = ColdSim()
    n = WARM_PER_STEP + 20
    for i in range(n):
        sim.submit(f"j{i}", at=T0 + 2 * HORIZON + i)
    assert len(sim.ps.cold) == n  # type: ignore[arg-type]
    sim.at(T0 + HORIZON + n)
    assert len(sim.ps.jobs) == WARM_PER_STEP and len(sim.ps.cold) == 20  # type: ignore[arg-type]
    assert sim.ps.next_due_ms() is not None and sim.ps.next_due_ms() <= sim.now  # more to do at once
    sim.at(sim.now)
    assert len(sim.ps.jobs) == n
    fired = [r.nominal_ms for t in range(n) for r in ready(sim.at(T0 + 2 * HORIZON + t))]
    assert fired == [T0 + 2 * HORIZON + i for i in range(n)]
