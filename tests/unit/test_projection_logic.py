"""Pure mapping of the projections: events → rows and documents, folding, ordering."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from consumers.projections.logs_projector import LogChunkRefused, chunk_doc, chunk_id
from consumers.projections.migrate import redact_url
from consumers.projections.models import RUN_FINAL_STATUSES
from consumers.projections.pg_projector import (
    Batch,
    ProjectionError,
    command_summary,
    job_row,
    merge_job,
    merge_run,
    run_row,
)
from consumers.projections.queries import _parse_time, iso, run_sort_key
from schemas.codec import default_codec
from schemas.events import (
    ExecutorSpec,
    HttpSpec,
    JobSpec,
    JobStatusChanged,
    LogChunk,
    PythonSpec,
    RunStarted,
    RunStatusChanged,
    ScheduleSpec,
    run_id_for,
)

T0 = 1_750_000_000_000
TOPIC = "jobs.events"


def spec(job_id: str = "j1", **kw: Any) -> JobSpec:
    fields: dict[str, Any] = dict(job_id=job_id, name="backup", user_id="alice", tenant_id="acme",
                                  executor=ExecutorSpec.of_shell(["tar", "czf", "/tmp/x y.tgz"]),
                                  submitted_at_ms=T0 - 1000, schedule=ScheduleSpec(at_ms=T0),
                                  after=["a", "b", "a"], labels={"k": "v"})
    fields.update(kw)
    return JobSpec(**fields)


def jsc(status: str, job_id: str = "j1", **kw: Any) -> JobStatusChanged:
    kw.setdefault("occurred_at_ms", T0)
    return JobStatusChanged(user_id="alice", tenant_id="acme", job_id=job_id, status=status, **kw)


def rsc(attempt: int, status: str, job_id: str = "j1", nominal: int = T0, **kw: Any) -> RunStatusChanged:
    kw.setdefault("occurred_at_ms", T0 + 10 * attempt)
    return RunStatusChanged(user_id="alice", tenant_id="acme", job_id=job_id, run_id=run_id_for(job_id, nominal),
                            attempt=attempt, status=status, nominal_ms=nominal, **kw)


# --- jobs ---------------------------------------------------------------------------------------


def test_job_row_from_an_accepting_event_carries_the_spec() -> None:
    row = job_row(jsc("pending", spec=spec(), next_fire_ms=T0), 2, 40)
    assert row.has_spec and row.name == "backup" and row.queue == "default" and row.priority == "normal"
    assert row.executor_kind == "shell" and row.command == "tar czf '/tmp/x y.tgz'"
    assert row.schedule_at_ms == T0 and row.cron is None and row.timezone == "UTC"
    assert row.created_ms == T0 - 1000 and row.updated_ms == T0 and row.next_fire_ms == T0
    assert row.after == ("a", "b") and row.labels_json == '{"k":"v"}'
    assert '"name":"backup"' in (row.spec_json or "")
    assert (row.partition, row.offset) == (2, 40) and row.finished_ms is None


def test_job_row_without_spec_and_terminal_status() -> None:
    row = job_row(jsc("completed", attempts=2, run_id="j1@1"), 0, 7)
    assert not row.has_spec and row.name is None and row.created_ms == T0
    assert row.finished_ms == T0 and row.attempts == 2 and row.last_run_id == "j1@1"


@pytest.mark.parametrize("bad", [jsc("bogus"), jsc("pending", spec=spec(job_id="other"))])
def test_job_row_refuses_what_it_cannot_apply(bad: JobStatusChanged) -> None:
    with pytest.raises(ProjectionError):
        job_row(bad, 0, 0)


def test_merge_job_keeps_spec_fields_and_first_finish() -> None:
    first = job_row(jsc("pending", spec=spec()), 0, 1)
    second = merge_job(first, job_row(jsc("running", run_id="j1@5", attempts=1, occurred_at_ms=T0 + 5), 0, 2))
    assert second.status == "running" and second.name == "backup" and second.created_ms == T0 - 1000
    assert second.after == ("a", "b") and second.offset == 2
    third = merge_job(second, job_row(jsc("failed", reason="boom", occurred_at_ms=T0 + 9), 0, 3))
    assert third.last_run_id == "j1@5" and third.finished_ms == T0 + 9 and third.reason == "boom"
    fourth = merge_job(third, job_row(jsc("failed", reason="again", occurred_at_ms=T0 + 20), 0, 4))
    assert fourth.finished_ms == T0 + 9
    revived = merge_job(fourth, job_row(jsc("pending", occurred_at_ms=T0 + 30), 0, 5))
    assert revived.finished_ms is None and revived.has_spec


def test_command_summary_for_each_executor() -> None:
    assert command_summary(ExecutorSpec(kind="http", http=HttpSpec(url="https://x/y", method="POST"))) == \
        "POST https://x/y"
    assert command_summary(ExecutorSpec(kind="python", python=PythonSpec(target="pkg.mod:fn"))) == "pkg.mod:fn"
    assert command_summary(ExecutorSpec(kind="shell")) is None
    long = command_summary(ExecutorSpec.of_shell(["echo", "x" * 5000]))
    assert long is not None and len(long) == 1000 and long.endswith("…")


# --- runs ---------------------------------------------------------------------------------------


def test_run_row_derives_times_from_the_status() -> None:
    q = run_row(rsc(1, "queued"), 0, 1)
    assert q.queued_ms == T0 + 10 and q.started_ms is None and q.finished_ms is None
    r = run_row(rsc(1, "running", worker_id="w"), 0, 2)
    assert r.started_ms == T0 + 10 and r.worker_id == "w"
    r2 = run_row(rsc(1, "running", started_at_ms=T0 + 3), 0, 2)
    assert r2.started_ms == T0 + 3
    f = run_row(rsc(1, "timed_out"), 0, 3)
    assert f.finished_ms == T0 + 10
    with pytest.raises(ProjectionError):
        run_row(rsc(1, "exploded"), 0, 4)


@pytest.mark.parametrize("final", sorted(RUN_FINAL_STATUSES))
@pytest.mark.parametrize("stale", ["queued", "running"])
def test_a_final_attempt_never_goes_back(final: str, stale: str) -> None:
    done = run_row(rsc(1, final, exit_code=1), 0, 5)
    assert merge_run(done, run_row(rsc(1, stale, worker_id="late"), 0, 6)) is done


def test_merge_run_keeps_known_values() -> None:
    a = run_row(rsc(1, "queued", occurred_at_ms=T0 + 1), 0, 1)
    b = merge_run(a, run_row(rsc(1, "running", worker_id="w1", occurred_at_ms=T0 + 2), 0, 2))
    c = merge_run(b, run_row(rsc(1, "failed", exit_code=2, reason="exit 2", occurred_at_ms=T0 + 3), 0, 3))
    d = merge_run(c, run_row(rsc(1, "retry_scheduled", retry_at_ms=T0 + 100, occurred_at_ms=T0 + 4), 0, 4))
    assert (d.status, d.worker_id, d.exit_code, d.reason) == ("retry_scheduled", "w1", 2, "exit 2")
    assert (d.queued_ms, d.started_ms, d.finished_ms, d.retry_ms) == (T0 + 1, T0 + 2, T0 + 3, T0 + 100)
    assert d.offset == 4 and merge_run(None, a) is a


def test_batch_folds_attempts_and_ignores_superseded_ones() -> None:
    b = Batch(codec=default_codec())
    events = [
        jsc("pending", spec=spec()),
        rsc(1, "queued"), rsc(1, "running", worker_id="w1"), rsc(1, "lost"),
        rsc(2, "queued"), rsc(2, "running", worker_id="w2"),
        rsc(1, "succeeded", worker_id="w1"),      # older attempt after a newer one
        rsc(2, "succeeded", exit_code=0),
        rsc(2, "running", worker_id="w3"),        # final attempt never runs again
        jsc("completed", attempts=2, run_id=run_id_for("j1", T0)),
    ]
    applied = [b.add(e, TOPIC, 1, i) for i, e in enumerate(events)]
    assert applied == [True] * 6 + [False, True, False, True]
    assert b.ignored == 2
    runs = {k[1]: r for k, r in b.runs.items()}
    assert (runs[1].status, runs[1].worker_id, runs[1].offset) == ("lost", "w1", 3)
    assert (runs[2].status, runs[2].worker_id, runs[2].exit_code, runs[2].offset) == ("succeeded", "w2", 0, 7)
    job = b.jobs["j1"]
    assert job.status == "completed" and job.name == "backup" and job.offset == 9
    assert b.dependencies == [("j1", "a"), ("j1", "b")]
    assert len(b.audit) == len(events)  # the audit keeps what was said, stale or not
    audit = list(b.audit.values())
    assert audit[0].type == "JobStatusChanged" and audit[1].type == "RunStatusChanged"
    assert '"spec"' in audit[0].payload_json and audit[1].run_id == run_id_for("j1", T0)


def test_a_job_change_riding_on_a_run_event_updates_both_rows() -> None:
    b = Batch(codec=default_codec())
    run = run_id_for("j1", T0)
    events = [
        jsc("pending", spec=spec()),
        rsc(1, "queued", job_status="queued", job_attempts=1),
        rsc(1, "running", worker_id="w1", started_at_ms=T0 + 5, job_status="running", job_attempts=1),
        rsc(1, "succeeded", worker_id="w1", exit_code=0, job_status="completed", job_attempts=1),
    ]
    assert [b.add(e, TOPIC, 2, i) for i, e in enumerate(events)] == [True] * 4
    job = b.jobs["j1"]
    assert (job.status, job.attempts, job.last_run_id, job.offset) == ("completed", 1, run, 3)
    assert job.finished_ms == events[-1].occurred_at_ms and job.name == "backup" and job.has_spec
    (r,) = b.runs.values()
    assert (r.status, r.worker_id, r.started_ms, r.exit_code) == ("succeeded", "w1", T0 + 5, 0)
    # One audit entry per event: the run event, with the job change in its payload.
    assert [a.type for a in b.audit.values()] == ["JobStatusChanged"] + ["RunStatusChanged"] * 3
    assert '"job_status":"completed"' in list(b.audit.values())[-1].payload_json


def test_a_stale_run_event_still_applies_the_job_change_it_carries() -> None:
    b = Batch(codec=default_codec())
    b.add(rsc(2, "queued"), TOPIC, 0, 0)
    # Attempt 1 is superseded for the runs table, but the scheduler's job change stands.
    assert b.add(rsc(1, "lost", job_status="pending", job_reason="retry", job_attempts=2), TOPIC, 0, 1)
    assert {k[1] for k in b.runs} == {2}
    assert (b.jobs["j1"].status, b.jobs["j1"].reason, b.jobs["j1"].attempts) == ("pending", "retry", 2)


def test_a_run_event_with_an_unknown_job_status_is_refused_whole() -> None:
    b = Batch(codec=default_codec())
    with pytest.raises(ProjectionError, match="unknown job status 'exploded'"):
        b.add(rsc(1, "running", job_status="exploded"), TOPIC, 0, 0)
    assert len(b) == 0


def test_batch_dedupes_events_and_skips_foreign_types() -> None:
    b = Batch()
    e = jsc("pending", spec=spec())
    assert b.add(e, TOPIC, 0, 0) and b.add(e, TOPIC, 0, 1)
    assert len(b.audit) == 1 and b.jobs["j1"].offset == 1
    other = RunStarted(user_id="u", job_id="j1", run_id="j1@1", attempt=1, worker_id="w")
    assert not b.add(other, TOPIC, 0, 2) and b.ignored == 1 and len(b.audit) == 1


def test_batch_is_unchanged_by_a_refused_event() -> None:
    b = Batch()
    with pytest.raises(ProjectionError):
        b.add(rsc(1, "nonsense"), TOPIC, 0, 0)
    assert len(b) == 0


# --- logs ---------------------------------------------------------------------------------------


def test_chunk_doc_is_keyed_by_run_attempt_seq() -> None:
    c = LogChunk(user_id="u", tenant_id="t", job_id="j", run_id="j@5", attempt=2, seq=7, stream="stderr",
                 data="oops\n", eof=True, occurred_at_ms=T0)
    d = chunk_doc(c)
    assert d["_id"] == chunk_id("j@5", 2, 7) == "j@5|2|7"
    assert d["at"] == datetime(2025, 6, 15, 15, 6, 40, tzinfo=timezone.utc)
    assert {k: d[k] for k in ("job_id", "run_id", "attempt", "seq", "stream", "data", "eof", "tenant_id",
                              "user_id")} == {"job_id": "j", "run_id": "j@5", "attempt": 2, "seq": 7,
                                              "stream": "stderr", "data": "oops\n", "eof": True,
                                              "tenant_id": "t", "user_id": "u"}
    with pytest.raises(LogChunkRefused):
        chunk_doc(LogChunk(user_id="u", job_id="j", run_id="j@5", attempt=1, seq=0, stream="tty", data=""))


def test_runs_sort_by_nominal_time() -> None:
    ids = ["j@1000", "j@200", "j@30000", "j@manual"]
    assert sorted(ids, key=run_sort_key) == ["j@manual", "j@200", "j@1000", "j@30000"]


# --- rendering and helpers ----------------------------------------------------------------------


def test_iso_is_utc_with_milliseconds() -> None:
    paris = timezone(timedelta(hours=2))
    assert iso(datetime(2025, 6, 15, 17, 6, 40, 123456, tzinfo=paris)) == "2025-06-15T15:06:40.123Z"
    assert iso(None) is None


def test_parse_time_cursor() -> None:
    utc = datetime(2025, 6, 15, 15, 6, 40, tzinfo=timezone.utc)
    assert _parse_time(T0) == utc
    assert _parse_time("2025-06-15T15:06:40Z") == utc
    assert _parse_time("2025-06-15T15:06:40") == utc
    assert _parse_time(utc.replace(tzinfo=None)) == utc
    assert _parse_time("3f2c-job-id") is None


def test_redact_url_hides_passwords() -> None:
    assert redact_url("postgresql+psycopg://bob:s3cret@db:5432/x") == "postgresql+psycopg://bob:***@db:5432/x"
    assert redact_url("mongodb://bob:s3cret@h:27017/?tls=true") == "mongodb://bob:***@h:27017/?tls=true"
    assert redact_url("mongodb://127.0.0.1:27017/") == "mongodb://127.0.0.1:27017/"


def test_a_redelivered_attempt_keeps_each_workers_sequence_whole() -> None:
    from consumers.projections.queries import order_chunks

    def doc(worker: str | None, seq: int, t: int, data: str) -> dict[str, Any]:
        c = LogChunk(user_id="u", job_id="j", run_id="j@5", attempt=1, seq=seq, stream="stdout", data=data,
                     occurred_at_ms=T0 + t, worker_id=worker)
        return chunk_doc(c)

    dead = [doc("w1", 0, 0, "w1 a\n"), doc("w1", 1, 10, "w1 b\n")]
    second = [doc("w2", 0, 5000, "w2 a\n"), doc("w2", 1, 5010, "w2 b\n"), doc("w2", 2, 5020, "w2 c\n")]
    assert dead[0]["_id"] == chunk_id("j@5", 1, 0, "w1") == "j@5|1|w1|0" != second[0]["_id"]
    assert dead[0]["worker_id"] == "w1"
    docs = [second[2], dead[1], second[0], dead[0], second[1]]
    order_chunks(docs)
    assert [d["data"] for d in docs] == ["w1 a\n", "w1 b\n", "w2 a\n", "w2 b\n", "w2 c\n"]
