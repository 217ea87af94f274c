"""Alembic environment: migrations run on the connection `HistoryStore.migrate()` hands over.

The history's URL comes from the service settings, not from an alembic.ini, so this
environment runs only inside `HistoryStore.migrate()` (which `python -m ingest` calls at start).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from teamtrack.history import metadata

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError(
        "run the history migrations through teamtrack.history.HistoryStore.migrate() "
        "(python -m ingest does at start)"
    )
context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite cannot ALTER most things in place; batch mode copies the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
