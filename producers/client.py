"""The Python client: how people's tools and other services submit and control jobs.

    from infra.config import Settings
    from producers.client import JobClient

    with JobClient(Settings.from_env(), user_id="billing-service") as client:
        job_id = client.submit(["python", "-m", "billing.close_day"], name="close-day",
                               cron="0 2 * * *", timezone="Europe/Paris", retries=3)
        print(client.status(job_id)["status"])

Writes go to Kafka as Avro commands (nothing writes the databases directly); reads
come from the projections.  A submit returns once the broker has acknowledged the
command, so an id the client returns is never lost.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Iterator, Mapping, Sequence

from confluent_kafka import KafkaException

from infra.config import Settings
from infra.errors import BrokerUnavailable, ValidationError
from infra.kafka import make_producer
from scheduler.timing import parse_duration_ms, parse_instant_ms
from scheduler.validation import check_dag, validate_spec
from schemas.codec import Codec, default_codec
from schemas.events import (
    Event,
    ExecutorSpec,
    HttpSpec,
    JobCancelRequested,
    JobSpec,
    JobSubmitted,
    PythonSpec,
    RetryPolicy,
    SchedulePaused,
    ScheduleResumed,
    ScheduleSpec,
    ShellSpec,
    new_id,
    now_ms,
)

#: Largest encoded command accepted (the broker's default record limit is 1 MiB).
MAX_COMMAND_BYTES = 512 * 1024


def _ms(value: int | float | str | None) -> int | None:
    """A duration as ms: ints are ms, strings are parsed ("30s")."""
    if value is None:
        return None
    if isinstance(value, str):
        return parse_duration_ms(value)
    return int(value)


def build_spec(
    command: Sequence[str] | None = None,
    *,
    user_id: str,
    tenant_id: str = "default",
    name: str | None = None,
    job_id: str | None = None,
    http: Mapping[str, Any] | None = None,
    python: str | None = None,
    python_kwargs: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    at: str | int | None = None,
    delay: str | int | None = None,
    cron: str | None = None,
    timezone: str = "UTC",
    overlap: str = "forbid",
    catchup: str = "latest",
    catchup_window: str | int | None = None,
    end: str | int | None = None,
    after: Sequence[str] = (),
    retries: int = 0,
    backoff: str | int = 1000,
    backoff_max: str | int = 300_000,
    timeout: str | int | None = None,
    lease: str | int = 30_000,
    queue: str = "default",
    priority: str = "normal",
    labels: Mapping[str, str] | None = None,
    now: int | None = None,
) -> JobSpec:
    """A validated :class:`JobSpec` from friendly arguments (durations as "30s" or ms)."""
    now = now_ms() if now is None else now
    kinds = [k for k, v in (("shell", command), ("http", http), ("python", python)) if v]
    if len(kinds) != 1:
        raise ValidationError("give exactly one of: a command, an http request, a python target")
    if kinds[0] == "shell":
        assert command is not None
        executor = ExecutorSpec(kind="shell", shell=ShellSpec(argv=list(command), env=dict(env or {}), cwd=cwd))
        default_name = " ".join(command)[:80]
    elif kinds[0] == "http":
        assert http is not None
        executor = ExecutorSpec(kind="http", http=HttpSpec(
            url=str(http["url"]), method=str(http.get("method", "GET")).upper(),
            headers={str(k): str(v) for k, v in dict(http.get("headers") or {}).items()},
            body=http.get("body"), success_codes=[int(c) for c in http.get("success_codes") or []]))
        default_name = f"{executor.http.method} {executor.http.url}"[:80]  # type: ignore[union-attr]
    else:
        assert python is not None
        executor = ExecutorSpec(kind="python", python=PythonSpec(target=python,
                                                                 kwargs_json=json.dumps(dict(python_kwargs or {}))))
        default_name = python[:80]
    if sum(x is not None for x in (at, delay, cron)) > 1:
        raise ValidationError("give at most one of --at, --in and --cron")
    at_ms: int | None = None
    if at is not None:
        at_ms = parse_instant_ms(at) if isinstance(at, str) else int(at)
    elif delay is not None:
        at_ms = now + (_ms(delay) or 0)
    schedule = ScheduleSpec(
        at_ms=at_ms, cron=cron, timezone=timezone, overlap=overlap, catchup=catchup,
        catchup_window_ms=_ms(catchup_window) if catchup_window is not None else 86_400_000,
        end_ms=(parse_instant_ms(end) if isinstance(end, str) else end),
    )
    spec = JobSpec(
        job_id=job_id or new_id(), name=name or default_name, user_id=user_id, tenant_id=tenant_id,
        executor=executor, submitted_at_ms=now, queue=queue, priority=priority, schedule=schedule,
        after=list(after), retry=RetryPolicy(max_retries=retries, backoff_ms=_ms(backoff) or 0,
                                            backoff_max_ms=_ms(backoff_max) or 0),
        timeout_ms=_ms(timeout), lease_ms=_ms(lease) or 30_000, labels=dict(labels or {}),
    )
    validate_spec(spec)
    return spec


class JobClient:
    """Submits and controls jobs; reads their status and logs from the projections."""

    def __init__(self, settings: Settings, *, user_id: str | None = None, tenant_id: str | None = None,
                 codec: Codec | None = None) -> None:
        self.settings = settings
        self.user_id = user_id or settings.user_id
        self.tenant_id = tenant_id or settings.tenant_id
        self.codec = codec or default_codec()
        self._producer: Any = None
        self._txn_producer: Any = None
        self._jobs: Any = None
        self._logs: Any = None

    # -- lifecycle --------------------------------------------------------------------

    def __enter__(self) -> "JobClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(10)
            self._producer = None
        if self._jobs is not None:
            self._jobs.close()
            self._jobs = None
        if self._logs is not None:
            self._logs.close()
            self._logs = None

    # -- writes -----------------------------------------------------------------------

    def _send(self, key: str, event: Event, *, wait: bool = True) -> None:
        value = self.codec.encode(event)
        if len(value) > MAX_COMMAND_BYTES:
            raise ValidationError(f"the job is {len(value)} bytes encoded; the limit is {MAX_COMMAND_BYTES}")
        if self._producer is None:
            self._producer = make_producer(self.settings, **{"message.timeout.ms": 15000})
        errors: list[str] = []

        def _ack(err: Any, _msg: Any) -> None:
            if err is not None:
                errors.append(err.str())

        try:
            self._producer.produce(self.settings.commands_topic, key=key.encode(), value=value, on_delivery=_ack)
        except BufferError:
            self._producer.flush(15)
            self._producer.produce(self.settings.commands_topic, key=key.encode(), value=value, on_delivery=_ack)
        except KafkaException as e:
            raise BrokerUnavailable(f"could not send to Kafka at {self.settings.kafka_bootstrap}: {e}") from e
        if wait:
            remaining = self._producer.flush(20)
            if remaining or errors:
                raise BrokerUnavailable(
                    f"Kafka at {self.settings.kafka_bootstrap} did not acknowledge the command"
                    + (f": {errors[0]}" if errors else " (is the broker running? try `jobsched stack status`)"))
        else:
            self._producer.poll(0)

    def _event_fields(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "tenant_id": self.tenant_id}

    def submit_spec(self, spec: JobSpec, *, wait: bool = True) -> str:
        """Submit a prepared spec; returns its job id."""
        if spec.user_id != self.user_id or spec.tenant_id != self.tenant_id:
            spec = replace(spec, user_id=self.user_id, tenant_id=self.tenant_id)
        validate_spec(spec)
        self._send(spec.job_id, JobSubmitted(spec=spec, **self._event_fields()), wait=wait)
        return spec.job_id

    def submit(self, command: Sequence[str] | None = None, **options: Any) -> str:
        """Submit a job (see :func:`build_spec` for the options); returns its id."""
        wait = options.pop("wait", True)
        spec = build_spec(command, user_id=self.user_id, tenant_id=self.tenant_id, **options)
        return self.submit_spec(spec, wait=wait)

    def flush(self) -> None:
        """Wait until every command sent with ``wait=False`` is acknowledged."""
        if self._producer is not None and self._producer.flush(60):
            raise BrokerUnavailable("Kafka did not acknowledge every command within 60 s")

    def submit_dag(self, jobs: Sequence[Mapping[str, Any]], *, known: Sequence[str] = ()) -> dict[str, str]:
        """Submit a batch of jobs with local names and ``after`` lists, atomically.

        Each entry: ``{"name": "extract", "command": [...], "after": ["other-name" or a job id], ...}``
        plus any :func:`build_spec` option.  Cycles and unknown names are refused before
        anything is sent; the batch is one Kafka transaction, so all or none is submitted.
        Returns name -> job id.
        """
        names = [str(j.get("name") or "") for j in jobs]
        if not all(names):
            raise ValidationError("every job of a DAG needs a name")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValidationError(f"job name {dup!r} appears twice in the DAG")
        edges = {str(j["name"]): [str(a) for a in j.get("after") or []] for j in jobs}
        order = check_dag(edges, known)
        ids = {n: new_id() for n in names}
        batch = new_id()
        by_name = {str(j["name"]): j for j in jobs}
        specs = []
        for n in order:
            opts = {k: v for k, v in by_name[n].items() if k not in ("name", "after", "command")}
            after = [ids.get(a, a) for a in edges[n]]
            specs.append(build_spec(by_name[n].get("command"), user_id=self.user_id, tenant_id=self.tenant_id,
                                    name=n, job_id=ids[n], after=after, **opts))
        if self._txn_producer is None:
            self._txn_producer = make_producer(self.settings, transactional_id=f"jobsched-client-{new_id()}")
            self._txn_producer.init_transactions(30)
        p = self._txn_producer
        try:
            p.begin_transaction()
            for spec in specs:
                ev = JobSubmitted(spec=spec, batch_id=batch, **self._event_fields())
                p.produce(self.settings.commands_topic, key=spec.job_id.encode(), value=self.codec.encode(ev))
            p.commit_transaction(30)
        except KafkaException as e:
            try:
                p.abort_transaction(10)
            except KafkaException:
                pass
            raise BrokerUnavailable(f"the DAG could not be submitted: {e.args[0].str()}") from e
        return ids

    def cancel(self, job_id: str, reason: str | None = None) -> None:
        self._send(job_id, JobCancelRequested(job_id=job_id, reason=reason, **self._event_fields()))

    def pause(self, job_id: str) -> None:
        self._send(job_id, SchedulePaused(job_id=job_id, **self._event_fields()))

    def resume(self, job_id: str) -> None:
        self._send(job_id, ScheduleResumed(job_id=job_id, **self._event_fields()))

    # -- reads ------------------------------------------------------------------------

    def _job_queries(self) -> Any:
        if self._jobs is None:
            from consumers.projections.queries import JobQueries

            self._jobs = JobQueries(self.settings)
        return self._jobs

    def _log_queries(self) -> Any:
        if self._logs is None:
            from consumers.projections.queries import LogQueries

            self._logs = LogQueries(self.settings)
        return self._logs

    def status(self, job_id: str) -> dict[str, Any]:
        """The job as projected: status, attempts, runs.  Raises JobNotFound."""
        return self._job_queries().get_job(job_id)  # type: ignore[no-any-return]

    def list(self, **filters: Any) -> list[dict[str, Any]]:
        return self._job_queries().list_jobs(**filters)  # type: ignore[no-any-return]

    def logs(self, job_id: str, run_id: str | None = None) -> list[dict[str, Any]]:
        return self._log_queries().get_logs(job_id, run_id=run_id)  # type: ignore[no-any-return]

    def follow(self, job_id: str, run_id: str | None = None) -> Iterator[dict[str, Any]]:
        return self._log_queries().follow(job_id, run_id=run_id)  # type: ignore[no-any-return]
