"""scaleout: end-to-end throughput with 1, 2 and 4 workers, then 1 vs 2 schedulers.

One deployment, grown step by step (processes are only added, so every step starts
from a warm system): 1 scheduler + 1 worker → batch; + 1 worker → batch; + 2 workers
→ batch; + 1 scheduler → batch.  Each batch is the throughput scenario's workload
(N no-op jobs submitted at once, a job counts once ``completed`` is visible in
PostgreSQL) with its own user id.  speedup_k_workers = jobs/s with k workers ÷ jobs/s
with 1; speedup_2_schedulers = jobs/s with 2 schedulers ÷ 1 (same workers).  On a
2-core machine more processes cannot add CPU: expect ≤ 1 once the CPU is saturated.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import NOOP_TARGET, BenchEnv, CpuWatch, Proc, RunOptions, rnd, say, write_result
from bench.throughput import ledger_for, run_batch


def run(opts: RunOptions, machine: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    n = opts.pick(200, 2000, 20_000, "jobs_per_step")
    worker_steps = opts.pick((1, 2, 4), (1, 2), (1, 2, 4))
    if "max_workers" in opts.overrides:
        worker_steps = tuple(k for k in (1, 2, 4) if k <= int(opts.overrides["max_workers"]))
    watch = CpuWatch()
    steps: list[dict[str, Any]] = []
    with BenchEnv(opts, "scaleout") as env:
        say(f"scaleout: {n:,} jobs per step; workers {worker_steps}, then 2 schedulers; topics {env.prefix}.*")
        procs = env.start_system(schedulers=1, workers=1)
        scheds: list[Proc] = procs["schedulers"]
        workers: list[Proc] = procs["workers"]
        total_cpu = 0.0
        for k in worker_steps:
            while len(workers) < k:
                w = env.worker()
                workers.append(w)
            for w in workers:
                w.wait_for("partitions assigned", 90)
            time.sleep(opts.pick(0.5, 2.0, 2.0))  # let the cooperative rebalance settle
            led = ledger_for(env, {"schedulers": scheds, "workers": workers, "projectors": procs["projectors"]})
            res = run_batch(env, n, f"{env.prefix}-w{k}", led, label=f"scaleout {len(scheds)}s/{k}w")
            total_cpu += res["cpu_total_s"]
            steps.append({"schedulers": len(scheds), "workers": k, **res})
        s2 = env.scheduler()
        scheds.append(s2)
        s2.wait_for("partitions_restored", 90)
        time.sleep(opts.pick(1.0, 3.0, 3.0))
        led = ledger_for(env, {"schedulers": scheds, "workers": workers, "projectors": procs["projectors"]})
        k = len(workers)
        res = run_batch(env, n, f"{env.prefix}-s2w{k}", led, label=f"scaleout 2s/{k}w")
        total_cpu += res["cpu_total_s"]
        steps.append({"schedulers": 2, "workers": k, **res})

        def rate(s: int, w: int) -> float | None:
            for st in steps:
                if st["schedulers"] == s and st["workers"] == w:
                    return st["jobs_per_s"]  # type: ignore[no-any-return]
            return None

        r1 = rate(1, 1)

        def speedup(r: float | None, base: float | None) -> float | None:
            return rnd(r / base, 3) if r and base else None

        metrics = {
            "speedup_2_workers": speedup(rate(1, 2), r1),
            "speedup_4_workers": speedup(rate(1, 4), r1),
            "speedup_2_schedulers": speedup(rate(2, k), rate(1, k)),
            "jobs_per_s": {f"{st['schedulers']}s_{st['workers']}w": st["jobs_per_s"] for st in steps},
        }
        notes = ["2 cores: the whole system (Kafka, PostgreSQL, scheduler(s), worker(s), projector, client) "
                 "shares them, so added processes compete for the same CPU"]
        if 4 not in worker_steps:
            notes.append("4 workers not run at this size (quick runs 1 and 2)")
        return write_result(
            opts, "scaleout", metrics=metrics, machine=machine, started=started, notes=notes,
            params={"jobs_per_step": n, "worker_steps": list(worker_steps), "worker_concurrency": opts.concurrency,
                    "executor": f"python {NOOP_TARGET}", "partitions": env.settings.partitions},
            details={"steps": [{k2: v for k2, v in st.items()} for st in steps],
                     "machine_load": watch.result(total_cpu)},
        )
