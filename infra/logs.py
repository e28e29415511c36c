"""structlog set-up: one JSON object per line for services, readable lines for people.

Call :func:`configure` once at process start (the CLI does); library code only calls
``structlog.get_logger()`` and binds fields, never formats messages itself.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure(*, json: bool = True, level: str = "INFO") -> None:
    """Route structlog (and stdlib logging) to stderr as JSON lines or console lines."""
    lvl = getattr(logging, level.upper(), logging.INFO)
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(lvl, logging.WARNING), stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
