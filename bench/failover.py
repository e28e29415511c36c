"""failover: SIGKILL one of two schedulers under load; takeover time, lost and duplicate runs.

Two scheduler processes share the partitions (range assignor: 6 + 6 of 12).  A
load thread submits immediate no-op jobs at a steady rate for the whole run; at
``kill_at`` seconds the bench SIGKILLs the scheduler that owns the most partitions
(it cannot leave the group or abort its open transaction: like a host dying).

takeover_s = kill → the first committed ``RunReady`` (read_committed, from the ready
topics) on a partition the dead instance owned whose ``occurred_at_ms`` is after the
kill: the survivor dispatching its orphaned jobs again.  (Ready topics have the
commands' partition count and the same key and partitioner, so a job's ready partition
is its scheduler partition.)  lost = submitted jobs not ``completed`` in PostgreSQL
after the load stops and the system drained; duplicated = run ids dispatched more than
once (RunReady records per run id > 1) plus jobs that ran more than one attempt.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from bench.common import (
    NOOP_TARGET,
    BenchEnv,
    CpuWatch,
    Proc,
    Progress,
    ReadyTail,
    RunOptions,
    now_ms,
    rnd,
    say,
    write_result,
)
from bench.throughput import ledger_for


def owned(p: Proc) -> set[int]:
    """Partitions a scheduler owns now, from its partitions_restored/_revoked log lines."""
    mine: set[int] = set()
    for e in p.events():
        if e.get("event") == "partitions_restored":
            mine |= set(e.get("partitions") or [])
        elif e.get("event") == "partitions_revoked":
            mine -= set(e.get("partitions") or [])
    return mine


class Load(threading.Thread):
    """Submits immediate no-op jobs at ``rate`` per second until stopped."""

    def __init__(self, env: BenchEnv, user: str, rate: float) -> None:
        super().__init__(name="load", daemon=True)
        from producers.client import JobClient

        self.client = JobClient(env.settings, user_id=user)
        self.rate = rate
        self.ids: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.halt.is_set():
            due = int((time.monotonic() - t0) * self.rate) + 1
            while len(self.ids) < due:
                self.ids.append(self.client.submit(python=NOOP_TARGET, name="failover", wait=False))
            self.halt.wait(0.01)
        self.client.flush()
        self.client.close()


def run(opts: RunOptions, machine: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    rate = opts.pick(50, 100, 150, "rate")
    kill_at = opts.pick(2, 6, 15, "kill_at_s")
    duration = opts.pick(13, 30, 60, "load_s")
    watch = CpuWatch()
    with BenchEnv(opts, "failover") as env:
        say(f"failover: 2 schedulers, load {rate}/s for {duration}s, SIGKILL at {kill_at}s; topics {env.prefix}.*")
        procs = env.start_system(schedulers=2, workers=1)
        s1, s2 = procs["schedulers"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until the two instances split the partitions
            a, b = owned(s1), owned(s2)
            if a and b and not (a & b) and len(a | b) == env.settings.partitions:
                break
            time.sleep(0.2)
        before = {s1.name: sorted(owned(s1)), s2.name: sorted(owned(s2))}
        victim, survivor = (s1, s2) if len(owned(s1)) >= len(owned(s2)) else (s2, s1)
        dead_parts = owned(victim)
        led = ledger_for(env, {"schedulers": [survivor], "workers": procs["workers"],
                               "projectors": procs["projectors"]})
        tail = ReadyTail(env.settings)
        tail.start()
        tail.started.wait(30)
        user = f"{env.prefix}-u"
        load = Load(env, user, rate)
        led.start()
        load.start()
        prog = Progress("failover: load", duration)
        t_load = time.monotonic()
        kill_ms = None
        survivor_mark = len(survivor.events())
        while time.monotonic() - t_load < duration:
            el = time.monotonic() - t_load
            if kill_ms is None and el >= kill_at:
                kill_ms = now_ms()
                victim.kill()
                say(f"failover: SIGKILLed {victim.name} (pid {victim.pid}, partitions {sorted(dead_parts)})")
            prog.update(el, f"{len(load.ids)} submitted" + (" (killed)" if kill_ms else ""))
            led.snapshot()
            time.sleep(0.2)
        load.halt.set()
        load.join(60)
        prog.done(f"{len(load.ids)} submitted")
        submitted = list(load.ids)
        # Drain: every submitted job completed (or a long timeout).
        conn = env.pg()
        prog = Progress("failover: drain", len(submitted))
        give_up = time.monotonic() + opts.pick(60, 90, 180, "drain_timeout_s")
        while True:
            row = conn.execute("SELECT count(*) FROM jobs WHERE user_id = %s AND status = 'completed'",
                               (user,)).fetchone()
            done = int(row[0])
            prog.update(done)
            led.snapshot()
            if done >= len(submitted) or time.monotonic() > give_up:
                break
            time.sleep(0.25)
        prog.done()
        time.sleep(1.0)
        tail.stop()
        completed = {r[0] for r in conn.execute(
            "SELECT job_id FROM jobs WHERE user_id = %s AND status = 'completed'", (user,)).fetchall()}
        multi_attempt = int(conn.execute("SELECT count(*) FROM jobs WHERE user_id = %s AND attempts > 1",
                                         (user,)).fetchone()[0])
        statuses = dict(conn.execute("SELECT status, count(*) FROM jobs WHERE user_id = %s GROUP BY status",
                                     (user,)).fetchall())
        conn.close()
        lost_ids = [j for j in submitted if j not in completed]
        per_run = Counter(r[0] for r in tail.rows)
        dup_dispatch = sum(c - 1 for c in per_run.values() if c > 1)
        assert kill_ms is not None
        after = sorted(r[3] for r in tail.rows if r[2] in dead_parts and r[3] > kill_ms)
        first_dispatch = after[0] if after else None
        takeover_s = (first_dispatch - kill_ms) / 1000 if first_dispatch else None
        restored = [e for e in survivor.events()[survivor_mark:] if e.get("event") == "partitions_restored"]
        # Gap seen on the survivor's own partitions (it keeps dispatching during the rebalance?).
        own_parts = set(before[survivor.name])
        own_after = [r[3] for r in tail.rows if r[2] in own_parts and r[3] > kill_ms]
        metrics = {
            "takeover_s": rnd(takeover_s, 3),
            "lost": len(lost_ids),
            "duplicated": dup_dispatch + multi_attempt,
            "duplicate_dispatches": dup_dispatch,
            "jobs_with_more_than_one_attempt": multi_attempt,
            "submitted": len(submitted),
        }
        notes = []
        if takeover_s is None:
            notes.append("no dispatch on the dead instance's partitions was seen after the kill")
        return write_result(
            opts, "failover", metrics=metrics, machine=machine, started=started, notes=notes,
            params={"schedulers": 2, "workers": 1, "rate_per_s": rate, "load_s": duration, "kill_at_s": kill_at,
                    "signal": "SIGKILL", "partitions": env.settings.partitions, "executor": f"python {NOOP_TARGET}"},
            details={
                "partitions_before": before, "victim": victim.name, "dead_partitions": sorted(dead_parts),
                "kill_ms": kill_ms, "first_dispatch_on_dead_partitions_ms": first_dispatch,
                "survivor_restores_after_kill": [
                    {"partitions": e.get("partitions"), "seconds": e.get("seconds"), "timestamp": e.get("timestamp")}
                    for e in restored],
                "survivor_first_dispatch_own_partitions_after_kill_s":
                    rnd((min(own_after) - kill_ms) / 1000, 3) if own_after else None,
                "final_statuses": statuses, "lost_sample": lost_ids[:10],
                "dispatches_seen": len(tail.rows), "cpu": led.result(len(submitted)),
                "machine_load": watch.result(led.total()),
                "why": "the survivor can only take over once the group coordinator drops the dead member "
                       "(scheduler session.timeout.ms = 6000) and, for read_committed restores, once the dead "
                       "instance's open transaction is aborted (transaction.timeout.ms = 10000: its "
                       "transactional.id is per instance, so nobody fences it sooner)",
            },
        )
