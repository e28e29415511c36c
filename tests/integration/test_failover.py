"""Failover under load: two scheduler processes, one SIGKILLed mid-submission.

Two real ``jobsched scheduler`` processes share the consumer group; a scripted
Reporter plays the workers.  About 2,000 jobs are submitted over a few seconds (one-off
"now" jobs, delayed jobs, jobs that fail their first attempt and are retried, and a few
recurring ``* * * * *`` jobs).  While the submission runs, one scheduler is killed with
SIGKILL.  The survivor must take over its partitions from the changelog and finish
everything, with each run dispatched exactly once: read with ``read_committed``, no
(run id, attempt) appears twice on the ready topics and none is missing.  A third
instance then joins (a rebalance under a second, smaller load) and must not duplicate
anything either.

A second test freezes a scheduler (SIGSTOP) past its session timeout and resumes it
after the other instance has taken over and fired its jobs: the zombie must not
dispatch them again from the state it still holds in memory.

The takeover time (kill -> first RunReady committed for a partition the dead instance
owned) is printed, never asserted: timing belongs in the benchmark.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from harness import InThread, Reporter, Tail, isolated
from infra.config import Settings
from producers.client import JobClient
from schemas.events import RunReady, RunStatusChanged, new_id, now_ms, run_id_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PARTITIONS = 6
MINUTE_MS = 60_000

N_NOW, N_DELAYED, N_RETRY, N_CRON = 1800, 180, 20, 10
N_SECOND = 200  # one-off jobs submitted while the third instance joins
#: The submission starts at this second of a minute (waiting up to a minute for it).
ALIGN_FROM, ALIGN_TO = 52, 55


# --- scheduler processes -----------------------------------------------------------


class SchedulerProc:
    """One ``jobsched scheduler`` subprocess; its JSON log goes to a file."""

    def __init__(self, settings: Settings, name: str, log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"scheduler-{name}.log"
        env = {
            **os.environ,
            "JOBSCHED_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "JOBSCHED_TOPIC_PREFIX": settings.topic_prefix,
            "JOBSCHED_PARTITIONS": str(settings.partitions),
            "JOBSCHED_READY_PARTITIONS": str(settings.ready_partitions),
            "PYTHONUNBUFFERED": "1",
        }
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "producers.cli", "scheduler", "--instance", f"{settings.topic_prefix}-{name}"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=self._log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            try:
                d = json.loads(raw)
            except ValueError:
                d = {"event": "raw", "text": raw}
            if isinstance(d, dict):
                out.append(d)
        return out

    def owned(self) -> set[int]:
        """Partitions owned now, replayed from the restore/revoke log lines."""
        owned: set[int] = set()
        for d in self.lines():
            if d.get("event") == "partitions_restored":
                owned |= set(d["partitions"])
            elif d.get("event") == "partitions_revoked":
                owned -= set(d["partitions"])
        return owned

    def restores(self) -> list[tuple[float, set[int], float]]:
        """(wall-clock ms, partitions, restore seconds) of every restore."""
        return [(_iso_ms(d["timestamp"]), set(d["partitions"]), float(d.get("seconds", 0)))
                for d in self.lines() if d.get("event") == "partitions_restored"]

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()

    def tail(self, n: int = 25) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return f"--- {self.log_path} (last {n} of {len(lines)} lines) ---\n" + "\n".join(lines[-n:])


def _iso_ms(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000


def _wait(pred: Any, timeout: float, what: str, procs: list[SchedulerProc], tail: Tail | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tail is not None:
            tail.poll(0.2)
        else:
            time.sleep(0.2)
        if pred():
            return
        for p in procs:
            if p.name != "a" and p.proc.poll() is not None:
                raise AssertionError(f"scheduler {p.name} exited with {p.proc.returncode}\n{p.tail()}")
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n" + "\n".join(p.tail() for p in procs))


# --- the load ----------------------------------------------------------------------


class Load:
    """The plan of jobs, by kind, with ids fixed in advance (the reporter needs them)."""

    def __init__(self, n_now: int, n_delayed: int, n_retry: int, n_cron: int, seed: int) -> None:
        rnd = random.Random(seed)
        self.kinds: dict[str, str] = {}
        plan = ["now"] * n_now + ["delayed"] * n_delayed + ["retry"] * n_retry + ["cron"] * n_cron
        rnd.shuffle(plan)
        self.plan = [(k, new_id(), rnd.randint(1000, 8000)) for k in plan]
        for kind, jid, _ in self.plan:
            self.kinds[jid] = kind
        self.at_ms: dict[str, int] = {}  # delayed job -> due time
        self.submitted_at: dict[str, int] = {}
        self.submitted = 0
        self.error: BaseException | None = None

    def ids(self, *kinds: str) -> list[str]:
        return [j for k, j, _ in self.plan if k in kinds]

    def submit(self, client: JobClient, seconds: float, milestone: float, reached: threading.Event) -> None:
        """Submit the plan in batches spread over ``seconds``; set ``reached`` past ``milestone``."""
        try:
            batches = max(1, int(seconds / 0.1))
            size = -(-len(self.plan) // batches)
            for i in range(0, len(self.plan), size):
                for kind, jid, delay in self.plan[i:i + size]:
                    now = now_ms()
                    self.submitted_at[jid] = now
                    if kind == "now":
                        client.submit(["true"], job_id=jid, now=now, wait=False)
                    elif kind == "delayed":
                        self.at_ms[jid] = now + delay
                        client.submit(["true"], job_id=jid, at=now + delay, now=now, wait=False)
                    elif kind == "retry":
                        client.submit(["flaky"], job_id=jid, retries=1, backoff=200, backoff_max=400, now=now,
                                      wait=False)
                    else:
                        client.submit(["tick"], job_id=jid, cron="* * * * *", now=now, wait=False)
                    self.submitted += 1
                client.flush()
                if self.submitted >= milestone * len(self.plan):
                    reached.set()
                time.sleep(0.1)
        except BaseException as e:  # surfaced by the test
            self.error = e
        finally:
            reached.set()


# --- reading the outcome -------------------------------------------------------------


def _final(tail: Tail) -> dict[str, str]:
    out: dict[str, str] = {}
    for e in tail.job_changes():
        out[e.job_id] = e.status
    return out


def _ready(ready_tail: Tail) -> list[tuple[int, RunReady]]:
    """(partition, RunReady) of every committed ready record."""
    out = []
    for msg in ready_tail.raw:
        ev = ready_tail.codec.decode(msg.value())
        assert isinstance(ev, RunReady)
        out.append((msg.partition(), ev))
    return out


def _minutes(after_ms: int, upto_ms: float) -> list[int]:
    """``* * * * *`` nominal times strictly after ``after_ms`` and at or before ``upto_ms``."""
    first = (after_ms // MINUTE_MS + 1) * MINUTE_MS
    return list(range(first, int(upto_ms) + 1, MINUTE_MS))


def test_a_killed_scheduler_loses_and_duplicates_nothing(stack_settings: Settings, tmp_path: Path) -> None:
    s = isolated(stack_settings, partitions=PARTITIONS)
    ready_topics = [s.ready_topic("default", prio) for prio in ("high", "normal", "low")]
    load = Load(N_NOW, N_DELAYED, N_RETRY, N_CRON, seed=int(time.time()))
    retry_ids = set(load.ids("retry"))
    second = Load(N_SECOND, 0, 0, 0, seed=1)
    one_off = set(load.ids("now", "delayed", "retry"))
    cron_ids = set(load.ids("cron"))

    def script(r: RunReady) -> str:
        return "failed" if r.job_id in retry_ids and r.attempt == 1 else "succeeded"

    events = Tail(s, [s.events_topic])
    client = JobClient(s, user_id="failover")
    a = SchedulerProc(s, "a", tmp_path)
    b = SchedulerProc(s, "b", tmp_path)
    procs = [a, b]
    reporter = InThread(Reporter(s, script))
    try:
        reporter.__enter__()
        # Both instances joined, each owns half of the partitions.
        everything = set(range(PARTITIONS))
        _wait(lambda: a.owned() and b.owned() and not a.owned() & b.owned() and a.owned() | b.owned() == everything,
              60, "both schedulers to own a share of the partitions", procs)
        # Ownership settles with the last rebalance; give a late one a moment to show.
        time.sleep(1.0)
        _wait(lambda: a.owned() | b.owned() == everything and not a.owned() & b.owned(), 30, "a stable split", procs)

        # Start so that a minute boundary (a firing of the recurring jobs) falls a few
        # seconds after the kill, while the dead instance's partitions have no owner.
        sec = time.time() % 60
        if not ALIGN_FROM <= sec <= ALIGN_TO:
            time.sleep((ALIGN_FROM - sec) % 60)
        reached = threading.Event()
        submitter = threading.Thread(target=load.submit, args=(client, 4.0, 0.4, reached), daemon=True)
        t_start = now_ms()
        submitter.start()
        assert reached.wait(60), "the submission never reached 40%"
        owned_a = a.owned()
        t_kill = time.time() * 1000
        a.kill()
        submitted_at_kill = load.submitted
        print(f"\nkilled scheduler a (pid {a.pid}) owning partitions {sorted(owned_a)} after "
              f"{submitted_at_kill}/{len(load.plan)} submissions, {(t_kill - t_start) / 1000:.1f}s in")
        submitter.join(60)
        assert not submitter.is_alive(), "the submission did not finish"
        if load.error is not None:
            raise load.error

        # Every one-off job completes, the survivor having taken over.
        def done() -> bool:
            final = _final(events)
            return all(final.get(j) == "completed" for j in one_off)

        try:
            _wait(done, 90, "every one-off job to complete", procs, events)
        except AssertionError:
            final = _final(events)
            missing = Counter(final.get(j, "no event") for j in one_off if final.get(j) != "completed")
            raise AssertionError(f"not completed: {dict(missing)}\n" + "\n".join(p.tail() for p in procs)) from None
        t_done = now_ms()
        assert b.owned() == everything, f"survivor owns {sorted(b.owned())}\n{b.tail()}"

        # Recurring jobs: every minute boundary passed while the survivor ran has fired.
        def cron_accounted(upto: float) -> bool:
            fired = {(r.job_id, r.nominal_ms) for _, r in _ready(ready_tail)}
            skipped = {(e.job_id, e.nominal_ms) for e in events.of(RunStatusChanged) if e.status == "skipped"}
            return all((j, m) in fired | skipped for j in cron_ids for m in _minutes(load.submitted_at[j], upto))

        ready_tail = Tail(s, ready_topics)
        _wait(lambda: cron_accounted(t_done), 30, "the recurring jobs' due firings", procs, ready_tail)

        # A third instance joins while more jobs arrive: a rebalance must not duplicate either.
        c = SchedulerProc(s, "c", tmp_path)
        procs.append(c)
        reached2 = threading.Event()
        submitter2 = threading.Thread(target=second.submit, args=(client, 2.0, 1.0, reached2), daemon=True)
        submitter2.start()
        _wait(lambda: bool(c.owned()) and not b.owned() & c.owned() and b.owned() | c.owned() == everything,
              60, "the third instance to take a share", procs)
        submitter2.join(60)
        assert not submitter2.is_alive() and second.error is None, second.error
        _wait(lambda: all(_final(events).get(j) == "completed" for j in second.ids("now")), 60,
              "the second batch to complete", procs, events)
        # Let straggling records (cron firings, late reports) settle before counting.
        time.sleep(2.0)
        t_end = now_ms()
        owned_c = c.owned()
        for _ in range(10):
            events.poll(0.3)
            ready_tail.poll(0.3)
    finally:
        reporter.event.set()
        for p in procs:
            p.stop()
        reporter.stop()
        client.close()

    # --- exactly once on the ready topics (read_committed) --------------------------
    ready = _ready(ready_tail)
    per_attempt = Counter((r.run_id, r.attempt) for _, r in ready)
    dupes = {k: n for k, n in per_attempt.items() if n > 1}
    assert not dupes, f"{len(dupes)} (run, attempt) dispatched more than once, e.g. {list(dupes.items())[:5]}"
    runs_of: dict[str, set[str]] = defaultdict(set)
    attempts_of: dict[str, list[int]] = defaultdict(list)
    for _, r in ready:
        runs_of[r.job_id].add(r.run_id)
        attempts_of[r.run_id].append(r.attempt)
    all_one_off = one_off | set(second.ids("now"))
    unknown = set(runs_of) - all_one_off - cron_ids
    assert not unknown, f"RunReady for jobs never submitted: {sorted(unknown)[:5]}"
    lost = [j for j in all_one_off if j not in runs_of]
    assert not lost, f"{len(lost)} one-off jobs never dispatched, e.g. {lost[:5]}"
    several = {j: sorted(runs_of[j]) for j in all_one_off if len(runs_of[j]) != 1}
    assert not several, f"{len(several)} one-off jobs dispatched as several runs, e.g. {list(several.items())[:3]}"
    for j in all_one_off:
        (run,) = runs_of[j]
        want = [1, 2] if j in retry_ids else [1]
        assert sorted(attempts_of[run]) == want, (j, load.kinds.get(j, "second"), attempts_of[run])
        if j in load.at_ms:
            assert run == run_id_for(j, load.at_ms[j]), (run, load.at_ms[j])

    # Recurring jobs: only real minute boundaries, attempt 1, none missing up to t_done.
    for j in cron_ids:
        nominal = sorted(int(r.split("@")[1]) for r in runs_of.get(j, ()))
        assert all(n % MINUTE_MS == 0 and n > load.submitted_at[j] for n in nominal), (j, nominal)
        assert nominal == _minutes(load.submitted_at[j], nominal[-1] if nominal else 0), (j, nominal)
        for r in runs_of.get(j, ()):
            assert attempts_of[r] == [1], (r, attempts_of[r])
    cron_runs = sum(len(runs_of.get(j, ())) for j in cron_ids)

    # --- exactly once on the events topic --------------------------------------------
    status_seq: dict[str, list[str]] = defaultdict(list)
    for e in events.job_changes():
        status_seq[e.job_id].append(e.status)
    plain = ["pending", "queued", "running", "completed"]
    retried = ["pending", "queued", "running", "pending", "queued", "running", "completed"]
    wrong = {j: status_seq[j] for j in all_one_off if status_seq[j] != (retried if j in retry_ids else plain)}
    assert not wrong, f"{len(wrong)} jobs with unexpected status sequences, e.g. {list(wrong.items())[:3]}"

    # --- the survivor took over ----------------------------------------------------------
    after_kill = [(p, r) for p, r in ready if p in owned_a and r.occurred_at_ms > t_kill]
    assert after_kill, "nothing was dispatched on the dead instance's partitions after the kill"
    resumed_delayed = [r for p, r in after_kill if r.job_id in load.at_ms and load.at_ms[r.job_id] > t_kill
                       and load.submitted_at[r.job_id] < t_kill]
    takeover = (min(r.occurred_at_ms for _, r in after_kill) - t_kill) / 1000
    b_restores = [(t, ps, secs) for t, ps, secs in b.restores() if t > t_kill and owned_a <= ps]
    restored_at = (b_restores[0][0] - t_kill) / 1000 if b_restores else float("nan")
    restore_secs = b_restores[0][2] if b_restores else float("nan")
    before = [r for p, r in ready if p in owned_a and r.occurred_at_ms <= t_kill]
    print(f"jobs: {len(load.plan)} + {N_SECOND} (one-off {len(all_one_off)}, cron {len(cron_ids)} with "
          f"{cron_runs} firings); RunReady records {len(ready)}, distinct (run, attempt) {len(per_attempt)}")
    print(f"dead instance's partitions: {len(before)} dispatched before the kill, {len(after_kill)} after "
          f"({len(resumed_delayed)} delayed jobs it had accepted, due after the kill)")
    print(f"TAKEOVER: survivor restored the partitions {restored_at:.2f}s after the kill (restore took "
          f"{restore_secs:.2f}s); first RunReady on them {takeover:.2f}s after the kill")
    cron_fired = sorted({int(r.split("@")[1]) for j in cron_ids for r in runs_of.get(j, ())})
    for m in cron_fired:
        late = [r.occurred_at_ms - r.nominal_ms for _, r in ready if r.job_id in cron_ids and r.nominal_ms == m]
        print(f"cron firing due {(m - t_kill) / 1000:+.1f}s from the kill: {len(late)} runs, "
              f"lateness {min(late) / 1000:.2f}-{max(late) / 1000:.2f}s")
    print(f"third instance owns {sorted(owned_c)}; total {(t_end - t_start) / 1000:.1f}s from first submit")


def test_a_paused_scheduler_does_not_dispatch_after_losing_its_partitions(stack_settings: Settings,
                                                                          tmp_path: Path) -> None:
    """A zombie: a scheduler frozen (SIGSTOP) past its session, then resumed (SIGCONT).

    While it is frozen the group gives its partitions to the other instance, which fires
    its delayed jobs.  On waking up, the frozen instance still holds those jobs in memory
    with overdue timers; it must not dispatch them a second time.
    """
    s = isolated(stack_settings, partitions=PARTITIONS)
    ready_topics = [s.ready_topic("default", prio) for prio in ("high", "normal", "low")]
    events = Tail(s, [s.events_topic])
    client = JobClient(s, user_id="zombie")
    a = SchedulerProc(s, "a", tmp_path)
    b = SchedulerProc(s, "b", tmp_path)
    procs = [a, b]
    reporter = InThread(Reporter(s))
    everything = set(range(PARTITIONS))
    jobs: dict[str, int] = {}
    try:
        reporter.__enter__()
        _wait(lambda: a.owned() and b.owned() and not a.owned() & b.owned() and a.owned() | b.owned() == everything,
              60, "both schedulers to own a share of the partitions", procs)
        now = now_ms()
        for i in range(300):
            at = now + 14_000 + i * 20  # due 14-20 s from now: after the takeover
            jobs[client.submit(["true"], at=at, now=now, wait=False)] = at
        client.flush()
        _wait(lambda: all(_final(events).get(j) == "pending" for j in jobs), 30, "every job accepted", procs, events)
        owned_a = a.owned()
        os.kill(a.pid, signal.SIGSTOP)
        t_stop = now_ms()
        _wait(lambda: b.owned() == everything, 60, "the other instance to take every partition", [b])
        _wait(lambda: all(_final(events).get(j) == "completed" for j in jobs), 60, "every job completed", [b], events)
        revoked = len([d for d in a.lines() if d.get("event") == "partitions_revoked"])
        os.kill(a.pid, signal.SIGCONT)
        t_cont = now_ms()
        _wait(lambda: len([d for d in a.lines() if d.get("event") == "partitions_revoked"]) > revoked, 30,
              "the resumed instance to learn that its partitions are gone", [b])
        time.sleep(2.0)
        ready_tail = Tail(s, ready_topics)
        _wait(lambda: len(ready_tail.raw) >= len(jobs), 30, "the ready records", [b], ready_tail)
        for _ in range(5):
            ready_tail.poll(0.3)
    finally:
        reporter.event.set()
        for p in procs:
            if p.proc.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
            p.stop()
        reporter.stop()
        client.close()
    ready = [r for _, r in _ready(ready_tail)]
    per_job = Counter(r.job_id for r in ready)
    twice = {j: n for j, n in per_job.items() if n > 1}
    late = [r for r in ready if r.occurred_at_ms >= t_cont]
    print(f"\nfroze a (owning {sorted(owned_a)}) at +0s, resumed it at +{(t_cont - t_stop) / 1000:.1f}s; "
          f"{len(ready)} RunReady for {len(jobs)} jobs, {len(late)} written after the resume")
    fenced = [d for d in a.lines() if d.get("event") == "transaction_failed"]
    print(f"the resumed instance's transactions refused by the group coordinator: {len(fenced)}"
          + (f" ({fenced[0].get('error', '')[:120]})" if fenced else ""))
    assert set(per_job) == set(jobs)
    assert not twice, (f"{len(twice)} jobs dispatched twice, {len(late)} RunReady after the resume "
                       f"(the zombie's): e.g. {[(r.job_id, r.run_id, r.occurred_at_ms - t_cont) for r in late[:3]]}\n"
                       + a.tail(10))
