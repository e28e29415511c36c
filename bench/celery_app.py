"""The Celery application the peer scenario runs (broker and result backend: Redis).

Settings follow Celery's own advice for many short tasks ("Optimizing" in its docs):
a high prefetch multiplier (128: "if you have many tasks with a short duration ... 64
or 128"), early acknowledgement (``task_acks_late=False``, the default), rate limits
disabled, JSON, no gossip/mingle/heartbeat events (set on the worker's command line).
A result backend is needed to *see* completion (our system's counterpart is the
``completed`` row in PostgreSQL): Redis db 1 holds one result key per finished task,
so ``DBSIZE`` of db 1 is the number of completed tasks.

``timed`` returns its lateness (start of execution − the instant it was due, ms);
``cron_tick`` is called by celery beat on ``crontab()`` (every minute) and returns its
lateness against the minute boundary (as ``{"c": ms}``, to tell it from ``timed``'s).
"""

from __future__ import annotations

import os
import time

from celery import Celery
from celery.schedules import crontab

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")
QUEUE = "bench"

app = Celery("bench", broker=f"{URL}/0", backend=f"{URL}/1")
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_default_queue=QUEUE,
    worker_prefetch_multiplier=int(os.environ.get("BENCH_CELERY_PREFETCH", "128")),
    task_acks_late=False,
    worker_disable_rate_limits=True,
    task_ignore_result=False,
    result_expires=None,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    enable_utc=True,
    timezone="UTC",
    # ETA tasks wait in the worker; the visibility timeout must exceed the longest wait.
    broker_transport_options={"visibility_timeout": 3600},
)

_CRONS = int(os.environ.get("BENCH_CELERY_CRONS", "0"))
app.conf.beat_schedule = {
    f"cron-{i}": {"task": "bench.cron_tick", "schedule": crontab(), "args": (i,), "options": {"queue": QUEUE}}
    for i in range(_CRONS)
}


@app.task(name="bench.noop")
def noop() -> None:
    return None


@app.task(name="bench.timed")
def timed(nominal_ms: int) -> float:
    return time.time() * 1000 - nominal_ms


@app.task(name="bench.cron_tick")
def cron_tick(i: int) -> dict[str, float]:
    now = time.time() * 1000
    return {"c": now - (now // 60_000) * 60_000}
