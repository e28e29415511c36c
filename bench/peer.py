"""peer: the throughput and timers workloads on Celery + Redis, on the same machine.

Redis is Debian's ``redis-server`` (installed with apt-get when missing and the bench
runs as root), started by the bench on a free loopback port with no persistence
(``--save "" --appendonly no``).  Celery (``pip install '.[bench]'``; installed with pip
when missing) runs ``bench.celery_app`` with the settings its docs give for many short
tasks — see that module.  Worker: the default prefork pool, one process per core
(``-c <cores>``), ``--without-gossip --without-mingle --without-heartbeat``, log level
WARNING (no per-task log lines).

throughput: N ``noop.apply_async()`` as fast as the client can; a task counts once
its result is in the Redis result backend (``DBSIZE`` of db 1), the counterpart of
our ``completed`` row in PostgreSQL.  celery_jobs_per_s = N / (first submit → last
result visible).

timers: N ``timed.apply_async(eta=…)`` due at random instants of the same window, plus
C celery-beat ``crontab()`` entries (every minute; beat is started < 1 minute before the
boundary so each fires once in the window).  Lateness = start of the task's execution
− its due time (Celery has no separate dispatch step; the worker holds ETA tasks and
runs them when due, so this is the closest counterpart of our dispatch time).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.common import (
    plan_dues,
    REPO,
    CpuLedger,
    CpuWatch,
    Progress,
    RunOptions,
    free_port,
    now_ms,
    percentile,
    proc_cpu_s,
    proc_tree_cpu_s,
    rnd,
    say,
    which,
    write_result,
)


def ensure_deps() -> dict[str, str]:
    """redis-server and celery, installed when missing (apt-get as root / pip)."""
    if not which("redis-server"):
        if os.geteuid() == 0 and which("apt-get"):
            say("peer: installing Debian's redis-server")
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            r = subprocess.run(["apt-get", "install", "-y", "-q", "redis-server"], env=env, capture_output=True)
            if r.returncode != 0:
                subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
                subprocess.run(["apt-get", "install", "-y", "-q", "redis-server"], env=env, check=True)
        if not which("redis-server"):
            raise RuntimeError("redis-server is missing: apt-get install -y redis-server")
    try:
        import celery  # noqa: F401
        import redis  # noqa: F401
    except ImportError:
        say("peer: installing celery[redis] with pip (the project's 'bench' extra)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "celery[redis]>=5.3"], check=True)
    import celery
    import redis

    ver = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip()
    return {"celery": celery.__version__, "redis_py": redis.__version__, "redis_server": ver}


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = open(workdir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir), "--daemonize", "no", "--loglevel", "warning"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.url = f"redis://127.0.0.1:{self.port}"
        import redis

        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis(port=self.port).ping()
                break
            except Exception:  # noqa: BLE001
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.1)

    def client(self, db: int) -> Any:
        import redis

        return redis.Redis(port=self.port, db=db)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


class CeleryProc:
    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log = open(log_path, "ab")
        self.log_path = log_path
        self.proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "bench.celery_app", *args], env=env,
                                     cwd=str(REPO), stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.proc.pid
        self.name = name

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # warm shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def _env(redis_url: str, crons: int = 0) -> dict[str, str]:
    env = dict(os.environ)
    env["BENCH_REDIS_URL"] = redis_url
    env["BENCH_CELERY_CRONS"] = str(crons)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def start_worker(opts: RunOptions, redis_url: str, tag: str) -> CeleryProc:
    celery_app = _configure_client(redis_url)
    cores = os.cpu_count() or 2
    w = CeleryProc("celery-worker", ["worker", "-P", "prefork", "-c", str(cores), "-Q", celery_app.QUEUE,
                                     "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING",
                                     "-n", f"bench-{tag}@%h"],
                   _env(redis_url), opts.logs / f"celery-worker-{tag}.log")
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if celery_app.app.control.ping(timeout=0.5):
                return w
            if w.proc.poll() is not None:
                break
    except BaseException:
        w.stop()
        raise
    w.stop()
    raise RuntimeError(f"the celery worker did not answer a ping; log: {w.log_path}")


def _configure_client(redis_url: str) -> Any:
    """bench.celery_app, bound to this Redis (it reads BENCH_REDIS_URL when imported)."""
    import importlib

    os.environ["BENCH_REDIS_URL"] = redis_url
    from bench import celery_app

    if celery_app.URL != redis_url:
        celery_app = importlib.reload(celery_app)
    return celery_app


def throughput(opts: RunOptions, redis: RedisServer, n: int) -> dict[str, Any]:
    ca = _configure_client(redis.url)
    results = redis.client(1)
    worker = start_worker(opts, redis.url, "thr")
    led = CpuLedger()
    led.add("celery-worker (+pool)", lambda: proc_tree_cpu_s(worker.pid))
    led.add("redis-server", lambda: proc_cpu_s(redis.proc.pid))
    try:
        prog = Progress("celery: submit", n)
        led.start()
        c0 = os.times()
        t0 = time.monotonic()
        for i in range(n):
            ca.noop.apply_async()
            if i % 500 == 0:
                prog.update(i)
        submit_s = time.monotonic() - t0
        c1 = os.times()
        client_cpu = (c1.user - c0.user) + (c1.system - c0.system)
        prog.done(f"{n / submit_s:,.0f}/s")
        prog = Progress("celery: complete", n)
        last, last_change = -1, time.monotonic()
        while True:
            done = int(results.dbsize())
            led.snapshot()
            prog.update(done, f"{done / (time.monotonic() - t0):,.0f}/s e2e")
            if done >= n:
                break
            if done != last:
                last, last_change = done, time.monotonic()
            elif time.monotonic() - last_change > 120:
                say(f"celery: no progress for 120s at {done}/{n}")
                break
            time.sleep(0.1 if n <= 5000 else 0.25)
        e2e_s = time.monotonic() - t0
        led.snapshot()
        prog.done()
    finally:
        worker.stop()
    cpu = led.result(n)
    cpu["bench-client (submit)"] = {"cpu_s": round(client_cpu, 2), "cpu_s_per_1000_jobs": round(client_cpu / n * 1000, 3)}
    return {"jobs": n, "completed": done, "submit_s": round(submit_s, 3), "e2e_s": round(e2e_s, 3),
            "submit_per_s": rnd(n / submit_s, 1), "jobs_per_s": rnd(done / e2e_s, 1), "cpu": cpu,
            "cpu_total_s": round(led.total() + client_cpu, 2)}


def timers(opts: RunOptions, redis: RedisServer, n: int, window_s: float, crons: int, lead_s: float) -> dict[str, Any]:
    ca = _configure_client(redis.url)
    redis.client(0).flushdb()
    results = redis.client(1)
    results.flushdb()
    worker = start_worker(opts, redis.url, "tim")
    beat: CeleryProc | None = None
    try:
        w_ms = int(window_s * 1000)
        t0, boundary, dues = plan_dues(now_ms(), lead_s, window_s, n, crons)
        prog = Progress("celery timers: submit", n)
        ts = time.monotonic()
        for i, due in enumerate(dues):
            ca.timed.apply_async(args=[due], eta=datetime.fromtimestamp(due / 1000, tz=timezone.utc))
            if i % 500 == 0:
                prog.update(i)
        prog.done()
        submit_s = time.monotonic() - ts
        if crons:
            assert boundary is not None
            wait_until = boundary - 50_000
            if now_ms() < wait_until:
                time.sleep((wait_until - now_ms()) / 1000)
            sched = opts.logs / f"celerybeat-schedule-{os.getpid()}"
            beat = CeleryProc("celery-beat", ["beat", "-s", str(sched), "-l", "WARNING"], _env(redis.url, crons),
                              opts.logs / "celery-beat.log")
        slack_s = (t0 - now_ms()) / 1000
        expected = n + crons
        prog = Progress("celery timers: firing", expected)
        end = t0 + w_ms
        while True:
            got = int(results.dbsize())
            prog.update(got, "window " + ("open" if t0 <= now_ms() <= end else "closed" if now_ms() > end
                                          else f"opens in {(t0 - now_ms()) / 1000:.0f}s"))
            if now_ms() > end + 2000 and got >= expected:
                break
            if now_ms() > end + 120_000:
                say(f"celery timers: only {got}/{expected} results 2 min after the window")
                break
            time.sleep(0.25)
        prog.done()
    finally:
        if beat is not None:
            beat.stop()
        worker.stop()
    late_one: list[float] = []
    late_cron: list[float] = []
    keys = list(results.scan_iter(match="celery-task-meta-*", count=5000))
    for i in range(0, len(keys), 5000):
        for raw in results.mget(keys[i:i + 5000]):
            if raw is None:
                continue
            doc = json.loads(raw)
            r = doc.get("result")
            if doc.get("status") != "SUCCESS":
                continue
            if isinstance(r, dict):
                late_cron.append(float(r["c"]))
            elif isinstance(r, (int, float)):
                late_one.append(float(r))
    allv = late_one + late_cron

    def st(v: list[float]) -> dict[str, Any]:
        return {"count": len(v), "p50_ms": rnd(percentile(v, 50), 1), "p99_ms": rnd(percentile(v, 99), 1),
                "max_ms": rnd(max(v), 1) if v else None}

    return {"one_off": st(late_one), "cron": st(late_cron), "all": st(allv), "submit_s": round(submit_s, 2),
            "slack_before_window_s": round(slack_s, 2), "expected": expected}


def run(opts: RunOptions, machine: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    versions = ensure_deps()
    n = opts.pick(200, 2000, 200_000, "jobs")
    tn = opts.pick(200, 5000, 100_000, "timer_jobs")
    window_s = opts.pick(2, 10, 60, "window_s")
    crons = opts.pick(0, 50, 1000, "crons")
    lead_s = opts.pick(6, 12, tn / 1500 + 20, "lead_s")
    watch = CpuWatch()
    workdir = opts.logs / f"redis-{os.getpid()}"
    redis = RedisServer(workdir)
    say(f"peer: Celery {versions['celery']} + {versions['redis_server'].split(' sha')[0]} on port {redis.port}")
    try:
        thr = throughput(opts, redis, n)
        redis.client(0).flushdb()
        redis.client(1).flushdb()
        tim = timers(opts, redis, tn, window_s, crons, lead_s)
    finally:
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    metrics = {
        "celery_jobs_per_s": thr["jobs_per_s"],
        "celery_submit_per_s": thr["submit_per_s"],
        "celery_lateness_p50_ms": tim["all"]["p50_ms"],
        "celery_lateness_p99_ms": tim["all"]["p99_ms"],
        "celery_lateness_max_ms": tim["all"]["max_ms"],
        "celery_cpu_s_per_1000_jobs": {k: v["cpu_s_per_1000_jobs"] for k, v in thr["cpu"].items()},
    }
    return write_result(
        opts, "peer", metrics=metrics, machine={**machine, **versions}, started=started,
        params={"jobs": n, "timer_jobs": tn, "window_s": window_s, "crons": crons, "lead_s": round(lead_s, 1),
                "pool": f"prefork -c {os.cpu_count()}", "prefetch_multiplier": 128, "acks_late": False,
                "result_backend": "redis db 1 (completion = result key present)",
                "broker": "redis db 0, no persistence", "worker_flags": "--without-gossip --without-mingle "
                "--without-heartbeat -l WARNING"},
        details={"throughput": thr, "timers": tim, "machine_load": watch.result(thr["cpu_total_s"])},
    )
