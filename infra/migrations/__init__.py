"""Alembic migrations of the PostgreSQL projections (see ``consumers.projections.migrate``)."""
