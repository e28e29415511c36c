"""The logs projector: ``jobs.logs`` → MongoDB collection ``log_chunks``.

Workers write log chunks at least once (a redelivered run may repeat chunks, and a
second attempt writes its own).  Every chunk is stored under
``_id = "<run_id>|<attempt>|<seq>"``, so a repeat is a duplicate-key no-op::

    consume ≤ batch_size records
      → decode (undecodable → dead-letter topic)
      → insert_many(ordered=False), duplicate keys ignored
      → commit the Kafka offsets                    (at-least-once + idempotent writes)
      → every purge_interval: delete chunks older than the retention

FerretDB has no TTL indexes, so retention is this periodic purge on ``at`` (the
chunk's ``occurred_at``), default 30 days; on a real MongoDB a TTL index could replace it.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, TypeVar

import structlog
from confluent_kafka import Consumer, Producer, TopicPartition
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError, PyMongoError

from consumers.projections.migrate import LOG_CHUNKS, ensure_log_indexes, mongo_client, mongo_error, redact_url
from infra.config import Settings
from infra.errors import BrokerUnavailable, DecodeError, JobschedError, Unavailable
from infra.kafka import DeadLetters, Message, make_consumer, make_producer, raise_for_message
from schemas.codec import Codec, default_codec
from schemas.events import LogChunk

__all__ = [
    "CONSUMER_GROUP",
    "DEFAULT_RETENTION_MS",
    "LogsProjector",
    "chunk_doc",
    "chunk_id",
    "purge_collection",
    "purge_logs",
]

CONSUMER_GROUP = "jobsched-projector-logs"
DAY_MS = 86_400_000
DEFAULT_RETENTION_MS = 30 * DAY_MS
DEFAULT_PURGE_INTERVAL_S = 3600.0
_DUPLICATE_KEY = 11000
LOG_STREAMS = frozenset({"stdout", "stderr", "system"})

log = structlog.get_logger(__name__)
T = TypeVar("T")


class LogChunkRefused(JobschedError, ValueError):
    """A well-formed record that is not a log chunk this projection can store."""


def chunk_id(run_id: str, attempt: int, seq: int, worker_id: str | None = None) -> str:
    """The document id of a chunk: one per (run, attempt, worker, seq), whatever the delivery count.

    The worker is part of it because a run redelivered to another worker (its first
    worker died) writes a sequence of its own from 0; without it the two would collide.
    Chunks written before workers named themselves keep the shorter id.
    """
    if worker_id is None:
        return f"{run_id}|{attempt}|{seq}"
    return f"{run_id}|{attempt}|{worker_id}|{seq}"


def ms_to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def chunk_doc(chunk: LogChunk) -> dict[str, Any]:
    """The ``log_chunks`` document of a chunk (pure)."""
    if chunk.stream not in LOG_STREAMS:
        raise LogChunkRefused(f"run {chunk.run_id}: unknown log stream {chunk.stream!r}")
    try:
        at = ms_to_datetime(chunk.occurred_at_ms)
    except (OverflowError, OSError, ValueError) as e:
        raise LogChunkRefused(f"run {chunk.run_id}: occurred_at_ms {chunk.occurred_at_ms} is no time") from e
    return {
        "_id": chunk_id(chunk.run_id, chunk.attempt, chunk.seq, chunk.worker_id),
        "job_id": chunk.job_id,
        "run_id": chunk.run_id,
        "attempt": chunk.attempt,
        "seq": chunk.seq,
        "stream": chunk.stream,
        "data": chunk.data,
        "eof": chunk.eof,
        "worker_id": chunk.worker_id,
        "at": at,
        "tenant_id": chunk.tenant_id,
        "user_id": chunk.user_id,
    }


def purge_collection(collection: Collection[dict[str, Any]], older_than_ms: int) -> int:
    """Delete the chunks whose ``at`` is before ``older_than_ms`` (epoch ms); return how many."""
    return collection.delete_many({"at": {"$lt": ms_to_datetime(older_than_ms)}}).deleted_count


def purge_logs(settings: Settings, older_than_ms: int) -> int:
    """Delete log chunks written before the instant ``older_than_ms`` (epoch ms).

    For retention, pass ``now - retention``: the logs projector does so every hour.
    Raises :class:`~infra.errors.StoreUnavailable` when MongoDB does not answer.
    """
    client = mongo_client(settings)
    try:
        return purge_collection(client[settings.mongo_db][LOG_CHUNKS], older_than_ms)
    except PyMongoError as e:
        raise mongo_error(settings, e, "purging logs") from e
    finally:
        client.close()


@dataclasses.dataclass
class LogsStats:
    records: int = 0
    inserted: int = 0
    duplicates: int = 0
    dead: int = 0
    purged: int = 0
    batches: int = 0


class LogsProjector:
    """Stores ``jobs.logs`` in MongoDB (a :class:`~infra.service.Service`)."""

    name = "projector-logs"

    def __init__(
        self,
        settings: Settings,
        *,
        consumer_name: str | None = None,
        batch_size: int = 1000,
        poll_timeout: float = 0.2,
        retention_ms: int = DEFAULT_RETENTION_MS,
        purge_interval_s: float = DEFAULT_PURGE_INTERVAL_S,
        codec: Codec | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if retention_ms <= 0:
            raise ValueError("retention_ms must be positive")
        self.settings = settings
        # Per topic prefix, so separate deployments never share (and rebalance) a group.
        self.consumer_name = consumer_name or settings.group_id("projector-logs")
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        self.retention_ms = retention_ms
        self.purge_interval_s = purge_interval_s
        self.codec = codec or default_codec()
        self.clock = clock
        self.stats = LogsStats()
        self._stop = threading.Event()
        self._collection: Collection[dict[str, Any]] | None = None
        self._producer: Producer | None = None
        self._dlq: DeadLetters | None = None
        self._log = log.bind(service=self.name, consumer=self.consumer_name, topic=settings.logs_topic)

    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        client = mongo_client(self.settings)
        producer = self._producer = make_producer(self.settings)
        self._dlq = DeadLetters(producer, self.settings, self.consumer_name)
        consumer: Consumer | None = None
        try:
            coll = self._collection = client[self.settings.mongo_db][LOG_CHUNKS]
            if self._retry(lambda: ensure_log_indexes(coll) or True, "creating indexes") is None:
                return  # stopped before MongoDB answered
            consumer = make_consumer(self.settings, self.consumer_name)
            consumer.subscribe([self.settings.logs_topic])
            self._log.info("logs projector started", mongo=redact_url(self.settings.mongo_url))
            next_purge = 0.0  # purge once at start, then every interval
            while not stop.is_set():
                if time.monotonic() >= next_purge:
                    self._retry(self._purge, "purging old logs")
                    next_purge = time.monotonic() + self.purge_interval_s
                msgs = consumer.consume(self.batch_size, self.poll_timeout)
                producer.poll(0)
                records = [m for m in msgs if raise_for_message(m)]
                if not records:
                    continue
                if self._retry(lambda: self._apply(records), "writing log chunks") is None:
                    break  # stopped while retrying: the batch is not committed, so it is replayed
                offsets: dict[tuple[str, int], int] = {}
                for m in records:
                    offsets[(m.topic(), m.partition())] = m.offset() + 1
                try:
                    consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                    asynchronous=False)
                except Exception as e:  # lost partitions: the next owner replays, harmlessly
                    self._log.warning("offset commit failed", error=str(e))
        finally:
            if consumer is not None:
                consumer.close()
            producer.flush(5)
            client.close()
            self._log.info("logs projector stopped", **dataclasses.asdict(self.stats))

    def purge_logs(self, older_than_ms: int) -> int:
        """Delete chunks older than ``older_than_ms`` (epoch ms) through this projector's client."""
        assert self._collection is not None, "purge_logs needs a running projector; use logs_projector.purge_logs"
        return purge_collection(self._collection, older_than_ms)

    # -- internals ----------------------------------------------------------------------

    def _retry(self, fn: Callable[[], T], doing: str) -> T | None:
        delay = 0.2
        while True:
            try:
                return fn()
            except (PyMongoError, Unavailable) as e:
                err = mongo_error(self.settings, e, doing) if isinstance(e, PyMongoError) else e
                self._log.warning("retrying", doing=doing, error=str(err), delay=delay)
            if self._stop.wait(delay):
                return None
            delay = min(delay * 2, 5.0)

    def _purge(self) -> int:
        assert self._collection is not None
        cutoff = int(self.clock() * 1000) - self.retention_ms
        n = purge_collection(self._collection, cutoff)
        self.stats.purged += n
        if n:
            self._log.info("purged old log chunks", deleted=n, cutoff_ms=cutoff)
        return n

    def _apply(self, records: list[Message]) -> int:
        assert self._collection is not None and self._dlq is not None and self._producer is not None
        docs: dict[str, dict[str, Any]] = {}
        sources: dict[str, Message] = {}
        dead = 0
        for m in records:
            try:
                event = self.codec.decode(m.value())
                if not isinstance(event, LogChunk):
                    raise LogChunkRefused(f"{type(event).__name__} is not a LogChunk")
                doc = chunk_doc(event)
            except (DecodeError, LogChunkRefused) as e:
                self._dead(m, e)
                dead += 1
                continue
            if doc["_id"] not in docs:  # a duplicate inside the batch keeps the first copy
                docs[doc["_id"]] = doc
                sources[doc["_id"]] = m
        ordered = list(docs.values())
        inserted, dups = len(ordered), len(records) - dead - len(ordered)
        if ordered:
            try:
                self._collection.insert_many(ordered, ordered=False)
            except BulkWriteError as e:
                if e.details.get("writeConcernErrors"):
                    raise
                for err in e.details.get("writeErrors", []):
                    inserted -= 1
                    if err.get("code") == _DUPLICATE_KEY:
                        dups += 1
                    else:  # the document itself is refused (too large, bad key…)
                        self._dead(sources[ordered[err["index"]]["_id"]], err.get("errmsg", "write refused"))
                        dead += 1
        if dead:
            left = self._producer.flush(10)
            if left:
                raise BrokerUnavailable(f"{left} dead letters not acknowledged by Kafka; retrying the batch")
        self.stats.records += len(records)
        self.stats.inserted += inserted
        self.stats.duplicates += dups
        self.stats.dead += dead
        self.stats.batches += 1
        return inserted

    def _dead(self, m: Message, error: BaseException | str) -> None:
        assert self._dlq is not None
        self._log.warning("dead letter", partition=m.partition(), offset=m.offset(), error=str(error)[:300])
        self._dlq.send(m, error)
