"""The native local stack: PostgreSQL, Apache Kafka (KRaft) and FerretDB as plain processes.

``up`` fetches or builds what is missing into ``Settings.cache`` (the Kafka jars with
Maven, the FerretDB binary with Go) and starts whatever is not running, each under
``Settings.home``::

    <home>/
      pids/<service>.pid      the pid we started; the only processes `down` ever stops
      logs/<service>.log      stdout/stderr (and, for Kafka, log4j) of each service
      postgres/data           the cluster (owned by the ``postgres`` user when we are root)
      postgres/run            its Unix socket
      kafka/server.properties rendered from infra/kafka/server.properties.template
      kafka/cluster.id        the KRaft cluster id the data directory was formatted with
      kafka/data              the broker's log dirs
      ferretdb/               FerretDB's state directory

Nothing here reads the environment except to find programs (``PATH``, ``JAVA_HOME``):
addresses, ports and folders come from :class:`~infra.config.Settings`, so the
``JOBSCHED_*`` variables work through ``Settings.from_env()`` only.

Errors::

    JobschedError
    └── StackError(RuntimeError)   a service could not be built, started or stopped;
                                   the message names the service and its log file
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import string
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from infra.config import ConfigError, Settings
from infra.errors import JobschedError

__all__ = [
    "PostgresTarget",
    "ServiceStatus",
    "StackError",
    "StackStatus",
    "down",
    "new_cluster_id",
    "parse_host_port",
    "parse_mongo_url",
    "parse_postgres_url",
    "parse_properties",
    "render_server_properties",
    "reset",
    "status",
    "up",
]

Log = Callable[[str], None]

_INFRA = Path(__file__).resolve().parent
KAFKA_POM = _INFRA / "kafka" / "pom.xml"
SERVER_PROPERTIES_TEMPLATE = _INFRA / "kafka" / "server.properties.template"
KAFKA_LOG4J2_CONFIG = _INFRA / "kafka" / "log4j2.properties"

FERRETDB_MODULE = "github.com/FerretDB/FerretDB"
FERRETDB_VERSION = "v1.24.2"
#: The database FerretDB keeps its collections in (next to the projections' database).
FERRETDB_DATABASE = "ferretdb"

KAFKA_NODE_ID = 1
KAFKA_JVM_OPTIONS = ("-Xms256m", "-Xmx768m", "-XX:+UseG1GC")

# How long a service may take to answer after it was started.  A cold JVM on a small
# machine needs most of Kafka's minute; the others answer within a second or two.
POSTGRES_START_TIMEOUT = 60.0
KAFKA_START_TIMEOUT = 90.0
FERRETDB_START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
LOG_TAIL_LINES = 20

# Longest Unix socket path the kernel accepts (sizeof(sun_path) - 1 on Linux).
_MAX_SOCKET_PATH = 107


# --------------------------------------------------------------------------- errors


class StackError(JobschedError, RuntimeError):
    """A service of the local stack could not be fetched, built, started or stopped.

    ``message`` is one line naming the service, what failed and its log file;
    ``log_tail`` holds the last lines of that log (or of the failed command's output).
    ``str()`` gives both, so a traceback in a test shows the cause.
    """

    def __init__(
        self,
        message: str,
        *,
        service: str | None = None,
        log_path: Path | None = None,
        log_tail: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.service = service
        self.log_path = log_path
        self.log_tail = tuple(log_tail)

    def __str__(self) -> str:
        if not self.log_tail:
            return self.message
        return "\n".join([self.message, *("    " + line for line in self.log_tail)])


# --------------------------------------------------------------------------- status values


@dataclass(frozen=True, kw_only=True)
class ServiceStatus:
    """What ``status`` knows about one service."""

    name: str
    running: bool
    pid: int | None
    address: str
    log_path: Path
    answering: bool

    @property
    def healthy(self) -> bool:
        return self.running and self.answering

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "running": self.running,
            "pid": self.pid,
            "address": self.address,
            "log": str(self.log_path),
            "answering": self.answering,
        }


@dataclass(frozen=True, kw_only=True)
class StackStatus:
    """The state of every service of the stack, in start order."""

    services: tuple[ServiceStatus, ...]

    @property
    def healthy(self) -> bool:
        return bool(self.services) and all(s.healthy for s in self.services)

    def service(self, name: str) -> ServiceStatus:
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "services": [s.to_dict() for s in self.services]}


# --------------------------------------------------------------------------- pure helpers


def parse_host_port(value: str, *, default_port: int | None = None, what: str = "address") -> tuple[str, int]:
    """``"127.0.0.1:9092"`` -> ``("127.0.0.1", 9092)``; ``"[::1]:9092"`` -> ``("::1", 9092)``.

    A comma-separated list (a Kafka bootstrap list) gives its first entry: the native
    stack runs one broker.
    """
    first = value.split(",")[0].strip()
    if not first:
        raise ConfigError(f"{what} is empty")
    if first.startswith("["):
        host, sep, rest = first[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"{what} {value!r} is not host:port")
    else:
        host, _, port_text = first.rpartition(":") if ":" in first else (first, "", "")
    if not port_text:
        if default_port is None:
            raise ConfigError(f"{what} {value!r} has no port")
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{what} {value!r} has a port that is not a number") from None
    if not host or not 0 < port < 65536:
        raise ConfigError(f"{what} {value!r} is not host:port")
    return host, port


@dataclass(frozen=True, kw_only=True)
class PostgresTarget:
    """Where the projections' database lives, from ``Settings.postgres_url``."""

    host: str
    port: int
    user: str
    dbname: str

    @property
    def address(self) -> str:
        return _join_host_port(self.host, self.port)


def parse_postgres_url(url: str) -> PostgresTarget:
    """Parse a SQLAlchemy/libpq URL (``postgresql+psycopg://user@host:port/db``)."""
    parts = urlsplit(url)
    if parts.scheme.split("+")[0] not in ("postgresql", "postgres"):
        raise ConfigError(f"postgres_url {url!r} is not a postgresql:// URL")
    try:
        port = parts.port or 5432
    except ValueError:
        raise ConfigError(f"postgres_url {url!r} has an invalid port") from None
    dbname = unquote(parts.path.lstrip("/"))
    if not dbname:
        raise ConfigError(f"postgres_url {url!r} names no database")
    return PostgresTarget(
        host=parts.hostname or "127.0.0.1",
        port=port,
        user=unquote(parts.username) if parts.username else "postgres",
        dbname=dbname,
    )


def parse_mongo_url(url: str) -> tuple[str, int]:
    """Host and port of a ``mongodb://`` URL (the first host of a seed list)."""
    parts = urlsplit(url)
    if parts.scheme != "mongodb":
        raise ConfigError(f"mongo_url {url!r} must be a mongodb:// URL to run locally")
    hosts = parts.netloc.rpartition("@")[2]
    return parse_host_port(hosts, default_port=27017, what="mongo_url host")


def new_cluster_id(randbytes: Callable[[int], bytes] = os.urandom) -> str:
    """A KRaft cluster id: 16 random bytes, base64url without padding (22 characters).

    Kafka's own ``Uuid.randomUuid()`` also refuses ids that start with ``-``: they read
    as an option on a command line.
    """
    while True:
        cid = base64.urlsafe_b64encode(randbytes(16)).decode("ascii").rstrip("=")
        if not cid.startswith("-"):
            return cid


def render_server_properties(
    template: str,
    *,
    node_id: int,
    broker: tuple[str, int],
    controller: tuple[str, int],
    log_dir: Path,
) -> str:
    """Fill the server.properties template; a missing placeholder is an error."""
    values = {
        "node_id": str(node_id),
        "broker_host": _bracket(broker[0]),
        "broker_port": str(broker[1]),
        "controller_host": _bracket(controller[0]),
        "controller_port": str(controller[1]),
        # Java properties treat a backslash as an escape.
        "log_dir": str(log_dir).replace("\\", "\\\\"),
    }
    return string.Template(template).substitute(values)


def parse_properties(text: str) -> dict[str, str]:
    """The key=value lines of a simple Java properties file (no continuations)."""
    result: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#!":
            continue
        key, _, value = line.partition("=")
        result[key.strip()] = value.strip()
    return result


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _join_host_port(host: str, port: int) -> str:
    return f"{_bracket(host)}:{port}"


def _kafka_version(pom: Path = KAFKA_POM) -> str:
    """The Kafka version pinned in infra/kafka/pom.xml: one place to change it."""
    props = ET.parse(pom).getroot().find("{http://maven.apache.org/POM/4.0.0}properties")
    for el in props if props is not None else ():
        if el.tag.endswith("}kafka.version") and el.text:
            return el.text.strip()
    raise StackError(f"kafka: {pom} has no <kafka.version> property", service="kafka")


def _check_kafka_lib(lib: Path, version: str) -> str | None:
    """What is wrong with a Kafka lib folder, or None when it is complete."""
    if not lib.is_dir():
        return f"{lib} does not exist"
    names = [p.name for p in lib.iterdir()]
    if not any(re.fullmatch(rf"kafka_[\d.]+-{re.escape(version)}\.jar", n) for n in names):
        return f"{lib} has no kafka_<scala>-{version}.jar"
    slf4j = sorted(n for n in names if n.startswith("slf4j-api-"))
    if len(slf4j) != 1:
        # Two slf4j-api versions on the classpath make logging pick one at random.
        return f"{lib} must hold exactly one slf4j-api jar, found {slf4j or 'none'}"
    if not any(n.startswith("log4j-slf4j-impl-") for n in names):
        return f"{lib} has no log4j-slf4j-impl jar: Kafka would log nothing"
    return None


# --------------------------------------------------------------------------- process helpers


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


def _output_tail(text: str, lines: int = LOG_TAIL_LINES) -> list[str]:
    # Maven colours its output even in batch mode; escape codes make unreadable errors.
    clean = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return [line for line in clean.splitlines() if line.strip()][-lines:]


def _proc_cmdline(pid: int) -> str | None:
    """The command line of a process, or None where /proc cannot tell."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return "" if Path("/proc/self").exists() else None
    except OSError:
        return None
    return raw.replace(b"\0", b" ").decode("utf-8", "replace")


def _pid_alive(pid: int) -> bool:
    """True when the process exists and is not a zombie."""
    try:
        # A service started by this very process is our child: reap it if it died,
        # or kill(pid, 0) would keep reporting its zombie as alive.
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    partial.write_text(text)
    os.replace(partial, path)


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _spawn_detached(argv: Sequence[str], log_path: Path) -> int:
    """Start a program in its own session with stdout/stderr appended to ``log_path``.

    posix_spawn rather than subprocess.Popen: a Popen object of a process meant to
    outlive us warns (ResourceWarning, an error under pytest) when it is collected.
    The new session keeps Ctrl-C in the terminal that ran ``up`` away from it.
    """
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(log_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    return os.posix_spawn(argv[0], list(argv), dict(os.environ), file_actions=actions, setsid=True)


def _terminate(pid: int, timeout: float = STOP_TIMEOUT) -> bool:
    """SIGTERM, wait, then SIGKILL.  True when the process was gone in time."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                return True
            time.sleep(0.1)
    return not _pid_alive(pid)


def _which(program: str, *, service: str, hint: str) -> str:
    found = shutil.which(program)
    if not found:
        raise StackError(f"{service}: '{program}' is not on PATH; {hint}", service=service)
    return found


def _run(
    argv: Sequence[str],
    *,
    service: str,
    what: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    new_session: bool = False,
) -> str:
    """Run a command to completion; on failure raise StackError with its output's tail.

    ``new_session`` is for commands that leave a daemon behind (pg_ctl start): the
    daemon must not share the caller's terminal and its Ctrl-C.
    """
    result = subprocess.run(
        list(argv),
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        start_new_session=new_session,
        check=False,
    )
    if result.returncode != 0:
        where = f" (log: {log_path})" if log_path else ""
        raise StackError(
            f"{service}: {what} failed with exit code {result.returncode}{where}",
            service=service,
            log_path=log_path,
            log_tail=_output_tail(result.stdout + "\n" + result.stderr) or (_tail(log_path) if log_path else []),
        )
    # Only stdout: `go mod download -json` may still talk on stderr.
    return result.stdout


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise up/down/reset on one home (two test processes may race to start)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class _Layout:
    """Every path under ``Settings.home``."""

    home: Path

    @property
    def pids(self) -> Path:
        return self.home / "pids"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def lock(self) -> Path:
        return self.home / ".lock"

    @property
    def postgres(self) -> Path:
        return self.home / "postgres"

    @property
    def kafka(self) -> Path:
        return self.home / "kafka"

    @property
    def ferretdb(self) -> Path:
        return self.home / "ferretdb"

    def owned(self) -> tuple[Path, ...]:
        """What ``reset`` deletes: only what this module creates."""
        return (self.pids, self.logs, self.postgres, self.kafka, self.ferretdb, self.lock)

    def create(self) -> None:
        for d in (self.home, self.pids, self.logs, self.kafka, self.ferretdb):
            d.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------- services


class _Service(ABC):
    """One component of the stack: how to fetch it, start it, probe it and stop it."""

    name: str
    start_timeout: float

    def __init__(self, settings: Settings, layout: _Layout) -> None:
        self.settings = settings
        self.layout = layout

    @property
    def pid_file(self) -> Path:
        return self.layout.pids / f"{self.name}.pid"

    @property
    def log_path(self) -> Path:
        return self.layout.logs / f"{self.name}.log"

    @property
    @abstractmethod
    def listen(self) -> tuple[str, int]:
        """The address clients use."""

    def ports(self) -> list[tuple[str, int]]:
        """Every address the service binds (checked for squatters before a start)."""
        return [self.listen]

    @property
    def address(self) -> str:
        return _join_host_port(*self.listen)

    @abstractmethod
    def _marker(self) -> str:
        """A string the service's command line contains, to tell our process from a pid reuse."""

    def ensure_artifacts(self, log: Log) -> None:
        """Fetch or build what the service runs, unless the cache has it."""

    @abstractmethod
    def launch(self, log: Log) -> int:
        """Start the service (it is not running) and return its pid."""

    @abstractmethod
    def probe(self, timeout: float) -> bool:
        """True when the service answers a real request."""

    def after_ready(self, log: Log) -> None:
        """Idempotent set-up once the service answers (databases, …)."""

    def live_pid(self) -> int | None:
        """The recorded pid when that process is alive and is really this service."""
        pid = _read_pid(self.pid_file)
        if pid is None or not _pid_alive(pid):
            return None
        cmdline = _proc_cmdline(pid)
        if cmdline is not None and self._marker() not in cmdline:
            return None  # the pid was reused by an unrelated process
        return pid

    def record(self, pid: int) -> None:
        # The address goes along so that a later `up` with other settings can tell.
        _write_atomic(self.pid_file, f"{pid}\n{self.address}\n")

    def recorded_address(self) -> str | None:
        lines = (_read_text(self.pid_file) or "").splitlines()
        return lines[1].strip() if len(lines) > 1 else None

    def stop(self, pid: int, log: Log) -> None:
        if not _terminate(pid):
            raise StackError(
                f"{self.name}: pid {pid} did not exit after SIGTERM and SIGKILL (log: {self.log_path})",
                service=self.name,
                log_path=self.log_path,
            )

    def fail(self, what: str) -> StackError:
        return StackError(
            f"{self.name}: {what} (log: {self.log_path})",
            service=self.name,
            log_path=self.log_path,
            log_tail=_tail(self.log_path),
        )

    def status(self) -> ServiceStatus:
        pid = self.live_pid()
        return ServiceStatus(
            name=self.name,
            running=pid is not None,
            pid=pid,
            address=self.address,
            log_path=self.log_path,
            answering=pid is not None and self.probe(timeout=2.0),
        )


class _Postgres(_Service):
    """A private PostgreSQL cluster: own data directory, port and socket folder."""

    name = "postgres"
    start_timeout = POSTGRES_START_TIMEOUT

    def __init__(self, settings: Settings, layout: _Layout) -> None:
        super().__init__(settings, layout)
        self.target = parse_postgres_url(settings.postgres_url)
        self.data = layout.postgres / "data"
        self.socket_dir = layout.postgres / "run"
        self._bindir: Path | None = None

    @property
    def listen(self) -> tuple[str, int]:
        return self.target.host, self.target.port

    def _marker(self) -> str:
        return str(self.data)

    # PostgreSQL refuses to run as root: when we are root, its files belong to the
    # ``postgres`` user and its programs run as that user.
    @staticmethod
    def _as_root() -> bool:
        return os.geteuid() == 0

    def _as_postgres(self, argv: Sequence[str]) -> list[str]:
        if not self._as_root():
            return list(argv)
        runuser = shutil.which("runuser")
        if runuser:
            return [runuser, "-u", "postgres", "--", *argv]
        su = _which("su", service=self.name, hint="install util-linux (runuser) or login (su)")
        return [su, "postgres", "-s", "/bin/sh", "-c", shlex.join(argv)]

    def _chown(self, path: Path) -> None:
        if self._as_root():
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise StackError(
                    "postgres: PostgreSQL refuses to run as root and there is no 'postgres' user; "
                    "install the postgresql package or run as an ordinary user",
                    service=self.name,
                ) from None
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def bindir(self) -> Path:
        """The server binaries, matching the data directory's major version if it exists."""
        if self._bindir is not None:
            return self._bindir
        wanted = None
        with contextlib.suppress(OSError):
            wanted = (self.data / "PG_VERSION").read_text().strip()
        found: list[Path] = []
        root = Path("/usr/lib/postgresql")  # Debian/Ubuntu: one folder per major version
        if root.is_dir():
            found = sorted(
                (p / "bin" for p in root.iterdir() if (p / "bin" / "initdb").exists()),
                key=lambda b: [int(x) if x.isdigit() else 0 for x in b.parent.name.split(".")],
                reverse=True,
            )
        pg_config = shutil.which("pg_config")
        if pg_config:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True)
                b = Path(out.stdout.strip())
                if (b / "initdb").exists() and b not in found:
                    found.append(b)
        initdb = shutil.which("initdb")
        if initdb and Path(initdb).parent not in found:
            found.append(Path(initdb).parent)
        if not found:
            raise StackError(
                "postgres: no PostgreSQL server programs found (looked in /usr/lib/postgresql/*/bin, "
                "pg_config --bindir and PATH); install the postgresql package",
                service=self.name,
            )
        if wanted is not None:
            for b in found:
                if b.parent.name == wanted or _postgres_major(b) == wanted:
                    self._bindir = b
                    return b
            raise StackError(
                f"postgres: {self.data} was created by PostgreSQL {wanted} but only "
                f"{', '.join(str(b) for b in found)} is installed; `python -m infra reset` recreates it",
                service=self.name,
            )
        self._bindir = found[0]
        return found[0]

    def ensure_artifacts(self, log: Log) -> None:
        self.bindir()

    def _prepare_dirs(self) -> None:
        for d in (self.layout.postgres, self.socket_dir):
            d.mkdir(parents=True, exist_ok=True)
            self._chown(d)
        self.log_path.touch(exist_ok=True)
        self._chown(self.log_path)
        sock = self.socket_dir / f".s.PGSQL.{self.target.port}"
        if len(str(sock)) > _MAX_SOCKET_PATH:
            raise StackError(
                f"postgres: socket path {sock} is longer than {_MAX_SOCKET_PATH} bytes; "
                "set JOBSCHED_HOME to a shorter folder",
                service=self.name,
            )
        if self._as_root():
            # Every folder above home must be traversable by the postgres user.
            test = _which("test", service=self.name, hint="coreutils is missing")
            probe = subprocess.run(self._as_postgres([test, "-w", str(self.socket_dir)]), check=False)
            if probe.returncode != 0:
                raise StackError(
                    f"postgres: the postgres user cannot reach {self.socket_dir}; make the folders "
                    f"above {self.layout.home} traversable (chmod o+x) or set JOBSCHED_HOME elsewhere",
                    service=self.name,
                )

    def launch(self, log: Log) -> int:
        self._prepare_dirs()
        bindir = self.bindir()
        if not (self.data / "PG_VERSION").exists():
            log(f"postgres: creating a cluster in {self.data}")
            # initdb into a side folder, then rename: an interrupted initdb never leaves
            # a half cluster where the next `up` would try to start it.
            partial = self.data.with_name(f"data.partial-{os.getpid()}")
            shutil.rmtree(partial, ignore_errors=True)
            _run(
                self._as_postgres([
                    str(bindir / "initdb"), "-D", str(partial), "-A", "trust", "-U", "postgres",
                    # C collation, UTF-8: the same everywhere, whatever locales are installed.
                    "-E", "UTF8", "--locale=C",
                    # A dev cluster: skipping the final fsync saves seconds on a cold start.
                    "--no-sync",
                ]),
                service=self.name, what="initdb", cwd=self.layout.postgres,
            )
            shutil.rmtree(self.data, ignore_errors=True)  # a leftover without PG_VERSION
            os.rename(partial, self.data)
        options = " ".join([
            "-p", str(self.target.port),
            "-k", shlex.quote(str(self.socket_dir)),
            "-c", shlex.quote(f"listen_addresses={self.target.host}"),
        ])
        log(f"postgres: starting on {self.address}")
        _run(
            self._as_postgres([
                str(bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_path),
                "-o", options, "-w", "-t", str(int(self.start_timeout)), "start",
            ]),
            service=self.name, what="pg_ctl start", cwd=self.layout.postgres, log_path=self.log_path,
            new_session=True,
        )
        pid = self._postmaster_pid()
        if pid is None:
            raise self.fail("pg_ctl reported a start but postmaster.pid names no live process")
        return pid

    def _postmaster_pid(self) -> int | None:
        pid = _read_pid(self.data / "postmaster.pid")
        return pid if pid is not None and _pid_alive(pid) else None

    def live_pid(self) -> int | None:
        # postmaster.pid in our own data directory is authoritative: it survives a lost
        # pid file and can never name someone else's server.
        pid = self._postmaster_pid()
        if pid is not None:
            cmdline = _proc_cmdline(pid)
            if cmdline is None or self._marker() in cmdline:
                return pid
        return super().live_pid()

    def _connect(self, dbname: str, timeout: float) -> Any:
        import psycopg

        return psycopg.connect(
            host=self.target.host, port=self.target.port, user="postgres", dbname=dbname,
            connect_timeout=max(1, int(timeout)), autocommit=True,
        )

    def probe(self, timeout: float) -> bool:
        import psycopg

        try:
            with self._connect("postgres", timeout) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def after_ready(self, log: Log) -> None:
        from psycopg import sql

        with self._connect("postgres", 5.0) as conn:
            owner = "postgres"
            if self.target.user != "postgres":
                exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (self.target.user,)).fetchone()
                if not exists:
                    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(self.target.user)))
                owner = self.target.user
            for db, db_owner in ((self.target.dbname, owner), (FERRETDB_DATABASE, "postgres")):
                exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone()
                if not exists:
                    log(f"postgres: creating database {db}")
                    conn.execute(
                        sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db), sql.Identifier(db_owner))
                    )

    def stop(self, pid: int, log: Log) -> None:
        try:
            _run(
                self._as_postgres([
                    str(self.bindir() / "pg_ctl"), "-D", str(self.data), "-m", "fast",
                    "-w", "-t", str(int(STOP_TIMEOUT)), "stop",
                ]),
                service=self.name, what="pg_ctl stop", cwd=self.layout.postgres, log_path=self.log_path,
            )
        except StackError:
            if not _pid_alive(pid):
                return
            # A server that ignores a fast shutdown: immediate mode is PostgreSQL's own
            # SIGQUIT path, which still cleans up its shared memory (SIGKILL would not).
            log("postgres: fast shutdown timed out, using immediate mode")
            _run(
                self._as_postgres([str(self.bindir() / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"]),
                service=self.name, what="pg_ctl stop -m immediate", cwd=self.layout.postgres,
                log_path=self.log_path,
            )


def _postgres_major(bindir: Path) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=True)
        m = re.search(r"(\d+)(?:\.\d+)?", out.stdout)
        if m:
            return m.group(1)
    return None


class _Kafka(_Service):
    """One KRaft node, broker and controller, run from the Maven Central jars."""

    name = "kafka"
    start_timeout = KAFKA_START_TIMEOUT

    def __init__(self, settings: Settings, layout: _Layout) -> None:
        super().__init__(settings, layout)
        self.broker = parse_host_port(settings.kafka_bootstrap, what="kafka_bootstrap")
        # The controller listener is not a setting: it takes the port after the broker's.
        self.controller = (self.broker[0], self.broker[1] + 1)
        self.version = _kafka_version()
        self.lib = settings.cache / f"kafka-{self.version}" / "lib"
        self.properties = layout.kafka / "server.properties"
        self.cluster_id_file = layout.kafka / "cluster.id"
        self.data = layout.kafka / "data"

    @property
    def listen(self) -> tuple[str, int]:
        return self.broker

    def ports(self) -> list[tuple[str, int]]:
        return [self.broker, self.controller]

    def _marker(self) -> str:
        return str(self.properties)

    def ensure_artifacts(self, log: Log) -> None:
        if _check_kafka_lib(self.lib, self.version) is None:
            return
        mvn = _which("mvn", service=self.name, hint="install Maven (e.g. apt-get install maven)")
        log(f"kafka: fetching Kafka {self.version} jars with Maven into {self.lib}")
        self.lib.parent.mkdir(parents=True, exist_ok=True)
        partial = self.lib.with_name(f"lib.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            _run(
                [mvn, "-B", "-q", "-f", str(KAFKA_POM), "dependency:copy-dependencies",
                 f"-DoutputDirectory={partial}", "-DincludeScope=runtime"],
                service=self.name, what=f"Maven fetch of Kafka {self.version} ({KAFKA_POM})",
            )
            problem = _check_kafka_lib(partial, self.version)
            if problem:
                raise StackError(f"kafka: the Maven fetch is incomplete: {problem}", service=self.name)
            # A whole folder appears at once, so an interrupted fetch is never mistaken
            # for a complete one.  Another process may have won the race: keep its copy.
            if _check_kafka_lib(self.lib, self.version) is None:
                return
            shutil.rmtree(self.lib, ignore_errors=True)
            os.rename(partial, self.lib)
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    def _java(self) -> str:
        java_home = os.environ.get("JAVA_HOME")
        if java_home and (Path(java_home) / "bin" / "java").exists():
            return str(Path(java_home) / "bin" / "java")
        return _which("java", service=self.name, hint="install a JDK 17 or newer")

    def _java_cmd(self, main_class: str, *args: str) -> list[str]:
        return [
            self._java(), *KAFKA_JVM_OPTIONS,
            f"-Dlog4j2.configurationFile={KAFKA_LOG4J2_CONFIG}",
            f"-Dkafka.logs.dir={self.layout.logs}",
            # A JVM crash report would otherwise land in whatever folder `up` ran from.
            f"-XX:ErrorFile={self.layout.logs}/kafka-hs_err_pid%p.log",
            "-cp", f"{self.lib}/*", main_class, *args,
        ]

    def cluster_id(self) -> str:
        """The id the data directory was (or will be) formatted with, kept in home."""
        meta = self.data / "meta.properties"
        if meta.exists():
            cid = parse_properties(meta.read_text()).get("cluster.id")
            if cid:
                if _read_text(self.cluster_id_file) != cid:
                    _write_atomic(self.cluster_id_file, cid + "\n")
                return cid
        cid = _read_text(self.cluster_id_file) or new_cluster_id()
        _write_atomic(self.cluster_id_file, cid + "\n")
        return cid

    def launch(self, log: Log) -> int:
        template = SERVER_PROPERTIES_TEMPLATE.read_text()
        _write_atomic(
            self.properties,
            render_server_properties(
                template, node_id=KAFKA_NODE_ID, broker=self.broker, controller=self.controller, log_dir=self.data
            ),
        )
        cid = self.cluster_id()
        if not (self.data / "meta.properties").exists():
            log(f"kafka: formatting {self.data} (cluster id {cid})")
            out = _run(
                self._java_cmd("kafka.tools.StorageTool", "format", "--standalone", "-t", cid, "-c", str(self.properties)),
                service=self.name, what="storage format", log_path=self.log_path,
            )
            with self.log_path.open("a") as f:
                f.write(out)
        log(f"kafka: starting Kafka {self.version} on {self.address} (controller {_join_host_port(*self.controller)})")
        return _spawn_detached(self._java_cmd("kafka.Kafka", str(self.properties)), self.log_path)

    def probe(self, timeout: float) -> bool:
        # A plain connect first: the AdminClient would wait out its whole timeout (and
        # log connection errors) against a closed port.
        if not _port_open(*self.broker, timeout=min(timeout, 1.0)):
            return False
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.address, "log_level": 0})
        try:
            metadata = admin.list_topics(timeout=timeout)
        except KafkaException:
            return False
        return bool(metadata.brokers)


class _FerretDB(_Service):
    """FerretDB, the MongoDB wire protocol on top of our PostgreSQL."""

    name = "ferretdb"
    start_timeout = FERRETDB_START_TIMEOUT

    def __init__(self, settings: Settings, layout: _Layout, postgres: PostgresTarget) -> None:
        super().__init__(settings, layout)
        self.mongo = parse_mongo_url(settings.mongo_url)
        self.postgres = postgres
        self.binary = settings.cache / f"ferretdb-{FERRETDB_VERSION}" / "ferretdb"

    @property
    def listen(self) -> tuple[str, int]:
        return self.mongo

    def _marker(self) -> str:
        return f"--state-dir={self.layout.ferretdb}"

    def ensure_artifacts(self, log: Log) -> None:
        if self.binary.exists():
            return
        go = _which("go", service=self.name, hint="install Go 1.22 or newer")
        log(f"ferretdb: building FerretDB {FERRETDB_VERSION} with Go into {self.binary} (up to a minute on a cold Go cache)")
        self.binary.parent.mkdir(parents=True, exist_ok=True)
        # GOWORK=off: a go.work above the temp dir must not join the build.  GOFLAGS,
        # GOPROXY, GOCACHE… are the user's and stay as they are.
        env = dict(os.environ, GOWORK="off")
        with tempfile.TemporaryDirectory(prefix="jobsched-ferretdb-") as tmp:
            out = _run(
                [go, "mod", "download", "-json", f"{FERRETDB_MODULE}@{FERRETDB_VERSION}"],
                service=self.name, what=f"go mod download {FERRETDB_MODULE}@{FERRETDB_VERSION}", cwd=Path(tmp), env=env,
            )
            info = json.loads(out)
            if info.get("Error") or not info.get("Dir"):
                raise StackError(f"ferretdb: go mod download failed: {info.get('Error')}", service=self.name)
            # The module cache is read-only, and the module lacks the version file
            # FerretDB's version check panics without: build from a writable copy.
            src = Path(tmp) / "src"
            shutil.copytree(info["Dir"], src)
            for root, dirs, files in os.walk(src):
                for n in (*dirs, *files):
                    p = os.path.join(root, n)
                    os.chmod(p, os.stat(p).st_mode | 0o200)
            os.chmod(src, os.stat(src).st_mode | 0o200)
            (src / "build" / "version" / "version.txt").write_text(FERRETDB_VERSION)
            partial = self.binary.with_name(f"{self.binary.name}.partial-{os.getpid()}")
            try:
                # SQLite is a large pure-Go compile we do not use: leave it out.
                _run(
                    [go, "build", "-tags", "ferretdb_no_sqlite", "-o", str(partial), "./cmd/ferretdb"],
                    service=self.name, what=f"go build of FerretDB {FERRETDB_VERSION}", cwd=src, env=env,
                )
                os.replace(partial, self.binary)
            finally:
                partial.unlink(missing_ok=True)

    def launch(self, log: Log) -> int:
        pg = self.postgres
        postgres_url = f"postgres://postgres@{pg.address}/{FERRETDB_DATABASE}"
        log(f"ferretdb: starting FerretDB {FERRETDB_VERSION} on {self.address}")
        return _spawn_detached(
            [
                str(self.binary),
                "--handler=postgresql",
                f"--postgresql-url={postgres_url}",
                f"--listen-addr={self.address}",
                "--telemetry=disable",
                f"--state-dir={self.layout.ferretdb}",
                "--debug-addr=-",
                # Not "warn": FerretDB 1.24 logs every non-ok reply at WARN, and pymongo
                # sends endSessions (unsupported) whenever a client closes, i.e. each
                # probe and each short-lived client would write 20 lines.
                "--log-level=error",
            ],
            self.log_path,
        )

    def probe(self, timeout: float) -> bool:
        if not _port_open(*self.mongo, timeout=min(timeout, 1.0)):
            return False
        import pymongo
        from pymongo.errors import PyMongoError

        ms = int(timeout * 1000)
        try:
            client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
                self.settings.mongo_url, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms, socketTimeoutMS=ms
            )
            with client:
                client.admin.command("ping")
            return True
        except PyMongoError:
            return False


def _read_text(path: Path) -> str | None:
    with contextlib.suppress(OSError):
        return path.read_text().strip() or None
    return None


def _services(settings: Settings) -> tuple[_Postgres, _Kafka, _FerretDB]:
    layout = _Layout(settings.home)
    pg = _Postgres(settings, layout)
    return pg, _Kafka(settings, layout), _FerretDB(settings, layout, pg.target)


# --------------------------------------------------------------------------- public API


def up(settings: Settings, *, log: Log = print) -> StackStatus:
    """Fetch/build what is missing, start what is not running, wait until all answer.

    Idempotent: with everything running it only checks each service and returns.
    Raises StackError naming the service, the failure and its log file.
    """
    services = _services(settings)
    layout = services[0].layout
    layout.create()
    with _locked(layout.lock):
        for s in services:
            s.ensure_artifacts(log)
        postgres, kafka, ferretdb = services
        # PostgreSQL first (FerretDB stores into it), then the two others side by side:
        # the JVM's start-up dominates and FerretDB's hides behind it.
        pids = _bring_up([postgres], log) | _bring_up([kafka, ferretdb], log)
        # Each service has just answered a probe: no need to ask again.
        return StackStatus(
            services=tuple(
                ServiceStatus(
                    name=s.name, running=True, pid=pids[s.name], address=s.address,
                    log_path=s.log_path, answering=True,
                )
                for s in services
            )
        )


def _bring_up(group: Sequence[_Service], log: Log) -> dict[str, int]:
    """Start the services of ``group`` that are not running, then wait for all of them."""
    pids: dict[str, int] = {}
    to_start: list[_Service] = []
    for s in group:
        pid = s.live_pid()
        if pid is None:
            to_start.append(s)
            continue
        recorded = s.recorded_address()
        if recorded is not None and recorded != s.address:
            raise StackError(
                f"{s.name}: already running (pid {pid}) on {recorded}, but the settings ask for "
                f"{s.address}; run `python -m infra down` first",
                service=s.name,
                log_path=s.log_path,
            )
        pids[s.name] = pid
    # Check every port before starting anything, so a refusal leaves nothing half-started.
    for s in to_start:
        for host, port in s.ports():
            if _port_open(host, port, timeout=0.3):
                raise StackError(
                    f"{s.name}: cannot start, {_join_host_port(host, port)} is already in use by a process "
                    f"that is not ours (no live pid in {s.pid_file}); stop it or choose another port",
                    service=s.name,
                    log_path=s.log_path,
                )
    for s in to_start:
        pid = s.launch(log)
        s.record(pid)
        pids[s.name] = pid
    for s in group:
        _wait_ready(s, pids[s.name])
        s.after_ready(log)
        log(f"{s.name}: ready on {s.address} (pid {pids[s.name]})")
    return pids


def _wait_ready(s: _Service, pid: int) -> None:
    deadline = time.monotonic() + s.start_timeout
    while True:
        if s.probe(timeout=2.0):
            return
        if not _pid_alive(pid):
            raise s.fail(f"exited during start-up (pid {pid})")
        if time.monotonic() > deadline:
            raise s.fail(f"did not answer on {s.address} within {s.start_timeout:.0f} s (pid {pid} is running)")
        time.sleep(0.2)


def down(settings: Settings, *, log: Log = print) -> None:
    """Stop the processes recorded in ``<home>/pids`` (and nothing else); keep the data."""
    services = _services(settings)
    layout = services[0].layout
    if not layout.home.exists():
        return
    with _locked(layout.lock):
        _down_locked(services, log)


def _down_locked(services: Sequence[_Service], log: Log) -> None:
    errors: list[StackError] = []
    for s in reversed(services):  # FerretDB before the PostgreSQL it uses
        pid = s.live_pid()
        if pid is not None:
            log(f"{s.name}: stopping pid {pid}")
            try:
                s.stop(pid, log)
            except StackError as e:
                errors.append(e)
                continue
        s.pid_file.unlink(missing_ok=True)
    if errors:
        raise errors[0]


def status(settings: Settings) -> StackStatus:
    """Per service: running (its recorded process is alive), pid, address, log, answering."""
    return StackStatus(services=tuple(s.status() for s in _services(settings)))


def reset(settings: Settings, *, log: Log = print) -> None:
    """``down``, then delete the stack's data under home (never the cache)."""
    services = _services(settings)
    layout = services[0].layout
    if not layout.home.exists():
        return
    with _locked(layout.lock):
        _down_locked(services, log)
        for p in layout.owned():
            if p == layout.lock:
                continue
            if p.is_dir():
                log(f"deleting {p}")
                shutil.rmtree(p)
    layout.lock.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        layout.home.rmdir()  # only when nothing else lives there
