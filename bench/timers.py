"""timers: firing precision of due times and cron schedules, and duplicate firings.

N one-off jobs are due at uniformly random instants of a window of W seconds
(full: 100,000 over 60 s, ~1,667 due per second), plus C cron schedules ``* * * * *``
(full: 1,000) whose firing at the minute boundary inside the window adds a burst of C
at one instant.  All are submitted ahead of the window (one-offs first; the crons last,
less than a minute before the boundary, so each fires exactly once inside it), and
the window starts only after a lead time meant to let the scheduler ingest them.

Lateness of a firing = ``RunStarted.occurred_at_ms − nominal`` (for an attempt that
ended before its start was reported, the ``started_at_ms`` of its ``RunFinished``
with ``implies_start``): the worker's clock when the job started minus the time it was due — what a user of a scheduler cares
about, and what Celery's side measures (task start − ETA).  The scheduler dispatches
timed runs up to its lookahead (1 s by default) ahead with ``not_before_ms`` and
the worker starts them on the instant, so this is not the dispatch time.  The bench
reads the ready topics and the reports topic with ``isolation.level=read_committed``
in a background thread, so only committed records count; it also reports the dispatch
side: ``dispatch_lateness`` = max(0, ``RunReady.occurred_at_ms`` − nominal) and how
far ahead runs were dispatched.  Duplicate firings = run ids dispatched more than once
(must be 0); runs started more than once are counted too.  The whole system runs
(worker and projector too), so the scheduler also absorbs the workers' reports while
it fires.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

from bench.common import (
    plan_dues,
    NOOP_TARGET,
    BenchEnv,
    CpuWatch,
    Progress,
    ReadyTail,
    RunOptions,
    group_lag,
    now_ms,
    percentile,
    rnd,
    say,
    write_result,
)
from bench.throughput import ledger_for


def wait_ingested(env: BenchEnv, label: str, timeout: float) -> float:
    """Wait until the scheduler group has committed every command; seconds waited."""
    t0 = time.monotonic()
    s = env.settings
    prog = Progress(label)
    while True:
        lag = group_lag(s, s.group_id("scheduler"), [s.commands_topic])
        prog.update(lag, "commands not yet applied")
        if lag <= 0:
            prog.done()
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            say(f"{label}: scheduler still {lag} commands behind after {timeout:.0f}s")
            return time.monotonic() - t0
        time.sleep(0.5)


def stats(values: list[float]) -> dict[str, Any]:
    return {"count": len(values), "p50_ms": rnd(percentile(values, 50), 1), "p99_ms": rnd(percentile(values, 99), 1),
            "p999_ms": rnd(percentile(values, 99.9), 1), "max_ms": rnd(max(values), 1) if values else None,
            "min_ms": rnd(min(values), 1) if values else None}


def run(opts: RunOptions, machine: dict[str, Any]) -> dict[str, Any]:
    from producers.client import JobClient

    started = time.monotonic()
    n = opts.pick(200, 5000, 100_000, "timer_jobs")
    window_s = opts.pick(2, 10, 60, "window_s")
    crons = opts.pick(0, 50, 1000, "crons")
    lead_s = opts.pick(4, 12, n / 1500 + 20, "lead_s")
    watch = CpuWatch()
    with BenchEnv(opts, "timers") as env:
        say(f"timers: {n:,} one-off jobs over {window_s}s + {crons:,} cron schedules (* * * * *); "
            f"topics {env.prefix}.*")
        procs = env.start_system(schedulers=1, workers=1)
        led = ledger_for(env, procs)
        tail = ReadyTail(env.settings, starts=True)
        tail.start()
        w_ms = int(window_s * 1000)
        t0, boundary, dues = plan_dues(now_ms(), lead_s, window_s, n, crons)
        user = f"{env.prefix}-u"
        client = JobClient(env.settings, user_id=user)
        led.start()
        prog = Progress("timers: submit", n + crons)
        ts = time.monotonic()
        for i, due in enumerate(dues):
            client.submit(python=NOOP_TARGET, name="timed", at=due, wait=False)
            if i % 500 == 0:
                prog.update(i)
        client.flush()
        submit_s = time.monotonic() - ts
        ingest_s = wait_ingested(env, "timers: ingest", max(30.0, (t0 - now_ms()) / 1000))
        cron_ids: set[str] = set()
        if crons:
            # Submitted less than a minute before the boundary, so the first firing is it.
            wait_until = boundary - 58_000
            if now_ms() < wait_until:
                time.sleep((wait_until - now_ms()) / 1000)
            for i in range(crons):
                cron_ids.add(client.submit(python=NOOP_TARGET, name=f"cron-{i}", cron="* * * * *", wait=False))
            client.flush()
            wait_ingested(env, "timers: ingest crons", 30)
        prog.done()
        client.close()
        backlog_at_t0 = now_ms() > t0
        slack_s = (t0 - now_ms()) / 1000
        if backlog_at_t0:
            say(f"timers: submissions were not all applied before the window opened ({-slack_s:.1f}s late)")
        expected = n + crons
        prog = Progress("timers: firing", expected)
        end = t0 + w_ms
        give_up = end + 120_000
        while True:
            got = min(len(tail.rows), len(tail.starts))
            led.snapshot()
            prog.update(got, "window " + ("open" if t0 <= now_ms() <= end else
                                          "closed" if now_ms() > end else f"opens in {(t0 - now_ms()) / 1000:.0f}s"))
            if now_ms() > end + 2000 and got >= expected:
                break
            if now_ms() > give_up:
                say(f"timers: only {got}/{expected} firings (dispatched and started) seen 2 min after the "
                    "window closed")
                break
            time.sleep(0.2)
        time.sleep(1.0)  # a late duplicate would show up now
        tail.stop()
        led.snapshot()
        prog.done()
        rows = tail.rows
        per_run = Counter(r[0] for r in rows)
        duplicates = sum(1 for c in per_run.values() if c > 1)
        nominal = {r[0]: r[4] for r in rows}
        first_start: dict[str, int] = {}
        for run_id, attempt, at in tail.starts:
            if attempt == 1 and run_id in nominal:
                first_start[run_id] = min(at, first_start.get(run_id, at))
        started_twice = sum(1 for c in Counter(s[0] for s in tail.starts if s[1] == 1).values() if c > 1)
        late = [at - nominal[run_id] for run_id, at in first_start.items()]
        is_cron = [run_id.split("@", 1)[0] in cron_ids for run_id in first_start]
        late_one = [v for v, c in zip(late, is_cron, strict=True) if not c]
        late_cron = [v for v, c in zip(late, is_cron, strict=True) if c]
        dispatch_late = [max(0, r[3] - r[4]) for r in rows]
        dispatch_lead = [r[4] - r[3] for r in rows]
        visible = [r[5] - r[4] for r in rows]
        per_second = Counter((d - t0) // 1000 for d in dues)
        if boundary is not None:
            per_second[(boundary - t0) // 1000] += crons
        all_stats = stats(late)
        metrics = {
            "lateness_p50_ms": all_stats["p50_ms"],
            "lateness_p99_ms": all_stats["p99_ms"],
            "lateness_max_ms": all_stats["max_ms"],
            "duplicate_firings": duplicates,
            "celery_lateness_p99_ms": None,
            "firings": len(rows),
            "expected_firings": expected,
            "missing_firings": max(0, expected - len(per_run)),
            "runs_started": len(first_start),
            "started_more_than_once": started_twice,
            "dispatch_lateness_p99_ms": stats(dispatch_late)["p99_ms"],
            "visible_lateness_p99_ms": stats(visible)["p99_ms"],
        }
        notes = []
        if backlog_at_t0:
            notes.append(f"the scheduler had not applied every submission when the window opened "
                         f"({-slack_s:.1f}s late): early firings include that backlog")
        load = watch.result(led.total())
        return write_result(
            opts, "timers", metrics=metrics, machine=machine, started=started, notes=notes,
            params={"one_off_jobs": n, "window_s": window_s, "crons": crons, "cron": "* * * * *",
                    "lead_s": round(lead_s, 1), "peak_due_per_s": max(per_second.values()) if per_second else 0,
                    "mean_due_per_s": round(n / window_s, 1), "schedulers": 1, "workers": 1,
                    "worker_concurrency": opts.concurrency, "executor": f"python {NOOP_TARGET}",
                    "dispatch_lookahead_ms": int(os.environ.get("JOBSCHED_DISPATCH_LOOKAHEAD_MS") or 1000),
                    "lateness": "RunStarted.occurred_at_ms, or RunFinished.started_at_ms when it implies the start "
                                "(worker clock) - nominal time, first attempt; "
                                "read_committed from the reports topic"},
            details={"all": all_stats, "one_off": stats(late_one), "cron": stats(late_cron),
                     "dispatch_lateness": stats(dispatch_late), "dispatch_lead": stats(dispatch_lead),
                     "visible": stats(visible), "submit_s": round(submit_s, 2), "ingest_wait_s": round(ingest_s, 2),
                     "slack_before_window_s": round(slack_s, 2), "cpu": led.result(expected),
                     "machine_load": load},
        )
