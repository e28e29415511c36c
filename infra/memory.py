"""Giving freed heap memory back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from functools import lru_cache
from typing import Any, Callable


@lru_cache(maxsize=1)
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def release_free_memory() -> bool:
    """Ask glibc to return free heap pages of every malloc arena (``malloc_trim(0)``).

    After a burst that allocated and freed a lot — librdkafka's fetch buffers while a
    partition's changelog is read — the freed memory otherwise stays in the process's
    arenas (and its RSS).  False where there is no glibc ``malloc_trim`` (e.g. musl, macOS).
    """
    try:
        libc = _libc()
        trim = getattr(libc, "malloc_trim", None) if libc is not None else None
        if trim is None:
            return False
        trim(0)
        return True
    except OSError:
        return False


class TrimWhenIdle:
    """Calls ``trim`` (by default :func:`release_free_memory`) when a service goes idle
    after work, at most once per ``interval`` seconds.

    A burst of input (a million submissions, a backlog of reports) leaves its decoded
    records and client buffers freed but still in the heap; without this the process
    keeps that peak as RSS.  ``busy()`` after each step that did work, ``idle()`` after
    each step that found none.
    """

    def __init__(self, interval: float = 10.0, *, trim: Callable[[], object] = release_free_memory,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._trim = trim
        self._clock = clock
        self._worked = False
        self._last = float("-inf")

    def busy(self) -> None:
        self._worked = True

    def idle(self) -> bool:
        """Trim if there was work since the last trim and the interval has passed; True if it did."""
        if not self._worked:
            return False
        now = self._clock()
        if now - self._last < self.interval:
            return False
        self._trim()
        self._last = now
        self._worked = False
        return True
