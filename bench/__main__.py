"""``python -m bench [--scenario NAME ...] [--quick | --tiny] [--out DIR]`` (``make bench``).

Brings up the local stack (idempotent), runs the scenarios in order, writes
``bench/results/<scenario>.json`` each, folds the cross-scenario figures (Celery,
raw Kafka) into throughput.json and timers.json, and prints every JSON document and a
summary table.  Sizes: full (default; the issue's numbers), ``--quick`` (~2,000 jobs),
``--tiny`` (a few hundred jobs; what the smoke test runs).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.common import (
    CROWDED_BROKER_PARTITIONS,
    RESULTS,
    RunOptions,
    machine_info,
    read_result,
    say,
    target_met,
    write_result,
)

#: Run order: ceiling needs throughput's records per job; peer and ceiling figures are
#: folded into throughput.json / timers.json at the end.
SCENARIOS = ("throughput", "timers", "failover", "memory", "scaleout", "peer", "ceiling")
EXTRA = ("profile",)


def _num(v: str) -> Any:
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def parse(argv: list[str] | None = None) -> tuple[list[str], RunOptions]:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", "-s", nargs="+", choices=SCENARIOS + EXTRA + ("all",), default=["all"],
                    help="scenarios to run (default: all but profile, in order)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes (~2,000 jobs)")
    size.add_argument("--tiny", action="store_true", help="smoke-test sizes (a few hundred jobs, 2 s windows)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where the JSON files go (default bench/results)")
    ap.add_argument("--concurrency", type=int, default=128,
                    help="worker --concurrency (default 128: a no-op job holds its slot for a ~50 ms executor tick)")
    ap.add_argument("--keep", action="store_true", help="keep the topics and databases each scenario created")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a size parameter, e.g. --set jobs=50000 (see each scenario's params)")
    ap.add_argument("--no-stack", action="store_true", help="do not run `stack up` first")
    a = ap.parse_args(argv)
    names = list(SCENARIOS) if "all" in a.scenario else [s for s in SCENARIOS + EXTRA if s in a.scenario]
    overrides = {}
    for kv in a.set:
        k, _, v = kv.partition("=")
        overrides[k.strip()] = _num(v.strip())
    opts = RunOptions(size="tiny" if a.tiny else "quick" if a.quick else "full", out=a.out, keep=a.keep,
                      concurrency=a.concurrency, overrides=overrides)
    opts.overrides["_no_stack"] = a.no_stack
    return names, opts


def fold(opts: RunOptions) -> None:
    """Put the peer and ceiling figures into throughput.json and timers.json."""
    thr, tim = read_result(opts, "throughput"), read_result(opts, "timers")
    peer, ceil = read_result(opts, "peer"), read_result(opts, "ceiling")
    if thr is not None:
        m = thr["metrics"]
        if peer is not None:
            cj = peer["metrics"].get("celery_jobs_per_s")
            m["celery_jobs_per_s"] = cj
            m["ratio_vs_celery"] = round(m["jobs_per_s"] / cj, 3) if cj and m.get("jobs_per_s") else None
            m["celery_submit_per_s"] = peer["metrics"].get("celery_submit_per_s")
        if ceil is not None:
            raw = ceil["metrics"].get("raw_kafka_msgs_per_s")
            m["raw_kafka_msgs_per_s"] = raw
            mpj = m.get("messages_per_job")
            m["ceiling_ratio"] = round(mpj * m["jobs_per_s"] / raw, 4) if raw and mpj and m.get("jobs_per_s") else None
        thr["targets"] = {k: {"target": v["target"], "met": target_met(v["target"], m.get(k))}
                          for k, v in thr["targets"].items()}
        thr.setdefault("params", {})["folded_from"] = {
            "peer": peer["params"]["run_id"] if peer else None, "ceiling": ceil["params"]["run_id"] if ceil else None}
        (opts.out / "throughput.json").write_text(json.dumps(thr, indent=2, default=str) + "\n")
    if tim is not None and peer is not None:
        tim["metrics"]["celery_lateness_p99_ms"] = peer["metrics"].get("celery_lateness_p99_ms")
        tim["metrics"]["celery_lateness_p50_ms"] = peer["metrics"].get("celery_lateness_p50_ms")
        tim.setdefault("params", {})["folded_from"] = {"peer": peer["params"]["run_id"]}
        (opts.out / "timers.json").write_text(json.dumps(tim, indent=2, default=str) + "\n")


def summary(opts: RunOptions) -> str:
    lines = ["| scenario | metric | value | target | met |", "|---|---|---|---|---|"]
    for s in SCENARIOS:
        doc = read_result(opts, s)
        if doc is None:
            continue
        for k, v in doc["metrics"].items():
            if isinstance(v, dict):
                continue
            t = doc.get("targets", {}).get(k, {})
            met = t.get("met")
            lines.append(f"| {s} | {k} | {v} | {t.get('target', '')} | "
                         f"{'' if met is None else ('yes' if met else '**no**')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    names, opts = parse(argv)
    from infra.config import Settings

    settings = Settings.from_env()
    if not opts.overrides.pop("_no_stack"):
        from infra.stack import up

        say("stack up (idempotent)")
        up(settings, log=lambda m: None)
    machine = machine_info(settings)
    crowded = machine.get("broker_partitions_at_start")
    if crowded is not None and crowded > CROWDED_BROKER_PARTITIONS:
        say(f"warning: the broker already holds {crowded:,} partitions (topics of earlier runs or tests); "
            "they cost it heap and CPU, so these results will be lower than on a clean broker")
    say(f"run {opts.run_id}: {', '.join(names)} ({opts.size}); results -> {opts.out}; service logs -> {opts.logs}")
    failed: list[str] = []
    t0 = time.monotonic()
    for i, name in enumerate(names, 1):
        say(f"=== [{i}/{len(names)}] {name} ===")
        mod = importlib.import_module(f"bench.{name}")
        try:
            doc = mod.run(opts, machine)
        except Exception as e:  # noqa: BLE001 - one scenario failing must not hide the others
            traceback.print_exc()
            failed.append(name)
            write_result(opts, name, metrics={}, params={}, machine=machine,
                         notes=[f"scenario failed: {type(e).__name__}: {e}"])
            continue
        fold(opts)
        print(json.dumps(read_result(opts, name) or doc, indent=2, default=str), flush=True)
    fold(opts)
    table = summary(opts)
    (opts.out / "summary.md").write_text(table + "\n")
    print(table)
    say(f"done in {time.monotonic() - t0:.0f}s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
