"""One job through the whole real path, driven the way a user drives it: the CLI.

jobsched submit -> jobs.commands -> scheduler -> jobs.ready.default -> worker (a real
subprocess) -> reports/logs -> scheduler -> jobs.events -> PostgreSQL / MongoDB
-> jobsched status / logs / replay.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from consumers.projections.logs_projector import LogsProjector
from consumers.projections.migrate import migrate
from consumers.projections.pg_projector import PostgresProjector
from consumers.worker import Worker
from harness import InThread, isolated
from infra.config import Settings
from scheduler.service import SchedulerService

pytestmark = pytest.mark.integration


def jobsched(settings: Settings, *args: str, check: bool = True, timeout: float = 60,
             extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "JOBSCHED_TOPIC_PREFIX": settings.topic_prefix,
           "JOBSCHED_PARTITIONS": str(settings.partitions), "JOBSCHED_USER": "e2e-user", **(extra_env or {})}
    proc = subprocess.run([sys.executable, "-m", "producers.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, f"jobsched {' '.join(args)} -> {proc.returncode}: {proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def system(stack_settings: Settings):  # type: ignore[no-untyped-def]
    s = isolated(stack_settings)
    migrate(s)
    services = [InThread(SchedulerService(s)), InThread(Worker(s, concurrency=4)),
                InThread(PostgresProjector(s)), InThread(LogsProjector(s))]
    for svc in services:
        svc.__enter__()
    yield s
    for svc in reversed(services):
        svc.stop()


def wait_status(s: Settings, job_id: str, want: str, timeout: float = 20) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    last: dict = {}  # type: ignore[type-arg]
    while time.monotonic() < deadline:
        p = jobsched(s, "status", job_id, "--json", check=False)
        if p.returncode == 0:
            last = json.loads(p.stdout)
            if last["status"] == want:
                return last
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} not {want} within {timeout}s; last: {last}")


def test_echo_hello_end_to_end(system: Settings) -> None:
    s = system
    t0 = time.monotonic()
    out = jobsched(s, "submit", "--json", "--", "echo", "hello")
    job_id = json.loads(out.stdout)["job_id"]
    job = wait_status(s, job_id, "completed", timeout=10)
    took = time.monotonic() - t0
    assert took < 10, took
    assert job["job_id"] == job_id and job["name"] == "echo hello" and job["attempts"] == 1
    assert job["created_at"]
    (run,) = job["runs"]
    assert run["status"] == "succeeded" and run["exit_code"] == 0
    assert run["started_at"] and run["finished_at"]
    deadline = time.monotonic() + 10
    while "hello" not in (logs := jobsched(s, "logs", job_id).stdout) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert logs == "hello\n"
    replay = jobsched(s, "replay", "--topic", s.commands_topic, "--from-beginning", "--json", "--idle", "1")
    submitted = [json.loads(line) for line in replay.stdout.splitlines()]
    mine = [e for e in submitted if e.get("type") == "JobSubmitted" and e["spec"]["job_id"] == job_id]
    assert len(mine) == 1
    assert mine[0]["spec"]["executor"]["shell"]["argv"] == ["echo", "hello"]
    assert mine[0]["user_id"] == "e2e-user"


def test_a_delayed_job_starts_on_its_due_time_never_before(system: Settings) -> None:
    # The scheduler dispatches it ahead of time (not_before_ms); the worker holds it.
    s = system
    job_id = jobsched(s, "submit", "--in", "2s", "--", "true").stdout.strip()
    job = wait_status(s, job_id, "completed")
    (run,) = job["runs"]
    nominal = datetime.fromisoformat(run["nominal_at"].replace("Z", "+00:00"))
    started = datetime.fromisoformat(run["started_at"].replace("Z", "+00:00"))
    assert started >= nominal, (run["started_at"], run["nominal_at"])


def test_failing_command_shows_exit_code_and_stderr(system: Settings) -> None:
    s = system
    job_id = jobsched(s, "submit", "--", "sh", "-c", "echo oops >&2; exit 3").stdout.strip()
    job = wait_status(s, job_id, "failed")
    assert job["runs"][0]["exit_code"] == 3
    deadline = time.monotonic() + 10
    while "oops" not in jobsched(s, "logs", job_id).stdout and time.monotonic() < deadline:
        time.sleep(0.3)
    assert "oops" in jobsched(s, "logs", job_id).stdout


def test_dag_file_and_cancel_through_the_cli(system: Settings, tmp_path: Path) -> None:
    s = system
    dag = tmp_path / "dag.yaml"
    dag.write_text("jobs:\n  - name: first\n    command: [echo, one]\n"
                   "  - name: second\n    command: [echo, two]\n    after: [first]\n")
    ids = json.loads(jobsched(s, "submit-dag", str(dag), "--json").stdout)
    wait_status(s, ids["second"], "completed")
    later = jobsched(s, "submit", "--in", "1h", "--", "echo", "never").stdout.strip()
    wait_status(s, later, "pending")
    jobsched(s, "cancel", later)
    wait_status(s, later, "cancelled")


def test_user_errors_are_one_line_with_exit_codes(system: Settings, tmp_path: Path) -> None:
    s = system
    p = jobsched(s, "status", "no-such-job", "--wait", "0", check=False)
    assert p.returncode == 3 and p.stderr.strip().count("\n") == 0 and "no-such-job" in p.stderr
    p = jobsched(s, "submit", "--cron", "61 * * * *", "--", "true", check=False)
    assert p.returncode == 5 and "cron" in p.stderr and "Traceback" not in p.stderr
    p = jobsched(s, "submit", "--tz", "Mars/Olympus", "--cron", "0 * * * *", "--", "true", check=False)
    assert p.returncode == 5 and "Mars/Olympus" in p.stderr
    p = jobsched(s, "submit", "--json", check=False)
    assert p.returncode == 5 and "command" in p.stderr
    cyc = tmp_path / "cycle.json"
    cyc.write_text(json.dumps([{"name": "a", "command": ["x"], "after": ["b"]},
                               {"name": "b", "command": ["x"], "after": ["a"]}]))
    p = jobsched(s, "submit-dag", str(cyc), check=False)
    assert p.returncode == 5 and "cycle" in p.stderr and "a" in p.stderr
    p = jobsched(s, "submit", "--", "true", check=False, extra_env={"JOBSCHED_KAFKA_BOOTSTRAP": "127.0.0.1:1"},
                 timeout=90)
    assert p.returncode == 4 and "Traceback" not in p.stderr and "Kafka" in p.stderr
    assert p.stderr.strip().count("\n") == 0


def test_projection_rebuilt_from_the_topic_into_an_empty_database(system: Settings) -> None:
    """Kafka is the source of truth: a brand-new database is rebuilt by replaying jobs.events."""
    import uuid

    import psycopg

    s = system
    job_id = jobsched(s, "submit", "--", "echo", "rebuild-me").stdout.strip()
    before = wait_status(s, job_id, "completed")
    db = f"jobsched_rebuild_{uuid.uuid4().hex[:8]}"
    admin_url = s.postgres_url.replace("postgresql+psycopg://", "postgresql://").rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    try:
        url = s.postgres_url.rsplit("/", 1)[0] + f"/{db}"
        out = jobsched(s, "rebuild-projections", "--yes", "--idle", "2", extra_env={"JOBSCHED_POSTGRES_URL": url})
        assert "replayed" in out.stdout
        p = jobsched(s, "status", job_id, "--json", extra_env={"JOBSCHED_POSTGRES_URL": url})
        after = json.loads(p.stdout)
        assert after["status"] == "completed" and after["runs"] == before["runs"]
        assert after["attempts"] == before["attempts"] and after["created_at"] == before["created_at"]
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def test_logs_follow_shows_lines_while_the_job_runs(system: Settings, tmp_path: Path) -> None:
    s = system
    go = tmp_path / "go"
    # The job prints one line, then waits until the test has seen it through `logs -f`.
    script = f"echo line1; while [ ! -e {go} ]; do sleep 0.05; done; for i in 2 3 4 5 6; do echo line$i; done"
    job_id = jobsched(s, "submit", "--", "sh", "-c", script).stdout.strip()
    env = {**os.environ, "JOBSCHED_TOPIC_PREFIX": s.topic_prefix, "JOBSCHED_PARTITIONS": str(s.partitions)}
    follower = subprocess.Popen([sys.executable, "-m", "producers.cli", "logs", "-f", job_id],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert follower.stdout is not None
        first = follower.stdout.readline()
        # The first line arrived while the job was still going: it is followed live.
        during = json.loads(jobsched(s, "status", job_id, "--json").stdout)["status"]
        go.touch()
        rest, err = follower.communicate(timeout=60)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.communicate()
    assert first == "line1\n", err
    assert during == "running"
    assert rest == "".join(f"line{i}\n" for i in range(2, 7))
    assert follower.returncode == 0
