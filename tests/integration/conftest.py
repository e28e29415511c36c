"""Fixtures for tests that run against the real local stack (PostgreSQL, Kafka, FerretDB)."""

from __future__ import annotations

import pytest

from infra.config import Settings
from infra.stack import StackError, up


@pytest.fixture(scope="session")
def stack_settings() -> Settings:
    """Settings from the ``JOBSCHED_*`` environment, with the stack up and answering.

    ``up`` is idempotent and takes well under a second when the stack already runs
    (as after ``make test`` / ``python -m infra up``).  A stack that cannot start fails
    the test with the service's message and log tail; it never skips.
    """
    settings = Settings.from_env()
    try:
        up(settings, log=lambda message: None)
    except StackError as e:
        pytest.fail(f"the local stack is not available: {e}", pytrace=False)
    return settings
