"""Helpers for integration tests: isolated topic prefixes, services in threads, topic tails."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any, Callable, Iterable

from confluent_kafka import Consumer

from infra.config import Settings
from infra.kafka import ensure_topics, make_producer
from schemas.codec import default_codec
from schemas.events import Event, RunFinished, RunReady, RunStarted


def isolated(settings: Settings, partitions: int = 4) -> Settings:
    """Settings whose topics no other test (and no running system) uses."""
    s = settings.with_(topic_prefix=f"t{uuid.uuid4().hex[:10]}", partitions=partitions, ready_partitions=partitions)
    ensure_topics(s)
    return s


class InThread:
    """Runs a Service in a thread; ``stop()`` sets its event and joins."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=getattr(service, "name", "svc"), daemon=True)

    def _run(self) -> None:
        try:
            self.service.run(self.event)
        except BaseException as e:  # surfaced by stop()
            self.error = e

    def __enter__(self) -> "InThread":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 60) -> None:
        self.event.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{self.thread.name} did not stop within {timeout}s"
        if self.error is not None:
            raise self.error


class Tail:
    """Collects decoded events of some topics from the beginning (read_committed)."""

    def __init__(self, settings: Settings, topics: Iterable[str]) -> None:
        self.codec = default_codec()
        self.events: list[tuple[str, Event]] = []
        self.raw: list[Any] = []
        self._c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"tail-{uuid.uuid4().hex}",
                            "enable.auto.commit": False, "isolation.level": "read_committed",
                            "auto.offset.reset": "earliest", "fetch.wait.max.ms": 10})
        self._c.subscribe(list(topics))

    def poll(self, seconds: float = 0.2) -> None:
        for msg in self._c.consume(5000, seconds):
            if msg.error() is not None:
                continue
            self.raw.append(msg)
            try:
                self.events.append((msg.topic(), self.codec.decode(msg.value())))
            except Exception:
                pass

    def wait_for(self, pred: Callable[[list[tuple[str, Event]]], bool], timeout: float = 30, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll()
            if pred(self.events):
                return
        raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")

    def of(self, cls: type) -> list[Any]:
        return [e for _, e in self.events if isinstance(e, cls)]

    def job_changes(self) -> list[Any]:
        """Every job status change seen, alone or riding on a run event, in order."""
        from schemas.events import job_changes

        return job_changes(e for _, e in self.events)

    def close(self) -> None:
        self._c.close()


class Reporter:
    """Plays the worker side of the contract: answers RunReady with scripted reports.

    ``script(ready) -> list of outcomes`` decides; default: every attempt succeeds.
    """

    name = "reporter"

    def __init__(self, settings: Settings, script: Callable[[RunReady], str | None] | None = None,
                 worker_id: str = "reporter-1") -> None:
        self.settings = settings
        self.script = script or (lambda r: "succeeded")
        self.worker_id = worker_id
        self.seen: list[RunReady] = []

    def run(self, stop: threading.Event) -> None:
        s = self.settings
        codec = default_codec()
        c = Consumer({"bootstrap.servers": s.kafka_bootstrap, "group.id": f"reporter-{uuid.uuid4().hex}",
                      "enable.auto.commit": True, "isolation.level": "read_committed",
                      "auto.offset.reset": "earliest", "fetch.wait.max.ms": 10,
                      "topic.metadata.refresh.interval.ms": 1000})
        c.subscribe([f"^{s.topic_prefix}\\.ready\\..*"])
        p = make_producer(s)
        try:
            while not stop.is_set():
                for msg in c.consume(1000, 0.1):
                    if msg.error() is not None:
                        continue
                    r = codec.decode(msg.value())
                    assert isinstance(r, RunReady)
                    self.seen.append(r)
                    outcome = self.script(r)
                    if outcome is None:
                        continue  # leave it "running" forever
                    common = dict(user_id=r.user_id, tenant_id=r.tenant_id, job_id=r.job_id, run_id=r.run_id,
                                  attempt=r.attempt, worker_id=self.worker_id)
                    p.produce(s.reports_topic, key=r.job_id.encode(), value=codec.encode(RunStarted(**common)))
                    if outcome != "running":
                        p.produce(s.reports_topic, key=r.job_id.encode(), value=codec.encode(RunFinished(
                            **common, outcome=outcome, exit_code=0 if outcome == "succeeded" else 1)))
                p.poll(0)
        finally:
            p.flush(10)
            c.close()


def statuses(tail: Tail, job_id: str) -> list[str]:
    return [e.status for e in tail.job_changes() if e.job_id == job_id]


def final_status(tail: Tail, job_id: str) -> str | None:
    s = statuses(tail, job_id)
    return s[-1] if s else None

