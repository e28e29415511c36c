"""Checks a job spec or a DAG before it is accepted, with messages that say what is wrong.

The client runs these before producing (so a user hears about a bad cron at once), and
the scheduler runs them again on every submission (other services produce directly).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import networkx as nx

from infra.errors import DependencyCycle, ValidationError
from scheduler.timing import validate_cron, zone
from schemas.events import CATCHUP_POLICIES, EXECUTOR_KINDS, OVERLAP_POLICIES, PRIORITIES, JobSpec

MAX_NAME = 200
MAX_ARGV_BYTES = 64 * 1024
MAX_DEPENDENCIES = 1000


def _queue_ok(q: str) -> bool:
    return bool(q) and len(q) <= 100 and all(c.isalnum() or c in "-_" for c in q)


def validate_spec(spec: JobSpec) -> None:
    """Raise :class:`ValidationError` naming the first problem of a job spec."""
    if not spec.job_id or len(spec.job_id) > 100:
        raise ValidationError("job_id must be 1-100 characters")
    if not spec.name or len(spec.name) > MAX_NAME:
        raise ValidationError(f"name must be 1-{MAX_NAME} characters")
    if not spec.user_id:
        raise ValidationError("user_id is required: every job belongs to a user")
    if not _queue_ok(spec.queue):
        raise ValidationError(f"queue {spec.queue!r} may only hold letters, digits, '-' and '_'")
    if spec.priority not in PRIORITIES:
        raise ValidationError(f"priority must be one of {', '.join(PRIORITIES)}, got {spec.priority!r}")
    ex = spec.executor
    if ex.kind not in EXECUTOR_KINDS:
        raise ValidationError(f"executor must be one of {', '.join(EXECUTOR_KINDS)}, got {ex.kind!r}")
    if ex.kind == "shell":
        if ex.shell is None or not ex.shell.argv or not ex.shell.argv[0]:
            raise ValidationError("a shell job needs a command")
        if sum(len(a) for a in ex.shell.argv) > MAX_ARGV_BYTES:
            raise ValidationError(f"the command is longer than {MAX_ARGV_BYTES} bytes")
    elif ex.kind == "http":
        if ex.http is None or not ex.http.url.startswith(("http://", "https://")):
            raise ValidationError("an http job needs an http:// or https:// URL")
    elif ex.kind == "python":
        if ex.python is None or ":" not in ex.python.target:
            raise ValidationError("a python job needs a target 'package.module:function'")
    sched = spec.schedule
    if sched.cron is not None and sched.at_ms is not None:
        raise ValidationError("a job is either recurring (cron) or due at one time (at), not both")
    if sched.cron is not None:
        validate_cron(sched.cron)
        if spec.after:
            raise ValidationError(
                "a recurring job cannot wait on other jobs; make the downstream jobs depend on it instead"
            )
    zone(sched.timezone)
    if sched.overlap not in OVERLAP_POLICIES:
        raise ValidationError(f"overlap must be one of {', '.join(OVERLAP_POLICIES)}, got {sched.overlap!r}")
    if sched.catchup not in CATCHUP_POLICIES:
        raise ValidationError(f"catchup must be one of {', '.join(CATCHUP_POLICIES)}, got {sched.catchup!r}")
    if sched.catchup_window_ms < 0:
        raise ValidationError("catchup window must not be negative")
    r = spec.retry
    if r.max_retries < 0 or r.max_retries > 100:
        raise ValidationError("retries must be between 0 and 100")
    if r.backoff_ms < 0 or r.backoff_max_ms < r.backoff_ms:
        raise ValidationError("backoff must be >= 0 and backoff-max >= backoff")
    if spec.timeout_ms is not None and spec.timeout_ms <= 0:
        raise ValidationError("timeout must be positive")
    if spec.lease_ms < 1000:
        raise ValidationError("lease must be at least 1s")
    if len(spec.after) > MAX_DEPENDENCIES:
        raise ValidationError(f"at most {MAX_DEPENDENCIES} dependencies")
    if spec.job_id in spec.after:
        raise ValidationError("a job cannot depend on itself")
    if len(set(spec.after)) != len(spec.after):
        raise ValidationError("a dependency is listed twice")


def check_dag(edges: Mapping[str, Sequence[str]], known: Iterable[str] = ()) -> list[str]:
    """Order of a batch of jobs given ``name -> upstream names``; refuse cycles and unknowns.

    ``known`` are ids outside the batch that exist already (they may be upstreams).
    Returns the names in a topological order (upstreams first).
    """
    known_set = set(known)
    g: nx.DiGraph = nx.DiGraph()
    g.add_nodes_from(edges)
    for name, ups in edges.items():
        for up in ups:
            if up not in edges and up not in known_set:
                raise ValidationError(f"job {name!r} depends on {up!r}, which is neither in the batch nor a known job")
            if up in edges:
                g.add_edge(up, name)
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return list(nx.topological_sort(g))
    raise DependencyCycle([u for u, _ in cycle])
