"""What every scenario shares: sizes, an isolated environment, service subprocesses,
CPU accounting, Kafka/PostgreSQL probes, percentiles, a progress bar and result files.

Every scenario runs the product as real processes (``python -m producers.cli
scheduler|worker|project``) on its own topic prefix, its own PostgreSQL database and
its own MongoDB database, so nothing it does touches another run or another
engineer's tests, and everything it created is removed afterwards (``--keep`` keeps it).
"""

from __future__ import annotations

import random

import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
NOOP_TARGET = "bench.noop:noop"

# --------------------------------------------------------------------------- sizes

SIZES = ("tiny", "quick", "full")


@dataclass
class RunOptions:
    size: str = "full"
    out: Path = RESULTS
    keep: bool = False
    concurrency: int = 128
    log_dir: Path = field(default_factory=lambda: Path(os.environ.get("TMPDIR", "/tmp")) / "jobsched-bench")
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4])
    overrides: dict[str, Any] = field(default_factory=dict)

    def pick(self, tiny: Any, quick: Any, full: Any, key: str | None = None) -> Any:
        if key is not None and key in self.overrides:
            return self.overrides[key]
        return {"tiny": tiny, "quick": quick, "full": full}[self.size]

    @property
    def logs(self) -> Path:
        p = self.log_dir / self.run_id
        p.mkdir(parents=True, exist_ok=True)
        return p


# --------------------------------------------------------------------------- progress


class Progress:
    """A plain-stderr progress bar: redrawn in place on a terminal, a line every few
    seconds otherwise (CI logs, the smoke test)."""

    def __init__(self, label: str, total: float | None = None, *, unit: str = "") -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.tty = sys.stderr.isatty()
        self._last = 0.0
        self._t0 = time.monotonic()
        self._line = ""

    def update(self, done: float, note: str = "", force: bool = False) -> None:
        now = time.monotonic()
        every = 0.2 if self.tty else 5.0
        if not force and now - self._last < every:
            return
        self._last = now
        el = now - self._t0
        if self.total:
            frac = max(0.0, min(1.0, done / self.total))
            width = 28
            bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
            text = f"{self.label:<22} [{bar}] {frac * 100:5.1f}% {done:,.0f}/{self.total:,.0f}{self.unit}"
        else:
            text = f"{self.label:<22} {done:,.0f}{self.unit}"
        text += f"  {el:6.1f}s" + (f"  {note}" if note else "")
        if self.tty:
            pad = max(0, len(self._line) - len(text))
            sys.stderr.write("\r" + text + " " * pad)
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()
        self._line = text

    def done(self, note: str = "") -> None:
        self.update(self.total or 0, note, force=True)
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def say(msg: str) -> None:
    sys.stderr.write(f"[bench] {msg}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------- numbers


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted values; None when empty."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return float(s[k])


def rnd(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(float(x), nd)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# --------------------------------------------------------------------------- machine


def _cmd_version(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(settings: Any | None = None) -> dict[str, Any]:
    import confluent_kafka
    import fastavro

    mem = mem_total()
    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "cores": os.cpu_count(),
        "memory_bytes": mem,
        "memory_gib": round(mem / 2**30, 1),
        "os": platform.platform(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "confluent_kafka": getattr(confluent_kafka, "__version__", None) or str(confluent_kafka.version()),
        "librdkafka": confluent_kafka.libversion()[0],
        "fastavro": fastavro.__version__,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "shared_machine": "yes: other engineers' test suites may run on this machine at the same time; "
                          "foreign_cpu_share in each result says how busy it was",
    }
    try:
        from infra.stack import _kafka_version

        info["kafka"] = _kafka_version()
    except Exception:  # noqa: BLE001 - informational
        info["kafka"] = None
    if settings is not None:
        try:
            import psycopg

            with psycopg.connect(pg_dsn(settings.postgres_url), connect_timeout=5) as c:
                info["postgres"] = c.execute("SHOW server_version").fetchone()[0]
        except Exception:  # noqa: BLE001
            info["postgres"] = None
        info["broker_partitions_at_start"] = broker_partitions(settings)
    return info


#: Above this many partitions already on the broker when a run starts, the run warns: a
#: broker that carries thousands of partitions left by test runs has less heap and CPU
#: for the scenarios, and the timers' tail showed it (docs/benchmarks.md).
CROWDED_BROKER_PARTITIONS = 500


def broker_partitions(settings: Any) -> int | None:
    """Partitions on the broker, internal topics included (None if it does not answer)."""
    try:
        from infra.kafka import make_admin

        topics = make_admin(settings).list_topics(timeout=10).topics
        return sum(len(t.partitions) for t in topics.values())
    except Exception:  # noqa: BLE001 - informational
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


class CpuWatch:
    """System-wide busy CPU seconds (from /proc/stat) over an interval, to tell how much
    of the machine other people's processes used while a scenario ran."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.busy0 = self._busy()

    @staticmethod
    def _busy() -> float:
        parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        vals = [int(x) for x in parts]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        total = sum(vals[:8])
        return (total - idle) / os.sysconf("SC_CLK_TCK")

    def result(self, ours_cpu_s: float) -> dict[str, Any]:
        wall = time.monotonic() - self.t0
        busy = self._busy() - self.busy0
        cores = os.cpu_count() or 1
        foreign = max(0.0, busy - ours_cpu_s)
        return {"wall_s": round(wall, 2), "machine_busy_cpu_s": round(busy, 2), "ours_cpu_s": round(ours_cpu_s, 2),
                "foreign_cpu_s": round(foreign, 2),
                "foreign_cpu_share": round(foreign / (wall * cores), 3) if wall > 0 else None}


# --------------------------------------------------------------------------- processes


_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (field 3 is index 0)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process and its reaped children (None if gone).

    Read from /proc (no psutil needed): utime, stime, cutime, cstime."""
    f = _stat(pid)
    if f is None or f[0] == "Z":
        return None
    return sum(int(x) for x in f[11:15]) / _TICK


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                out += [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def proc_tree_cpu_s(pid: int) -> float | None:
    """CPU seconds of a process and all its live descendants (a Celery prefork pool)."""
    total = proc_cpu_s(pid)
    if total is None:
        return None
    todo = _children(pid)
    while todo:
        c = todo.pop()
        f = _stat(c)
        if f is not None:
            total += sum(int(x) for x in f[11:13]) / _TICK
        todo += _children(c)
    return total


def proc_rss(pid: int) -> int | None:
    """Resident set size in bytes (/proc/<pid>/status VmRSS)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


class Proc:
    """One service subprocess with its log file; log lines are structlog JSON."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.started_mono = time.monotonic()
        self.started_ms = now_ms()
        self.popen = subprocess.Popen(argv, env=env, cwd=str(REPO), stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.popen.pid
        self._pos = 0
        self._events: list[dict[str, Any]] = []
        self.killed = False

    # -- logs ---------------------------------------------------------------------------

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line so far (parsed once, incrementally)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._pos)
                data = f.read()
        except OSError:
            return self._events
        cut = data.rfind(b"\n")
        if cut < 0:
            return self._events
        self._pos += cut + 1
        for line in data[: cut + 1].splitlines():
            if not line.startswith(b"{"):
                continue
            try:
                self._events.append(json.loads(line))
            except ValueError:
                pass
        return self._events

    def find(self, event: str, start: int = 0) -> list[dict[str, Any]]:
        return [e for e in self.events()[start:] if e.get("event") == event]

    def wait_for(self, event: str, timeout: float, *, count: int = 1, start: int = 0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(event, start)
            if len(found) >= count:
                return found
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode} before logging {event!r}; "
                                   f"log: {self.log_path}\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not log {event!r} within {timeout:.0f}s; log: {self.log_path}"
                                   f"\n{self.tail()}")
            time.sleep(0.05)

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # -- accounting ---------------------------------------------------------------------

    def cpu_s(self) -> float | None:
        return proc_cpu_s(self.pid)

    def rss(self) -> int | None:
        return proc_rss(self.pid)

    def alive(self) -> bool:
        return self.popen.poll() is None

    # -- stopping -----------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL, like a crashed host."""
        self.killed = True
        try:
            self.popen.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)

    def stop(self, timeout: float = 30) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._log.close()
        return self.popen.returncode


# --------------------------------------------------------------------------- environment


def pg_dsn(sqlalchemy_url: str) -> str:
    """A libpq DSN from the project's SQLAlchemy URL (drops the ``+psycopg`` driver)."""
    return sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)


def _with_db(url: str, db: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=db).render_as_string(hide_password=False)


class BenchEnv:
    """An isolated deployment: topic prefix, PostgreSQL database, MongoDB database.

    ``settings`` is what the bench's own clients use; :meth:`service_env` is the
    environment of every service subprocess (the same values, as ``JOBSCHED_*``).
    """

    def __init__(self, opts: RunOptions, scenario: str, *, projections: bool = True) -> None:
        from infra.config import Settings
        from infra.kafka import ensure_topics

        self.opts = opts
        self.scenario = scenario
        tag = uuid.uuid4().hex[:8]
        self.prefix = f"bench-{scenario}-{tag}"
        base = Settings.from_env()
        self.db = f"jobsched_bench_{scenario}_{tag}"
        self.mongo_db = self.db
        self.projections = projections
        self.settings = base.with_(topic_prefix=self.prefix, postgres_url=_with_db(base.postgres_url, self.db),
                                   mongo_db=self.mongo_db)
        self.base = base
        self.procs: list[Proc] = []
        self._counter = 0
        ensure_topics(self.settings)
        if projections:
            self._create_db()

    # -- databases ------------------------------------------------------------------------

    def _create_db(self) -> None:
        import psycopg

        from consumers.projections.migrate import migrate

        with psycopg.connect(pg_dsn(_with_db(self.base.postgres_url, "postgres")), autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{self.db}"')
        migrate(self.settings)

    def pg(self) -> Any:
        import psycopg

        return psycopg.connect(pg_dsn(self.settings.postgres_url), autocommit=True)

    def service_env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "JOBSCHED_TOPIC_PREFIX": self.prefix,
            "JOBSCHED_PARTITIONS": str(self.settings.partitions),
            "JOBSCHED_READY_PARTITIONS": str(self.settings.ready_partitions),
            "JOBSCHED_POSTGRES_URL": self.settings.postgres_url,
            "JOBSCHED_MONGO_DB": self.mongo_db,
            "JOBSCHED_USER": f"{self.prefix}-svc",
            "PYTHONUNBUFFERED": "1",
        })
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.update(extra)
        return env

    # -- services ------------------------------------------------------------------------

    def spawn(self, role: str, *args: str, name: str | None = None) -> Proc:
        self._counter += 1
        name = name or f"{role}-{self._counter}"
        argv = [sys.executable, "-m", "producers.cli", role, *args]
        p = Proc(name, argv, self.service_env(), self.opts.logs / f"{self.prefix}.{name}.log")
        self.procs.append(p)
        return p

    def scheduler(self, name: str | None = None) -> Proc:
        return self.spawn("scheduler", name=name)

    def worker(self, concurrency: int | None = None, name: str | None = None) -> Proc:
        return self.spawn("worker", "--allow", "shell,http,python", "--concurrency",
                          str(concurrency or self.opts.concurrency), name=name)

    def projector(self, name: str | None = None) -> Proc:
        return self.spawn("project", name=name or "projector")

    def start_system(self, *, schedulers: int = 1, workers: int = 1, projector: bool = True,
                     timeout: float = 90) -> dict[str, list[Proc]]:
        """Start services in parallel and wait until each has its partitions."""
        scheds = [self.scheduler() for _ in range(schedulers)]
        wks = [self.worker() for _ in range(workers)]
        projs = [self.projector()] if projector else []
        for s in scheds:
            s.wait_for("partitions_restored", timeout)
        for w in wks:
            w.wait_for("partitions assigned", timeout)
        for p in projs:
            p.wait_for("partitions assigned", timeout)
        return {"schedulers": scheds, "workers": wks, "projectors": projs}

    # -- cleanup ------------------------------------------------------------------------

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            if p.alive():
                try:
                    p.popen.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in reversed(self.procs):
            p.stop(timeout=40)

    def cleanup(self) -> None:
        self.stop_all()
        if self.opts.keep:
            say(f"kept topics {self.prefix}.* and database {self.db}")
            return
        delete_prefix(self.settings, self.prefix)
        if self.projections:
            try:
                import psycopg

                with psycopg.connect(pg_dsn(_with_db(self.base.postgres_url, "postgres")), autocommit=True) as c:
                    c.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
            except Exception as e:  # noqa: BLE001 - cleanup is best effort
                say(f"could not drop database {self.db}: {e}")
            try:
                from consumers.projections.migrate import mongo_client

                mc = mongo_client(self.settings)
                mc.drop_database(self.mongo_db)
                mc.close()
            except Exception as e:  # noqa: BLE001
                say(f"could not drop mongo database {self.mongo_db}: {e}")

    def __enter__(self) -> "BenchEnv":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def delete_prefix(settings: Any, prefix: str) -> None:
    """Delete the topics and consumer groups of one bench deployment."""
    from infra.kafka import make_admin

    admin = make_admin(settings)
    try:
        topics = [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix + ".")]
        if topics:
            for _, f in admin.delete_topics(topics, operation_timeout=30).items():
                try:
                    f.result(30)
                except Exception:  # noqa: BLE001
                    pass
        groups = [g.group_id for g in admin.list_consumer_groups().result(30).valid if prefix in g.group_id]
        if groups:
            for _, f in admin.delete_consumer_groups(groups, request_timeout=30).items():
                try:
                    f.result(30)
                except Exception:  # noqa: BLE001 - a group with live members stays
                    pass
    except Exception as e:  # noqa: BLE001
        say(f"cleanup of {prefix}.* incomplete: {e}")


# --------------------------------------------------------------------------- Kafka probes


def group_lag(settings: Any, group: str, topics: Iterable[str]) -> int:
    """Records of ``topics`` not yet committed by ``group`` (committed offsets vs ends)."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group, "enable.auto.commit": False,
                  "isolation.level": "read_committed"})
    try:
        md = c.list_topics(timeout=10)
        tps = [TopicPartition(t, p) for t in topics for p in md.topics[t].partitions]
        committed = {(tp.topic, tp.partition): tp.offset for tp in c.committed(tps, timeout=10)}
        lag = 0
        for tp in tps:
            lo, hi = c.get_watermark_offsets(tp, timeout=10, cached=False)
            pos = committed.get((tp.topic, tp.partition), -1)
            lag += hi - (pos if pos >= 0 else lo)
        return lag
    finally:
        c.close()


def count_topic_records(settings: Any, topics: Iterable[str], progress: Progress | None = None) -> dict[str, dict[str, int]]:
    """Committed records and value bytes per topic, read to the end (read_committed:
    transaction markers and aborted records are not counted)."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"bench-count-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False, "isolation.level": "read_committed", "enable.partition.eof": True,
                  "fetch.max.bytes": 52428800, "max.partition.fetch.bytes": 10485760})
    out: dict[str, dict[str, int]] = {}
    try:
        md = c.list_topics(timeout=10)
        assign = []
        ends: dict[tuple[str, int], int] = {}
        for t in topics:
            if t not in md.topics:
                continue
            out[t] = {"records": 0, "value_bytes": 0, "key_bytes": 0, "offsets": 0}
            for p in md.topics[t].partitions:
                lo, hi = c.get_watermark_offsets(TopicPartition(t, p), timeout=10, cached=False)
                out[t]["offsets"] += hi - lo
                if hi > lo:
                    ends[(t, p)] = hi
                    assign.append(TopicPartition(t, p, lo))
        if not assign:
            return out
        c.assign(assign)
        pending = set(ends)
        total = 0
        idle_deadline = time.monotonic() + 60
        while pending and time.monotonic() < idle_deadline:
            msgs = c.consume(20000, 1.0)
            if msgs:
                idle_deadline = time.monotonic() + 60
            for m in msgs:
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        key = (m.topic(), m.partition())
                        if m.offset() >= ends.get(key, 0):
                            pending.discard(key)
                    continue
                st = out[m.topic()]
                st["records"] += 1
                v = m.value()
                k = m.key()
                st["value_bytes"] += len(v) if v else 0
                st["key_bytes"] += len(k) if k else 0
                total += 1
            if progress is not None:
                progress.update(total)
        return out
    finally:
        c.close()


class ReadyTail(threading.Thread):
    """Reads ``RunReady`` records of the ready topics (read_committed) in the background:
    (run_id, attempt, partition, occurred_at_ms, nominal_ms, received_ms) each.  With
    ``starts=True`` it also reads the reports topic: ``starts`` holds (run_id, attempt,
    start time) of every start a worker reported: ``RunStarted.occurred_at_ms``, or the
    ``started_at_ms`` of a ``RunFinished`` that ``implies_start``."""

    def __init__(self, settings: Any, queues: Sequence[str] = ("default",), *, starts: bool = False) -> None:
        super().__init__(name="ready-tail", daemon=True)
        from confluent_kafka import Consumer

        from schemas.codec import default_codec

        self.settings = settings
        self.codec = default_codec()
        self.rows: list[tuple[str, int, int, int, int, int]] = []
        self.starts: list[tuple[str, int, int]] = []
        self.errors = 0
        self._halt = threading.Event()
        self.started = threading.Event()
        self._c = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                            "group.id": f"bench-tail-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
                            "isolation.level": "read_committed", "auto.offset.reset": "earliest",
                            "fetch.wait.max.ms": 5, "fetch.min.bytes": 1})
        topics = [settings.ready_topic(q, p) for q in queues for p in ("high", "normal", "low")]
        if starts:
            topics.append(settings.reports_topic)
        self._c.subscribe(topics, on_assign=lambda c, tps: self.started.set())

    def run(self) -> None:
        from schemas.events import RunFinished, RunReady, RunStarted

        try:
            while not self._halt.is_set():
                for m in self._c.consume(5000, 0.1):
                    if m.error() is not None:
                        continue
                    recv = now_ms()
                    try:
                        ev = self.codec.decode(m.value())
                    except Exception:  # noqa: BLE001
                        self.errors += 1
                        continue
                    if isinstance(ev, RunReady):
                        self.rows.append((ev.run_id, ev.attempt, m.partition(), ev.occurred_at_ms, ev.nominal_ms,
                                          recv))
                    elif isinstance(ev, RunStarted):
                        self.starts.append((ev.run_id, ev.attempt, ev.occurred_at_ms))
                    elif isinstance(ev, RunFinished) and ev.implies_start and ev.started_at_ms is not None:
                        # Ended within the worker's start-report delay: this record is the start.
                        self.starts.append((ev.run_id, ev.attempt, ev.started_at_ms))
        finally:
            self._c.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(30)


# --------------------------------------------------------------------------- PostgreSQL probes


def pg_counts(conn: Any, user_id: str) -> dict[str, int]:
    rows = conn.execute("SELECT status, count(*) FROM jobs WHERE user_id = %s GROUP BY status", (user_id,)).fetchall()
    return {r[0]: int(r[1]) for r in rows}


def pg_start_latency(conn: Any, user_id: str) -> dict[str, Any]:
    """Submit-to-start latency (runs.started_at − jobs.created_at, i.e. RunStarted's
    time − JobSpec.submitted_at_ms) of a batch's runs, in ms."""
    row = conn.execute(
        """SELECT count(*),
                  percentile_disc(0.5) WITHIN GROUP (ORDER BY d),
                  percentile_disc(0.99) WITHIN GROUP (ORDER BY d),
                  max(d), min(j_created), max(r_started), max(r_finished)
           FROM (SELECT EXTRACT(EPOCH FROM (r.started_at - j.created_at)) * 1000 AS d,
                        j.created_at AS j_created, r.started_at AS r_started, r.finished_at AS r_finished
                 FROM runs r JOIN jobs j ON j.job_id = r.job_id
                 WHERE j.user_id = %s AND r.status = 'succeeded') x""", (user_id,)).fetchone()
    return {"runs": int(row[0]), "p50_ms": rnd(row[1], 1), "p99_ms": rnd(row[2], 1), "max_ms": rnd(row[3], 1),
            "first_submitted_at": row[4].isoformat() if row[4] else None,
            "last_started_at": row[5].isoformat() if row[5] else None,
            "last_finished_at": row[6].isoformat() if row[6] else None}


def stack_pids(settings: Any) -> dict[str, int]:
    """Pids of the stack's Kafka and PostgreSQL (for their CPU seconds)."""
    try:
        from infra.stack import status

        st = status(settings)
        return {s.name: s.pid for s in st.services if s.pid}
    except Exception:  # noqa: BLE001
        return {}


def pg_backend_cpu_s(db: str) -> float:
    """CPU seconds of the PostgreSQL backends connected to one database (live ones)."""
    total = 0.0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("postgres:") and f" {db} " in cmd + " ":
            f = _stat(int(d.name))
            if f is not None:
                total += sum(int(x) for x in f[11:13]) / _TICK
    return total


class CpuLedger:
    """CPU seconds of named processes between :meth:`start` and :meth:`stop`."""

    def __init__(self) -> None:
        self.fns: dict[str, Callable[[], float | None]] = {}
        self.t0: dict[str, float] = {}
        self.t1: dict[str, float] = {}

    def add(self, name: str, fn: Callable[[], float | None]) -> None:
        self.fns[name] = fn

    def start(self) -> None:
        self.t0 = {n: (f() or 0.0) for n, f in self.fns.items()}

    def snapshot(self) -> None:
        """Keep the latest readings (call while processes are still alive)."""
        for n, f in self.fns.items():
            v = f()
            if v is not None:
                self.t1[n] = v

    def result(self, per: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for n in self.fns:
            d = self.t1.get(n, self.t0.get(n, 0.0)) - self.t0.get(n, 0.0)
            out[n] = {"cpu_s": round(d, 2), "cpu_s_per_1000_jobs": round(d / per * 1000, 3) if per else None}
        return out

    def total(self) -> float:
        return sum(self.t1.get(n, 0.0) - self.t0.get(n, 0.0) for n in self.fns)


# --------------------------------------------------------------------------- results


TARGETS: dict[str, dict[str, str]] = {
    "throughput": {"jobs_per_s": ">= 10000", "ratio_vs_celery": ">= 5", "ceiling_ratio": ">= 0.3"},
    "timers": {"lateness_p99_ms": "<= 10", "duplicate_firings": "== 0"},
    "failover": {"takeover_s": "<= 5", "lost": "== 0", "duplicated": "== 0"},
    "memory": {"bytes_per_pending_job": "<= 300", "restore_s": "<= 15"},
    "scaleout": {},
    "peer": {},
    "ceiling": {},
}


def target_met(expr: str, value: Any) -> bool | None:
    if not isinstance(value, (int, float)):
        return None
    op, num = expr.split()
    x = float(num)
    return {">=": value >= x, "<=": value <= x, "==": value == x}[op]


def write_result(opts: RunOptions, scenario: str, *, metrics: dict[str, Any], params: dict[str, Any],
                 details: dict[str, Any] | None = None, machine: dict[str, Any] | None = None,
                 notes: list[str] | None = None, started: float | None = None) -> dict[str, Any]:
    opts.out.mkdir(parents=True, exist_ok=True)
    targets = TARGETS.get(scenario, {})
    doc = {
        "scenario": scenario,
        "metrics": metrics,
        "targets": {k: {"target": v, "met": target_met(v, metrics.get(k))} for k, v in targets.items()},
        "params": {"size": opts.size, "run_id": opts.run_id, **params},
        "machine": machine or machine_info(),
        "details": details or {},
        "notes": notes or [],
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_s": round(time.monotonic() - started, 1) if started else None,
    }
    path = opts.out / f"{scenario}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    tmp.replace(path)
    return doc


def read_result(opts: RunOptions, scenario: str) -> dict[str, Any] | None:
    path = opts.out / f"{scenario}.json"
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def which(prog: str) -> str | None:
    return shutil.which(prog)


def plan_dues(now: int, lead_s: float, window_s: float, n: int,
              crons: int) -> tuple[int, int | None, list[int]]:
    """The timers workload, the same for every system measured: ``n`` one-off due times
    spread at random (fixed seed) over ``window_s`` seconds starting ``lead_s`` from now;
    with crons, the window is centred on a minute boundary so the cron firings land in
    the middle of the one-off load.  Returns (window start, minute boundary or None, dues).
    """
    w_ms = int(window_s * 1000)
    if crons:
        earliest = now + int(lead_s * 1000) + w_ms // 2
        boundary: int | None = -(-earliest // 60_000) * 60_000
        t0 = boundary - w_ms // 2  # type: ignore[operator]
    else:
        boundary, t0 = None, now + int(lead_s * 1000)
    rng = random.Random(5)
    return t0, boundary, sorted(t0 + rng.randrange(w_ms) for _ in range(n))

