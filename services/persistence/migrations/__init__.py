"""Alembic migrations of the persistence schema (applied by `orchestrator migrate`)."""
