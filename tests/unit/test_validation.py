"""Refusals of job specs and DAGs, each with a message that says what is wrong."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from infra.errors import DependencyCycle, ValidationError
from producers.client import build_spec
from scheduler.validation import MAX_ARGV_BYTES, MAX_DEPENDENCIES, check_dag, validate_spec
from schemas.events import ExecutorSpec, HttpSpec, JobSpec, PythonSpec, RetryPolicy, ScheduleSpec

T0 = 1_767_225_600_000


def good(**changes: Any) -> JobSpec:
    spec = JobSpec(job_id="job-1", name="report", user_id="alice", submitted_at_ms=T0,
                   executor=ExecutorSpec.of_shell(["echo", "hi"]))
    return replace(spec, **changes)


def sched(**changes: Any) -> ScheduleSpec:
    return replace(ScheduleSpec(), **changes)


def test_a_good_spec_passes() -> None:
    validate_spec(good())
    validate_spec(good(schedule=sched(cron="*/5 * * * *", timezone="America/New_York", overlap="allow",
                                      catchup="all"), priority="high", queue="gpu_jobs-2"))
    validate_spec(good(after=["a", "b"], schedule=sched(at_ms=T0 + 1)))
    validate_spec(good(executor=ExecutorSpec(kind="http", http=HttpSpec(url="https://x.example/hook"))))
    validate_spec(good(executor=ExecutorSpec(kind="python", python=PythonSpec(target="pkg.mod:fn"))))


REFUSALS: list[tuple[str, JobSpec, str]] = [
    ("empty job id", good(job_id=""), "job_id must be 1-100 characters"),
    ("long job id", good(job_id="x" * 101), "job_id must be 1-100 characters"),
    ("empty name", good(name=""), "name must be 1-200 characters"),
    ("no user", good(user_id=""), "user_id is required"),
    ("bad queue", good(queue="a b"), "queue 'a b' may only hold letters, digits"),
    ("empty queue", good(queue=""), "queue '' may only hold"),
    ("bad priority", good(priority="urgent"), "priority must be one of high, normal, low, got 'urgent'"),
    ("bad executor", good(executor=ExecutorSpec(kind="docker")),
     "executor must be one of shell, http, python, got 'docker'"),
    ("shell without branch", good(executor=ExecutorSpec(kind="shell")), "a shell job needs a command"),
    ("empty command", good(executor=ExecutorSpec.of_shell([])), "a shell job needs a command"),
    ("empty argv[0]", good(executor=ExecutorSpec.of_shell(["", "x"])), "a shell job needs a command"),
    ("huge command", good(executor=ExecutorSpec.of_shell(["x" * (MAX_ARGV_BYTES + 1)])),
     f"the command is longer than {MAX_ARGV_BYTES} bytes"),
    ("http without branch", good(executor=ExecutorSpec(kind="http")), "an http job needs an http:// or https:// URL"),
    ("http without scheme", good(executor=ExecutorSpec(kind="http", http=HttpSpec(url="example.com"))),
     "needs an http:// or https:// URL"),
    ("http ftp", good(executor=ExecutorSpec(kind="http", http=HttpSpec(url="ftp://example.com"))),
     "needs an http:// or https:// URL"),
    ("python without colon", good(executor=ExecutorSpec(kind="python", python=PythonSpec(target="pkg.mod.fn"))),
     "a python job needs a target 'package.module:function'"),
    ("python without branch", good(executor=ExecutorSpec(kind="python")), "a python job needs a target"),
    ("cron and at", good(schedule=sched(cron="0 * * * *", at_ms=T0)),
     r"either recurring \(cron\) or due at one time \(at\), not both"),
    ("bad cron", good(schedule=sched(cron="61 * * * *")), r"bad cron expression '61 \* \* \* \*'"),
    ("short cron", good(schedule=sched(cron="* * *")), "expected 5 fields"),
    ("cron with after", good(schedule=sched(cron="0 * * * *"), after=["up"]),
     "a recurring job cannot wait on other jobs"),
    ("bad tz", good(schedule=sched(timezone="Europe/Atlantis")),
     "unknown time zone 'Europe/Atlantis' .*IANA name"),
    ("bad overlap", good(schedule=sched(cron="0 * * * *", overlap="queue")),
     "overlap must be one of allow, forbid, replace, got 'queue'"),
    ("bad catchup", good(schedule=sched(catchup="none")), "catchup must be one of skip, latest, all, got 'none'"),
    ("negative window", good(schedule=sched(catchup_window_ms=-1)), "catchup window must not be negative"),
    ("negative retries", good(retry=RetryPolicy(max_retries=-1)), "retries must be between 0 and 100"),
    ("too many retries", good(retry=RetryPolicy(max_retries=101)), "retries must be between 0 and 100"),
    ("negative backoff", good(retry=RetryPolicy(backoff_ms=-1)), "backoff must be >= 0"),
    ("cap below base", good(retry=RetryPolicy(backoff_ms=5000, backoff_max_ms=1000)), "backoff-max >= backoff"),
    ("zero timeout", good(timeout_ms=0), "timeout must be positive"),
    ("short lease", good(lease_ms=999), "lease must be at least 1s"),
    ("too many deps", good(after=[f"u{i}" for i in range(MAX_DEPENDENCIES + 1)]),
     f"at most {MAX_DEPENDENCIES} dependencies"),
    ("self dependency", good(after=["other", "job-1"]), "a job cannot depend on itself"),
    ("duplicate dependency", good(after=["a", "b", "a"]), "a dependency is listed twice"),
]


@pytest.mark.parametrize(("spec", "message"), [pytest.param(s, m, id=i) for i, s, m in REFUSALS])
def test_refusal_names_the_problem(spec: JobSpec, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        validate_spec(spec)


def test_refusals_are_value_errors_for_generic_callers() -> None:
    with pytest.raises(ValueError):
        validate_spec(good(priority="urgent"))


def test_boundaries_that_are_allowed() -> None:
    validate_spec(good(job_id="x" * 100, name="n" * 200, lease_ms=1000, timeout_ms=1,
                       retry=RetryPolicy(max_retries=100, backoff_ms=0, backoff_max_ms=0),
                       after=[f"u{i}" for i in range(MAX_DEPENDENCIES)],
                       schedule=sched(catchup_window_ms=0)))
    validate_spec(good(executor=ExecutorSpec.of_shell(["x" * MAX_ARGV_BYTES])))


def test_build_spec_validates_too() -> None:
    spec = build_spec(["echo", "hi"], user_id="alice", cron="0 3 * * *", timezone="Europe/Berlin", retries=2,
                      backoff="5s", timeout="10m", now=T0)
    assert spec.retry == RetryPolicy(max_retries=2, backoff_ms=5000, backoff_max_ms=300_000)
    assert spec.timeout_ms == 600_000 and spec.schedule.cron == "0 3 * * *"
    with pytest.raises(ValidationError, match="unknown time zone"):
        build_spec(["echo"], user_id="alice", cron="0 3 * * *", timezone="Nowhere/City", now=T0)
    with pytest.raises(ValidationError, match="give at most one of --at, --in and --cron"):
        build_spec(["echo"], user_id="alice", cron="0 3 * * *", delay="5m", now=T0)
    with pytest.raises(ValidationError, match="give exactly one of"):
        build_spec(["echo"], user_id="alice", http={"url": "https://x"}, now=T0)
    with pytest.raises(ValidationError, match="an http job needs"):
        build_spec(None, user_id="alice", http={"url": "x.example"}, now=T0)


# ----------------------------------------------------------------------------------- DAGs


def test_dag_order_puts_upstreams_first() -> None:
    edges = {"report": ["extract", "load"], "load": ["extract"], "extract": [], "notify": ["report"]}
    order = check_dag(edges)
    assert sorted(order) == sorted(edges)
    pos = {n: i for i, n in enumerate(order)}
    for name, ups in edges.items():
        for up in ups:
            assert pos[up] < pos[name], (up, name, order)


def test_dag_of_independent_jobs_and_empty_batch() -> None:
    assert sorted(check_dag({"a": [], "b": []})) == ["a", "b"]
    assert check_dag({}) == []


def test_known_upstreams_outside_the_batch_are_allowed_and_not_returned() -> None:
    assert check_dag({"b": ["existing"], "c": ["b", "existing"]}, known=["existing"]) == ["b", "c"]


def test_unknown_upstream_is_refused_by_name() -> None:
    with pytest.raises(ValidationError, match="job 'b' depends on 'ghost', which is neither in the batch nor a known"):
        check_dag({"a": [], "b": ["a", "ghost"]}, known=["other"])


def test_cycle_is_refused_naming_its_members() -> None:
    with pytest.raises(DependencyCycle) as info:
        check_dag({"start": [], "a": ["start", "c"], "b": ["a"], "c": ["b"], "tail": ["c"]})
    assert sorted(info.value.cycle) == ["a", "b", "c"]
    msg = str(info.value)
    assert msg.startswith("dependency cycle: ")
    chain = msg.removeprefix("dependency cycle: ").split(" -> ")
    assert chain[0] == chain[-1] and sorted(chain[:-1]) == ["a", "b", "c"]
    # The chain follows the edges: each member is an upstream of the next.
    edges = {"a": ["start", "c"], "b": ["a"], "c": ["b"]}
    for up, down in zip(chain, chain[1:]):
        assert up in edges[down]


def test_two_job_cycle_and_cycle_is_a_validation_error() -> None:
    with pytest.raises(ValidationError, match=r"dependency cycle: (x -> y -> x|y -> x -> y)"):
        check_dag({"x": ["y"], "y": ["x"]})


def test_self_loop_in_a_batch_is_a_cycle() -> None:
    with pytest.raises(DependencyCycle, match="dependency cycle: solo -> solo"):
        check_dag({"solo": ["solo"]})
