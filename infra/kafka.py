"""Kafka adapter: clients with the project's settings, topic creation, dead letters.

Only this module and the service loops that drive consumers import ``confluent_kafka``.
Producers are idempotent with ``acks=all``; consumers never auto-commit and read only
committed transactions.  Driver errors leave as :class:`BrokerUnavailable`.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any, Iterable

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from infra.config import Settings
from infra.errors import BrokerUnavailable
from infra.topics import TopicSpec, replication_for, topic_specs

__all__ = [
    "Message",
    "KafkaError",
    "KafkaException",
    "make_producer",
    "make_consumer",
    "make_admin",
    "ensure_topics",
    "DeadLetters",
    "wait_for_broker",
]


#: librdkafka's own log lines go through this logger (not straight to stderr), so a
#: service logs them and the CLI can keep a user's terminal to one clear line.
KAFKA_LOGGER = logging.getLogger("jobsched.kafka")


def _base(settings: Settings) -> dict[str, Any]:
    return {"bootstrap.servers": settings.kafka_bootstrap, "client.id": f"jobsched-{socket.gethostname()}",
            "logger": KAFKA_LOGGER}


#: Every producer must place a key on the same partition, or a job's commands and
#: reports would reach different scheduler owners.  murmur2 is what Java clients use,
#: so services producing from the JVM agree with us.
PARTITIONER = "murmur2_random"


def make_producer(settings: Settings, *, transactional_id: str | None = None, **overrides: Any) -> Producer:
    """An idempotent producer (``acks=all``); transactional when an id is given."""
    conf: dict[str, Any] = {
        **_base(settings),
        "enable.idempotence": True,
        "acks": "all",
        "partitioner": PARTITIONER,
        "linger.ms": 2,
        "compression.type": "lz4",
        "batch.num.messages": 10000,
        "queue.buffering.max.messages": 500000,
    }
    if transactional_id:
        conf["transactional.id"] = transactional_id
        conf["transaction.timeout.ms"] = 10000
    conf.update(overrides)
    return Producer(conf)


def make_consumer(settings: Settings, group_id: str, **overrides: Any) -> Consumer:
    """A group consumer that commits explicitly and reads only committed records."""
    conf: dict[str, Any] = {
        **_base(settings),
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 1000,
        "fetch.wait.max.ms": 10,
    }
    conf.update(overrides)
    if conf.get("group.protocol") == "consumer":
        # KIP-848 groups keep their timeouts and assignor on the broker side.
        for key in ("session.timeout.ms", "heartbeat.interval.ms", "partition.assignment.strategy"):
            conf.pop(key, None)
    return Consumer(conf)


def make_admin(settings: Settings) -> AdminClient:
    return AdminClient(_base(settings))


def wait_for_broker(settings: Settings, timeout: float = 10.0) -> int:
    """Number of brokers once the cluster answers; :class:`BrokerUnavailable` if it doesn't."""
    admin = make_admin(settings)
    try:
        md = admin.list_topics(timeout=timeout)
    except KafkaException as e:
        raise BrokerUnavailable(f"no Kafka broker answered at {settings.kafka_bootstrap} within {timeout:g}s") from e
    return len(md.brokers)


def ensure_topics(settings: Settings, specs: Iterable[TopicSpec] | None = None, timeout: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet; return the names created."""
    admin = make_admin(settings)
    try:
        md = admin.list_topics(timeout=timeout)
    except KafkaException as e:
        raise BrokerUnavailable(f"no Kafka broker answered at {settings.kafka_bootstrap}") from e
    rf, min_isr = replication_for(settings, len(md.brokers))
    wanted = [s for s in (specs if specs is not None else topic_specs(settings)) if s.name not in md.topics]
    if not wanted:
        return []
    new = [
        NewTopic(s.name, num_partitions=s.partitions, replication_factor=rf,
                 config={**s.config, "min.insync.replicas": str(min_isr)})
        for s in wanted
    ]
    created = []
    for name, fut in admin.create_topics(new, operation_timeout=timeout).items():
        try:
            fut.result(timeout=timeout)
            created.append(name)
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise BrokerUnavailable(f"could not create topic {name}: {e.args[0].str()}") from e
    # Metadata propagates asynchronously: wait until every new partition has a leader, or
    # the first client to touch it (a restore, a consumer) meets NOT_LEADER errors.
    deadline = time.monotonic() + timeout
    names = {s.name for s in wanted}
    while time.monotonic() < deadline:
        topics = admin.list_topics(timeout=timeout).topics
        if all(n in topics and topics[n].partitions and topics[n].error is None
               and all(pm.leader >= 0 and pm.error is None for pm in topics[n].partitions.values())
               for n in names):
            break
        time.sleep(0.1)
    return created


class DeadLetters:
    """Sends records that cannot be decoded or applied to the dead-letter topic.

    The original key and value are kept byte for byte; headers say where the record
    came from and why it was refused, so it can be inspected and replayed.
    """

    def __init__(self, producer: Producer, settings: Settings, consumer_name: str) -> None:
        self._producer = producer
        self._topic = settings.dlq_topic
        self._consumer_name = consumer_name
        self.count = 0

    def send(self, msg: Message, error: BaseException | str) -> None:
        headers = [
            ("dlq.error", str(error).encode()[:4000]),
            ("dlq.error.type", (type(error).__name__ if isinstance(error, BaseException) else "error").encode()),
            ("dlq.topic", (msg.topic() or "").encode()),
            ("dlq.partition", str(msg.partition()).encode()),
            ("dlq.offset", str(msg.offset()).encode()),
            ("dlq.consumer", self._consumer_name.encode()),
            ("dlq.at_ms", str(int(time.time() * 1000)).encode()),
        ]
        self._producer.produce(self._topic, key=msg.key(), value=msg.value(), headers=headers)
        self.count += 1


def raise_for_message(msg: Message) -> bool:
    """True when a consumed message holds a record; raise on fatal errors, False otherwise."""
    err = msg.error()
    if err is None:
        return True
    if err.code() in (KafkaError._PARTITION_EOF,):
        return False
    if err.fatal():
        raise BrokerUnavailable(f"fatal consumer error: {err.str()}")
    return False
