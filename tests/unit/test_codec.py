"""The Avro contract and its codec: round trips, the wire header, drift guards, garbage, evolution."""

from __future__ import annotations

import io
import json
import shutil
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

import fastavro
import pytest

from infra.errors import DecodeError, EncodeError
from schemas.codec import HEADER_LEN, MAGIC, SCHEMA_DIR, TOP_LEVEL, Codec, _load_dir, default_codec, fingerprint
from schemas.events import (
    EVENT_TYPES,
    STATE_TYPES,
    VALUE_TYPES,
    DependencyRegistered,
    Event,
    ExecutorSpec,
    HttpSpec,
    JobCancelRequested,
    JobSpec,
    JobStatusChanged,
    JobSubmitted,
    LogChunk,
    PythonSpec,
    RetryPolicy,
    RunCancelRequested,
    RunFinished,
    RunHeartbeat,
    RunReady,
    RunStarted,
    RunStatusChanged,
    SchedulePaused,
    ScheduleResumed,
    ScheduleSpec,
    SchedulerJobState,
    SchedulerRunState,
    ShellSpec,
    UpstreamResolved,
    run_id_for,
)

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
JOB = "3f2b8c1e-5d4a-4e7f-9a1b-2c3d4e5f6a7b"
RUN = run_id_for(JOB, T0 + 60_000)
COMMON: dict[str, Any] = {"user_id": "alice", "tenant_id": "acme", "event_id": "ev-1", "occurred_at_ms": T0 + 5}


def _shell_spec() -> JobSpec:
    return JobSpec(
        job_id=JOB, name="nightly-report", user_id="alice", tenant_id="acme", submitted_at_ms=T0,
        executor=ExecutorSpec(kind="shell", shell=ShellSpec(argv=["python", "-m", "reports.nightly", "--día"],
                                                            env={"MODE": "full", "EMPTY": ""}, cwd="/srv/reports")),
        queue="reports", priority="high",
        schedule=ScheduleSpec(cron="30 2 * * *", timezone="Europe/Berlin", overlap="replace", catchup="all",
                              catchup_window_ms=3_600_000, end_ms=T0 + 86_400_000 * 30),
        after=["up-1", "up-2"], retry=RetryPolicy(max_retries=3, backoff_ms=2_000, backoff_max_ms=60_000),
        timeout_ms=900_000, lease_ms=45_000, labels={"team": "finance", "cost-center": "42"},
    )


def _http_executor() -> ExecutorSpec:
    return ExecutorSpec(kind="http", http=HttpSpec(url="https://example.com/hook?x=1", method="POST",
                                                   headers={"Authorization": "Bearer t"}, body='{"a": 1}',
                                                   success_codes=[200, 202]))


def _python_executor() -> ExecutorSpec:
    return ExecutorSpec(kind="python", python=PythonSpec(target="tests.helpers.pyjobs:add",
                                                         kwargs_json='{"a": 1, "b": 2}'))


def _run_fields(attempt: int = 2) -> dict[str, Any]:
    return {**COMMON, "job_id": JOB, "run_id": RUN, "attempt": attempt}


#: One realistic instance of every top-level record.  Several per class where optional
#: branches differ (nested records set / unset, minimal defaults).
EXAMPLES: dict[type, list[Callable[[], Any]]] = {
    JobSubmitted: [
        lambda: JobSubmitted(**COMMON, spec=_shell_spec(), batch_id="batch-7"),
        lambda: JobSubmitted(user_id="bob", spec=JobSpec(job_id="j2", name="ping", user_id="bob", submitted_at_ms=T0,
                                                         executor=_http_executor())),
        lambda: JobSubmitted(user_id="bob", spec=JobSpec(job_id="j3", name="py", user_id="bob", submitted_at_ms=T0,
                                                         executor=_python_executor(),
                                                         schedule=ScheduleSpec(at_ms=T0 + 1)))
    ],
    JobCancelRequested: [lambda: JobCancelRequested(**COMMON, job_id=JOB, reason="no longer needed"),
                         lambda: JobCancelRequested(user_id="u", job_id=JOB)],
    SchedulePaused: [lambda: SchedulePaused(**COMMON, job_id=JOB)],
    ScheduleResumed: [lambda: ScheduleResumed(**COMMON, job_id=JOB)],
    DependencyRegistered: [lambda: DependencyRegistered(**COMMON, upstream_id="up", downstream_id=JOB)],
    UpstreamResolved: [
        lambda: UpstreamResolved(**COMMON, upstream_id="up", downstream_id=JOB, outcome="completed", run_id="up@5",
                                 nominal_ms=5),
        lambda: UpstreamResolved(**COMMON, upstream_id="up", downstream_id=JOB, outcome="unknown"),
    ],
    RunReady: [
        lambda: RunReady(**_run_fields(), name="nightly-report", nominal_ms=T0 + 60_000, queue="reports",
                         priority="high", executor=_shell_spec().executor, timeout_ms=900_000, lease_ms=45_000),
        lambda: RunReady(**_run_fields(1), name="ping", nominal_ms=T0, queue="default", priority="low",
                         executor=_http_executor()),
    ],
    RunStarted: [lambda: RunStarted(**_run_fields(), worker_id="worker-a")],
    RunHeartbeat: [lambda: RunHeartbeat(**_run_fields(), worker_id="worker-a")],
    RunFinished: [
        lambda: RunFinished(**_run_fields(), worker_id="worker-a", outcome="failed", exit_code=-9,
                            reason="killed by signal 9", started_at_ms=T0 + 10, finished_at_ms=T0 + 20,
                            log_bytes=2**40, log_truncated=True),
        lambda: RunFinished(**_run_fields(), worker_id="worker-a", outcome="succeeded"),
    ],
    RunCancelRequested: [lambda: RunCancelRequested(**_run_fields(), worker_id="*", reason="user asked")],
    LogChunk: [lambda: LogChunk(**_run_fields(), seq=17, stream="stderr", data="Traceback …\n\x00end", eof=True)],
    JobStatusChanged: [
        lambda: JobStatusChanged(**COMMON, job_id=JOB, status="pending", reason="waiting for up-1", attempts=0,
                                 next_fire_ms=T0 + 60_000, spec=_shell_spec()),
        lambda: JobStatusChanged(**COMMON, job_id=JOB, status="failed", attempts=4, run_id=RUN),
    ],
    RunStatusChanged: [
        lambda: RunStatusChanged(**_run_fields(), status="retry_scheduled", nominal_ms=T0 + 60_000,
                                 worker_id="worker-a", exit_code=1, reason="exit 1", started_at_ms=T0 + 1,
                                 finished_at_ms=T0 + 2, retry_at_ms=T0 + 3),
        lambda: RunStatusChanged(**_run_fields(), status="queued", nominal_ms=T0),
        lambda: RunStatusChanged(**_run_fields(), status="failed", nominal_ms=T0, worker_id="worker-a", exit_code=2,
                                 job_status="pending", job_reason="retry 1/3 after failed (exit code 2)",
                                 job_attempts=1, job_next_fire_ms=T0 + 60_000),
    ],
    SchedulerJobState: [
        lambda: SchedulerJobState(
            job_id=JOB, status="running", reason="r", spec=_shell_spec(), waiting=["up-2"], downstream=["d1", "d2"],
            next_fire_ms=T0 + 86_400_000, attempts=3, paused=True,
            runs=[SchedulerRunState(run_id=RUN, nominal_ms=T0 + 60_000, attempt=2, execution=3, status="running",
                                    worker_id="worker-a", started_at_ms=T0 + 61_000),
                  SchedulerRunState(run_id=run_id_for(JOB, T0), nominal_ms=T0, attempt=1, execution=1,
                                    status="retry_wait", retry_at_ms=T0 + 70_000)]),
        lambda: SchedulerJobState(job_id=JOB, status="completed", finished_at_ms=T0),
    ],
}

ALL_EXAMPLES = [pytest.param(make, id=f"{cls.__name__}-{i}") for cls, makers in EXAMPLES.items()
                for i, make in enumerate(makers)]


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec()


# ----------------------------------------------------------------------------- round trip


def test_examples_cover_every_top_level_record() -> None:
    # A new event class must come with an example here, or its round trip is untested.
    assert set(EXAMPLES) == set(TOP_LEVEL.values())


@pytest.mark.parametrize("make", ALL_EXAMPLES)
def test_round_trip(codec: Codec, make: Callable[[], Any]) -> None:
    value = make()
    data = codec.encode(value)
    decoded = codec.decode(data) if type(value).avro_name in EVENT_TYPES else codec.decode_state(data)
    assert type(decoded) is type(value)
    assert decoded == value
    assert codec.schema_name(data) == value.avro_name


def test_round_trip_is_byte_stable(codec: Codec) -> None:
    # Re-encoding what was decoded gives the same bytes: nothing is lost or reordered.
    for cls, makers in EXAMPLES.items():
        for make in makers:
            data = codec.encode(make())
            again = codec.decode(data) if cls.avro_name in EVENT_TYPES else codec.decode_state(data)
            assert codec.encode(again) == data


def test_a_fresh_codec_reads_what_another_wrote(codec: Codec) -> None:
    ev = EXAMPLES[JobSubmitted][0]()
    assert Codec().decode(codec.encode(ev)) == ev
    assert default_codec().decode(codec.encode(ev)) == ev


def test_to_json_names_the_type_and_nests_records(codec: Codec) -> None:
    ev = EXAMPLES[JobSubmitted][0]()
    doc = json.loads(codec.to_json(ev))
    assert doc["type"] == "JobSubmitted"
    assert doc["spec"]["executor"]["shell"]["argv"][0] == "python"
    assert doc["spec"]["retry"]["max_retries"] == 3


def test_to_json_holds_exactly_the_schema_fields_of_every_example(codec: Codec) -> None:
    """The JSON is the event's Avro fields (nothing more, nothing less), non-ASCII kept."""

    def plain(value: Any) -> Any:
        if hasattr(value, "avro_name") or type(value).__name__ in {c.__name__ for c in VALUE_TYPES.values()}:
            return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
        if isinstance(value, list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    schemas = dict(_load_dir(SCHEMA_DIR))
    for cls, makers in EXAMPLES.items():
        if cls.avro_name not in EVENT_TYPES:
            continue
        for make in makers:
            ev = make()
            doc = json.loads(codec.to_json(ev))
            assert doc.pop("type") == cls.avro_name.rsplit(".", 1)[-1]
            assert set(doc) == {f["name"] for f in schemas[cls.avro_name]["fields"]}
            assert doc == plain(ev)
    shell = json.loads(codec.to_json(EXAMPLES[JobSubmitted][0]()))["spec"]["executor"]["shell"]
    assert shell["argv"][-1] == "--día" and shell["env"] == {"MODE": "full", "EMPTY": ""}


# --------------------------------------------------------------------------- wire header


def test_header_is_magic_plus_fingerprint_of_the_writer_schema(codec: Codec) -> None:
    schemas = dict(_load_dir(SCHEMA_DIR))
    for cls, makers in EXAMPLES.items():
        data = codec.encode(makers[0]())
        assert data[:2] == b"\xc3\x01" == MAGIC
        assert HEADER_LEN == 10
        assert data[2:10] == fingerprint(schemas[cls.avro_name])


def test_fingerprint_matches_the_avro_spec_test_vector() -> None:
    # Avro specification: CRC-64-AVRO("null") == 0x63dd24e7cc258f8a, sent little-endian.
    assert fingerprint("null") == bytes.fromhex("8a8f25cce724dd63")
    assert fingerprint("null") == (0x63DD24E7CC258F8A).to_bytes(8, "little")


def test_fingerprints_differ_between_records() -> None:
    fps = {fingerprint(s) for _, s in _load_dir(SCHEMA_DIR)}
    assert len(fps) == len(_load_dir(SCHEMA_DIR))


def test_body_after_the_header_is_plain_avro_binary(codec: Codec) -> None:
    # Any Avro implementation can read the body with the schema the fingerprint names.
    ev = EXAMPLES[JobCancelRequested][0]()
    data = codec.encode(ev)
    schema = fastavro.parse_schema(dict(_load_dir(SCHEMA_DIR))[JobCancelRequested.avro_name])
    record = fastavro.schemaless_reader(io.BytesIO(data[HEADER_LEN:]), schema, None)
    assert record == {"event_id": "ev-1", "occurred_at_ms": T0 + 5, "user_id": "alice", "tenant_id": "acme",
                      "job_id": JOB, "reason": "no longer needed"}


# -------------------------------------------------------------------- contract drift guard


def _avsc(name: str) -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())  # type: ignore[no-any-return]


CLASSES = {**TOP_LEVEL, **VALUE_TYPES}


def test_every_schema_file_has_a_class_and_every_class_a_schema_file() -> None:
    files = {p.name[: -len(".avsc")] for p in SCHEMA_DIR.glob("*.avsc")}
    assert files == set(CLASSES)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_dataclass_fields_equal_avsc_fields(name: str) -> None:
    cls = CLASSES[name]
    schema = _avsc(name)
    assert schema["namespace"] + "." + schema["name"] == name
    avro_fields = [f["name"] for f in schema["fields"]]
    assert len(avro_fields) == len(set(avro_fields))
    assert {f.name for f in fields(cls)} == set(avro_fields)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_nullable_in_avro_iff_optional_in_python(name: str) -> None:
    cls = CLASSES[name]
    hints = typing.get_type_hints(cls)
    for f in _avsc(name)["fields"]:
        typ = f["type"]
        avro_nullable = isinstance(typ, list) and "null" in typ
        py_optional = type(None) in typing.get_args(hints[f["name"]])
        assert avro_nullable == py_optional, f"{name}.{f['name']}"


@pytest.mark.parametrize("cls", sorted(EVENT_TYPES.values(), key=lambda c: c.__name__))
def test_avro_name_matches_class_name(cls: type[Event]) -> None:
    assert cls.avro_name == f"io.jobsched.{cls.__name__}"
    assert issubclass(cls, Event)
    assert STATE_TYPES.keys().isdisjoint(EVENT_TYPES.keys())


# --------------------------------------------------------------------------------- garbage


def _encoded(codec: Codec) -> bytes:
    return codec.encode(EXAMPLES[RunFinished][0]())


def test_empty_bytes_are_refused(codec: Codec) -> None:
    with pytest.raises(DecodeError, match="missing C3 01 header"):
        codec.decode(b"")


def test_none_is_refused(codec: Codec) -> None:
    with pytest.raises(DecodeError, match="missing C3 01 header"):
        codec.decode(None)  # type: ignore[arg-type]


def test_wrong_magic_is_refused(codec: Codec) -> None:
    data = _encoded(codec)
    for magic in (b"\xc3\x00", b"\x00\x01", b"\x01\xc3", b"{\""):
        with pytest.raises(DecodeError, match="missing C3 01 header"):
            codec.decode(magic + data[2:])


def test_header_shorter_than_ten_bytes_is_refused(codec: Codec) -> None:
    data = _encoded(codec)
    for n in range(HEADER_LEN):
        with pytest.raises(DecodeError, match="missing C3 01 header"):
            codec.decode(data[:n])


def test_unknown_fingerprint_is_refused_and_named(codec: Codec) -> None:
    data = _encoded(codec)
    forged = MAGIC + bytes.fromhex("0123456789abcdef") + data[HEADER_LEN:]
    with pytest.raises(DecodeError, match="unknown writer schema fingerprint 0123456789abcdef"):
        codec.decode(forged)
    with pytest.raises(DecodeError, match="unknown writer schema fingerprint"):
        codec.schema_name(forged)


def test_every_truncation_of_the_body_is_refused(codec: Codec) -> None:
    for make in (EXAMPLES[RunFinished][0], EXAMPLES[JobSubmitted][0], EXAMPLES[LogChunk][0]):
        data = codec.encode(make())
        for n in range(HEADER_LEN, len(data)):
            with pytest.raises(DecodeError, match=r"corrupt io\.jobsched\.\w+ body"):
                codec.decode(data[:n])


def test_trailing_bytes_are_refused(codec: Codec) -> None:
    data = _encoded(codec)
    with pytest.raises(DecodeError, match="RunFinished body has 1 trailing bytes"):
        codec.decode(data + b"\x00")
    with pytest.raises(DecodeError, match="has 3 trailing bytes"):
        codec.decode(data + b"abc")


def test_body_of_another_record_is_refused(codec: Codec) -> None:
    # A header naming RunStarted in front of a LogChunk body: the lengths cannot line up.
    started = codec.encode(EXAMPLES[RunStarted][0]())
    chunk = codec.encode(EXAMPLES[LogChunk][0]())
    with pytest.raises(DecodeError):
        codec.decode(started[:HEADER_LEN] + chunk[HEADER_LEN:])


def test_decode_and_decode_state_keep_to_their_kind(codec: Codec) -> None:
    state = codec.encode(EXAMPLES[SchedulerJobState][1]())
    event = codec.encode(EXAMPLES[RunStarted][0]())
    with pytest.raises(DecodeError, match="SchedulerJobState is not an event"):
        codec.decode(state)
    with pytest.raises(DecodeError, match="RunStarted is not a state record"):
        codec.decode_state(event)


def test_nested_records_alone_are_not_messages(codec: Codec) -> None:
    with pytest.raises(EncodeError, match="JobSpec has no schema in the contract"):
        codec.encode(_shell_spec())


def test_value_that_does_not_fit_is_refused_on_encode(codec: Codec) -> None:
    bad = RunStarted(**_run_fields(), worker_id=None)  # type: ignore[arg-type]
    with pytest.raises(EncodeError, match="RunStarted does not fit its schema"):
        codec.encode(bad)
    bad_attempt = RunStarted(**{**_run_fields(), "attempt": "two"}, worker_id="w")  # type: ignore[arg-type]
    with pytest.raises(EncodeError, match="RunStarted does not fit its schema"):
        codec.encode(bad_attempt)


# ----------------------------------------------------------------------- schema evolution


def _copy_schemas(dest: Path) -> Path:
    dest.mkdir()
    for p in SCHEMA_DIR.glob("*.avsc"):
        shutil.copy(p, dest / p.name)
    return dest


def _add_field(schema_dir: Path, name: str, new_field: dict[str, Any]) -> None:
    path = schema_dir / f"{name}.avsc"
    schema = json.loads(path.read_text())
    schema["fields"].append(new_field)
    path.write_text(json.dumps(schema, indent=1))


def _history(dest: Path, schema_dir: Path, names: list[str], version: int) -> Path:
    """A history folder with the fully expanded schema of ``names`` as found in ``schema_dir``."""
    dest.mkdir()
    expanded = dict(_load_dir(schema_dir))
    for name in names:
        (dest / f"{name}.v{version}.avsc").write_text(json.dumps(expanded[name], indent=1))
    return dest


def _write_raw(schema_dir: Path, name: str, record: dict[str, Any]) -> bytes:
    """What a writer on ``schema_dir`` puts on the wire for ``record``, its new fields set."""
    schema = dict(_load_dir(schema_dir))[name]
    buf = io.BytesIO()
    buf.write(MAGIC + fingerprint(schema))
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), record)
    return buf.getvalue()


FORCE = {"name": "force", "type": "boolean", "default": False, "doc": "Kill without grace."}


@pytest.fixture()
def evolved(tmp_path: Path) -> Path:
    """A copy of the contract where JobCancelRequested gained ``force`` (with a default)."""
    new_dir = _copy_schemas(tmp_path / "new")
    _add_field(new_dir, JobCancelRequested.avro_name, FORCE)
    return new_dir


def test_evolved_schema_has_a_new_fingerprint(evolved: Path) -> None:
    old = dict(_load_dir(SCHEMA_DIR))[JobCancelRequested.avro_name]
    new = dict(_load_dir(evolved))[JobCancelRequested.avro_name]
    assert fingerprint(old) != fingerprint(new)
    # And a reader that was never told about the other version refuses rather than guesses.
    new_bytes = Codec(schema_dir=evolved, history_dirs=[]).encode(EXAMPLES[JobCancelRequested][0]())
    with pytest.raises(DecodeError, match="unknown writer schema fingerprint"):
        Codec(history_dirs=[]).decode(new_bytes)


def test_new_reader_reads_old_record_and_fills_the_default(tmp_path: Path, evolved: Path) -> None:
    old_versions = _history(tmp_path / "old-history", SCHEMA_DIR, [JobCancelRequested.avro_name], 1)
    ev = EXAMPLES[JobCancelRequested][0]()
    old_bytes = Codec(history_dirs=[]).encode(ev)  # the shipped writer

    new_reader = Codec(schema_dir=evolved, history_dirs=[old_versions])
    name, record = new_reader.decode_dict(old_bytes)
    assert name == JobCancelRequested.avro_name
    assert record == {"event_id": "ev-1", "occurred_at_ms": T0 + 5, "user_id": "alice", "tenant_id": "acme",
                      "job_id": JOB, "reason": "no longer needed", "force": False}
    # Without the old version in its history the new reader cannot resolve the old record.
    with pytest.raises(DecodeError, match="unknown writer schema fingerprint"):
        Codec(schema_dir=evolved, history_dirs=[]).decode_dict(old_bytes)


def test_new_writer_uses_the_new_schema(evolved: Path) -> None:
    new_codec = Codec(schema_dir=evolved, history_dirs=[])
    data = new_codec.encode(EXAMPLES[JobCancelRequested][0]())
    assert data[2:HEADER_LEN] == fingerprint(dict(_load_dir(evolved))[JobCancelRequested.avro_name])
    assert new_codec.decode_dict(data)[1]["force"] is False  # missing in the Python value: the default


def test_old_reader_reads_new_record_and_drops_the_new_field(tmp_path: Path, evolved: Path) -> None:
    new_versions = _history(tmp_path / "new-history", evolved, [JobCancelRequested.avro_name], 2)
    ev = EXAMPLES[JobCancelRequested][0]()
    new_codec = Codec(schema_dir=evolved, history_dirs=[])
    new_bytes = _write_raw(evolved, JobCancelRequested.avro_name,
                           {**new_codec.decode_dict(new_codec.encode(ev))[1], "force": True})
    assert new_bytes[:HEADER_LEN] == new_codec.encode(ev)[:HEADER_LEN]
    assert new_codec.decode_dict(new_bytes)[1]["force"] is True

    old_reader = Codec(schema_dir=SCHEMA_DIR, history_dirs=[new_versions])
    decoded = old_reader.decode(new_bytes)
    assert decoded == ev
    assert not hasattr(decoded, "force")


PRIORITY_CLASS = {"name": "sla_class", "type": ["null", "string"], "default": None}


def test_nested_record_evolution_both_ways(tmp_path: Path) -> None:
    # JobSpec gains a field.  Every top-level record that embeds JobSpec changes with it, so
    # their expanded old (resp. new) versions are what the history must hold.
    embedding = [JobSubmitted.avro_name, JobStatusChanged.avro_name, SchedulerJobState.avro_name]
    new_dir = _copy_schemas(tmp_path / "new")
    _add_field(new_dir, "io.jobsched.JobSpec", PRIORITY_CLASS)
    old_versions = _history(tmp_path / "old-history", SCHEMA_DIR, embedding, 1)
    new_versions = _history(tmp_path / "new-history", new_dir, embedding, 2)
    for name in embedding:
        assert (fingerprint(dict(_load_dir(SCHEMA_DIR))[name])
                != fingerprint(dict(_load_dir(new_dir))[name]))

    ev = EXAMPLES[JobSubmitted][0]()
    shipped = Codec(history_dirs=[])

    # (a) old record, new reader: the nested default appears.
    new_reader = Codec(schema_dir=new_dir, history_dirs=[old_versions])
    name, record = new_reader.decode_dict(shipped.encode(ev))
    assert name == JobSubmitted.avro_name
    assert record["spec"]["sla_class"] is None
    assert record["spec"]["job_id"] == JOB and record["spec"]["retry"]["max_retries"] == 3

    # (b) new record with the field set, old reader: decodes to today's class without it.
    new_record = new_reader.decode_dict(shipped.encode(ev))[1]
    new_record["spec"]["sla_class"] = "gold"
    new_bytes = _write_raw(new_dir, JobSubmitted.avro_name, new_record)
    assert new_reader.decode_dict(new_bytes)[1]["spec"]["sla_class"] == "gold"
    old_reader = Codec(schema_dir=SCHEMA_DIR, history_dirs=[new_versions])
    assert old_reader.decode(new_bytes) == ev


def test_history_entries_for_records_no_longer_in_the_contract_are_ignored(tmp_path: Path) -> None:
    hist = tmp_path / "hist"
    hist.mkdir()
    (hist / "io.jobsched.Retired.v1.avsc").write_text(json.dumps(
        {"type": "record", "name": "Retired", "namespace": "io.jobsched", "fields": [{"name": "x", "type": "int"}]}))
    codec = Codec(history_dirs=[hist])
    ev = EXAMPLES[RunHeartbeat][0]()
    assert codec.decode(codec.encode(ev)) == ev


def test_log_chunks_written_before_worker_id_existed_still_read() -> None:
    # schemas/history holds LogChunk v1 (no worker_id): records of older workers decode
    # into today's class with the default.
    import io
    import json

    import fastavro

    from schemas.codec import HISTORY_DIR, MAGIC, fingerprint

    v1 = json.loads((HISTORY_DIR / "io.jobsched.LogChunk.v1.avsc").read_text())
    assert "worker_id" not in {f["name"] for f in v1["fields"]}
    buf = io.BytesIO()
    buf.write(MAGIC + fingerprint(v1))
    fastavro.schemaless_writer(buf, fastavro.parse_schema(v1), {
        "event_id": "e1", "occurred_at_ms": 1, "user_id": "u", "tenant_id": "t", "job_id": "j",
        "run_id": "j@1", "attempt": 1, "seq": 0, "stream": "stdout", "data": "old\n", "eof": False})
    old = Codec().decode(buf.getvalue())
    assert isinstance(old, LogChunk) and old.data == "old\n" and old.worker_id is None


def test_run_status_events_written_before_job_fields_existed_still_read() -> None:
    # schemas/history holds RunStatusChanged v1 (no job_* fields): such records decode
    # into today's class, carrying no job change.
    import io
    import json

    import fastavro

    from schemas.codec import HISTORY_DIR, MAGIC, fingerprint

    v1 = json.loads((HISTORY_DIR / "io.jobsched.RunStatusChanged.v1.avsc").read_text())
    assert not {f["name"] for f in v1["fields"]} & {"job_status", "job_reason", "job_attempts", "job_next_fire_ms"}
    buf = io.BytesIO()
    buf.write(MAGIC + fingerprint(v1))
    fastavro.schemaless_writer(buf, fastavro.parse_schema(v1), {
        "event_id": "e1", "occurred_at_ms": 1, "user_id": "u", "tenant_id": "t", "job_id": "j",
        "run_id": "j@1", "attempt": 1, "status": "running", "nominal_ms": 1, "worker_id": "w",
        "exit_code": None, "reason": None, "started_at_ms": 2, "finished_at_ms": None, "retry_at_ms": None})
    old = Codec().decode(buf.getvalue())
    assert isinstance(old, RunStatusChanged) and (old.status, old.worker_id) == ("running", "w")
    assert old.job_status is None and old.job_change() is None


def test_a_run_event_carrying_a_job_change_reads_as_that_change() -> None:
    from schemas.events import job_changes

    ev = EXAMPLES[RunStatusChanged][2]()
    change = ev.job_change()
    assert change == JobStatusChanged(event_id=ev.event_id, occurred_at_ms=ev.occurred_at_ms, user_id=ev.user_id,
                                      tenant_id=ev.tenant_id, job_id=ev.job_id, status="pending",
                                      reason="retry 1/3 after failed (exit code 2)", attempts=1, run_id=ev.run_id,
                                      next_fire_ms=T0 + 60_000)
    own = EXAMPLES[JobStatusChanged][1]()
    plain = EXAMPLES[RunStatusChanged][1]()
    assert job_changes([own, plain, ev]) == [own, change]


def test_a_forked_child_draws_event_ids_of_its_own() -> None:
    import multiprocessing

    from schemas.events import next_event_id

    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        child = pool.apply(next_event_id)
    mine = next_event_id()
    assert child.rsplit("-", 1)[0] != mine.rsplit("-", 1)[0]
    assert len({next_event_id() for _ in range(1000)}) == 1000


def test_nullable_records_encode_the_same_bytes_as_fastavros_own_branch_choice(codec: Codec) -> None:
    """Naming the union branch is only a shortcut: the bytes are those fastavro picks itself."""
    seen = 0
    for cls, makers in EXAMPLES.items():
        header, schema = codec._writer[cls.avro_name]
        shape = codec._shapes[cls.avro_name]
        for make in makers:
            value = make()

            def plain(v: Any) -> Any:  # the record as dicts only, branch left to fastavro
                s = codec._shapes["io.jobsched." + type(v).__name__]
                out = {}
                for n in s.names:
                    x = getattr(v, n)
                    if x is not None and n in s.nested:
                        x = plain(x)
                    elif x is not None and n in s.lists:
                        x = [plain(i) for i in x]
                    out[n] = x
                return out

            buf = io.BytesIO()
            buf.write(header)
            fastavro.schemaless_writer(buf, schema, plain(value))
            assert codec.encode(value) == buf.getvalue()
            seen += bool(shape.unions)
    assert seen >= 3
