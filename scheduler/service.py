"""The scheduler service: a consumer-group member that drives :class:`PartitionState`.

Each instance owns some partitions of ``jobs.commands`` and ``jobs.reports`` (the
range assignor gives partition *p* of both topics to the same member).  For every batch
of input records and every batch of due timers it runs ONE Kafka transaction that
holds the produced ``ready``/``events``/``commands``/``control`` records, the changelog
records of every job touched, and the consumed input offsets.  So a crash at any point
either commits all of a step or none of it: a run is dispatched exactly once.

On assignment an instance restores each new partition's state by reading the
compacted changelog ``jobs.state`` to its end (read_committed, so an aborted
transaction of a dead owner is never seen); the previous owner's in-flight
transaction has to be resolved first, which the read_committed fetch waits for.
Standby instances are simply more members of the group: when one dies, the group
rebalances and the survivors restore and resume its partitions.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from typing import Any

import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from prometheus_client import Counter, Gauge, Histogram

from infra.config import Settings
from infra.errors import BrokerUnavailable, DecodeError
from infra.kafka import KAFKA_LOGGER, DeadLetters, ensure_topics, make_consumer, make_producer
from infra.memory import TrimWhenIdle, release_free_memory
from infra.topics import topic_specs
from scheduler.coldstore import FileColdStore
from scheduler.state import COMMANDS, CONTROL, EVENTS, READY, Output, PartitionState, Rejected, SchedulerConfig
from schemas.codec import Codec, default_codec
from schemas.events import DependencyRegistered, RunReady, UpstreamResolved, now_ms

log = structlog.get_logger("scheduler")


APPLIED = Counter("jobsched_scheduler_events_applied_total", "Input events applied", ["type"])
DISPATCHED = Counter("jobsched_scheduler_runs_dispatched_total", "RunReady records committed")
DEAD = Counter("jobsched_scheduler_dead_letters_total", "Input records sent to the dead-letter topic")
TXN = Histogram("jobsched_scheduler_transaction_seconds", "Duration of one scheduler transaction",
                buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
LATENESS = Histogram("jobsched_scheduler_firing_lateness_seconds",
                     "Dispatch time minus due time (0 when dispatched ahead with not_before_ms)",
                     buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, 30))
LIVE = Gauge("jobsched_scheduler_live_jobs", "Live jobs held by this instance")
TIMERS = Gauge("jobsched_scheduler_timers", "Pending timers held by this instance")
OWNED = Gauge("jobsched_scheduler_partitions", "Partitions owned by this instance")
RESTORE = Histogram("jobsched_scheduler_restore_seconds", "Time to restore newly assigned partitions",
                    buckets=(0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60))

#: Changelog header of a job filed cold: its due time (epoch ms, ASCII digits).
COLD_DUE_HEADER = "jobsched-cold-due"


def _cold_due(msg: Any) -> int | None:
    for k, v in msg.headers() or ():
        if k == COLD_DUE_HEADER and v is not None:
            try:
                return int(v)
            except ValueError:
                return None
    return None


#: A transaction slower than this is logged with where its time went.
SLOW_TRANSACTION_S = float(os.environ.get("JOBSCHED_SLOW_TRANSACTION_S", "0.25"))

#: Timed runs go to the workers this long before they are due, so the scheduler's
#: transaction and the workers' fetch are done by then; each worker holds a run until its
#: ``not_before_ms`` and starts it on the instant.  Under load a transaction plus the
#: fetch took over 500 ms now and then in the benchmark (the offsets round trip alone up
#: to 340 ms); 1 s covers that with room to spare.
DEFAULT_DISPATCH_LOOKAHEAD_MS = 1000


class SchedulerService:
    """One scheduler instance; run several for standby and scale."""

    name = "scheduler"

    def __init__(self, settings: Settings, *, instance_id: str | None = None, config: SchedulerConfig | None = None,
                 batch_size: int = 2000, codec: Codec | None = None,
                 consumer_overrides: dict[str, Any] | None = None, cold_dir: str | None = None) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.settings = settings
        self.instance_id = instance_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.config = config or SchedulerConfig(dispatch_lookahead_ms=DEFAULT_DISPATCH_LOOKAHEAD_MS)
        self.batch_size = batch_size
        self.codec = codec or default_codec()
        self.states: dict[int, PartitionState] = {}
        #: Where cold jobs' records are kept (unlinked temporary files); None: the system's temp dir.
        self.cold_dir = cold_dir
        self._consumer_overrides = consumer_overrides or {}
        self._known_topics: set[str] = set()
        self._log = log.bind(instance=self.instance_id)
        #: Gives the heap pages freed after a burst of input back once the input stops.
        self._trim = TrimWhenIdle()
        self._consumer: Consumer | None = None
        #: Set once the instance has joined and restored its first assignment.
        self.ready = threading.Event()

    # -- restore ----------------------------------------------------------------------

    def _restore(self, partitions: list[int]) -> None:
        """Rebuild the state of ``partitions`` from the changelog, all at once."""
        if not partitions:
            return
        t0 = time.monotonic()
        topic = self.settings.state_topic
        reader = Consumer({
            "bootstrap.servers": self.settings.kafka_bootstrap,
            "group.id": f"{self.settings.group_id('scheduler-restore')}-{self.instance_id}",
            "logger": KAFKA_LOGGER,
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "fetch.max.bytes": 52428800,
            # librdkafka's prefetch queue (64 MiB by default) would stay in the process's
            # heap after the restore: a quarter of it keeps the reader just as fast.
            "queued.max.messages.kbytes": 16384,
        })
        # Latest record per job: decoded ("hot"), or its bytes straight into the partition's
        # cold store when the writer marked it cold and it is still beyond the horizon.
        records: dict[int, dict[str, Any]] = {p: {} for p in partitions}
        stores = {p: self._cold_store() for p in partitions}
        horizon_end = now_ms() + self.config.cold_horizon_ms
        try:
            ends: dict[int, int] = {}
            assign = []
            for p in partitions:
                lo, hi = self._watermarks(reader, TopicPartition(topic, p))
                if hi > lo:
                    ends[p] = hi
                    assign.append(TopicPartition(topic, p, OFFSET_BEGINNING))
            if assign:
                reader.assign(assign)
                pending = set(ends)
                while pending:
                    for msg in reader.consume(10000, 1.0):
                        err = msg.error()
                        if err is not None:
                            if err.code() == KafkaError._PARTITION_EOF:
                                pos = reader.position([TopicPartition(topic, msg.partition())])[0].offset
                                if pos >= ends[msg.partition()]:
                                    pending.discard(msg.partition())
                                continue
                            raise BrokerUnavailable(f"changelog restore failed: {err.str()}")
                        key = msg.key().decode()
                        value = msg.value()
                        part = msg.partition()
                        due = _cold_due(msg) if value is not None else None
                        if due is not None and due > horizon_end:
                            records[part].pop(key, None)
                            stores[part].put(key, due, value)
                            continue
                        stores[part].discard(key)
                        try:
                            rec = self.codec.decode_state(value) if value is not None else None
                        except DecodeError as e:
                            self._log.error("changelog_record_unreadable", job_id=key, error=str(e))
                            continue
                        records[part][key] = rec
        except BaseException:
            for store in stores.values():
                store.close()
            raise
        finally:
            reader.close()
        now = now_ms()
        for p in partitions:
            ps = PartitionState(p, self.config, cold=stores[p], decode=self.codec.decode_state)
            ps.restore(records[p].items(), now)
            self.states[p] = ps
        release_free_memory()  # the reader's fetch buffers, freed but still in the heap
        took = time.monotonic() - t0
        RESTORE.observe(took)
        self._log.info("partitions_restored", partitions=sorted(partitions), seconds=round(took, 3),
                       jobs=sum(self.states[p].live_count for p in partitions),
                       cold_jobs=sum(len(stores[p]) for p in partitions),
                       cold_file_bytes=sum(stores[p].file_bytes for p in partitions))

    def _cold_store(self) -> FileColdStore:
        return FileColdStore(self.cold_dir)

    def _drop_state(self, partition: int) -> None:
        ps = self.states.pop(partition, None)
        if ps is not None and ps.cold is not None:
            ps.cold.close()

    def _watermarks(self, reader: Consumer, tp: TopicPartition, timeout: float = 60.0) -> tuple[int, int]:
        """(low, high) of a changelog partition, waiting out leader elections."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                lo, hi = reader.get_watermark_offsets(tp, timeout=10)
                return int(lo), int(hi)
            except KafkaException as e:
                err = e.args[0]
                if time.monotonic() >= deadline or not (err.retriable() or err.code() in (
                        KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                        KafkaError._TIMED_OUT, KafkaError.UNKNOWN_TOPIC_OR_PART)):
                    raise BrokerUnavailable(f"changelog {tp.topic}[{tp.partition}] unreadable: {err.str()}") from e
                self._log.warning("changelog_not_ready", partition=tp.partition, error=err.str())
                time.sleep(0.2)

    def _on_assign(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        new = sorted({tp.partition for tp in tps} - set(self.states))
        self._restore(new)
        OWNED.set(len(self.states))
        self.ready.set()

    def _on_revoke(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        # No transaction is ever open while consume() runs callbacks, so there is
        # nothing to flush: drop the state; the next owner restores it from the changelog.
        gone = {tp.partition for tp in tps}
        for p in gone:
            self._drop_state(p)
        OWNED.set(len(self.states))
        if gone:
            self._log.info("partitions_revoked", partitions=sorted(gone))

    # -- output -----------------------------------------------------------------------

    def _topic_for(self, dest: str, ev: Any) -> tuple[str, str]:
        s = self.settings
        if dest == READY:
            assert isinstance(ev, RunReady)
            return s.ready_topic(ev.queue, ev.priority), ev.job_id
        if dest == EVENTS:
            return s.events_topic, ev.job_id
        if dest == COMMANDS:
            if isinstance(ev, DependencyRegistered):
                return s.commands_topic, ev.upstream_id
            assert isinstance(ev, UpstreamResolved)
            return s.commands_topic, ev.downstream_id
        assert dest == CONTROL
        return s.control_topic, ev.worker_id

    def _ensure_ready_topics(self, outs: list[Output]) -> None:
        """Create the ready topics of a queue the first time a job names it."""
        missing = {ev.queue for d, ev in outs if d == READY and self.settings.ready_topic(ev.queue) not in self._known_topics}  # type: ignore[attr-defined]
        for q in missing:
            ensure_topics(self.settings, [t for t in topic_specs(self.settings, (q,)) if ".ready." in t.name])
            for prio in ("high", "normal", "low"):
                self._known_topics.add(self.settings.ready_topic(q, prio))
            self._known_topics.add(self.settings.ready_topic(q))

    # -- the loop ---------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        s = self.settings
        ensure_topics(s)
        self._known_topics = {t.name for t in topic_specs(s)}
        consumer = make_consumer(s, s.group_id("scheduler"), **{
            "partition.assignment.strategy": "range",
            "max.poll.interval.ms": 300000,
            # A dead instance is noticed within 3 s (the broker's group.min.session.timeout.ms
            # must allow it; the classic default minimum is 6 s).
            "session.timeout.ms": 3000,
            "heartbeat.interval.ms": 500,
            # Batches are at most batch_size records: a 16 MiB prefetch queue is plenty.
            "queued.max.messages.kbytes": 16384,
            **self._consumer_overrides,
        })
        # A dead instance's open transaction holds back read_committed readers (and so the
        # survivor's restore) until it times out: keep that short.
        producer = make_producer(s, transactional_id=f"{s.group_id('scheduler')}-{self.instance_id}",
                                 **{"linger.ms": 1, "transaction.timeout.ms": 3000})
        self._consumer = consumer
        dlq = DeadLetters(producer, s, "scheduler")
        try:
            producer.init_transactions(60)
            consumer.subscribe([s.commands_topic, s.reports_topic], on_assign=self._on_assign,
                               on_revoke=self._on_revoke, on_lost=self._on_revoke)
            self._log.info("scheduler_started")
            while not stop.is_set():
                self._step(consumer, producer, dlq)
        finally:
            try:
                consumer.close()  # leaves the group: survivors rebalance at once
            finally:
                producer.flush(10)
                self._log.info("scheduler_stopped")

    def _next_due(self) -> int | None:
        dues = [d for d in (ps.next_due_ms() for ps in self.states.values()) if d is not None]
        return min(dues) if dues else None

    def _step(self, consumer: Consumer, producer: Any, dlq: DeadLetters) -> None:
        # A timer due soon caps the batch: applying 2,000 records takes a few hundred
        # milliseconds, which would all be lateness for that timer.
        nd, now = self._next_due(), now_ms()
        wanted = self.batch_size if nd is None or nd - now > 100 else min(self.batch_size, 100)
        # Never sleep past the next due time; otherwise wake every 100 ms.
        timeout = 0.1 if nd is None else max(0.0, min(0.1, (nd - now) / 1000))
        msgs = consumer.consume(wanted, timeout)
        now = now_ms()
        records = []
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.fatal():
                    raise BrokerUnavailable(f"fatal consumer error: {err.str()}")
                self._log.warning("consumer_error", error=err.str())
                continue
            records.append(msg)
        nd = self._next_due()
        if not records and (nd is None or nd > now):
            self._trim.idle()
            return
        if records:
            self._trim.busy()
        t0 = time.monotonic()
        # A full batch means more input is waiting: judge no lease until it is read.
        caught_up = len(msgs) < wanted
        producer.begin_transaction()
        try:
            outs: list[Output] = []
            dead = 0
            # Timers first, so that input processing never delays a firing that is due.
            for ps in self.states.values():
                outs.extend(ps.fire_due(now, check_leases=caught_up))
            for msg in records:
                ps = self.states.get(msg.partition())
                if ps is None:
                    continue
                try:
                    ev = self.codec.decode(msg.value())
                except DecodeError as e:
                    dlq.send(msg, e)
                    dead += 1
                    self._log.warning("dead_letter", topic=msg.topic(), partition=msg.partition(),
                                      offset=msg.offset(), error=str(e))
                    continue
                try:
                    outs.extend(ps.apply(ev, now))
                    APPLIED.labels(type(ev).__name__).inc()
                except Rejected as e:
                    outs.extend(e.outputs)
                    dlq.send(msg, e)
                    dead += 1
                    self._log.warning("command_rejected", topic=msg.topic(), offset=msg.offset(), error=str(e))
            t_applied = time.monotonic()
            later = now_ms()  # and whatever fell due while the batch was applied
            for ps in self.states.values():
                outs.extend(ps.fire_due(later, check_leases=caught_up))
            self._ensure_ready_topics(outs)
            encode = self.codec.encode
            dispatched = 0
            for dest, ev in outs:
                topic, key = self._topic_for(dest, ev)
                producer.produce(topic, key=key.encode(), value=encode(ev))
                if dest == READY:
                    dispatched += 1
                    due = ev.not_before_ms or ev.nominal_ms  # type: ignore[attr-defined]
                    LATENESS.observe(max(0, ev.occurred_at_ms - due) / 1000)  # type: ignore[attr-defined]
            producer.poll(0)
            state_topic = self.settings.state_topic
            for p, ps in self.states.items():
                dirty = ps.take_dirty()
                if not dirty:
                    continue
                encoded = {jid: encode(rec) for jid, rec in dirty if rec is not None}
                # Jobs now waiting beyond the horizon leave memory; their changelog record says
                # so (a header with the due time), so a new owner files them cold undecoded.
                cooled = ps.settle(now, encoded)
                for jid, rec in dirty:
                    headers = None
                    if jid in cooled:
                        assert rec is not None and rec.next_fire_ms is not None
                        headers = [(COLD_DUE_HEADER, str(rec.next_fire_ms).encode())]
                    producer.produce(state_topic, key=jid.encode(), value=encoded.get(jid), partition=p,
                                     headers=headers)
            # Offsets go into every transaction, timer-only ones too: the group coordinator
            # then fences a zombie whose partitions moved on (KIP-447) — no double dispatch.
            t_produced = time.monotonic()
            if records or self.states:
                positions = [tp for tp in consumer.position(consumer.assignment()) if tp.offset >= 0]
                producer.send_offsets_to_transaction(positions, consumer.consumer_group_metadata(), 30)
            t_offsets = time.monotonic()
            producer.commit_transaction(30)
        except KafkaException as e:
            self._recover(consumer, producer, e)
            return
        DISPATCHED.inc(dispatched)
        DEAD.inc(dead)
        took = time.monotonic() - t0
        TXN.observe(took)
        if took > SLOW_TRANSACTION_S:
            self._log.warning("slow_transaction", seconds=round(took, 3), inputs=len(records), outputs=len(outs),
                              apply_s=round(t_applied - t0, 3), produce_s=round(t_produced - t_applied, 3),
                              offsets_s=round(t_offsets - t_produced, 3), commit_s=round(time.monotonic() - t_offsets, 3))
        LIVE.set(sum(ps.live_count for ps in self.states.values()))
        TIMERS.set(sum(ps.timer_count for ps in self.states.values()))

    def _recover(self, consumer: Consumer, producer: Any, exc: KafkaException) -> None:
        """A transaction failed: abort it and rewind memory and input to the last commit."""
        err = exc.args[0]
        self._log.error("transaction_failed", error=err.str(), retriable=err.retriable(),
                        abortable=err.txn_requires_abort(), fatal=err.fatal())
        if err.fatal():
            raise BrokerUnavailable(f"scheduler producer fenced or failed: {err.str()}") from exc
        try:
            producer.abort_transaction(30)
        except KafkaException as e2:
            raise BrokerUnavailable(f"could not abort a failed transaction: {e2.args[0].str()}") from exc
        # The in-memory state ran ahead of what was committed: rebuild it, and seek the
        # inputs back to the committed offsets so the same records are applied again.
        owned = sorted(self.states)
        for p in owned:
            self._drop_state(p)
        self._restore(owned)
        assignment = consumer.assignment()
        for tp in consumer.committed(assignment, timeout=30):
            consumer.seek(TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING))


def main(settings: Settings, **kwargs: Any) -> None:
    from infra.service import run_until_signalled

    run_until_signalled(SchedulerService(settings, **kwargs))
