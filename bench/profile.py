"""profile: where the scheduler, worker and projector spend their time under the
throughput workload (``python -m bench --scenario profile``; not part of ``all``).

The throughput workload (full: 30,000 jobs; quick 2,000) runs with two ``py-spy
record`` samplers attached to each service process (100 Hz, ``--nonblocking`` so the
process is never paused, frames aggregated by function): ``wall`` samples every
thread py-spy does not consider idle (where time goes, waits in C calls included),
``gil`` only the thread holding the GIL (where the Python CPU goes).  The
folded stacks are kept in the run's log folder; ``bench/results/profile.json`` holds,
per process, the top functions by *self* samples (the frame on top of the stack) and
by *inclusive* samples (anywhere on the stack), in % of that process's samples, plus
the throughput measured while profiled (sampling slows the services a little).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import BenchEnv, RunOptions, say, write_result
from bench.throughput import ledger_for, run_batch


def _py_spy() -> str:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy>=0.3.14"], check=True)
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return exe


_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*)\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    f = m.group("file")
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in f:
            f = f.split(marker, 1)[1]
            break
    return f"{m.group('fn')} ({f})"


def summarize(folded: Path, top: int = 25) -> dict[str, Any]:
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in folded.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        cnt = int(n)
        frames = stack.split(";")
        if frames and frames[0].startswith("thread ") or (frames and frames[0].startswith("process ")):
            while frames and (frames[0].startswith("thread ") or frames[0].startswith("process ")):
                if frames[0].startswith("thread "):
                    threads[re.sub(r"\(0x[0-9a-fA-F]+\)", "", frames[0]).strip()] += cnt
                frames = frames[1:]
        if not frames:
            continue
        total += cnt
        short = [_short(f) for f in frames]
        self_c[short[-1]] += cnt
        for f in set(short):
            incl[f] += cnt

    def pct(c: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": f, "pct": round(100 * v / total, 1), "samples": v} for f, v in c.most_common(top)]

    return {"samples": total, "top_self": pct(self_c), "top_inclusive": pct(incl),
            "threads": [{"thread": t, "pct": round(100 * v / total, 1)} for t, v in threads.most_common(10)]}


def run(opts: RunOptions, machine: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    n = opts.pick(200, 2000, 30_000, "jobs")
    spy = _py_spy()
    with BenchEnv(opts, "profile") as env:
        say(f"profile: {n:,} no-op jobs with py-spy on scheduler, worker and projector")
        procs = env.start_system(schedulers=1, workers=1)
        targets = {"scheduler": procs["schedulers"][0], "worker": procs["workers"][0],
                   "projector": procs["projectors"][0]}
        spies = {}
        for name, p in targets.items():
            for mode, flags in (("wall", []), ("gil", ["--gil"])):
                out = opts.logs / f"profile-{name}-{mode}.folded"
                spies[f"{name}/{mode}"] = (out, subprocess.Popen(
                    [spy, "record", "--pid", str(p.pid), "--rate", "100", "--nonblocking", "--function", "--threads",
                     *flags, "--format", "raw", "--output", str(out)],
                    stdout=subprocess.DEVNULL, stderr=open(opts.logs / f"profile-{name}-{mode}.log", "wb")))
        time.sleep(1.0)
        led = ledger_for(env, procs)
        res = run_batch(env, n, f"{env.prefix}-u", led, label="profile")
        for _, sp in spies.values():
            sp.send_signal(signal.SIGINT)
        summaries = {}
        for name, (out, sp) in spies.items():
            try:
                sp.wait(60)
            except subprocess.TimeoutExpired:
                sp.kill()
            summaries[name] = summarize(out) if out.exists() else {"error": "py-spy wrote no profile"}
        metrics = {"jobs_per_s_while_profiled": res["jobs_per_s"],
                   "cpu_s_per_1000_jobs": {k: v["cpu_s_per_1000_jobs"] for k, v in res["cpu"].items()}}
        return write_result(
            opts, "profile", metrics=metrics, machine=machine, started=started,
            params={"jobs": n, "sampler": "py-spy record --rate 100 --nonblocking --function --threads; wall = non-idle threads, gil = --gil",
                    "worker_concurrency": opts.concurrency},
            details={"profiles": summaries, "folded_files": {k: str(v[0]) for k, v in spies.items()},
                     "batch": res},
        )
