"""Runs the system's services as child processes and keeps them running.

``jobsched run`` starts schedulers, workers and projectors, each a ``jobsched``
subcommand in its own process (so they use every core and fail independently),
restarts a child that dies with a growing delay, and on SIGINT/SIGTERM stops them all
with SIGTERM, waiting for each to shut down cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import structlog

from infra.config import Settings

log = structlog.get_logger("supervisor")


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)


class Supervisor:
    def __init__(self, children: list[Child], grace_s: float = 40.0) -> None:
        self.children = children
        self.grace_s = grace_s
        self._stopping = False

    @classmethod
    def for_system(cls, settings: Settings, *, schedulers: int = 2, workers: int = 1, concurrency: int = 8) -> "Supervisor":
        exe = [sys.executable, "-m", "producers.cli"]
        children = [Child(f"scheduler-{i + 1}", [*exe, "scheduler"]) for i in range(schedulers)]
        children += [Child(f"worker-{i + 1}", [*exe, "worker", "--concurrency", str(concurrency)])
                     for i in range(workers)]
        children.append(Child("projectors", [*exe, "project"]))
        return cls(children)

    def _start(self, c: Child) -> None:
        c.proc = subprocess.Popen(c.argv, env=os.environ.copy())
        c.started_at = time.monotonic()
        log.info("service_started", service=c.name, pid=c.proc.pid)

    def _stop_all(self) -> None:
        for c in self.children:
            if c.proc is not None and c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for c in self.children:
            if c.proc is None:
                continue
            try:
                c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()
            log.info("service_stopped", service=c.name, code=c.proc.returncode)

    def run_forever(self) -> None:
        def _stop(signum: int, _frame: object) -> None:
            self._stopping = True

        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGTERM, _stop)
        for c in self.children:
            self._start(c)
        log.info("system_running", services=[c.name for c in self.children])
        try:
            while not self._stopping:
                now = time.monotonic()
                for c in self.children:
                    if c.proc is not None and c.proc.poll() is not None:
                        code = c.proc.returncode
                        c.proc = None
                        # A child that ran a while before dying restarts at once; a crash loop backs off.
                        c.restarts = 0 if now - c.started_at > 60 else c.restarts + 1
                        c.next_start = now + min(30.0, 0.5 * 2 ** c.restarts)
                        log.warning("service_exited", service=c.name, code=code, restart_in=round(c.next_start - now, 1))
                    if c.proc is None and now >= c.next_start:
                        self._start(c)
                time.sleep(0.2)
        finally:
            self._stop_all()
