"""The worker's pure logic: offset commits, the priority buffer, pausing, log chunking."""

from __future__ import annotations

import dataclasses
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from consumers.executors import Executor, Outcome, RunContext
from consumers.logstream import LogStream
from consumers.worker import (
    ANY_WORKER,
    DEFAULT_ALLOW,
    HeldRuns,
    JobThreads,
    OffsetTracker,
    ReadyBuffer,
    Record,
    Worker,
    new_worker_id,
    paused_priorities,
    worker_group_id,
)
from infra.config import Settings
from schemas.codec import default_codec
from schemas.events import (
    ExecutorSpec,
    LogChunk,
    PythonSpec,
    RunCancelRequested,
    RunFinished,
    RunHeartbeat,
    RunReady,
    RunStarted,
)

TP_A = ("jobs.ready.default", 0)
TP_B = ("jobs.ready.default.high", 3)


# --- offsets -------------------------------------------------------------------------------


def test_commits_only_below_the_lowest_unfinished_offset() -> None:
    t = OffsetTracker()
    epochs = {o: t.track(TP_A, o) for o in (10, 11, 12, 13)}
    assert t.committable() == {TP_A: 10}  # nothing finished: the group position stays
    t.finish(TP_A, 11, epochs[11])
    t.finish(TP_A, 13, epochs[13])
    assert t.committable() == {TP_A: 10}  # 10 still running: 11 and 13 must wait
    t.finish(TP_A, 10, epochs[10])
    assert t.committable() == {TP_A: 12}
    t.committed(TP_A, 12)
    assert t.committable() == {}  # nothing new since the last commit
    t.finish(TP_A, 12, epochs[12])
    assert t.committable() == {TP_A: 14}


def test_partitions_are_independent_and_can_be_filtered() -> None:
    t = OffsetTracker()
    ea = t.track(TP_A, 5)
    eb = t.track(TP_B, 100)
    t.finish(TP_A, 5, ea)
    assert t.committable() == {TP_A: 6, TP_B: 100}
    assert t.committable(only={TP_B}) == {TP_B: 100}
    t.finish(TP_B, 100, eb)
    assert t.committable(only={TP_B}) == {TP_B: 101}


def test_a_revoked_partition_is_never_committed_and_old_results_are_ignored() -> None:
    t = OffsetTracker()
    old = t.track(TP_A, 7)
    t.forget([TP_A])
    assert t.committable() == {}
    assert t.finish(TP_A, 7, old) is False  # still running when revoked; finishing later changes nothing
    # The partition comes back and offset 7 is received again (it was never committed).
    new = t.track(TP_A, 7)
    assert new != old
    assert t.finish(TP_A, 7, old) is False  # the earlier run must not finish the new delivery
    assert t.committable() == {TP_A: 7}
    assert t.finish(TP_A, 7, new) is True
    assert t.committable() == {TP_A: 8}


def test_finishing_twice_or_unknown_offsets_is_harmless() -> None:
    t = OffsetTracker()
    e = t.track(TP_A, 1)
    assert t.finish(TP_A, 1, e) is True
    assert t.finish(TP_A, 1, e) is False
    assert t.finish(TP_A, 99, e) is False
    assert t.finish(TP_B, 1, e) is False
    assert t.committable() == {TP_A: 2}


# --- priority buffer and pausing -------------------------------------------------------------------


def _rec(i: int, priority: str, tp: tuple[str, int] = TP_A) -> Record:
    ready = RunReady(user_id="u", job_id=f"j{i}", run_id=f"j{i}@0", attempt=1, name="n", nominal_ms=0,
                     queue="default", priority=priority, executor=ExecutorSpec.of_shell(["true"]))
    return Record(tp=tp, offset=i, epoch=1, priority=priority, ready=ready)


def test_buffer_starts_highest_priority_first_and_fifo_within_a_priority() -> None:
    b = ReadyBuffer()
    for i, p in enumerate(["low", "normal", "low", "normal", "high", "normal", "high"]):
        b.push(_rec(i, p))
    assert b.counts() == {"high": 2, "normal": 3, "low": 2}
    order = [b.pop().offset for _ in range(len(b))]
    assert order == [4, 6, 1, 3, 5, 0, 2]
    assert b.counts() == {"high": 0, "normal": 0, "low": 0}


def test_buffer_drops_records_of_revoked_partitions() -> None:
    b = ReadyBuffer()
    b.push(_rec(1, "normal", TP_A))
    b.push(_rec(2, "high", TP_B))
    b.push(_rec(3, "low", TP_A))
    dropped = b.drop([TP_A])
    assert sorted(r.offset for r in dropped) == [1, 3]
    assert len(b) == 1 and b.counts() == {"high": 1, "normal": 0, "low": 0}
    assert b.pop().offset == 2


def test_held_runs_come_out_when_due_earliest_first_and_go_with_their_partition() -> None:
    h = HeldRuns()
    h.push(3_000, _rec(1, "normal", TP_A))
    h.push(1_000, _rec(2, "low", TP_B))
    h.push(2_000, _rec(3, "high", TP_A))
    assert h.next_due_ms() == 1_000 and len(h) == 3
    assert h.pop_due(999) == []
    assert [r.offset for r in h.pop_due(2_000)] == [2, 3]
    assert h.next_due_ms() == 3_000
    h.push(4_000, _rec(4, "normal", TP_B))
    assert [r.offset for r in h.drop([TP_A])] == [1]
    assert [r.offset for r in h.pop_due(10_000)] == [4] and h.next_due_ms() is None


@pytest.mark.parametrize(
    ("counts", "paused"),
    [
        ({}, set()),
        ({"high": 0, "normal": 3, "low": 0}, set()),
        ({"normal": 4}, {"normal", "low"}),
        ({"low": 4}, {"low"}),  # lows never keep normals or highs from being fetched
        ({"low": 40, "normal": 3}, {"low"}),
        ({"high": 1, "normal": 3}, {"normal", "low"}),
        ({"high": 4}, {"high", "normal", "low"}),  # only a buffer full of highs pauses high
    ],
)
def test_a_priority_pauses_when_the_buffer_holds_prefetch_records_of_it_or_higher(
        counts: dict[str, int], paused: set[str]) -> None:
    assert paused_priorities(counts, 4) == paused


# --- identities and validation ---------------------------------------------------------------------


def test_group_ids_and_worker_ids() -> None:
    assert worker_group_id(Settings(), ["default"]) == "jobsched-workers-default"
    assert worker_group_id(Settings(), ["gpu", "batch", "gpu"]) == "jobsched-workers-batch+gpu"
    assert worker_group_id(Settings(topic_prefix="t1"), ["default"]) == "jobsched-t1-workers-default"
    a, b = new_worker_id(), new_worker_id()
    assert a != b and a.rsplit("-", 2)[1].isdigit()


def test_defaults() -> None:
    w = Worker(Settings())
    assert w.allow == DEFAULT_ALLOW == frozenset({"shell", "http"})
    assert w.group_id == "jobsched-workers-default" and w.concurrency == 4
    assert w.topics == ["jobs.ready.default.high", "jobs.ready.default", "jobs.ready.default.low"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"queues": ()}, "queues must be a non-empty tuple"),
        ({"queues": "default"}, "queues must be a non-empty tuple"),
        ({"queues": ("a b",)}, "queue name 'a b'"),
        ({"concurrency": 0}, "concurrency must be an integer >= 1"),
        ({"concurrency": 2.5}, "concurrency must be an integer >= 1"),
        ({"allow": frozenset()}, "allow must name at least one executor kind"),
        ({"allow": frozenset({"shell", "docker"})}, "unknown executor kind(s) in allow: docker"),
        ({"allow": "shell"}, "allow must be a set of executor kinds"),
        ({"heartbeat_interval": 0}, "heartbeat_interval must be > 0"),
        ({"start_report_delay": -0.1}, "start_report_delay must be >= 0"),
        ({"log_cap_bytes": -1}, "log_cap_bytes must be an integer >= 0"),
        ({"grace": -1}, "grace must be >= 0"),
        ({"worker_id": " "}, "worker_id must be a non-empty string"),
        ({"consumer_overrides": {"enable.auto.commit": True}}, "may not change enable.auto.commit"),
        ({"prefetch": 0}, "prefetch must be an integer >= 1"),
        ({"python_modules": "myjobs"}, "python_modules must be a tuple"),
    ],
)
def test_constructor_rejects_bad_arguments_clearly(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as e:
        Worker(Settings(), **kwargs)  # type: ignore[arg-type]
    assert message in str(e.value)


# --- log chunking -------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


RUN = RunReady(user_id="alice", tenant_id="acme", job_id="j", run_id="j@1", attempt=2, name="n", nominal_ms=1,
               queue="default", priority="normal", executor=ExecutorSpec.of_shell(["true"]))


def _stream(**kw: object) -> tuple[LogStream, list[LogChunk], FakeClock]:
    out: list[LogChunk] = []
    clock = FakeClock()
    return LogStream(RUN, out.append, clock=clock, **kw), out, clock  # type: ignore[arg-type]


def test_chunks_are_bounded_numbered_and_end_with_eof() -> None:
    s, out, _ = _stream(chunk_bytes=10)
    s.write("stdout", b"0123456789abcdefghij-tail")
    assert [c.data for c in out] == ["0123456789", "abcdefghij"]  # full chunks leave at once
    s.close()
    assert [c.data for c in out] == ["0123456789", "abcdefghij", "-tail"]
    assert [c.seq for c in out] == [0, 1, 2]
    assert [c.eof for c in out] == [False, False, True]  # the last chunk carries eof itself
    c = out[0]
    assert (c.job_id, c.run_id, c.attempt, c.user_id, c.tenant_id) == ("j", "j@1", 2, "alice", "acme")
    assert s.kept_bytes == 25 and not s.truncated
    s.write("stdout", b"late")  # after close: ignored
    assert len(out) == 3


def test_an_attempt_with_no_pending_output_ends_with_an_empty_eof_chunk() -> None:
    s, out, _ = _stream(chunk_bytes=4)
    s.write("stdout", b"abcd")  # left as a full chunk at once: nothing pending at close
    s.close()
    assert [(c.stream, c.data, c.eof, c.seq) for c in out] == [("stdout", "abcd", False, 0), ("system", "", True, 1)]
    silent, out2, _ = _stream()
    silent.close()
    assert [(c.stream, c.data, c.eof) for c in out2] == [("system", "", True)]


def test_small_output_is_flushed_after_the_interval() -> None:
    s, out, clock = _stream(flush_interval=0.2)
    s.write("stdout", b"a")
    s.write("stderr", b"b")
    s.flush_due()
    assert out == []
    clock.now += 0.1
    s.write("stdout", b"c")
    s.flush_due()
    assert out == []
    clock.now += 0.15  # 0.25 s after the first byte
    s.flush_due()
    assert sorted((c.stream, c.data) for c in out) == [("stderr", "b"), ("stdout", "ac")]


def test_utf8_split_across_reads_and_invalid_bytes() -> None:
    s, out, _ = _stream(chunk_bytes=4)
    euro = "€".encode()  # 3 bytes
    s.write("stdout", b"ab" + euro[:2])  # a full chunk that ends inside a character
    s.write("stdout", euro[2:] + b"\xff")
    s.close()
    text = "".join(c.data for c in out if c.stream == "stdout")
    assert text == "ab€\ufffd"


def test_cap_keeps_a_prefix_and_says_once_how_much_was_dropped() -> None:
    s, out, _ = _stream(cap_bytes=10, chunk_bytes=4)
    s.write("stdout", b"12345678")
    s.write("stderr", b"abcdef")  # 2 kept, 4 dropped
    for _ in range(100):
        s.write("stdout", b"x" * 1000)
    s.note("[a worker note is outside the cap]")
    s.close()
    kept = "".join(c.data for c in out if c.stream in ("stdout", "stderr"))
    assert sorted(kept) == sorted("12345678ab")
    system = [c.data for c in out if c.stream == "system"]
    assert system == ["[a worker note is outside the cap]",
                      "[output truncated at 10 bytes; 100004 more bytes discarded]"]
    assert [c.eof for c in out][-1] and sum(c.eof for c in out) == 1
    assert out[-1].data.startswith("[output truncated")
    assert s.kept_bytes == 10 and s.discarded_bytes == 100004 and s.truncated


def test_interrupted_attempt_closes_without_eof() -> None:
    s, out, _ = _stream()
    s.write("stdout", b"partial")
    s.note("[interrupted]")
    s.close(eof=False)
    assert [(c.stream, c.data, c.eof) for c in out] == [
        ("stdout", "partial", False), ("system", "[interrupted]", False)]


def test_concurrent_writers_keep_seq_order_equal_to_sink_order() -> None:
    s, out, _ = _stream(chunk_bytes=64)

    def pump(stream: str) -> None:
        for _ in range(500):
            s.write(stream, b"y" * 37)

    threads = [threading.Thread(target=pump, args=(n,)) for n in ("stdout", "stderr")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s.close()
    assert [c.seq for c in out] == list(range(len(out)))
    assert sum(len(c.data) for c in out) == 2 * 500 * 37


# --- the worker's reporting order, with an in-memory producer -------------------------------------------


class FakeProducer:
    """Keeps produced records; acknowledges them only when polled (as librdkafka does)."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self._pending: list[tuple[dict[str, Any], Any]] = []
        self._lock = threading.Lock()

    def produce(self, topic: str, key: bytes | None = None, value: bytes | None = None,
                on_delivery: Any = None) -> None:
        event = default_codec().decode(value)  # type: ignore[arg-type]
        with self._lock:
            unacked = sum(1 for e in self.sent if isinstance(e["event"], LogChunk) and not e["acked"])
            entry = {"topic": topic, "key": key, "event": event, "acked": False, "unacked_chunks_before": unacked}
            self.sent.append(entry)
            self._pending.append((entry, on_delivery))

    def poll(self, timeout: float = 0) -> int:
        with self._lock:
            pending, self._pending = self._pending, []
        for entry, cb in pending:
            entry["acked"] = True
            if cb is not None:
                cb(None, None)
        if not pending and timeout:
            time.sleep(min(timeout, 0.01))
        return len(pending)

    def events(self, kind: type) -> list[Any]:
        return [e["event"] for e in self.sent if isinstance(e["event"], kind)]


def _wait_all(w: Worker, pool: JobThreads, timeout: float = 20.0) -> None:
    """Until every attempt the worker started has ended (as the consuming thread reaps them)."""
    deadline = time.monotonic() + timeout
    while w._running:
        assert time.monotonic() < deadline, "job threads did not finish"
        for token in pool.done(timeout=0.1):
            del w._running[token]
    pool.shutdown(wait=True)


def _run_one(w: Worker, rec_ready: RunReady) -> tuple[FakeProducer, tuple[str, int], int]:
    """Runs one record through the worker's dispatch and job thread (no Kafka)."""
    fake = FakeProducer()
    w._producer = fake  # type: ignore[assignment]
    tp = (w.topics[1], 0)
    epoch = w._tracker.track(tp, 5)
    w._buffer.push(Record(tp=tp, offset=5, epoch=epoch, priority="normal", ready=rec_ready))
    pool = w._pool = JobThreads(w._execute, 1)
    w._dispatch(pool)
    _wait_all(w, pool)
    fake.poll()  # the consuming thread polls the producer: log chunks acknowledged, RunFinished sent
    return fake, tp, epoch


def test_an_attempt_that_ends_within_the_delay_reports_its_start_with_its_end() -> None:
    w = Worker(Settings(topic_prefix="unit"), registry=CollectorRegistry(), worker_id="w-1")
    fake, _, _ = _run_one(w, _ready(ExecutorSpec.of_shell(["true"])))
    assert fake.events(RunStarted) == []
    (fin,) = fake.events(RunFinished)
    assert fin.implies_start and fin.outcome == "succeeded" and fin.started_at_ms is not None
    # The consuming thread, once the delay is over, sends nothing for it either.
    time.sleep(0.25)
    w._report_starts()
    assert fake.events(RunStarted) == [] and not w._unreported


def test_a_start_not_reported_yet_goes_out_before_the_first_heartbeat() -> None:
    # No consuming thread here: the start-report delay never passes, the heartbeat sends it.
    w = Worker(Settings(topic_prefix="unit"), heartbeat_interval=0.2, registry=CollectorRegistry(),
               worker_id="w-1", start_report_delay=30)
    fake, _, _ = _run_one(w, _ready(ExecutorSpec.of_shell(["sh", "-c", "sleep 0.5"])))
    reports = [e["event"] for e in fake.sent if e["topic"] == "unit.reports"]
    assert isinstance(reports[0], RunStarted) and isinstance(reports[1], RunHeartbeat)
    assert len(fake.events(RunStarted)) == 1
    fin = reports[-1]
    assert isinstance(fin, RunFinished) and not fin.implies_start
    assert reports[0].occurred_at_ms == fin.started_at_ms


def _ready(spec: ExecutorSpec) -> RunReady:
    return RunReady(user_id="alice", tenant_id="acme", job_id="j1", run_id="j1@7", attempt=3, name="n",
                    nominal_ms=7, queue="default", priority="normal", executor=spec)


def test_run_finished_is_produced_after_every_log_chunk_is_acknowledged() -> None:
    w = Worker(Settings(topic_prefix="unit"), heartbeat_interval=0.2, registry=CollectorRegistry(),
               worker_id="w-1", start_report_delay=0)
    fake, tp, _ = _run_one(w, _ready(ExecutorSpec.of_shell(
        ["sh", "-c", "for i in 1 2 3 4; do echo line $i; sleep 0.25; done"])))
    events = [e["event"] for e in fake.sent]
    assert isinstance(events[0], RunStarted) and isinstance(events[-1], RunFinished)
    finished = fake.sent[-1]
    assert finished["unacked_chunks_before"] == 0
    assert finished["topic"] == "unit.reports" and finished["key"] == b"j1"
    fin: RunFinished = finished["event"]
    assert (fin.outcome, fin.exit_code, fin.worker_id, fin.attempt, fin.user_id, fin.tenant_id) == (
        "succeeded", 0, "w-1", 3, "alice", "acme")
    chunks = fake.events(LogChunk)
    assert [c.seq for c in chunks] == list(range(len(chunks))) and chunks[-1].eof
    assert len(chunks) >= 3  # streamed while running, not one chunk at the end
    assert "".join(c.data for c in chunks if c.stream == "stdout") == "line 1\nline 2\nline 3\nline 4\n"
    assert all(e["key"] == b"j1@7" and e["topic"] == "unit.logs" for e in fake.sent if isinstance(e["event"], LogChunk))
    assert 3 <= len(fake.events(RunHeartbeat)) <= 6  # every 0.2 s for ~1 s, not per line
    # The offset is finished only when the RunFinished is acknowledged.
    w._drain_events()
    assert w._tracker.committable() == {tp: 5}
    fake.poll()
    w._drain_events()
    assert w._tracker.committable() == {tp: 6}


def test_refused_runs_are_reported_without_starting() -> None:
    w = Worker(Settings(topic_prefix="unit"), registry=CollectorRegistry(), worker_id="w-2")
    spec = ExecutorSpec(kind="python", python=PythonSpec(target="tests.helpers.pyjobs:touch", kwargs_json="{}"))
    fake, tp, _ = _run_one(w, _ready(spec))
    assert [type(e["event"]) for e in fake.sent] == [RunFinished]
    fin = fake.sent[0]["event"]
    assert (fin.outcome, fin.reason) == ("refused", "executor 'python' not allowed on worker w-2")
    fake.poll()
    w._drain_events()
    assert w._tracker.committable() == {tp: 6}


def test_heartbeats_come_at_least_three_times_per_lease() -> None:
    w = Worker(Settings(topic_prefix="unit"), heartbeat_interval=30.0, registry=CollectorRegistry())
    ready = dataclasses.replace(_ready(ExecutorSpec.of_shell(["sleep", "1"])), lease_ms=600)
    fake, _, _ = _run_one(w, ready)
    assert 3 <= len(fake.events(RunHeartbeat)) <= 6  # every 0.2 s, not every 30 s


class _Msg:
    def __init__(self, value: bytes) -> None:
        self._value = value

    def error(self) -> None:
        return None

    def value(self) -> bytes:
        return self._value

    def offset(self) -> int:
        return 0


class FakeControl:
    """The control consumer's side of the worker: hands over some records once."""

    def __init__(self, events: list[RunCancelRequested]) -> None:
        self.msgs = [_Msg(default_codec().encode(e)) for e in events]

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[_Msg]:
        out, self.msgs = self.msgs, []
        return out


def test_a_cancel_for_any_worker_answers_a_queued_attempt_without_running_it(tmp_path: Path) -> None:
    w = Worker(Settings(topic_prefix="unit"), registry=CollectorRegistry(), worker_id="w-3")
    marker = tmp_path / "ran"
    w._poll_control(FakeControl([  # type: ignore[arg-type]
        RunCancelRequested(user_id="alice", job_id="j1", run_id="j1@7", attempt=3, worker_id=ANY_WORKER,
                           reason="cancelled by bob"),
        RunCancelRequested(user_id="alice", job_id="j2", run_id="j2@1", attempt=1, worker_id="w-9"),
    ]))
    fake, tp, _ = _run_one(w, _ready(ExecutorSpec.of_shell(["touch", str(marker)])))
    assert [type(e["event"]) for e in fake.sent] == [RunFinished]
    fin = fake.sent[0]["event"]
    assert (fin.outcome, fin.reason, fin.worker_id) == ("cancelled", "cancelled by bob", "w-3")
    assert not marker.exists()
    assert w._cancelled == {}  # the other worker's request was not remembered
    fake.poll()
    w._drain_events()
    assert w._tracker.committable() == {tp: 6}


class _BrokenExecutor(Executor):
    kind = "shell"

    def execute(self, spec: ExecutorSpec, ctx: RunContext) -> Outcome:
        ctx.log.write("stdout", "about to break\n")
        raise RuntimeError("executor bug")


def test_an_executor_that_raises_fails_the_attempt_and_still_reports() -> None:
    w = Worker(Settings(topic_prefix="unit"), registry=CollectorRegistry(), executors={"shell": _BrokenExecutor()})
    fake, tp, _ = _run_one(w, _ready(ExecutorSpec.of_shell(["true"])))
    fin = fake.events(RunFinished)[0]
    assert (fin.outcome, fin.reason) == ("failed", "worker error: RuntimeError: executor bug")
    assert fake.sent[-1]["unacked_chunks_before"] == 0
    assert "".join(c.data for c in fake.events(LogChunk)) == "about to break\n"
    fake.poll()
    w._drain_events()
    assert w._tracker.committable() == {tp: 6}


def test_attempts_started_together_each_send_their_own_heartbeats() -> None:
    w = Worker(Settings(topic_prefix="unit"), heartbeat_interval=0.2, registry=CollectorRegistry(), concurrency=2)
    fake = FakeProducer()
    w._producer = fake  # type: ignore[assignment]
    tp = (w.topics[1], 0)
    for offset, job in enumerate(("a", "b")):
        ready = dataclasses.replace(_ready(ExecutorSpec.of_shell(["sleep", "0.7"])), job_id=job, run_id=f"{job}@1")
        w._buffer.push(Record(tp=tp, offset=offset, epoch=w._tracker.track(tp, offset), priority="normal",
                              ready=ready))
    pool = w._pool = JobThreads(w._execute, 2)
    w._dispatch(pool)  # both start in one turn of the consuming thread
    assert len(w._running) == 2
    _wait_all(w, pool)
    beats = fake.events(RunHeartbeat)
    assert {b.run_id for b in beats} == {"a@1", "b@1"}
    assert all(b.job_id == b.run_id[0] for b in beats)


class _ReadyMsg(_Msg):
    def __init__(self, value: bytes, topic: str, offset: int) -> None:
        super().__init__(value)
        self._topic, self._offset = topic, offset

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset


def test_a_run_dispatched_ahead_is_held_until_not_before_and_its_offset_not_committed() -> None:
    from schemas.events import now_ms

    w = Worker(Settings(topic_prefix="unit"), registry=CollectorRegistry(), prefetch=1)
    topic = w.topics[1]
    due = now_ms() + 60_000
    ahead = dataclasses.replace(_ready(ExecutorSpec.of_shell(["true"])), not_before_ms=due)
    now = dataclasses.replace(_ready(ExecutorSpec.of_shell(["true"])), run_id="j1@8", not_before_ms=now_ms() - 5)
    w._on_message(_ReadyMsg(default_codec().encode(ahead), topic, 10), accept=True)  # type: ignore[arg-type]
    w._on_message(_ReadyMsg(default_codec().encode(now), topic, 11), accept=True)  # type: ignore[arg-type]
    assert len(w._held) == 1 and w._held.next_due_ms() == due
    assert len(w._buffer) == 1 and w._buffer.pop().ready.run_id == "j1@8"  # already due: not held
    assert w._tracker.committable() == {(topic, 0): 10}  # nothing past the held record
    assert w._held.pop_due(due - 1) == []
    assert [r.ready.run_id for r in w._held.pop_due(due)] == ["j1@7"]


def test_a_failed_commit_offers_the_offsets_again() -> None:
    t = OffsetTracker()
    e = t.track(TP_A, 4)
    t.finish(TP_A, 4, e)
    t.committed(TP_A, 5)  # requested (asynchronously)
    assert t.committable() == {}
    t.commit_failed(TP_A)
    assert t.committable() == {TP_A: 5}
    t.commit_failed(TP_B)  # unknown partition: nothing to do
    assert t.committable() == {TP_A: 5}


def test_job_threads_start_as_needed_return_every_token_and_survive_a_failing_item() -> None:
    seen: list[int] = []
    gate = threading.Event()

    def target(item: int) -> None:
        if item == 3:
            raise RuntimeError("boom")  # a bug in the target: logged, the token still comes back
        gate.wait(5)
        seen.append(item)

    pool = JobThreads(target, 2)
    pool.submit(10, 1)
    pool.submit(11, 2)
    pool.submit(12, 3)  # queued: both threads are busy, and no third is started
    assert len(pool._threads) == 2
    assert pool.done() == []
    gate.set()
    got: list[int] = []
    deadline = time.monotonic() + 10
    while len(got) < 3 and time.monotonic() < deadline:
        got += pool.done(timeout=0.5)
    assert sorted(got) == [10, 11, 12] and sorted(seen) == [1, 2]
    assert pool._busy == 0
    pool.submit(13, 4)  # an idle thread takes it: still two threads
    assert pool.done(timeout=5) == [13] and len(pool._threads) == 2
    pool.shutdown(wait=True, timeout=5)
    assert not any(t.is_alive() for t in pool._threads)


def test_a_run_handed_over_early_starts_on_its_instant_not_before() -> None:
    from schemas.events import now_ms

    w = Worker(Settings(topic_prefix="unit"), registry=CollectorRegistry(), worker_id="w-1")
    due = now_ms() + 300
    fake, _, _ = _run_one(w, dataclasses.replace(_ready(ExecutorSpec.of_shell(["true"])), not_before_ms=due))
    (fin,) = fake.events(RunFinished)
    assert fin.outcome == "succeeded" and fin.started_at_ms is not None
    assert due <= fin.started_at_ms < due + 200


def _start_in_thread(w: Worker, ready: RunReady) -> tuple[FakeProducer, JobThreads]:
    fake = FakeProducer()
    w._producer = fake  # type: ignore[assignment]
    tp = (w.topics[1], 0)
    w._buffer.push(Record(tp=tp, offset=5, epoch=w._tracker.track(tp, 5), priority="normal", ready=ready))
    pool = w._pool = JobThreads(w._execute, 1)
    w._dispatch(pool)
    return fake, pool


def test_a_run_cancelled_while_it_waits_for_its_instant_never_runs() -> None:
    from schemas.events import now_ms

    w = Worker(Settings(topic_prefix="unit"), registry=CollectorRegistry(), worker_id="w-1")
    ready = dataclasses.replace(_ready(ExecutorSpec.of_shell(["sh", "-c", "echo ran"])), not_before_ms=now_ms() + 5000)
    fake, pool = _start_in_thread(w, ready)
    (run,) = w._running.values()
    assert run.ctx.request_stop("cancel", "user asked")
    _wait_all(w, pool, timeout=3)  # well before its instant
    fake.poll()
    (fin,) = fake.events(RunFinished)
    assert (fin.outcome, fin.reason, fin.started_at_ms) == ("cancelled", "user asked", None)
    assert fake.events(RunStarted) == [] and fake.events(LogChunk) == []


def test_a_run_waiting_for_its_instant_at_shutdown_is_left_for_redelivery() -> None:
    from schemas.events import now_ms

    w = Worker(Settings(topic_prefix="unit"), registry=CollectorRegistry(), worker_id="w-1")
    ready = dataclasses.replace(_ready(ExecutorSpec.of_shell(["true"])), not_before_ms=now_ms() + 5000)
    fake, pool = _start_in_thread(w, ready)
    (run,) = w._running.values()
    assert run.ctx.request_stop("shutdown", "worker shutdown")
    _wait_all(w, pool, timeout=3)
    fake.poll()
    assert fake.sent == []  # not run, not reported: the offset stays uncommitted
    w._drain_events()
    assert w._tracker.committable() == {(w.topics[1], 0): 5}  # never past it


@pytest.mark.parametrize("spec", [
    ExecutorSpec.of_shell(["true"]),
    ExecutorSpec(kind="python", python=PythonSpec(target="tests.helpers.pyjobs:add", kwargs_json='{"a": 1, "b": 2}')),
], ids=["shell", "python"])
def test_a_finished_attempt_is_freed_without_the_cycle_collector(spec: ExecutorSpec) -> None:
    # Reference cycles through an attempt's state left every run to the cycle collector:
    # full collections of tens of thousands of objects stalled the worker's threads for
    # up to ~100 ms, and runs due then started that late.
    import gc

    w = Worker(Settings(topic_prefix="unit"), registry=CollectorRegistry(), worker_id="w-1",
               allow=frozenset({"shell", "python"}))
    gc.collect()
    flags = gc.get_debug()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        fake, pool = _start_in_thread(w, _ready(spec))
        run = weakref.ref(next(iter(w._running.values())))
        _wait_all(w, pool)
        fake.poll()  # log chunks acknowledged, RunFinished sent
        time.sleep(0.25)
        w._report_starts()  # the consuming thread lets go of it once the start-report delay is over
        w._drain_events()
        (fin,) = fake.events(RunFinished)
        assert fin.outcome == "succeeded", fin.reason
        gc.collect()
        # Freed, and not by the collector: DEBUG_SAVEALL keeps what it finds in gc.garbage.
        left = sorted({type(o).__name__ for o in gc.garbage if isinstance(o, (Record, RunReady, RunContext, LogStream))})
        assert left == [] and run() is None
    finally:
        gc.set_debug(flags)
        gc.garbage.clear()
