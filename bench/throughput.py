"""throughput: N no-op jobs submitted as fast as the client can, end to end.

The client is the product's :class:`~producers.client.JobClient` (``submit(...,
wait=False)`` for each job, then ``flush()``), in the bench process.  Each job runs
``bench.noop:noop`` on the ``python`` executor (the worker calls it in-process, as
Celery's worker does with its task).  A job counts once its ``completed`` status is
visible in PostgreSQL (the projector's commit), polled with
``SELECT status, count(*) FROM jobs WHERE user_id = <batch user>``.

Reported: submit_per_s (client until every command is acknowledged), jobs_per_s (first
submit to last ``completed`` visible), submit-to-start latency p50/p99 (runs.started_at,
i.e. the worker's RunStarted time, minus the spec's submitted_at), CPU seconds per
1,000 jobs of every process, and the records the system wrote per job (counted on the
topics, read_committed, after the run) for the ceiling comparison.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import (
    NOOP_TARGET,
    BenchEnv,
    CpuLedger,
    CpuWatch,
    Progress,
    RunOptions,
    count_topic_records,
    now_ms,
    pg_backend_cpu_s,
    pg_counts,
    pg_start_latency,
    proc_cpu_s,
    rnd,
    say,
    stack_pids,
    write_result,
)
from infra.stack import FERRETDB_DATABASE

FINAL = ("completed", "failed", "cancelled")


def ledger_for(env: BenchEnv, procs: dict[str, list[Any]]) -> CpuLedger:
    """CPU accounting of every service process of ``env``, Kafka, our PG backends and
    FerretDB (with its PG backends)."""
    led = CpuLedger()
    for role, ps in procs.items():
        for i, p in enumerate(ps):
            name = role.rstrip("s") + (f"-{i + 1}" if len(ps) > 1 else "")
            led.add(name, p.cpu_s)
    pids = stack_pids(env.base)
    if pids.get("kafka"):
        kpid = pids["kafka"]
        led.add("kafka-broker (shared)", lambda: proc_cpu_s(kpid))
    db = env.db
    led.add("postgres-backends", lambda: pg_backend_cpu_s(db))
    if pids.get("ferretdb"):
        # The logs projection's store: FerretDB and the PostgreSQL backends it holds open.
        fpid = pids["ferretdb"]
        led.add("ferretdb (shared)", lambda: (proc_cpu_s(fpid) or 0.0) + pg_backend_cpu_s(FERRETDB_DATABASE))
    return led


def run_batch(env: BenchEnv, n: int, user: str, led: CpuLedger, *, label: str = "throughput",
              stall_timeout: float = 180.0) -> dict[str, Any]:
    """Submit ``n`` no-op jobs as user ``user`` and wait until all are final in PostgreSQL."""
    import os

    from producers.client import JobClient

    client = JobClient(env.settings, user_id=user)
    conn = env.pg()
    prog = Progress(f"{label}: submit", n)
    led.start()
    cpu_client0 = os.times()
    t0 = time.monotonic()
    t0_ms = now_ms()
    for i in range(n):
        client.submit(python=NOOP_TARGET, name="noop", wait=False)
        if i % 500 == 0:
            prog.update(i)
    client.flush()
    submit_s = time.monotonic() - t0
    c1 = os.times()
    client_cpu = (c1.user - cpu_client0.user) + (c1.system - cpu_client0.system)
    prog.done(f"{n / submit_s:,.0f}/s")
    client.close()

    prog = Progress(f"{label}: complete", n)
    last_done, last_change = -1, time.monotonic()
    counts: dict[str, int] = {}
    timed_out = False
    while True:
        counts = pg_counts(conn, user)
        done = sum(counts.get(s, 0) for s in FINAL)
        led.snapshot()
        now = time.monotonic()
        prog.update(done, f"{done / (now - t0):,.0f}/s e2e")
        if done >= n:
            break
        if done != last_done:
            last_done, last_change = done, now
        elif now - last_change > stall_timeout:
            timed_out = True
            say(f"{label}: no progress for {stall_timeout:.0f}s at {done}/{n}; giving up")
            break
        time.sleep(0.1 if n <= 5000 else 0.25)
    e2e_s = time.monotonic() - t0
    led.snapshot()
    prog.done(f"{done / e2e_s:,.0f}/s e2e")
    lat = pg_start_latency(conn, user)
    conn.close()
    completed = counts.get("completed", 0)
    cpu = led.result(n)
    cpu["bench-client (submit)"] = {"cpu_s": round(client_cpu, 2),
                                    "cpu_s_per_1000_jobs": round(client_cpu / n * 1000, 3)}
    return {
        "jobs": n,
        "completed": completed,
        "final_counts": counts,
        "timed_out": timed_out,
        "submit_s": round(submit_s, 3),
        "e2e_s": round(e2e_s, 3),
        "submit_per_s": rnd(n / submit_s, 1),
        "jobs_per_s": rnd(completed / e2e_s, 1),
        "start_latency": lat,
        "cpu": cpu,
        "cpu_total_s": round(led.total() + client_cpu, 2),
        "started_at_ms": t0_ms,
    }


def messages_per_job(env: BenchEnv, n: int) -> dict[str, Any]:
    """Every record the run left on its topics (read_committed), per job."""
    from infra.kafka import make_admin

    topics = sorted(t for t in make_admin(env.settings).list_topics(timeout=10).topics
                    if t.startswith(env.prefix + "."))
    prog = Progress("count records")
    per_topic = count_topic_records(env.settings, topics, prog)
    prog.done()
    total = sum(t["records"] for t in per_topic.values())
    vbytes = sum(t["value_bytes"] for t in per_topic.values())
    kbytes = sum(t["key_bytes"] for t in per_topic.values())
    offsets = sum(t["offsets"] for t in per_topic.values())
    return {
        "messages_per_job": round(total / n, 3) if n else None,
        "records": total,
        "offsets_incl_txn_markers": offsets,
        "mean_value_bytes": round(vbytes / total, 1) if total else None,
        "mean_key_bytes": round(kbytes / total, 1) if total else None,
        "per_topic": {t.removeprefix(env.prefix + "."): {**v, "per_job": round(v["records"] / n, 3)}
                      for t, v in per_topic.items() if v["offsets"]},
    }


def run(opts: RunOptions, machine: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    n = opts.pick(200, 2000, 200_000, "jobs")
    watch = CpuWatch()
    with BenchEnv(opts, "throughput") as env:
        say(f"throughput: {n:,} no-op jobs, 1 scheduler, 1 worker (concurrency {opts.concurrency}), "
            f"1 projector; topics {env.prefix}.*")
        procs = env.start_system(schedulers=1, workers=1)
        led = ledger_for(env, procs)
        res = run_batch(env, n, f"{env.prefix}-u", led)
        mpj = messages_per_job(env, n)
        load = watch.result(res["cpu_total_s"])
        metrics = {
            "jobs_per_s": res["jobs_per_s"],
            "submit_per_s": res["submit_per_s"],
            "start_latency_p50_ms": res["start_latency"]["p50_ms"],
            "start_latency_p99_ms": res["start_latency"]["p99_ms"],
            "celery_jobs_per_s": None,
            "ratio_vs_celery": None,
            "raw_kafka_msgs_per_s": None,
            "ceiling_ratio": None,
            "cpu_s_per_1000_jobs": {k: v["cpu_s_per_1000_jobs"] for k, v in res["cpu"].items()},
            "messages_per_job": mpj["messages_per_job"],
        }
        notes = [
            "start latency is measured while the whole batch is queued at once, so it is dominated by "
            "queueing behind the backlog (p99 ~ the batch's drain time), not by per-job overhead",
        ]
        if res["timed_out"]:
            notes.append(f"only {res['completed']} of {n} jobs completed before the stall timeout")
        if res["final_counts"].get("failed"):
            notes.append(f"{res['final_counts']['failed']} jobs failed")
        return write_result(
            opts, "throughput", metrics=metrics, machine=machine, started=started, notes=notes,
            params={"jobs": n, "schedulers": 1, "workers": 1, "worker_concurrency": opts.concurrency,
                    "executor": f"python {NOOP_TARGET}", "partitions": env.settings.partitions,
                    "client": "JobClient.submit(wait=False) per job, then flush()"},
            details={"batch": res, "records": mpj, "machine_load": load},
        )
