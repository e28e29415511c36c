"""Projections: the read models built from Kafka topics.

::

    jobs.events ──► PostgresProjector (pg_projector) ──► PostgreSQL: jobs, runs, dependencies,
                                                          audit, projector_offsets (models)
    jobs.logs   ──► LogsProjector (logs_projector)   ──► MongoDB: log_chunks
                          read side: JobQueries, LogQueries (queries)

Both can be dropped and rebuilt by replaying their topics; see ``docs/projections.md``.
Migrations: ``consumers.projections.migrate.migrate(settings)``.  The names below are
re-exported lazily, so importing the read side does not pull in the Kafka client.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["JobQueries", "LogQueries", "LogsProjector", "PostgresProjector", "purge_logs"]

_WHERE = {
    "JobQueries": "queries",
    "LogQueries": "queries",
    "LogsProjector": "logs_projector",
    "PostgresProjector": "pg_projector",
    "purge_logs": "logs_projector",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
