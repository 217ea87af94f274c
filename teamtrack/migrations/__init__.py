"""Alembic migrations of the history database; run with `HistoryStore.migrate()`."""
