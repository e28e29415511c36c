"""The job every throughput benchmark runs: a Python function that does nothing.

Celery's benchmark task is a Python function too, so the comparison is like for like:
our ``python`` executor calls this in the worker process (no fork per job), Celery's
worker calls ``bench.celery_app.noop``.
"""

from __future__ import annotations


def noop() -> None:
    """Do nothing, return None."""
    return None
