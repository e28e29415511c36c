"""Typed, validated configuration.

One frozen value object holds every setting with a named default that matches the
local stack.  Environment variables are read only by :meth:`Settings.from_env`, which
the thin CLI layer calls; everything else receives a ``Settings`` instance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

from infra.errors import JobschedError

DEFAULT_KAFKA_BOOTSTRAP = "127.0.0.1:9092"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:55432/jobsched"
DEFAULT_MONGO_URL = "mongodb://127.0.0.1:27017/"
DEFAULT_MONGO_DB = "jobsched"
DEFAULT_API_URL = "http://127.0.0.1:8080"

#: Partitions of every job-keyed topic.  All topics the scheduler consumes are
#: co-partitioned (same count, same key), so one owner holds all of a job's state.
DEFAULT_PARTITIONS = 12
DEFAULT_READY_PARTITIONS = 12


class ConfigError(JobschedError, ValueError):
    """A setting has a value that cannot work; the message names the setting."""


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every knob of the system, with defaults for the local stack."""

    kafka_bootstrap: str = DEFAULT_KAFKA_BOOTSTRAP
    postgres_url: str = DEFAULT_POSTGRES_URL
    mongo_url: str = DEFAULT_MONGO_URL
    mongo_db: str = DEFAULT_MONGO_DB
    api_url: str = DEFAULT_API_URL

    #: Running state of the local stack: data dirs, pids, logs.
    home: Path = field(default_factory=lambda: _repo_root() / ".jobsched")
    #: Downloads and builds (Kafka jars, the FerretDB binary), kept across clones.
    cache: Path = field(default_factory=lambda: Path.home() / ".cache" / "jobsched")

    #: Topic layout.  ``replication_factor``/``min_insync_replicas`` of None mean
    #: "as many as the cluster allows, up to 3 / 2", decided when topics are created.
    topic_prefix: str = "jobs"
    partitions: int = DEFAULT_PARTITIONS
    ready_partitions: int = DEFAULT_READY_PARTITIONS
    replication_factor: int | None = None
    min_insync_replicas: int | None = None
    queues: tuple[str, ...] = ("default",)

    #: Identity stamped on events written by this process when no user is given.
    user_id: str = field(default_factory=lambda: os.environ.get("USER", "anonymous") or "anonymous")
    tenant_id: str = "default"

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise ConfigError(f"partitions must be >= 1, got {self.partitions}")
        if self.ready_partitions < 1:
            raise ConfigError(f"ready_partitions must be >= 1, got {self.ready_partitions}")
        if not self.kafka_bootstrap:
            raise ConfigError("kafka_bootstrap must not be empty")
        for q in self.queues:
            if not q or not all(c.isalnum() or c in "-_" for c in q):
                raise ConfigError(f"queue name {q!r} may only hold letters, digits, '-' and '_'")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> "Settings":
        """Build settings from ``JOBSCHED_*`` environment variables, then overrides."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        simple = {
            "JOBSCHED_KAFKA_BOOTSTRAP": "kafka_bootstrap",
            "JOBSCHED_POSTGRES_URL": "postgres_url",
            "JOBSCHED_MONGO_URL": "mongo_url",
            "JOBSCHED_MONGO_DB": "mongo_db",
            "JOBSCHED_API_URL": "api_url",
            "JOBSCHED_TOPIC_PREFIX": "topic_prefix",
            "JOBSCHED_USER": "user_id",
            "JOBSCHED_TENANT": "tenant_id",
        }
        for var, name in simple.items():
            if env.get(var):
                values[name] = env[var]
        for var, name in {"JOBSCHED_HOME": "home", "JOBSCHED_CACHE": "cache"}.items():
            if env.get(var):
                values[name] = Path(env[var]).expanduser().resolve()
        for var, name in {
            "JOBSCHED_PARTITIONS": "partitions",
            "JOBSCHED_READY_PARTITIONS": "ready_partitions",
            "JOBSCHED_REPLICATION_FACTOR": "replication_factor",
            "JOBSCHED_MIN_INSYNC_REPLICAS": "min_insync_replicas",
        }.items():
            if env.get(var):
                try:
                    values[name] = int(env[var])
                except ValueError:
                    raise ConfigError(f"{var} must be an integer, got {env[var]!r}") from None
        if env.get("JOBSCHED_QUEUES"):
            values["queues"] = tuple(q.strip() for q in env["JOBSCHED_QUEUES"].split(",") if q.strip())
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    def with_(self, **changes: object) -> "Settings":
        """A copy with some settings changed."""
        return replace(self, **changes)  # type: ignore[arg-type]

    # Topic names, in one place.
    @property
    def commands_topic(self) -> str:
        return f"{self.topic_prefix}.commands"

    @property
    def reports_topic(self) -> str:
        return f"{self.topic_prefix}.reports"

    @property
    def events_topic(self) -> str:
        return f"{self.topic_prefix}.events"

    @property
    def logs_topic(self) -> str:
        return f"{self.topic_prefix}.logs"

    @property
    def state_topic(self) -> str:
        return f"{self.topic_prefix}.state"

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic_prefix}.dlq"

    @property
    def control_topic(self) -> str:
        return f"{self.topic_prefix}.control"

    def group_id(self, role: str) -> str:
        """Consumer group of a role, per topic prefix: separate deployments never share a group."""
        if self.topic_prefix == "jobs":
            return f"jobsched-{role}"
        return f"jobsched-{self.topic_prefix}-{role}"

    def ready_topic(self, queue: str, priority: str = "normal") -> str:
        """``jobs.ready.<queue>`` for normal priority, ``….high`` / ``….low`` otherwise."""
        base = f"{self.topic_prefix}.ready.{queue}"
        return base if priority == "normal" else f"{base}.{priority}"
