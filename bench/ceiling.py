"""ceiling: raw confluent-kafka produce + consume on the same broker, for comparison.

M Avro records (single-object encoding, our codec) of the mean size our system
wrote in the throughput scenario (its ``details.records``), keys of the same length,
go through one topic of the same partition count, with the product's producer
settings (``make_producer``: idempotent, acks=all, lz4, linger 2 ms) from the bench
process, while a consumer subprocess (read_committed, like our consumers) reads them.
M = throughput's jobs × our records per job, i.e. the same number of records our
system moved.  raw_kafka_msgs_per_s = M / (first produce → last record consumed).
The values come from a pool of 4,096 distinct records (fresh UUIDs in each) so lz4
sees data about as compressible as ours.

ceiling_ratio (folded into throughput.json) = our records per job × our jobs/s ÷
raw_kafka_msgs_per_s: how much of what the broker and client can move we use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any

from bench.common import REPO, BenchEnv, Progress, RunOptions, read_result, rnd, say, write_result


def _records(size: int, count: int) -> list[tuple[bytes, bytes]]:
    from schemas.codec import default_codec
    from schemas.events import RunStatusChanged

    codec = default_codec()
    out = []
    for _ in range(count):
        jid = str(uuid.uuid4())
        ev = RunStatusChanged(user_id="bench-user", job_id=jid, run_id=f"{jid}@1796400000000", attempt=1,
                              status="succeeded", nominal_ms=1796400000000, worker_id="w-1", reason="")
        base = len(codec.encode(ev))
        pad = max(0, size - base - 1)
        ev = RunStatusChanged(user_id="bench-user", job_id=jid, run_id=f"{jid}@1796400000000", attempt=1,
                              status="succeeded", nominal_ms=1796400000000, worker_id="w-1",
                              reason=uuid.uuid4().hex * (pad // 32 + 1))
        v = codec.encode(ev)
        # Trim the padding to hit the size (the zig-zag length prefix may move by a byte).
        while len(v) > size and pad > 0:
            pad -= 1
            ev = RunStatusChanged(user_id="bench-user", job_id=jid, run_id=f"{jid}@1796400000000", attempt=1,
                                  status="succeeded", nominal_ms=1796400000000, worker_id="w-1",
                                  reason=(uuid.uuid4().hex * (pad // 32 + 1))[:pad])
            v = codec.encode(ev)
        out.append((jid.encode(), v))
    return out


def consume_main(argv: list[str]) -> None:
    """The consumer subprocess: read ``count`` records of ``topic`` and print timings."""
    from confluent_kafka import Consumer

    bootstrap, topic, count = argv[0], argv[1], int(argv[2])
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-raw-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False, "isolation.level": "read_committed", "auto.offset.reset": "earliest",
                  "fetch.wait.max.ms": 10})
    assigned: list[Any] = []
    c.subscribe([topic], on_assign=lambda cons, tps: assigned.append(1))
    while not assigned:
        c.consume(1, 0.1)
    print("ready", flush=True)
    got, first, last = 0, None, None
    deadline = time.monotonic() + 600
    while got < count and time.monotonic() < deadline:
        for m in c.consume(10000, 0.5):
            if m.error() is not None:
                continue
            got += 1
            if first is None:
                first = time.time()
            last = time.time()
    c.close()
    import os

    t = os.times()
    print(json.dumps({"count": got, "first": first, "last": last, "cpu_s": round(t.user + t.system, 2)}), flush=True)


def run(opts: RunOptions, machine: dict[str, Any]) -> dict[str, Any]:
    from infra.kafka import ensure_topics, make_producer
    from infra.topics import TopicSpec

    started = time.monotonic()
    thr = read_result(opts, "throughput")
    rec = (thr or {}).get("details", {}).get("records", {})
    mpj = rec.get("messages_per_job") or 15.0
    size = int(round(rec.get("mean_value_bytes") or 210))
    jobs = (thr or {}).get("params", {}).get("jobs") or opts.pick(200, 2000, 200_000)
    m = int(opts.overrides.get("raw_records", jobs * mpj))
    notes = [] if thr else ["throughput.json missing: record count and size are estimates (15/job, 210 bytes)"]
    with BenchEnv(opts, "ceiling", projections=False) as env:
        topic = f"{env.prefix}.raw"
        ensure_topics(env.settings, [TopicSpec(name=topic, partitions=env.settings.partitions,
                                               config={"cleanup.policy": "delete"})])
        say(f"ceiling: {m:,} records of {size} bytes through {topic}")
        pool = _records(size, 4096)
        consumer = subprocess.Popen([sys.executable, "-m", "bench.ceiling", "consume", env.settings.kafka_bootstrap,
                                     topic, str(m)], cwd=str(REPO), stdout=subprocess.PIPE, text=True)
        assert consumer.stdout is not None
        if consumer.stdout.readline().strip() != "ready":
            raise RuntimeError("the raw consumer did not start")
        p = make_producer(env.settings)
        prog = Progress("ceiling: produce", m)
        c0 = os.times()
        t0 = time.time()
        npool = len(pool)
        for i in range(m):
            k, v = pool[i % npool]
            while True:
                try:
                    p.produce(topic, key=k, value=v)
                    break
                except BufferError:
                    p.poll(0.01)
            if i % 10000 == 0:
                p.poll(0)
                prog.update(i)
        p.flush(120)
        produce_s = time.time() - t0
        c1 = os.times()
        prog.done(f"{m / produce_s:,.0f}/s produced")
        out, _ = consumer.communicate(timeout=600)
        res = json.loads(out.strip().splitlines()[-1])
        total_s = (res["last"] or time.time()) - t0
        raw = res["count"] / total_s if total_s > 0 else None
        prod_cpu = (c1.user - c0.user) + (c1.system - c0.system)
        metrics = {"raw_kafka_msgs_per_s": rnd(raw, 1), "raw_produce_msgs_per_s": rnd(m / produce_s, 1),
                   "records": m, "record_bytes": size}
        if thr and raw:
            ours = thr["metrics"].get("jobs_per_s")
            metrics["ceiling_ratio"] = rnd(mpj * ours / raw, 4) if ours else None
        return write_result(
            opts, "ceiling", metrics=metrics, machine=machine, started=started, notes=notes,
            params={"records": m, "value_bytes": size, "messages_per_job": mpj, "partitions": env.settings.partitions,
                    "producer": "infra.kafka.make_producer (idempotent, acks=all, lz4, linger.ms=2)",
                    "consumer": "read_committed, another process"},
            details={"consumed": res["count"], "produce_s": round(produce_s, 3), "end_to_end_s": round(total_s, 3),
                     "cpu": {"producer (bench process)": round(prod_cpu, 2),
                             "consumer (process)": res.get("cpu_s")}},
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "consume":
        consume_main(sys.argv[2:])
