"""memory: RSS per pending delayed job in one scheduler, and restore time of a new instance.

One scheduler process (alone in its group: it owns all partitions) gets N one-off
jobs due in an hour (full: 1,000,000).  bytes_per_pending_job = (RSS once every
command is applied − RSS of the same process idle before the first submit) / N.
Then the instance is stopped (SIGTERM) and a fresh one started: restore_s = its spawn
→ its ``partitions_restored`` log line (interpreter start, group join, reading the
compacted changelog ``<prefix>.state`` to its end and rebuilding the timers), with the
scheduler's own measure of the changelog read in ``details.restore_log_seconds``.
No worker or projector runs: nothing is due, and the scheduler has the machine.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import NOOP_TARGET, BenchEnv, Progress, RunOptions, rnd, say, write_result
from bench.timers import wait_ingested


def run(opts: RunOptions, machine: dict[str, Any]) -> dict[str, Any]:
    from producers.client import JobClient

    started = time.monotonic()
    n = opts.pick(1000, 50_000, 1_000_000, "pending_jobs")
    with BenchEnv(opts, "memory", projections=False) as env:
        say(f"memory: {n:,} jobs due in 1 h held by one scheduler; topics {env.prefix}.*")
        s1 = env.scheduler()
        s1.wait_for("partitions_restored", 90)
        time.sleep(opts.pick(0.5, 2.0, 2.0))
        rss0 = s1.rss() or 0
        client = JobClient(env.settings, user_id=f"{env.prefix}-u")
        prog = Progress("memory: submit", n)
        t0 = time.monotonic()
        for i in range(n):
            client.submit(python=NOOP_TARGET, name="later", delay=3_600_000, wait=False)
            if i % 1000 == 0:
                prog.update(i)
        client.flush()
        client.close()
        submit_s = time.monotonic() - t0
        prog.done(f"{n / submit_s:,.0f}/s")
        wait_ingested(env, "memory: ingest", max(120.0, n / 500))
        ingest_s = time.monotonic() - t0
        time.sleep(opts.pick(1.0, 3.0, 3.0))
        rss1 = s1.rss() or 0
        rss1_peak = rss1
        say(f"memory: RSS {rss0 / 2**20:.0f} MiB idle -> {rss1 / 2**20:.0f} MiB with {n:,} pending")
        s1.stop(timeout=60)

        t_spawn = time.monotonic()
        s2 = env.scheduler(name="scheduler-fresh")
        ev = s2.wait_for("partitions_restored", max(120.0, n / 2000))[0]
        restore_s = time.monotonic() - t_spawn
        time.sleep(opts.pick(0.5, 2.0, 2.0))
        rss2 = s2.rss() or 0
        say(f"memory: fresh instance restored {ev.get('jobs')} jobs in {restore_s:.1f}s "
            f"(changelog read + rebuild {ev.get('seconds')}s), RSS {rss2 / 2**20:.0f} MiB")
        s2.stop(timeout=60)
        metrics = {
            "bytes_per_pending_job": rnd((rss1 - rss0) / n, 1),
            "restore_s": rnd(restore_s, 2),
            "restored_jobs": ev.get("jobs"),
            "bytes_per_pending_job_after_restore": rnd((rss2 - rss0) / n, 1),
        }
        return write_result(
            opts, "memory", metrics=metrics, machine=machine, started=started,
            params={"pending_jobs": n, "due_in_s": 3600, "schedulers": 1, "partitions": env.settings.partitions,
                    "executor": f"python {NOOP_TARGET}"},
            details={"rss_idle_bytes": rss0, "rss_loaded_bytes": rss1_peak,
                     "rss_restored_bytes": rss2, "submit_s": round(submit_s, 2),
                     "submit_to_all_applied_s": round(ingest_s, 2), "apply_rate_per_s": round(n / ingest_s, 1),
                     "restore_log_seconds": ev.get("seconds"),
                     "cold_jobs_after_restore": ev.get("cold_jobs"),
                     "cold_file_bytes_per_job": rnd((ev.get("cold_file_bytes") or 0) / n, 1),
                     "restore_s_means": "spawn of a new scheduler process -> its partitions_restored log line"},
        )
