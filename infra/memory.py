"""Giving freed heap memory back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache
from typing import Any


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
