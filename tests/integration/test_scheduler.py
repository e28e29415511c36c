"""The scheduler on the real broker: timing, retries, DAGs, cancel, dead letters."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from confluent_kafka import Consumer

from harness import InThread, Reporter, Tail, final_status, isolated, statuses
from infra.config import Settings
from infra.kafka import make_producer
from producers.client import JobClient
from scheduler.service import DEFAULT_DISPATCH_LOOKAHEAD_MS, SchedulerService
from scheduler.state import SchedulerConfig
from schemas.events import RunCancelRequested, RunReady, RunStatusChanged

pytestmark = pytest.mark.integration


@pytest.fixture
def env(stack_settings: Settings):  # type: ignore[no-untyped-def]
    s = isolated(stack_settings)
    tail = Tail(s, [s.events_topic, s.ready_topic("default"), s.control_topic])
    client = JobClient(s, user_id="alice")
    yield s, tail, client
    client.close()
    tail.close()


def test_job_runs_once_and_completes(env) -> None:  # type: ignore[no-untyped-def]
    s, tail, client = env
    with InThread(SchedulerService(s)), InThread(Reporter(s)):
        job = client.submit(["echo", "hi"])
        tail.wait_for(lambda ev: final_status(tail, job) == "completed", what="completed")
    assert statuses(tail, job) == ["pending", "queued", "running", "completed"]
    ready = [r for r in tail.of(RunReady) if r.job_id == job]
    assert len(ready) == 1 and ready[0].attempt == 1 and ready[0].user_id == "alice"
    accepted = tail.job_changes()[0]
    assert accepted.spec is not None and accepted.spec.executor.shell.argv == ["echo", "hi"]


def test_delayed_job_fires_in_its_window(env) -> None:  # type: ignore[no-untyped-def]
    s, tail, client = env
    with InThread(SchedulerService(s, config=SchedulerConfig(dispatch_lookahead_ms=0))), InThread(Reporter(s)):
        job = client.submit(["true"], delay="2s")
        tail.wait_for(lambda ev: final_status(tail, job) == "completed", what="completed")
    (ready,) = [r for r in tail.of(RunReady) if r.job_id == job]
    lateness = ready.occurred_at_ms - ready.nominal_ms
    assert 0 <= lateness < 1000, lateness
    assert ready.not_before_ms is None


def test_delayed_job_is_dispatched_ahead_with_its_due_time_by_default(env) -> None:  # type: ignore[no-untyped-def]
    s, tail, client = env
    with InThread(SchedulerService(s)), InThread(Reporter(s)):
        job = client.submit(["true"], delay="2s")
        tail.wait_for(lambda ev: final_status(tail, job) == "completed", what="completed")
    (ready,) = [r for r in tail.of(RunReady) if r.job_id == job]
    assert ready.not_before_ms == ready.nominal_ms
    early = ready.nominal_ms - ready.occurred_at_ms
    assert 0 < early <= DEFAULT_DISPATCH_LOOKAHEAD_MS, early


def test_retry_then_success(env) -> None:  # type: ignore[no-untyped-def]
    s, tail, client = env
    with InThread(SchedulerService(s)), InThread(Reporter(s, lambda r: "failed" if r.attempt < 3 else "succeeded")):
        job = client.submit(["flaky"], retries=3, backoff="100ms", backoff_max="300ms")
        tail.wait_for(lambda ev: final_status(tail, job) == "completed", what="completed")
    ready = [r.attempt for r in tail.of(RunReady) if r.job_id == job]
    assert ready == [1, 2, 3]
    runs = [(e.attempt, e.status) for e in tail.of(RunStatusChanged) if e.job_id == job]
    assert (1, "failed") in runs and (2, "failed") in runs and (3, "succeeded") in runs
    last = [e for e in tail.job_changes() if e.job_id == job][-1]
    assert last.attempts == 3


def test_retries_exhausted_fail_the_job(env) -> None:  # type: ignore[no-untyped-def]
    s, tail, client = env
    with InThread(SchedulerService(s)), InThread(Reporter(s, lambda r: "failed")):
        job = client.submit(["false"], retries=1, backoff="50ms")
        tail.wait_for(lambda ev: final_status(tail, job) == "failed", what="failed")
    assert [r.attempt for r in tail.of(RunReady) if r.job_id == job] == [1, 2]


def test_dag_fan_out_fan_in_with_failure_in_the_middle(env) -> None:  # type: ignore[no-untyped-def]
    s, tail, client = env
    # a -> b (fails), a -> c;  (b, c) -> d -> f;  c -> e
    dag = [
        {"name": "a", "command": ["a"]},
        {"name": "b", "command": ["b"], "after": ["a"]},
        {"name": "c", "command": ["c"], "after": ["a"]},
        {"name": "d", "command": ["d"], "after": ["b", "c"]},
        {"name": "e", "command": ["e"], "after": ["c"]},
        {"name": "f", "command": ["f"], "after": ["d"]},
    ]
    ids = client.submit_dag(dag)
    name_of = {v: k for k, v in ids.items()}
    with InThread(SchedulerService(s)), InThread(Reporter(s, lambda r: "failed" if name_of[r.job_id] == "b" else "succeeded")):
        tail.wait_for(lambda ev: all(final_status(tail, i) in ("completed", "failed") for i in ids.values()),
                      timeout=40, what="every DAG job final")
    got = {n: final_status(tail, i) for n, i in ids.items()}
    assert got == {"a": "completed", "b": "failed", "c": "completed", "d": "failed", "e": "completed", "f": "failed"}
    reasons = {name_of[e.job_id]: e.reason for e in tail.job_changes() if e.status == "failed"}
    assert reasons["d"] == f"upstream_failed: {ids['b']}"
    assert reasons["f"] == f"upstream_failed: {ids['d']}"
    dispatched = Counter(name_of[r.job_id] for r in tail.of(RunReady))
    assert dispatched == Counter({"a": 1, "b": 1, "c": 1, "e": 1})  # d and f never ran
    # order: c ran only after a completed
    order = [name_of[r.job_id] for r in tail.of(RunReady)]
    assert order.index("a") < order.index("c") and order.index("c") < order.index("e")


def test_cancel_pending_never_runs_and_cancel_running_reaches_worker(env) -> None:  # type: ignore[no-untyped-def]
    s, tail, client = env
    with InThread(SchedulerService(s)), InThread(Reporter(s, lambda r: "running")):
        later = client.submit(["sleep", "1"], delay="60s")
        running = client.submit(["sleep", "600"])
        tail.wait_for(lambda ev: "running" in statuses(tail, running), what="running")
        client.cancel(later)
        client.cancel(running)
        tail.wait_for(lambda ev: final_status(tail, later) == "cancelled" and final_status(tail, running) == "cancelled",
                      what="both cancelled")
        tail.wait_for(lambda ev: any(c.job_id == running for c in tail.of(RunCancelRequested)), what="kill request")
    assert not [r for r in tail.of(RunReady) if r.job_id == later]
    (kill,) = [c for c in tail.of(RunCancelRequested) if c.job_id == running]
    assert kill.worker_id == "reporter-1"


def test_garbage_goes_to_dead_letters_and_the_scheduler_carries_on(env) -> None:  # type: ignore[no-untyped-def]
    s, tail, client = env
    p = make_producer(s)
    p.produce(s.commands_topic, key=b"junk", value=b"\x00not avro at all")
    p.produce(s.commands_topic, key=b"junk2", value=b"\xc3\x01" + b"\x11" * 8 + b"body")
    p.flush(10)
    with InThread(SchedulerService(s)), InThread(Reporter(s)):
        job = client.submit(["echo", "after garbage"])
        tail.wait_for(lambda ev: final_status(tail, job) == "completed", what="good job completes")
    dlq = Consumer({"bootstrap.servers": s.kafka_bootstrap, "group.id": "dlq-check", "auto.offset.reset": "earliest",
                    "isolation.level": "read_committed"})
    dlq.subscribe([s.dlq_topic])
    got = []
    for _ in range(50):
        got += [m for m in dlq.consume(10, 0.2) if m.error() is None]
        if len(got) >= 2:
            break
    dlq.close()
    assert sorted(m.key() for m in got) == [b"junk", b"junk2"]
    headers = dict(got[0].headers())
    assert headers["dlq.topic"] == s.commands_topic.encode() and b"single-object" in dict(
        next(m for m in got if m.key() == b"junk").headers())["dlq.error"]
    assert next(m for m in got if m.key() == b"junk").value() == b"\x00not avro at all"


def test_invalid_spec_from_a_direct_producer_is_refused_visibly(env) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from producers.client import build_spec
    from schemas.codec import default_codec
    from schemas.events import JobSubmitted, ScheduleSpec

    s, tail, client = env
    spec = build_spec(["true"], user_id="svc")
    bad = replace(spec, schedule=ScheduleSpec(cron="61 * * * *"))  # bypasses the client's validation
    p = make_producer(s)
    p.produce(s.commands_topic, key=bad.job_id.encode(), value=default_codec().encode(JobSubmitted(user_id="svc", spec=bad)))
    p.flush(10)
    with InThread(SchedulerService(s)):
        tail.wait_for(lambda ev: final_status(tail, bad.job_id) == "failed", what="rejected")
    (ev,) = [e for e in tail.job_changes() if e.job_id == bad.job_id]
    assert ev.reason is not None and "cron" in ev.reason


def test_a_job_due_later_is_filed_cold_restored_cold_and_fires_once(env) -> None:  # type: ignore[no-untyped-def]
    s, tail, client = env
    config = SchedulerConfig(dispatch_lookahead_ms=200, cold_horizon_ms=3000)
    first = SchedulerService(s, config=config)
    with InThread(first), InThread(Reporter(s)):
        job = client.submit(["true"], delay="12s")
        tail.wait_for(lambda ev: statuses(tail, job) == ["pending"], what="pending")
        deadline = time.monotonic() + 10
        while not any(ps.cold is not None and job in ps.cold for ps in list(first.states.values())):
            assert time.monotonic() < deadline, "the job was not filed cold"
            time.sleep(0.05)
    # A new owner reads the changelog: the record is marked cold, so it is filed undecoded.
    second = SchedulerService(s, config=config)
    with InThread(second), InThread(Reporter(s)):
        second.ready.wait(30)
        assert any(ps.cold is not None and job in ps.cold for ps in second.states.values())
        tail.wait_for(lambda ev: final_status(tail, job) == "completed", timeout=30, what="completed")
    ready = [r for r in tail.of(RunReady) if r.job_id == job]
    assert len(ready) == 1 and ready[0].not_before_ms == ready[0].nominal_ms
    assert statuses(tail, job) == ["pending", "queued", "running", "completed"]
