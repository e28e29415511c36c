"""A tiny run of every benchmark scenario through the real stack (``python -m bench --tiny``).

It proves the harness works end to end — services start as subprocesses, jobs flow,
every JSON file has its metrics — not how fast anything is (numbers are never
asserted against targets here; ``make bench`` measures).  Correctness figures are
asserted: no duplicate firing, no lost or duplicated run across a scheduler SIGKILL.

The ``peer`` scenario (Celery + Redis) is left out on purpose: it needs Debian's
redis-server and celery, which ``make test`` does not install (the bench installs them
itself when it runs it; see docs/benchmarks.md).  Its metric keys are still checked:
they exist in throughput.json and timers.json, null until a peer run fills them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.config import Settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = ["throughput", "timers", "failover", "memory", "scaleout", "ceiling"]


def _num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@pytest.fixture(scope="module")
def results(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:  # type: ignore[type-arg]
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "bench", "--tiny", "--no-stack", "--out", str(out),
                           "--scenario", *SCENARIOS], cwd=REPO, capture_output=True, text=True, timeout=170,
                          env={**os.environ, "TMPDIR": str(out)})
    assert proc.returncode == 0, f"python -m bench failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    return {s: json.loads((out / f"{s}.json").read_text()) for s in SCENARIOS}


def test_every_file_has_metrics_machine_and_params(results: dict[str, dict]) -> None:  # type: ignore[type-arg]
    for s in SCENARIOS:
        doc = results[s]
        assert isinstance(doc["metrics"], dict) and doc["metrics"], s
        assert doc["machine"]["cores"] >= 1 and doc["machine"]["memory_bytes"] > 0
        assert doc["machine"]["python"] and doc["machine"]["confluent_kafka"] and doc["machine"]["kafka"]
        assert doc["params"]["size"] == "tiny"


def test_throughput(results: dict[str, dict]) -> None:  # type: ignore[type-arg]
    m = results["throughput"]["metrics"]
    for k in ("jobs_per_s", "submit_per_s", "start_latency_p99_ms", "raw_kafka_msgs_per_s", "ceiling_ratio",
              "messages_per_job"):
        assert _num(m[k]) and m[k] > 0, (k, m[k])
    assert "celery_jobs_per_s" in m and "ratio_vs_celery" in m  # filled by a peer run
    batch = results["throughput"]["details"]["batch"]
    assert batch["completed"] == batch["jobs"] and not batch["timed_out"]
    assert m["start_latency_p99_ms"] >= m["start_latency_p50_ms"] >= 0
    # commands, ready, events, reports, logs and changelog records are all counted
    per_topic = results["throughput"]["details"]["records"]["per_topic"]
    assert {"commands", "ready.default", "events", "reports", "logs", "state"} <= set(per_topic)
    assert all(_num(v["cpu_s_per_1000_jobs"]) for v in results["throughput"]["details"]["batch"]["cpu"].values())


def test_timers(results: dict[str, dict]) -> None:  # type: ignore[type-arg]
    m = results["timers"]["metrics"]
    for k in ("lateness_p50_ms", "lateness_p99_ms", "lateness_max_ms"):
        assert _num(m[k]), (k, m[k])
    assert m["lateness_max_ms"] >= m["lateness_p99_ms"] >= m["lateness_p50_ms"] >= 0
    assert m["duplicate_firings"] == 0
    assert m["missing_firings"] == 0 and m["firings"] == m["expected_firings"]
    assert m["runs_started"] == m["expected_firings"] and m["started_more_than_once"] == 0
    assert "celery_lateness_p99_ms" in m


def test_failover(results: dict[str, dict]) -> None:  # type: ignore[type-arg]
    m = results["failover"]["metrics"]
    assert _num(m["takeover_s"]) and m["takeover_s"] > 0
    assert m["lost"] == 0 and m["duplicated"] == 0
    assert m["submitted"] > 0


def test_memory(results: dict[str, dict]) -> None:  # type: ignore[type-arg]
    m = results["memory"]["metrics"]
    assert _num(m["bytes_per_pending_job"])
    assert _num(m["restore_s"]) and m["restore_s"] > 0
    assert m["restored_jobs"] == results["memory"]["params"]["pending_jobs"]


def test_scaleout(results: dict[str, dict]) -> None:  # type: ignore[type-arg]
    m = results["scaleout"]["metrics"]
    for k in ("speedup_2_workers", "speedup_4_workers", "speedup_2_schedulers"):
        assert _num(m[k]) and m[k] > 0, (k, m[k])


def test_ceiling(results: dict[str, dict]) -> None:  # type: ignore[type-arg]
    m = results["ceiling"]["metrics"]
    assert _num(m["raw_kafka_msgs_per_s"]) and m["raw_kafka_msgs_per_s"] > 0
    assert m["records"] > 0

