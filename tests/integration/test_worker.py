"""The worker against the real Kafka: RunReady in, reports and log chunks out.

Every test session uses its own topic prefix; every worker configuration its own queue
(hence its own ready topics and consumer group), so the tests never see each other's
records.  A collector thread reads ``<prefix>.reports`` and ``<prefix>.logs`` from the
beginning with ``read_committed`` and the tests wait on what it has seen.
"""

from __future__ import annotations

import http.server
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from prometheus_client import CollectorRegistry

from consumers.executors import group_members
from consumers.worker import Worker
from infra.config import Settings
from infra.kafka import ensure_topics, make_consumer, make_producer
from schemas.codec import default_codec
from schemas.events import (
    ExecutorSpec,
    HttpSpec,
    LogChunk,
    PythonSpec,
    RunCancelRequested,
    RunFinished,
    RunHeartbeat,
    RunReady,
    RunStarted,
    new_id,
    now_ms,
    run_id_for,
)

pytestmark = pytest.mark.integration

QUEUES = ("main", "py", "prio", "long", "stop", "dlq", "instant")
CODEC = default_codec()


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def settings() -> Settings:
    s = Settings(topic_prefix=f"tw{uuid.uuid4().hex[:10]}", partitions=3, ready_partitions=3, queues=QUEUES)
    ensure_topics(s)
    return s


@dataclass
class Seen:
    topic: str
    partition: int
    offset: int
    event: Any  # a decoded event; Any keeps the tests readable
    #: For a RunFinished: the logs topic's high watermarks when the collector read it.
    logs_high: dict[int, int] | None = None


class Collector:
    """Reads reports and logs from the beginning, in a thread; tests wait on it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.consumer = make_consumer(settings, f"test-collector-{uuid.uuid4().hex}")
        tps = []
        for topic in (settings.reports_topic, settings.logs_topic):
            md = self.consumer.list_topics(topic, timeout=10)
            tps += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in md.topics[topic].partitions]
        self.log_partitions = sorted(p.partition for p in tps if p.topic == settings.logs_topic)
        self.consumer.assign(tps)
        self.seen: list[Seen] = []
        self.cond = threading.Condition()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="collector", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            for msg in self.consumer.consume(num_messages=1000, timeout=0.1):
                if msg.error() is not None:
                    continue
                ev = CODEC.decode(msg.value() or b"")
                item = Seen(msg.topic() or "", msg.partition() or 0, msg.offset() or 0, ev)
                if isinstance(ev, RunFinished):
                    item.logs_high = {
                        p: self.consumer.get_watermark_offsets(TopicPartition(self.settings.logs_topic, p),
                                                               timeout=10, cached=False)[1]
                        for p in self.log_partitions
                    }
                with self.cond:
                    self.seen.append(item)
                    self.cond.notify_all()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.consumer.close()

    def select(self, pred: Callable[[Seen], bool]) -> list[Seen]:
        with self.cond:
            return [s for s in self.seen if pred(s)]

    def wait_for(self, pred: Callable[[Seen], bool], *, count: int = 1, timeout: float = 30.0) -> list[Seen]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = [s for s in self.seen if pred(s)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {count} records; have {len(found)}")
                self.cond.wait(left)

    def of_run(self, kind: type, run_id: str) -> list[Any]:
        return [s.event for s in self.select(
            lambda s: isinstance(s.event, kind) and getattr(s.event, "run_id", None) == run_id)]

    def finished(self, ready: RunReady, timeout: float = 30.0) -> Seen:
        return self.wait_for(lambda s: isinstance(s.event, RunFinished) and s.event.run_id == ready.run_id,
                             timeout=timeout)[0]

    def chunks(self, ready: RunReady, *, eof: bool = True) -> list[Seen]:
        """The run's log chunks by seq; with ``eof``, once the final chunk has been read.

        The collector reads two topics; a RunFinished may be read before the chunks that
        were written (and acknowledged) before it.
        """
        if eof:
            self.wait_for(lambda s: isinstance(s.event, LogChunk) and s.event.run_id == ready.run_id and s.event.eof,
                          timeout=10)
        got = self.select(lambda s: isinstance(s.event, LogChunk) and s.event.run_id == ready.run_id)
        return sorted(got, key=lambda s: s.event.seq)


@pytest.fixture(scope="module")
def collector(settings: Settings) -> Iterator[Collector]:
    c = Collector(settings)
    yield c
    c.close()


@dataclass
class Submitted:
    ready: RunReady
    topic: str
    partition: int
    offset: int


class Jobs:
    """Produces RunReady records the way the scheduler does."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.producer = make_producer(settings)

    def submit(self, queue: str, executor: ExecutorSpec, *, priority: str = "normal",
               timeout_ms: int | None = None, name: str = "test", key: str | None = None) -> Submitted:
        job_id = key or new_id()
        nominal = now_ms()
        ready = RunReady(user_id="alice", tenant_id="acme", job_id=job_id, run_id=run_id_for(job_id, nominal),
                         attempt=1, name=name, nominal_ms=nominal, queue=queue, priority=priority,
                         executor=executor, timeout_ms=timeout_ms)
        topic = self.settings.ready_topic(queue, priority)
        where: list[tuple[int | None, int | None]] = []
        self.producer.produce(topic, key=job_id.encode(), value=CODEC.encode(ready),
                              on_delivery=lambda err, msg: where.append((msg.partition(), msg.offset())))
        assert self.producer.flush(10) == 0
        partition, offset = where[0]
        assert partition is not None and offset is not None
        return Submitted(ready, topic, partition, offset)

    def raw(self, topic: str, key: str, value: bytes) -> tuple[int, int]:
        where: list[tuple[int | None, int | None]] = []
        self.producer.produce(topic, key=key.encode(), value=value,
                              on_delivery=lambda err, msg: where.append((msg.partition(), msg.offset())))
        assert self.producer.flush(10) == 0
        partition, offset = where[0]
        assert partition is not None and offset is not None
        return partition, offset

    def cancel(self, started: RunStarted, worker_id: str | None = None) -> None:
        worker_id = worker_id or started.worker_id
        req = RunCancelRequested(user_id="alice", job_id=started.job_id, run_id=started.run_id,
                                 attempt=started.attempt, worker_id=worker_id, reason="user asked")
        self.producer.produce(self.settings.control_topic, key=worker_id.encode(), value=CODEC.encode(req))
        assert self.producer.flush(10) == 0


@pytest.fixture(scope="module")
def jobs(settings: Settings) -> Iterator[Jobs]:
    j = Jobs(settings)
    yield j
    j.producer.flush(10)


class Pool:
    """Workers running in threads; all stopped and joined at the end of the test."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.running: list[tuple[Worker, threading.Event, threading.Thread]] = []
        self.registry = CollectorRegistry()

    def start(self, queue: str, **kwargs: Any) -> Worker:
        kwargs.setdefault("grace", 5.0)
        kwargs.setdefault("heartbeat_interval", 0.5)
        w = Worker(self.settings, queues=(queue,), registry=self.registry, **kwargs)
        stop = threading.Event()
        t = threading.Thread(target=w.run, args=(stop,), name=f"worker-{queue}")
        t.start()
        self.running.append((w, stop, t))
        assert w.ready.wait(20), "worker did not start"
        wait_until(lambda: bool(w.assigned), 20, "worker got no partitions")
        return w

    def stop(self, w: Worker, timeout: float = 30.0) -> None:
        for entry in self.running:
            if entry[0] is w:
                entry[1].set()
                entry[2].join(timeout)
                assert not entry[2].is_alive(), "worker did not stop"
                self.running.remove(entry)
                return

    def stop_all(self) -> None:
        for _, stop, _ in self.running:
            stop.set()
        for _, _, t in self.running:
            t.join(30)
        assert not any(t.is_alive() for _, _, t in self.running), "a worker did not stop"
        self.running.clear()


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.05)


@pytest.fixture(scope="module")
def pool(settings: Settings) -> Iterator[Pool]:
    p = Pool(settings)
    yield p
    p.stop_all()


@pytest.fixture(scope="module")
def main_worker(pool: Pool) -> Worker:
    """Shell and http, the default allow set; concurrency 4."""
    return pool.start("main", concurrency=4)


@pytest.fixture(scope="module")
def py_worker(pool: Pool) -> Worker:
    """Shell and python (tests.helpers only), concurrency 2, 1 MiB log cap."""
    return pool.start("py", concurrency=2, allow=frozenset({"shell", "python"}), log_cap_bytes=1024 * 1024,
                      python_modules=("tests.helpers",))


def shell(script: str, **kw: Any) -> ExecutorSpec:
    return ExecutorSpec.of_shell(["sh", "-c", script], **kw)


def committed(settings: Settings, group_id: str, topic: str, partition: int) -> int:
    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group_id,
                  "enable.auto.commit": False})
    try:
        return c.committed([TopicPartition(topic, partition)], timeout=10)[0].offset
    finally:
        c.close()


# --- shell ---------------------------------------------------------------------------------------


def test_shell_job_streams_stdout_in_order_and_reports_after_its_logs(
        main_worker: Worker, jobs: Jobs, collector: Collector, pool: Pool) -> None:
    sub = jobs.submit("main", shell("i=1; while [ $i -le 4000 ]; do echo line $i; i=$((i+1)); done; echo oops >&2"))
    fin = collector.finished(sub.ready)
    ev: RunFinished = fin.event
    assert (ev.outcome, ev.exit_code, ev.reason) == ("succeeded", 0, None)
    assert (ev.job_id, ev.attempt, ev.user_id, ev.tenant_id, ev.worker_id) == (
        sub.ready.job_id, 1, "alice", "acme", main_worker.worker_id)
    expected = "".join(f"line {i}\n" for i in range(1, 4001))
    assert ev.log_bytes == len(expected) + len("oops\n") and not ev.log_truncated
    assert ev.started_at_ms is not None and ev.finished_at_ms is not None and ev.started_at_ms <= ev.finished_at_ms

    chunks = collector.chunks(sub.ready)
    events = [c.event for c in chunks]
    assert [c.seq for c in events] == list(range(len(events)))
    assert len({c.partition for c in chunks}) == 1  # keyed by run_id
    stdout = [c for c in events if c.stream == "stdout"]
    assert len(stdout) >= 3 and all(len(c.data.encode()) <= 16 * 1024 for c in stdout)
    assert "".join(c.data for c in stdout) == expected
    assert "".join(c.data for c in events if c.stream == "stderr") == "oops\n"
    assert events[-1].eof and not any(c.eof for c in events[:-1])  # the last chunk carries eof itself
    # RunFinished was produced only once every chunk was in Kafka: when the collector read
    # the RunFinished, the logs partition's high watermark was already past all of them.
    assert fin.logs_high is not None
    assert all(c.offset < fin.logs_high[c.partition] for c in chunks)

    # Exactly one start report: a RunStarted, or (the job ended within the start-report
    # delay) the RunFinished standing for it.
    started = collector.of_run(RunStarted, sub.ready.run_id)
    if ev.implies_start:
        assert started == []
    else:
        assert len(started) == 1 and started[0].worker_id == main_worker.worker_id
    labels = {"queue": "main", "executor": "shell", "outcome": "succeeded"}
    assert (pool.registry.get_sample_value("jobsched_worker_runs_finished_total", labels) or 0) >= 1
    assert (pool.registry.get_sample_value("jobsched_worker_run_duration_seconds_count",
                                           {"executor": "shell", "outcome": "succeeded"}) or 0) >= 1


def test_only_an_attempt_still_running_after_the_delay_reports_its_start(
        main_worker: Worker, jobs: Jobs, collector: Collector) -> None:
    assert main_worker.start_report_delay == 0.2
    quick = jobs.submit("main", shell("true"))
    slow = jobs.submit("main", shell("sleep 1"))
    q = collector.finished(quick.ready).event
    assert q.outcome == "succeeded" and q.implies_start
    assert q.started_at_ms is not None and q.finished_at_ms is not None
    assert q.started_at_ms <= q.finished_at_ms < q.started_at_ms + 200
    fin = collector.finished(slow.ready)
    assert fin.event.outcome == "succeeded" and not fin.event.implies_start
    assert collector.of_run(RunStarted, quick.ready.run_id) == []
    (started,) = collector.select(lambda s: isinstance(s.event, RunStarted) and s.event.run_id == slow.ready.run_id)
    # Sent after the delay, before the end, with the time the attempt really started.
    assert started.event.occurred_at_ms == fin.event.started_at_ms
    assert (started.topic, started.partition) == (fin.topic, fin.partition) and started.offset < fin.offset


def test_a_worker_without_start_report_delay_reports_every_start(
        pool: Pool, jobs: Jobs, collector: Collector) -> None:
    w = pool.start("instant", concurrency=2, start_report_delay=0)
    try:
        sub = jobs.submit("instant", shell("true"))
        fin = collector.finished(sub.ready)
        assert fin.event.outcome == "succeeded" and not fin.event.implies_start
        (started,) = collector.select(
            lambda s: isinstance(s.event, RunStarted) and s.event.run_id == sub.ready.run_id)
        assert started.event.worker_id == w.worker_id and started.offset < fin.offset
    finally:
        pool.stop(w)


def test_nonzero_exit_fails_with_its_exit_code(main_worker: Worker, jobs: Jobs, collector: Collector) -> None:
    sub = jobs.submit("main", shell('echo "$JOBSCHED_RUN_ID $JOBSCHED_ATTEMPT"; echo bad >&2; exit 3'))
    ev = collector.finished(sub.ready).event
    assert (ev.outcome, ev.exit_code, ev.reason) == ("failed", 3, "exit code 3")
    chunks = collector.chunks(sub.ready)
    assert [c.event.data for c in chunks if c.event.stream == "stderr"] == ["bad\n"]
    assert [c.event.data for c in chunks if c.event.stream == "stdout"] == [f"{sub.ready.run_id} 1\n"]


def test_timeout_kills_the_whole_process_group(main_worker: Worker, jobs: Jobs, collector: Collector) -> None:
    t0 = time.monotonic()
    sub = jobs.submit("main", shell("echo $$; sleep 60 & echo $!; sleep 60"), timeout_ms=1000)
    ev = collector.finished(sub.ready, timeout=20).event
    assert time.monotonic() - t0 < 10
    assert ev.outcome == "timed_out" and ev.reason == "timed out after 1s"
    assert ev.exit_code == 128 + 15  # the shell died of SIGTERM
    out = "".join(c.event.data for c in collector.chunks(sub.ready) if c.event.stream == "stdout").split()
    pgid, background = int(out[0]), int(out[1])
    assert group_members(pgid) == []
    with pytest.raises(ProcessLookupError):
        _alive_or_raise(background)


def _alive_or_raise(pid: int) -> None:
    """Raise ProcessLookupError unless ``pid`` is a live (non-zombie) process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        raise ProcessLookupError(pid) from None
    if state in ("Z", "X"):
        raise ProcessLookupError(pid)


def test_disallowed_executor_is_refused_and_not_run(
        main_worker: Worker, jobs: Jobs, collector: Collector, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    spec = ExecutorSpec(kind="python", python=PythonSpec(target="tests.helpers.pyjobs:touch",
                                                         kwargs_json=f'{{"path": "{marker}"}}'))
    sub = jobs.submit("main", spec)
    ev = collector.finished(sub.ready).event
    assert ev.outcome == "refused"
    assert ev.reason == f"executor 'python' not allowed on worker {main_worker.worker_id}"
    assert collector.of_run(RunStarted, sub.ready.run_id) == []
    time.sleep(0.3)
    assert not marker.exists()


def test_cancel_request_kills_the_running_attempt(main_worker: Worker, jobs: Jobs, collector: Collector) -> None:
    sub = jobs.submit("main", shell("echo started; sleep 60"))
    started = collector.wait_for(lambda s: isinstance(s.event, RunStarted) and s.event.run_id == sub.ready.run_id)
    # Heartbeats every 0.5 s (not per line) while it runs.
    collector.wait_for(lambda s: isinstance(s.event, RunHeartbeat) and s.event.run_id == sub.ready.run_id,
                       count=2, timeout=10)
    t0 = time.monotonic()
    jobs.cancel(started[0].event)
    ev = collector.finished(sub.ready, timeout=15).event
    assert time.monotonic() - t0 < 8
    assert (ev.outcome, ev.reason) == ("cancelled", "user asked")
    hb = collector.of_run(RunHeartbeat, sub.ready.run_id)
    assert all(h.worker_id == main_worker.worker_id for h in hb)


def test_cancel_request_for_any_worker_kills_the_attempt_too(
        main_worker: Worker, jobs: Jobs, collector: Collector) -> None:
    sub = jobs.submit("main", shell("sleep 60"))
    started = collector.wait_for(lambda s: isinstance(s.event, RunStarted) and s.event.run_id == sub.ready.run_id)
    jobs.cancel(started[0].event, worker_id="*")
    assert collector.finished(sub.ready, timeout=15).event.outcome == "cancelled"


# --- http ----------------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def _answer(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        if self.path == "/ok":
            payload, status = b"hello " + body + b" " + self.headers.get("X-Token", "").encode(), 200
        else:
            payload, status = b"it broke", 500
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    t.join(5)


def test_http_executor_success_and_server_error(
        main_worker: Worker, jobs: Jobs, collector: Collector, http_server: str) -> None:
    ok = jobs.submit("main", ExecutorSpec(kind="http", http=HttpSpec(
        url=http_server + "/ok", method="POST", body="world", headers={"X-Token": "t0k"})))
    bad = jobs.submit("main", ExecutorSpec(kind="http", http=HttpSpec(url=http_server + "/fail")))
    ev = collector.finished(ok.ready).event
    assert ev.outcome == "succeeded"
    chunks = [c.event for c in collector.chunks(ok.ready)]
    assert "".join(c.data for c in chunks if c.stream == "stdout") == "hello world t0k"
    assert any(c.stream == "system" and c.data.startswith("HTTP 200") for c in chunks)
    ev = collector.finished(bad.ready).event
    assert (ev.outcome, ev.reason) == ("failed", "HTTP 500 Internal Server Error")
    assert "".join(c.event.data for c in collector.chunks(bad.ready) if c.event.stream == "stdout") == "it broke"


# --- python, concurrency, log cap -----------------------------------------------------------------


def test_python_executor_runs_allowed_targets(py_worker: Worker, jobs: Jobs, collector: Collector) -> None:
    ok = jobs.submit("py", ExecutorSpec(kind="python", python=PythonSpec(target="tests.helpers.pyjobs:add",
                                                                         kwargs_json='{"a": 2, "b": 3}')))
    boom = jobs.submit("py", ExecutorSpec(kind="python", python=PythonSpec(target="tests.helpers.pyjobs:boom",
                                                                           kwargs_json='{"message": "kaput"}')))
    other = jobs.submit("py", ExecutorSpec(kind="python", python=PythonSpec(target="os:getcwd")))
    assert collector.finished(ok.ready).event.outcome == "succeeded"
    assert any(c.event.data == 'returned: {"sum": 5}\n' for c in collector.chunks(ok.ready))
    ev = collector.finished(boom.ready).event
    assert (ev.outcome, ev.reason) == ("failed", "RuntimeError: kaput")
    assert "Traceback" in "".join(c.event.data for c in collector.chunks(boom.ready) if c.event.stream == "stderr")
    ev = collector.finished(other.ready).event
    assert ev.outcome == "refused" and "'os' is not in this worker's allowed modules" in ev.reason


def test_concurrency_limit_is_respected(py_worker: Worker, jobs: Jobs, collector: Collector,
                                        tmp_path: Path) -> None:
    subs = [jobs.submit("py", shell(f"date +%s%N > {tmp_path}/{i}.start; sleep 0.6; date +%s%N > {tmp_path}/{i}.end"))
            for i in range(6)]
    for s in subs:
        assert collector.finished(s.ready).event.outcome == "succeeded"
    spans = [(int((tmp_path / f"{i}.start").read_text()), int((tmp_path / f"{i}.end").read_text())) for i in range(6)]
    overlap = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert overlap == 2


def test_log_cap_truncates_and_the_worker_carries_on(py_worker: Worker, jobs: Jobs, collector: Collector) -> None:
    total = 50 * 1000 * 1000
    big = jobs.submit("py", shell(f"head -c {total} /dev/zero | tr '\\000' x; echo done >&2"))
    ev = collector.finished(big.ready, timeout=60).event
    cap = 1024 * 1024
    assert ev.outcome == "succeeded" and ev.log_truncated and ev.log_bytes == cap
    chunks = [c.event for c in collector.chunks(big.ready)]
    kept = sum(len(c.data) for c in chunks if c.stream in ("stdout", "stderr"))
    assert kept == cap
    markers = [c for c in chunks if c.stream == "system" and c.data.startswith("[output truncated")]
    assert [m.data for m in markers] == [f"[output truncated at {cap} bytes; {total + 5 - cap} more bytes discarded]"]
    assert chunks[-1] is markers[0] and chunks[-1].eof  # the truncation note is last and carries eof
    after = jobs.submit("py", shell("echo still here"))
    ev = collector.finished(after.ready).event
    assert ev.outcome == "succeeded"
    assert "".join(c.event.data for c in collector.chunks(after.ready) if c.event.stream == "stdout") == "still here\n"


# --- priorities -----------------------------------------------------------------------------------


def test_high_priority_overtakes_queued_normal_and_low(
        pool: Pool, jobs: Jobs, collector: Collector, tmp_path: Path) -> None:
    pool.start("prio", concurrency=1)
    order = tmp_path / "order"
    blocker = jobs.submit("prio", shell("sleep 3"))
    collector.wait_for(lambda s: isinstance(s.event, RunStarted) and s.event.run_id == blocker.ready.run_id)
    subs = [jobs.submit("prio", shell(f"echo low{i} >> {order}"), priority="low") for i in range(5)]
    subs += [jobs.submit("prio", shell(f"echo normal{i} >> {order}")) for i in range(5)]
    subs.append(jobs.submit("prio", shell(f"echo high >> {order}"), priority="high"))
    assert collector.of_run(RunFinished, blocker.ready.run_id) == [], "blocker ended before the rest was queued"
    for s in subs:
        assert collector.finished(s.ready).event.outcome == "succeeded"
    ran = order.read_text().split()
    assert ran[0] == "high"
    assert sorted(ran[1:6]) == [f"normal{i}" for i in range(5)]
    assert sorted(ran[6:]) == [f"low{i}" for i in range(5)]


# --- poison records, shutdown, long jobs ----------------------------------------------------------


def test_undecodable_record_goes_to_the_dead_letter_topic(
        pool: Pool, jobs: Jobs, collector: Collector, settings: Settings) -> None:
    w = pool.start("dlq", concurrency=1)
    key = new_id()
    part, off = jobs.raw(settings.ready_topic("dlq"), key, b"not avro at all")
    sub = jobs.submit("dlq", shell("echo fine"), key=key)  # same key: same partition, after the bad one
    assert sub.partition == part and sub.offset == off + 1
    assert collector.finished(sub.ready).event.outcome == "succeeded"

    dlq = make_consumer(settings, f"test-dlq-{uuid.uuid4().hex}")
    try:
        md = dlq.list_topics(settings.dlq_topic, timeout=10)
        dlq.assign([TopicPartition(settings.dlq_topic, p, OFFSET_BEGINNING)
                    for p in md.topics[settings.dlq_topic].partitions])
        found = None
        deadline = time.monotonic() + 15
        while found is None and time.monotonic() < deadline:
            for m in dlq.consume(100, 0.2):
                if m.error() is None and m.value() == b"not avro at all":
                    found = m
        assert found is not None and found.key() == key.encode()
        headers = dict(found.headers() or [])
        assert headers["dlq.consumer"] == b"worker" and headers["dlq.offset"] == str(off).encode()
    finally:
        dlq.close()
    wait_until(lambda: committed(settings, w.group_id, sub.topic, part) == off + 2, 10,
               "offsets of the bad record and the job after it were not committed")


def test_shutdown_interrupts_running_jobs_which_are_redelivered(
        pool: Pool, jobs: Jobs, collector: Collector, settings: Settings, tmp_path: Path) -> None:
    first = pool.start("stop", concurrency=2, grace=0.5)
    marker = tmp_path / "first-try"
    quick = jobs.submit("stop", shell("echo quick"))
    slow = jobs.submit("stop", shell(f"if [ -e {marker} ]; then echo second try; else touch {marker}; sleep 30; fi"))
    assert collector.finished(quick.ready).event.outcome == "succeeded"
    collector.wait_for(lambda s: isinstance(s.event, RunStarted) and s.event.run_id == slow.ready.run_id)
    wait_until(marker.exists, 10, "slow job did not start")
    t0 = time.monotonic()
    pool.stop(first)
    assert time.monotonic() - t0 < 10
    assert collector.of_run(RunFinished, slow.ready.run_id) == []
    collector.wait_for(lambda s: isinstance(s.event, LogChunk) and s.event.run_id == slow.ready.run_id
                       and s.event.data.startswith("[interrupted"))
    assert committed(settings, first.group_id, quick.topic, quick.partition) == quick.offset + 1
    assert committed(settings, first.group_id, slow.topic, slow.partition) <= slow.offset

    second = pool.start("stop", concurrency=2)
    ev = collector.finished(slow.ready, timeout=30).event
    assert ev.outcome == "succeeded" and ev.worker_id == second.worker_id
    assert "second try" in "".join(c.event.data for c in collector.chunks(slow.ready) if c.event.stream == "stdout")
    wait_until(lambda: committed(settings, second.group_id, slow.topic, slow.partition) == slow.offset + 1, 10,
               "redelivered job's offset not committed")


def test_long_job_keeps_its_worker_in_the_group(
        pool: Pool, jobs: Jobs, collector: Collector, settings: Settings) -> None:
    overrides = {"max.poll.interval.ms": 6000}
    a = pool.start("long", concurrency=1, consumer_overrides=overrides)
    b = pool.start("long", concurrency=1, consumer_overrides=overrides)
    wait_until(lambda: len(a.assigned) + len(b.assigned) == 9 and not (a.assigned & b.assigned), 30,
               "the two workers did not split the partitions")
    before = (a.assigned, b.assigned)
    # Two minutes: twenty times max.poll.interval.ms, while the worker keeps polling.
    sub = jobs.submit("long", shell("sleep 120; echo done"))
    ev = collector.finished(sub.ready, timeout=200).event
    assert ev.outcome == "succeeded"
    owner = a if (sub.topic, sub.partition) in a.assigned else b
    assert ev.worker_id == owner.worker_id
    wait_until(lambda: committed(settings, owner.group_id, sub.topic, sub.partition) == sub.offset + 1, 10,
               "offset not committed")
    time.sleep(1.0)
    assert len(collector.of_run(RunStarted, sub.ready.run_id)) == 1, "the job was redelivered"
    assert (a.assigned, b.assigned) == before, "a rebalance happened while the job ran"
