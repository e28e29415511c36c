"""The projectors against the real stack: Kafka → PostgreSQL / MongoDB, read back by the queries.

Isolation: this module creates its own PostgreSQL database (``jobsched_test_<hex>``),
MongoDB database and topic prefix, and drops them all at the end, so it neither sees nor
disturbs a running system or another test module.  Events are hand-made with the codec
and produced inside Kafka transactions, as the scheduler does.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from typing import Any, Callable, Iterator, TypeVar

import pytest
from confluent_kafka import OFFSET_BEGINNING, TopicPartition
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from consumers.projections.logs_projector import LogsProjector, purge_logs
from consumers.projections.migrate import migrate, mongo_client
from consumers.projections.pg_projector import PostgresProjector
from consumers.projections.queries import JobQueries, LogQueries
from infra.config import Settings
from infra.errors import JobNotFound, StoreUnavailable, ValidationError
from infra.kafka import make_admin, make_consumer, make_producer, ensure_topics
from infra.topics import topic_specs
from schemas.codec import default_codec
from schemas.events import (
    Event,
    ExecutorSpec,
    JobSpec,
    JobStatusChanged,
    LogChunk,
    RetryPolicy,
    RunStatusChanged,
    ScheduleSpec,
    now_ms,
    run_id_for,
)

pytestmark = pytest.mark.integration

T = TypeVar("T")
HEX = uuid.uuid4().hex[:10]
CODEC = default_codec()
T0 = 1_750_000_000_000  # a fixed nominal time base (2025-06-15)


# --- fixtures: a private database, Mongo database and topic prefix ---------------------------


@pytest.fixture(scope="module")
def settings(stack_settings: Settings) -> Iterator[Settings]:
    base = stack_settings
    db = f"jobsched_test_{HEX}"
    admin_url = make_url(base.postgres_url).set(database="postgres")
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db}"'))
    s = base.with_(
        postgres_url=make_url(base.postgres_url).set(database=db).render_as_string(hide_password=False),
        mongo_db=f"jobsched_test_{HEX}",
        topic_prefix=f"test{HEX}",
        partitions=3,
    )
    wanted = {s.events_topic, s.logs_topic, s.dlq_topic}
    ensure_topics(s, [t for t in topic_specs(s) if t.name in wanted])
    migrate(s)
    try:
        yield s
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        admin.dispose()
        client = mongo_client(s)
        client.drop_database(s.mongo_db)
        client.close()
        for fut in make_admin(s).delete_topics(sorted(wanted), operation_timeout=30).values():
            with contextlib.suppress(Exception):
                fut.result(30)


@contextlib.contextmanager
def running(service: Any) -> Iterator[Any]:
    """Run a service in a thread until the block ends; fail if it died or does not stop."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            service.run(stop)
        except BaseException as e:  # surfaced in the test below
            errors.append(e)

    thread = threading.Thread(target=target, name=service.name, daemon=True)
    thread.start()
    try:
        yield service
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive(), f"{service.name} did not stop"
    if errors:
        raise errors[0]


@pytest.fixture(scope="module")
def pg_projector(settings: Settings) -> Iterator[PostgresProjector]:
    with running(PostgresProjector(settings, poll_timeout=0.05)) as p:
        yield p


@pytest.fixture(scope="module")
def logs_projector(settings: Settings) -> Iterator[LogsProjector]:
    with running(LogsProjector(settings, poll_timeout=0.05)) as p:
        yield p


@pytest.fixture(scope="module")
def jobs(settings: Settings, pg_projector: PostgresProjector) -> Iterator[JobQueries]:
    q = JobQueries(settings)
    yield q
    q.close()


@pytest.fixture(scope="module")
def logs(settings: Settings, logs_projector: LogsProjector, jobs: JobQueries) -> Iterator[LogQueries]:
    q = LogQueries(settings, jobs=jobs)
    yield q
    q.close()


@pytest.fixture(scope="module")
def producer(settings: Settings) -> Iterator[Any]:
    p = make_producer(settings, transactional_id=f"test-projections-{HEX}")
    p.init_transactions(30)
    yield p
    p.flush(10)


# --- helpers ----------------------------------------------------------------------------------


def produce(producer: Any, topic: str, items: list[Event | tuple[str, bytes]]) -> None:
    """Produce events (keyed like the real writers) or raw (key, bytes) in one transaction."""
    producer.begin_transaction()
    for item in items:
        if isinstance(item, tuple):
            key, value = item
        else:
            key = item.run_id if isinstance(item, LogChunk) else item.job_id  # type: ignore[attr-defined]
            value = CODEC.encode(item)
        producer.produce(topic, key=key.encode(), value=value)
    producer.commit_transaction(30)


def wait_for(fn: Callable[[], T | None], timeout: float = 30.0, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except (JobNotFound, AssertionError, KeyError, IndexError) as e:
            last = e
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


def new_job_id(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


def spec(job_id: str, **kw: Any) -> JobSpec:
    fields: dict[str, Any] = dict(
        job_id=job_id, name=f"nightly {job_id}", user_id="alice", tenant_id="acme",
        executor=ExecutorSpec.of_shell(["echo", "hello world"]), submitted_at_ms=T0 - 60_000,
        queue="default", priority="high", schedule=ScheduleSpec(cron="*/5 * * * *", timezone="Europe/Paris"),
        retry=RetryPolicy(max_retries=2), labels={"team": "data"},
    )
    fields.update(kw)
    return JobSpec(**fields)


def jsc(job_id: str, status: str, **kw: Any) -> JobStatusChanged:
    return JobStatusChanged(user_id="alice", tenant_id="acme", job_id=job_id, status=status, **kw)


def rsc(job_id: str, nominal: int, attempt: int, status: str, **kw: Any) -> RunStatusChanged:
    return RunStatusChanged(user_id="alice", tenant_id="acme", job_id=job_id, run_id=run_id_for(job_id, nominal),
                            attempt=attempt, status=status, nominal_ms=nominal, **kw)


def chunk(job_id: str, nominal: int, attempt: int, seq: int, data: str, **kw: Any) -> LogChunk:
    return LogChunk(user_id="alice", tenant_id="acme", job_id=job_id, run_id=run_id_for(job_id, nominal),
                    attempt=attempt, seq=seq, stream=kw.pop("stream", "stdout"), data=data, **kw)


def dead_letters(settings: Settings, predicate: Callable[[Any], bool], timeout: float = 30.0) -> Any:
    """The first dead letter matching ``predicate`` (reads the whole DLQ topic)."""
    consumer = make_consumer(settings, f"test-dlq-reader-{uuid.uuid4().hex[:8]}")
    try:
        md = consumer.list_topics(settings.dlq_topic, timeout=10)
        parts = md.topics[settings.dlq_topic].partitions
        consumer.assign([TopicPartition(settings.dlq_topic, p, OFFSET_BEGINNING) for p in parts])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in consumer.consume(100, 0.2):
                if m.error() is None and predicate(m):
                    return m
        raise AssertionError("no matching dead letter")
    finally:
        consumer.close()


# --- schema -------------------------------------------------------------------------------------


def test_migrations_match_models_and_are_idempotent(settings: Settings) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from consumers.projections.models import metadata

    migrate(settings)  # a second run is a no-op
    engine = create_engine(settings.postgres_url)
    try:
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0001"
    finally:
        engine.dispose()


# --- jobs and runs ------------------------------------------------------------------------------


def test_accepted_job_shows_with_its_spec(producer: Any, settings: Settings, jobs: JobQueries) -> None:
    up1, up2, job_id = new_job_id("up"), new_job_id("up"), new_job_id("accept")
    produce(producer, settings.events_topic, [
        jsc(job_id, "pending", spec=spec(job_id, after=[up2, up1]), next_fire_ms=T0, occurred_at_ms=T0 - 59_000),
    ])
    job = wait_for(lambda: jobs.get_job(job_id), what="accepted job")
    assert job["name"] == f"nightly {job_id}"
    assert job["status"] == "pending" and job["attempts"] == 0 and job["reason"] is None
    assert (job["user_id"], job["tenant_id"], job["queue"], job["priority"]) == ("alice", "acme", "default", "high")
    assert job["executor"] == "shell" and job["command"] == "echo 'hello world'"
    assert job["schedule"] == {"at": None, "cron": "*/5 * * * *", "timezone": "Europe/Paris"}
    assert job["after"] == [up2, up1]  # the order the user gave
    assert job["labels"] == {"team": "data"}
    assert job["created_at"] == "2025-06-15T15:05:40.000Z"
    assert job["next_fire_at"] == "2025-06-15T15:06:40.000Z"
    assert job["finished_at"] is None and job["runs"] == []

    # A later event without a spec keeps the spec's fields.
    produce(producer, settings.events_topic, [jsc(job_id, "paused", reason="paused by alice", next_fire_ms=None)])
    job = wait_for(lambda: (j := jobs.get_job(job_id))["status"] == "paused" and j, what="paused")
    assert job["name"] == f"nightly {job_id}" and job["reason"] == "paused by alice"
    assert job["next_fire_at"] is None and job["schedule"]["cron"] == "*/5 * * * *"
    assert job["created_at"] == "2025-06-15T15:05:40.000Z"


def test_runs_with_attempts_in_order(producer: Any, settings: Settings, jobs: JobQueries) -> None:
    job_id = new_job_id("runs")
    n1, n2 = T0, T0 + 300_000
    produce(producer, settings.events_topic, [
        jsc(job_id, "pending", spec=spec(job_id), next_fire_ms=n1),
        jsc(job_id, "queued", run_id=run_id_for(job_id, n1), attempts=1),
        rsc(job_id, n1, 1, "queued", occurred_at_ms=n1),
        rsc(job_id, n1, 1, "running", worker_id="w1", started_at_ms=n1 + 100),
    ])
    produce(producer, settings.events_topic, [
        rsc(job_id, n1, 1, "failed", worker_id="w1", exit_code=3, reason="exit status 3", finished_at_ms=n1 + 900),
        rsc(job_id, n1, 1, "retry_scheduled", retry_at_ms=n1 + 2000),
        rsc(job_id, n1, 2, "queued", occurred_at_ms=n1 + 2000),
        rsc(job_id, n1, 2, "running", worker_id="w2", started_at_ms=n1 + 2100),
        rsc(job_id, n1, 2, "succeeded", worker_id="w2", exit_code=0, finished_at_ms=n1 + 2500),
        jsc(job_id, "pending", run_id=run_id_for(job_id, n1), attempts=2, next_fire_ms=n2),
        rsc(job_id, n2, 1, "queued", occurred_at_ms=n2),
        jsc(job_id, "queued", run_id=run_id_for(job_id, n2), attempts=1),
    ])
    job = wait_for(lambda: len((j := jobs.get_job(job_id))["runs"]) == 3 and j["status"] == "queued" and j,
                   what="three attempts")
    runs = job["runs"]
    assert [(r["run_id"], r["attempt"], r["status"]) for r in runs] == [
        (run_id_for(job_id, n1), 1, "retry_scheduled"),
        (run_id_for(job_id, n1), 2, "succeeded"),
        (run_id_for(job_id, n2), 1, "queued"),
    ]
    first, second = runs[0], runs[1]
    assert first["exit_code"] == 3 and first["worker_id"] == "w1" and first["reason"] == "exit status 3"
    assert first["started_at"] == "2025-06-15T15:06:40.100Z"
    assert first["finished_at"] == "2025-06-15T15:06:40.900Z"
    assert first["retry_at"] == "2025-06-15T15:06:42.000Z"
    assert first["queued_at"] == "2025-06-15T15:06:40.000Z"
    assert second["exit_code"] == 0 and second["worker_id"] == "w2"
    assert second["finished_at"] == "2025-06-15T15:06:42.500Z"
    assert job["last_run_id"] == run_id_for(job_id, n2)
    assert [r["run_id"] for r in jobs.get_runs(job_id)] == [r["run_id"] for r in runs]


def test_stale_events_are_ignored(producer: Any, settings: Settings, jobs: JobQueries) -> None:
    job_id = new_job_id("stale")
    n = T0
    produce(producer, settings.events_topic, [
        jsc(job_id, "pending", spec=spec(job_id)),
        rsc(job_id, n, 1, "running", worker_id="w1"),
        rsc(job_id, n, 1, "lost", reason="lease expired"),
        rsc(job_id, n, 2, "running", worker_id="w2"),
        rsc(job_id, n, 2, "succeeded", worker_id="w2", exit_code=0),
    ])
    wait_for(lambda: [r["status"] for r in jobs.get_runs(job_id)] == ["lost", "succeeded"], what="two attempts")
    # Each stale event in its own transaction (so in its own batch), then a marker event.
    produce(producer, settings.events_topic, [rsc(job_id, n, 1, "succeeded", worker_id="w1-late", exit_code=0)])
    produce(producer, settings.events_topic, [rsc(job_id, n, 2, "running", worker_id="w9")])
    produce(producer, settings.events_topic, [rsc(job_id, n, 2, "queued")])
    produce(producer, settings.events_topic, [jsc(job_id, "completed", reason="marker", attempts=2)])
    wait_for(lambda: jobs.get_job(job_id)["reason"] == "marker", what="marker")
    runs = jobs.get_runs(job_id)
    assert [(r["attempt"], r["status"], r["worker_id"]) for r in runs] == [(1, "lost", "w1"), (2, "succeeded", "w2")]
    job = jobs.get_job(job_id)
    assert job["status"] == "completed" and job["finished_at"] is not None
    # Every event is audited, even ignored ones (the audit is what was said, not what won).
    audit = jobs.get_audit(job_id)
    assert len(audit) == 9 and audit[0]["payload"]["spec"]["job_id"] == job_id
    assert [a["status"] for a in audit][-4:] == ["succeeded", "running", "queued", "completed"]


def test_list_jobs_filters_and_pages(producer: Any, settings: Settings, jobs: JobQueries) -> None:
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    ids = [new_job_id("list") for _ in range(5)]
    events: list[Event | tuple[str, bytes]] = []
    for i, job_id in enumerate(ids):
        sp = spec(job_id, tenant_id=tenant, user_id="bob" if i % 2 else "carol", submitted_at_ms=T0 + i * 1000)
        events.append(JobStatusChanged(user_id=sp.user_id, tenant_id=tenant, job_id=job_id,
                                       status="running" if i < 2 else "pending", spec=sp))
    produce(producer, settings.events_topic, events)
    wait_for(lambda: len(jobs.list_jobs(tenant_id=tenant)) == 5, what="five jobs")
    newest_first = list(reversed(ids))
    assert [j["job_id"] for j in jobs.list_jobs(tenant_id=tenant)] == newest_first
    assert [j["job_id"] for j in jobs.list_jobs(tenant_id=tenant, status="running")] == [ids[1], ids[0]]
    assert [j["job_id"] for j in jobs.list_jobs(tenant_id=tenant, user_id="bob")] == [ids[3], ids[1]]
    assert [j["job_id"] for j in jobs.list_jobs(tenant_id=tenant, status=["running", "pending"], limit=2)] == \
        newest_first[:2]
    page1 = jobs.list_jobs(tenant_id=tenant, limit=2)
    page2 = jobs.list_jobs(tenant_id=tenant, limit=2, before=page1[-1]["job_id"])
    page3 = jobs.list_jobs(tenant_id=tenant, limit=2, before=page2[-1]["job_id"])
    assert [j["job_id"] for j in page1 + page2 + page3] == newest_first
    by_time = jobs.list_jobs(tenant_id=tenant, before=page1[-1]["created_at"])
    assert [j["job_id"] for j in by_time] == newest_first[2:]
    assert "runs" not in page1[0] and page1[0]["created_at"].endswith("Z")
    with pytest.raises(ValidationError):
        jobs.list_jobs(status="bogus")
    with pytest.raises(ValidationError):
        jobs.list_jobs(limit=0)
    with pytest.raises(JobNotFound):
        jobs.get_job(new_job_id("missing"))


def test_bad_records_go_to_the_dead_letter_topic(
    producer: Any, settings: Settings, jobs: JobQueries, pg_projector: PostgresProjector
) -> None:
    garbage_key = f"garbage-{HEX}-{uuid.uuid4().hex[:6]}"
    good1, bad, good2 = new_job_id("good"), new_job_id("nul"), new_job_id("good")
    produce(producer, settings.events_topic, [
        (garbage_key, b"\x00not avro at all"),
        jsc(good1, "pending", spec=spec(good1)),
        # Decodes fine but PostgreSQL refuses NUL in text: the batch is retried record by record.
        jsc(bad, "pending", reason="bad\x00reason", spec=spec(bad)),
        jsc(good2, "pending", spec=spec(good2)),
    ])
    wait_for(lambda: jobs.get_job(good1) and jobs.get_job(good2), what="the good events")
    with pytest.raises(JobNotFound):
        jobs.get_job(bad)

    m = dead_letters(settings, lambda m: m.key() == garbage_key.encode())
    headers = dict(m.headers())
    assert m.value() == b"\x00not avro at all"
    assert headers["dlq.error.type"] == b"DecodeError" and b"single-object" in headers["dlq.error"]
    assert headers["dlq.topic"] == settings.events_topic.encode()
    assert headers["dlq.consumer"] == settings.group_id("projector-pg").encode()

    m = dead_letters(settings, lambda m: m.key() == bad.encode())
    headers = dict(m.headers())
    assert headers["dlq.error.type"] == b"DataError" and b"NUL" in headers["dlq.error"]
    assert CODEC.decode(m.value()).job_id == bad  # type: ignore[attr-defined]
    assert pg_projector.stats.dead >= 2 and pg_projector.stats.isolated >= 1


def test_store_errors_are_retried_not_dead_lettered(
    producer: Any, settings: Settings, jobs: JobQueries, pg_projector: PostgresProjector
) -> None:
    """A missing table is the store's fault, not the record's: the batch waits, nothing is lost."""
    engine = create_engine(settings.postgres_url)
    job_id = new_job_id("retry")
    dead_before = pg_projector.stats.dead

    def job_rows() -> int:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM jobs WHERE job_id = :j"), {"j": job_id}).scalar_one())

    try:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE runs RENAME TO runs_away"))
        try:
            produce(producer, settings.events_topic, [jsc(job_id, "queued", spec=spec(job_id)),
                                                      rsc(job_id, T0, 1, "queued")])
            time.sleep(1.5)  # the projector fails on this batch a few times meanwhile
            assert job_rows() == 0, "the batch was half applied"
        finally:
            with engine.begin() as conn:
                conn.execute(text("ALTER TABLE runs_away RENAME TO runs"))
        job = wait_for(lambda: (j := jobs.get_job(job_id))["runs"] and j, what="the batch after the retry")
        assert job["status"] == "queued" and job["runs"][0]["status"] == "queued"
        assert pg_projector.stats.dead == dead_before
    finally:
        engine.dispose()


def test_projector_stops_while_postgres_is_unreachable(settings: Settings) -> None:
    down = settings.with_(postgres_url="postgresql+psycopg://postgres@127.0.0.1:1/nowhere")
    projector = PostgresProjector(down, consumer_name=f"test-down-{HEX}")
    started = time.monotonic()
    with running(projector):
        time.sleep(1.0)  # retrying the migration with a back-off
    assert time.monotonic() - started < 10 and projector.stats.batches == 0


# --- logs ---------------------------------------------------------------------------------------


def test_log_chunks_in_order_without_duplicates(producer: Any, settings: Settings, logs: LogQueries) -> None:
    job_id = new_job_id("logs")
    n1, n2 = T0, T0 + 60_000
    produce(producer, settings.logs_topic, [
        chunk(job_id, n2, 1, 0, "second run\n"),
        chunk(job_id, n1, 1, 1, "a1 line 2\n"),
        chunk(job_id, n1, 1, 0, "a1 line 1\n"),
        chunk(job_id, n1, 1, 0, "a1 line 1\n"),  # redelivered duplicate
        chunk(job_id, n1, 2, 0, "a2 line 1\n", stream="stderr"),
        chunk(job_id, n1, 2, 1, "", eof=True, stream="system"),
    ])
    produce(producer, settings.logs_topic, [chunk(job_id, n1, 1, 1, "a1 line 2\n")])  # duplicate, later batch
    produce(producer, settings.logs_topic, [chunk(job_id, n2, 1, 1, "", eof=True)])
    wait_for(lambda: len(logs.get_logs(job_id)) == 6, what="six chunks")
    got = logs.get_logs(job_id)
    assert [(c["run_id"].rsplit("@", 1)[1], c["attempt"], c["seq"], c["data"]) for c in got] == [
        (str(n1), 1, 0, "a1 line 1\n"),
        (str(n1), 1, 1, "a1 line 2\n"),
        (str(n1), 2, 0, "a2 line 1\n"),
        (str(n1), 2, 1, ""),
        (str(n2), 1, 0, "second run\n"),
        (str(n2), 1, 1, ""),
    ]
    assert got[2]["stream"] == "stderr" and got[3]["eof"] is True and got[0]["at"].endswith("Z")
    assert [c["seq"] for c in logs.get_logs(job_id, run_id=run_id_for(job_id, n1), attempt=2)] == [0, 1]
    assert len(logs.get_logs(job_id, run_id=run_id_for(job_id, n2))) == 2
    time.sleep(0.5)  # let a late duplicate show, if the projector wrote one
    assert len(logs.get_logs(job_id)) == 6


def test_an_attempt_redelivered_to_another_worker_keeps_both_outputs(
        producer: Any, settings: Settings, logs: LogQueries) -> None:
    # The first worker died mid-run; Kafka redelivered the run to a second worker, which
    # starts its own sequence at 0. Neither may overwrite or drop the other's lines.
    job_id = new_job_id("redelivered")
    produce(producer, settings.logs_topic, [
        chunk(job_id, T0, 1, 0, "first worker 1\n", worker_id="w1", occurred_at_ms=T0 + 1000),
        chunk(job_id, T0, 1, 1, "first worker 2\n", worker_id="w1", occurred_at_ms=T0 + 1100),
    ])
    produce(producer, settings.logs_topic, [
        chunk(job_id, T0, 1, 0, "second worker 1\n", worker_id="w2", occurred_at_ms=T0 + 9000),
        chunk(job_id, T0, 1, 1, "second worker 2\n", worker_id="w2", occurred_at_ms=T0 + 9100),
        chunk(job_id, T0, 1, 2, "", eof=True, stream="system", worker_id="w2", occurred_at_ms=T0 + 9200),
    ])
    wait_for(lambda: len(logs.get_logs(job_id)) == 5, what="both workers' chunks")
    got = logs.get_logs(job_id)
    assert [(c["worker_id"], c["seq"], c["data"]) for c in got] == [
        ("w1", 0, "first worker 1\n"), ("w1", 1, "first worker 2\n"),
        ("w2", 0, "second worker 1\n"), ("w2", 1, "second worker 2\n"), ("w2", 2, ""),
    ]


def test_follow_yields_new_lines_and_stops_at_eof(producer: Any, settings: Settings, logs: LogQueries) -> None:
    job_id = new_job_id("follow")
    n = T0
    produce(producer, settings.events_topic, [
        jsc(job_id, "running", spec=spec(job_id), run_id=run_id_for(job_id, n), attempts=1),
        rsc(job_id, n, 1, "running", worker_id="w1"),
    ])
    produce(producer, settings.logs_topic, [chunk(job_id, n, 1, 0, "before follow\n")])
    wait_for(lambda: logs.get_logs(job_id), what="first chunk")

    got: list[dict[str, Any]] = []
    stop = threading.Event()
    ended = threading.Event()

    def follower() -> None:
        for c in logs.follow(job_id, poll=0.05, stop=stop, settle=60):
            got.append(c)
        ended.set()

    t = threading.Thread(target=follower, daemon=True)
    t.start()
    try:
        wait_for(lambda: len(got) == 1, what="the existing chunk")
        produce(producer, settings.logs_topic, [chunk(job_id, n, 1, 1, "after follow\n")])
        wait_for(lambda: len(got) == 2, what="a new chunk")
        produce(producer, settings.logs_topic, [chunk(job_id, n, 1, 2, "", eof=True, stream="system")])
        time.sleep(1.0)
        assert not ended.is_set(), "follow stopped before the run was final"
        produce(producer, settings.events_topic, [
            rsc(job_id, n, 1, "succeeded", worker_id="w1", exit_code=0),
            jsc(job_id, "completed", run_id=run_id_for(job_id, n), attempts=1),
        ])
        assert ended.wait(30), "follow did not stop at eof"
    finally:
        stop.set()
        t.join(10)
    assert [c["data"] for c in got] == ["before follow\n", "after follow\n", ""]
    assert got[-1]["eof"] is True


def test_follow_moves_to_a_new_attempt(producer: Any, settings: Settings, logs: LogQueries) -> None:
    job_id = new_job_id("follow2")
    n = T0
    produce(producer, settings.logs_topic, [chunk(job_id, n, 1, 0, "attempt 1\n")])
    wait_for(lambda: logs.get_logs(job_id), what="first chunk")
    got: list[str] = []
    ended = threading.Event()
    stop = threading.Event()

    def follower() -> None:
        for c in logs.follow(job_id, poll=0.05, stop=stop, settle=0.5):
            got.append(c["data"])
        ended.set()

    t = threading.Thread(target=follower, daemon=True)
    t.start()
    try:
        wait_for(lambda: got == ["attempt 1\n"], what="attempt 1")
        # The worker died without eof; the redelivered attempt 2 writes and ends.  The
        # projection knows nothing of this job, so follow ends `settle` after the eof.
        produce(producer, settings.logs_topic, [chunk(job_id, n, 2, 0, "attempt 2\n"),
                                                chunk(job_id, n, 2, 1, "", eof=True)])
        assert ended.wait(30), "follow did not stop after the eof of attempt 2"
    finally:
        stop.set()
        t.join(10)
    assert got == ["attempt 1\n", "attempt 2\n", ""]


def test_purge_logs(producer: Any, settings: Settings, logs: LogQueries) -> None:
    job_id = new_job_id("purge")
    old = now_ms() - 40 * 86_400_000
    produce(producer, settings.logs_topic, [
        chunk(job_id, T0, 1, 0, "old\n", occurred_at_ms=old),
        chunk(job_id, T0, 1, 1, "old too\n", occurred_at_ms=old + 1),
        chunk(job_id, T0, 1, 2, "recent\n"),
    ])
    wait_for(lambda: len(logs.get_logs(job_id)) == 3, what="three chunks")
    deleted = purge_logs(settings, now_ms() - 30 * 86_400_000)
    assert deleted >= 2
    assert [c["data"] for c in logs.get_logs(job_id)] == ["recent\n"]
    assert logs.purge_logs(old) == 0


def test_logs_projector_purges_on_its_own(producer: Any, settings: Settings, logs: LogQueries) -> None:
    job_id = new_job_id("autopurge")
    old = now_ms() - 2 * 86_400_000
    produce(producer, settings.logs_topic, [chunk(job_id, T0, 1, 0, "stale\n", occurred_at_ms=old),
                                            chunk(job_id, T0, 1, 1, "fresh\n")])
    wait_for(lambda: len(logs.get_logs(job_id)) == 2, what="two chunks")
    # A second projector (own group: it re-reads the topic, harmlessly) keeps one day of logs.
    other = LogsProjector(settings, consumer_name=f"test-purger-{HEX}", retention_ms=86_400_000,
                          purge_interval_s=0.2, poll_timeout=0.05)
    with running(other):
        wait_for(lambda: [c["data"] for c in logs.get_logs(job_id)] == ["fresh\n"], what="the purge")
        assert other.stats.purged >= 1


# --- replay -------------------------------------------------------------------------------------


def _snapshot(settings: Settings) -> dict[str, list[tuple[Any, ...]]]:
    engine = create_engine(settings.postgres_url)
    try:
        with engine.connect() as conn:
            return {
                t: [tuple(r) for r in conn.execute(text(f"SELECT * FROM {t} ORDER BY 1, 2"))]
                for t in ("jobs", "runs", "dependencies", "audit")
            }
    finally:
        engine.dispose()


def _offsets(settings: Settings, consumer: str) -> list[tuple[Any, ...]]:
    engine = create_engine(settings.postgres_url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(
                "SELECT topic, partition, next_offset FROM projector_offsets WHERE consumer = :c ORDER BY 1, 2"),
                {"c": consumer})]
    finally:
        engine.dispose()


def test_replay_from_the_beginning_changes_nothing(
    settings: Settings, jobs: JobQueries, pg_projector: PostgresProjector
) -> None:
    main = _offsets(settings, settings.group_id("projector-pg"))
    assert main, "the main projector stored no offsets"
    before = _snapshot(settings)
    assert before["jobs"] and before["runs"] and before["audit"]
    # Same database, a new consumer name: it starts from offset 0 and re-applies everything.
    replayer = PostgresProjector(settings, consumer_name=f"test-replay-{HEX}", poll_timeout=0.05)
    with running(replayer):
        wait_for(lambda: _offsets(settings, replayer.consumer_name) == main, timeout=60, what="replay caught up")
    assert replayer.stats.records > 0 and replayer.stats.dead >= 2  # it saw the bad records again
    assert _snapshot(settings) == before


def test_restart_resumes_from_stored_offsets(producer: Any, settings: Settings) -> None:
    """A projector restarted under the same name applies only what is new."""
    name = f"test-restart-{HEX}"
    first = PostgresProjector(settings, consumer_name=name, poll_timeout=0.05)
    main = _offsets(settings, settings.group_id("projector-pg"))
    with running(first):
        wait_for(lambda: _offsets(settings, name) == main, timeout=60, what="first pass")
    job_id = new_job_id("restart")
    produce(producer, settings.events_topic, [jsc(job_id, "pending", spec=spec(job_id))])
    second = PostgresProjector(settings, consumer_name=name, poll_timeout=0.05)
    q = JobQueries(settings)
    try:
        with running(second):
            wait_for(lambda: q.get_job(job_id), what="the new job")
            time.sleep(0.3)
        assert second.stats.records == 1, second.stats
    finally:
        q.close()


# --- stores down --------------------------------------------------------------------------------


def test_queries_report_unavailable_stores_without_password() -> None:
    down = Settings(postgres_url="postgresql+psycopg://bob:s3cret@127.0.0.1:1/nowhere",
                    mongo_url="mongodb://bob:s3cret@127.0.0.1:1/?serverSelectionTimeoutMS=300")
    with JobQueries(down) as q:
        with pytest.raises(StoreUnavailable) as e:
            q.get_job("x")
    assert "127.0.0.1:1" in str(e.value) and "s3cret" not in str(e.value)
    with LogQueries(down) as lq:
        with pytest.raises(StoreUnavailable) as e2:
            lq.get_logs("x")
    assert "127.0.0.1:1" in str(e2.value) and "s3cret" not in str(e2.value)


def test_queries_report_missing_tables(settings: Settings) -> None:
    db = f"jobsched_test_{HEX}_empty"
    admin = create_engine(make_url(settings.postgres_url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db}"'))
    try:
        empty = settings.with_(postgres_url=make_url(settings.postgres_url).set(database=db)
                               .render_as_string(hide_password=False))
        with JobQueries(empty) as q:
            with pytest.raises(StoreUnavailable, match="migrations"):
                q.list_jobs()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        admin.dispose()
