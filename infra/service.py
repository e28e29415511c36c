"""What every long-running service shares: a stop flag wired to SIGTERM/SIGINT.

A service is an object with ``run(stop: threading.Event) -> None`` that returns soon
after ``stop`` is set.  Tests run services in threads with their own event; processes
call :func:`run_until_signalled`.
"""

from __future__ import annotations

import gc
import signal
import threading
from typing import Protocol


class Service(Protocol):
    name: str

    def run(self, stop: threading.Event) -> None: ...


def run_until_signalled(service: Service) -> None:
    """Run a service in the foreground until SIGTERM or SIGINT."""
    stop = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    # What the imports built lives as long as the process: keep it out of the cycle
    # collector's full collections, which would otherwise walk all of it each time
    # (tens of milliseconds during which no thread of the service runs).
    gc.collect()
    gc.freeze()
    service.run(stop)
