"""Fixtures for tests that run against the real local stack (PostgreSQL, Kafka, FerretDB)."""

from __future__ import annotations

import contextlib

import pytest

from infra.config import Settings
from infra.kafka import KafkaException, make_admin
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


@pytest.fixture(scope="session", autouse=True)
def drop_test_topics(stack_settings: Settings):
    """Delete, when the session ends, the topics its tests created.

    Each test works under a prefix of its own; without this a developer's broker keeps
    every one of them (thousands of partitions after a few runs of the suite), which
    costs the broker heap and CPU and skews whatever runs on that stack next, such as
    ``make bench``.  Only topics created during the session go, and never the topics of
    the configured prefix (a ``jobsched run`` may be using them).
    """
    admin = make_admin(stack_settings)
    before = set(admin.list_topics(timeout=30).topics)
    yield
    own = f"{stack_settings.topic_prefix}."
    try:
        created = sorted(t for t in admin.list_topics(timeout=30).topics
                         if t not in before and not t.startswith(("__", own)))
    except KafkaException as e:
        print(f"could not delete the test topics: {e}")
        return
    if not created:
        return
    for fut in admin.delete_topics(created, operation_timeout=60).values():
        # Already gone, or the broker refused: left behind, nothing else depends on it.
        with contextlib.suppress(KafkaException):
            fut.result(timeout=60)
