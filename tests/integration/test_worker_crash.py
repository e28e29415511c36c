"""A worker SIGKILLed mid-run: its jobs run again elsewhere and still complete once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from harness import InThread, Tail, isolated
from infra.config import Settings
from producers.client import JobClient
from scheduler.service import SchedulerService
from schemas.events import RunStatusChanged

pytestmark = pytest.mark.integration


def _spawn_worker(s: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "JOBSCHED_TOPIC_PREFIX": s.topic_prefix, "JOBSCHED_PARTITIONS": str(s.partitions),
           "JOBSCHED_READY_PARTITIONS": str(s.ready_partitions)}
    with log.open("wb") as err:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "producers.cli", "worker", "--concurrency", "20"],
                                stdout=subprocess.DEVNULL, stderr=err, env=env)


def _worker_id(log: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                if rec.get("event") == "partitions assigned" and rec.get("worker_id"):
                    return str(rec["worker_id"])
        time.sleep(0.2)
    raise AssertionError(f"worker never joined its group; log:\n{log.read_text()[-3000:]}")


def test_jobs_of_a_killed_worker_run_again_and_complete_once(stack_settings: Settings, tmp_path: Path) -> None:
    s = isolated(stack_settings)
    tail = Tail(s, [s.events_topic])
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    workers = [_spawn_worker(s, logs[0]), _spawn_worker(s, logs[1])]
    try:
        ids = [_worker_id(logs[0]), _worker_id(logs[1])]
        with InThread(SchedulerService(s)), JobClient(s, user_id="crash") as client:
            jobs = [client.submit(["sh", "-c", "sleep 3; echo done"], name=f"crash-{i}") for i in range(20)]

            def running_on(wid: str) -> set[str]:
                return {e.job_id for e in tail.of(RunStatusChanged) if e.status == "running" and e.worker_id == wid}

            tail.wait_for(lambda ev: len(running_on(ids[0])) >= 1 and len(running_on(ids[1])) >= 1,
                          timeout=60, what="both workers running jobs")
            victims = running_on(ids[0])
            workers[0].send_signal(signal.SIGKILL)
            workers[0].wait(10)

            def final(job: str) -> str | None:
                st = [e.status for e in tail.job_changes() if e.job_id == job]
                return st[-1] if st else None

            tail.wait_for(lambda ev: all(final(j) == "completed" for j in jobs), timeout=120,
                          what="every job completed after the kill")
    finally:
        for w in workers:
            if w.poll() is None:
                w.terminate()
                try:
                    w.wait(40)
                except subprocess.TimeoutExpired:
                    w.kill()
                    w.wait()
        tail.close()

    completed = Counter(e.job_id for e in tail.job_changes() if e.status == "completed")
    assert all(completed[j] == 1 for j in jobs), completed
    succeeded = Counter(e.job_id for e in tail.of(RunStatusChanged) if e.status == "succeeded")
    assert all(succeeded[j] == 1 for j in jobs), succeeded
    assert victims, "the killed worker was running nothing"
    for job in victims:
        runs = [e for e in tail.of(RunStatusChanged) if e.job_id == job]
        lost = [e for e in runs if e.status == "lost"]
        assert lost and lost[0].worker_id == ids[0] and lost[0].attempt == 1, [(e.status, e.worker_id) for e in runs]
        ok = [e for e in runs if e.status == "succeeded"][0]
        assert ok.worker_id == ids[1] and ok.attempt == 2  # the run counted one more attempt
    last = {e.job_id: e for e in tail.job_changes() if e.status == "completed"}
    assert all(last[j].attempts == 2 for j in victims)
