"""The topic layout, declared once and created by the project.

Every job-keyed topic the scheduler consumes (``jobs.commands``, ``jobs.reports``) and
its changelog (``jobs.state``) have the same partition count, so partition *p* of each
belongs to the same scheduler instance.  Replication is "as much as the cluster has, up
to 3" with ``min.insync.replicas`` one less (at least 1): on the 3-broker cluster that
gives RF 3 / min ISR 2, so producers with ``acks=all`` survive one broker's loss without
losing an acknowledged record.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from infra.config import Settings

DAY_MS = 86_400_000


@dataclass(frozen=True, kw_only=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    purpose: str = ""


def replication_for(settings: Settings, brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) for a cluster of ``brokers`` brokers."""
    rf = settings.replication_factor or min(3, max(1, brokers))
    rf = min(rf, max(1, brokers))
    min_isr = settings.min_insync_replicas or max(1, rf - 1)
    return rf, min(min_isr, rf)


def topic_specs(settings: Settings, queues: tuple[str, ...] | None = None) -> list[TopicSpec]:
    """Every topic the system uses, with its settings."""
    p = settings.partitions
    retained = {"cleanup.policy": "delete", "retention.ms": str(30 * DAY_MS)}
    specs = [
        TopicSpec(name=settings.commands_topic, partitions=p, config=dict(retained),
                  purpose="user and service commands, scheduler-to-scheduler dependency messages"),
        TopicSpec(name=settings.reports_topic, partitions=p,
                  config={"cleanup.policy": "delete", "retention.ms": str(7 * DAY_MS)},
                  purpose="worker reports: started, heartbeat, finished"),
        TopicSpec(name=settings.events_topic, partitions=p, config=dict(retained),
                  purpose="the scheduler's lifecycle events, source of the projections"),
        TopicSpec(name=settings.logs_topic, partitions=p,
                  config={**retained, "compression.type": "zstd", "max.message.bytes": "1048576"},
                  purpose="job output chunks"),
        TopicSpec(name=settings.state_topic, partitions=p,
                  config={"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.1",
                          "segment.ms": str(3_600_000), "delete.retention.ms": str(DAY_MS),
                          "compression.type": "zstd"},
                  purpose="scheduler changelog: live job state, compacted"),
        TopicSpec(name=settings.dlq_topic, partitions=3, config=dict(retained),
                  purpose="records that could not be decoded or applied, with the error"),
        TopicSpec(name=settings.control_topic, partitions=1,
                  config={"cleanup.policy": "delete", "retention.ms": str(DAY_MS)},
                  purpose="scheduler-to-worker control: kill a running attempt"),
    ]
    for q in queues or settings.queues:
        for prio in ("high", "normal", "low"):
            specs.append(TopicSpec(name=settings.ready_topic(q, prio), partitions=settings.ready_partitions,
                                   config={"cleanup.policy": "delete", "retention.ms": str(7 * DAY_MS)},
                                   purpose=f"runs ready for queue {q}, {prio} priority"))
    return specs
