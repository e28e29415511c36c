"""Store plumbing of the projections: engines, clients, error translation, schema set-up.

PostgreSQL: :func:`create_pg_engine`, :func:`migrate`.  MongoDB (FerretDB locally):
:func:`mongo_client`, :func:`ensure_log_indexes`.  Both translate driver errors into
:class:`~infra.errors.StoreUnavailable` with messages that name the store's URL without
its password.

:func:`migrate` runs ``alembic upgrade head`` through the Alembic API with the scripts
shipped inside the ``infra.migrations`` package, so it works the same from the repository
and from an installed wheel.  Concurrent callers (two projectors starting at once)
serialise on a PostgreSQL advisory lock.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from alembic import command
from alembic.config import Config
from pymongo import ASCENDING, MongoClient
from pymongo.collection import Collection
from pymongo.errors import PyMongoError
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from infra.config import Settings
from infra.errors import StoreUnavailable

__all__ = ["LOG_CHUNKS", "SCRIPT_LOCATION", "alembic_config", "create_pg_engine", "ensure_log_indexes",
           "migrate", "migrate_engine", "mongo_client", "mongo_error", "redact_url", "store_error"]

#: The MongoDB collection of log chunks.
LOG_CHUNKS = "log_chunks"

SCRIPT_LOCATION = "infra:migrations"
#: Key of the advisory lock that serialises migrations (b"jobsche" as an integer).
_MIGRATION_LOCK = 0x6A6F6273636865


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, fit for messages and logs."""
    try:
        if url.startswith(("postgres", "postgresql")):
            return make_url(url).render_as_string(hide_password=True)
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)
        user = netloc[0].split(":", 1)[0]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))
    except Exception:  # a URL we cannot parse is shown by its scheme only
        return url.split("://", 1)[0] + "://…"


def create_pg_engine(settings: Settings, **kwargs: Any) -> Engine:
    """An engine for ``settings.postgres_url`` that fails fast when the server is down."""
    opts: dict[str, Any] = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 5}}
    opts.update(kwargs)
    return create_engine(settings.postgres_url, **opts)


def store_error(settings: Settings, e: SQLAlchemyError, doing: str) -> StoreUnavailable:
    """A :class:`StoreUnavailable` that names the database without its password."""
    url = redact_url(settings.postgres_url)
    orig = getattr(e, "orig", None) or e
    first = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    if isinstance(e, DBAPIError) and getattr(getattr(e.orig, "diag", None), "sqlstate", None) == "42P01":
        return StoreUnavailable(f"PostgreSQL at {url} has no projection tables ({first}); "
                                "run the migrations (jobsched migrate / consumers.projections.migrate)")
    return StoreUnavailable(f"PostgreSQL at {url} unavailable while {doing}: {first}")


def alembic_config() -> Config:
    """An Alembic configuration pointing at the packaged migration scripts."""
    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    cfg.set_main_option("path_separator", "os")
    return cfg


def migrate_engine(engine: Engine, revision: str = "head") -> None:
    """Upgrade the database behind ``engine`` to ``revision`` under an advisory lock."""
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def migrate(settings: Settings, revision: str = "head") -> None:
    """Create or upgrade the projection tables in ``settings.postgres_url``.

    Idempotent and safe to call from several processes at once; raises
    :class:`StoreUnavailable` when PostgreSQL does not answer.
    """
    engine = create_pg_engine(settings, poolclass=NullPool)
    try:
        migrate_engine(engine, revision)
    except OperationalError as e:
        raise store_error(settings, e, "migrating") from e
    finally:
        engine.dispose()


# --- MongoDB ----------------------------------------------------------------------------


def mongo_client(settings: Settings, **kwargs: Any) -> MongoClient[dict[str, Any]]:
    """A client for ``settings.mongo_url`` returning timezone-aware datetimes, failing fast."""
    opts: dict[str, Any] = {"tz_aware": True, "appname": "jobsched"}
    given = settings.mongo_url.lower()
    for option, default in (("serverSelectionTimeoutMS", 5000), ("connectTimeoutMS", 5000)):
        if option.lower() not in given:  # an option in the URL wins over our default
            opts[option] = default
    opts.update(kwargs)
    return MongoClient(settings.mongo_url, **opts)


def mongo_error(settings: Settings, e: PyMongoError, doing: str) -> StoreUnavailable:
    """A :class:`StoreUnavailable` that names the MongoDB server without its password."""
    first = str(e).strip().split(",")[0][:300] or type(e).__name__
    return StoreUnavailable(f"MongoDB at {redact_url(settings.mongo_url)} unavailable while {doing}: {first}")


def ensure_log_indexes(collection: Collection[dict[str, Any]]) -> None:
    """The indexes ``log_chunks`` needs: by job, by (run, attempt, seq), by time (purge).

    ``_id`` is ``run_id|attempt|seq`` and makes writes idempotent.  FerretDB has no TTL
    indexes, so retention is a periodic purge on ``at``
    (:func:`consumers.projections.logs_projector.purge_logs`).
    """
    collection.create_index([("job_id", ASCENDING)], name="job_id")
    collection.create_index([("run_id", ASCENDING), ("attempt", ASCENDING), ("seq", ASCENDING)],
                            name="run_attempt_seq")
    collection.create_index([("at", ASCENDING)], name="at")
