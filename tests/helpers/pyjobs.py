"""Targets for the Python executor in tests: ``tests.helpers.pyjobs:<function>``."""

from __future__ import annotations

import time
from pathlib import Path


def add(a: int, b: int) -> dict[str, int]:
    """Returns a JSON-able value, which the worker logs."""
    return {"sum": a + b}


def boom(message: str) -> None:
    """Fails the run with ``message``."""
    raise RuntimeError(message)


def touch(path: str) -> str:
    """Creates a file: proof that the job ran."""
    Path(path).write_text("ran\n")
    return path


def nap(seconds: float) -> float:
    """Sleeps; for timeout tests."""
    time.sleep(seconds)
    return seconds


class Tasks:
    @staticmethod
    def shout(word: str) -> str:
        return word.upper()
