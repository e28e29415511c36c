"""Alembic environment for the PostgreSQL projections.

Two ways in:

* programmatic (services, tests): :func:`consumers.projections.migrate.migrate` opens a
  connection, takes an advisory lock and hands the connection over in
  ``config.attributes["connection"]``; nothing here reads files or the environment;
* the ``alembic`` command with ``infra/alembic.ini``: the URL is ``-x url=…``, else
  ``JOBSCHED_POSTGRES_URL``, else ``sqlalchemy.url`` from the ini file.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool

from consumers.projections.models import metadata

config = context.config
target_metadata = metadata


def _url() -> str:
    x = context.get_x_argument(as_dictionary=True)
    url = x.get("url") or os.environ.get("JOBSCHED_POSTGRES_URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: pass -x url=… or set JOBSCHED_POSTGRES_URL")
    return url


def run_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True,
                      dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            context.configure(connection=conn, target_metadata=target_metadata)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if config.config_file_name is not None and config.attributes.get("connection") is None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

if context.is_offline_mode():
    run_offline()
else:
    run_online()
