"""Reading a topic back as decoded events: audits, debugging, rebuilding projections.

A replay uses its own throw-away consumer group and never commits, so it does not
disturb the services.  Undecodable records are shown with their error, not skipped.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Iterator

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaException, TopicPartition

from infra.config import Settings
from infra.errors import BrokerUnavailable, DecodeError, ValidationError
from infra.kafka import KAFKA_LOGGER
from schemas.codec import default_codec


def replay_topic(settings: Settings, topic: str, *, from_beginning: bool = True, as_json: bool = True,
                 limit: int = 0, idle_s: float = 2.0) -> Iterator[str]:
    """Yield one line per record of ``topic`` until nothing arrives for ``idle_s``."""
    codec = default_codec()
    consumer = Consumer({
        "bootstrap.servers": settings.kafka_bootstrap,
        "group.id": f"jobsched-replay-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
        "logger": KAFKA_LOGGER,
    })
    try:
        try:
            md = consumer.list_topics(topic, timeout=10)
        except KafkaException as e:
            raise BrokerUnavailable(f"no Kafka broker answered at {settings.kafka_bootstrap}") from e
        tmd = md.topics.get(topic)
        if tmd is None or tmd.error is not None or not tmd.partitions:
            raise ValidationError(f"no topic {topic!r}; see `jobsched topics` for the list")
        start = OFFSET_BEGINNING if from_beginning else OFFSET_END
        consumer.assign([TopicPartition(topic, p, start) for p in tmd.partitions])
        count = 0
        last = time.monotonic()
        is_state = topic == settings.state_topic
        while time.monotonic() - last < idle_s:
            for msg in consumer.consume(500, 0.2):
                if msg.error() is not None:
                    continue
                last = time.monotonic()
                meta = {"topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset(),
                        "key": msg.key().decode(errors="replace") if msg.key() else None}
                value = msg.value()
                try:
                    if value is None:
                        line = json.dumps({**meta, "type": "tombstone"})
                    else:
                        ev = codec.decode_state(value) if is_state else codec.decode(value)
                        body = json.loads(codec.to_json(ev)) if not is_state else {"type": "SchedulerJobState"}
                        line = json.dumps({**meta, **body}, sort_keys=True) if as_json else \
                            f"{meta['partition']}:{meta['offset']} {type(ev).__name__} {meta['key']}"
                except DecodeError as e:
                    headers = {k: v.decode(errors="replace") for k, v in (msg.headers() or [])}
                    line = json.dumps({**meta, "type": "undecodable", "error": str(e), "headers": headers,
                                       "value_hex": value.hex()[:2000] if value else None})
                yield line
                count += 1
                if limit and count >= limit:
                    return
    finally:
        consumer.close()
