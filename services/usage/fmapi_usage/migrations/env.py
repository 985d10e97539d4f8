"""Alembic's entry point, configured from code: :meth:`fmapi_usage.db.UsageDB.migrate` passes
the connection (already in a transaction, holding the migration lock) as
``config.attributes["connection"]``, so no ``alembic.ini`` and no second engine are needed.

To write a new revision, run ``alembic revision`` against a configured ``Config`` the same way
(``script_location`` = this directory); hand-written revisions are the rule here, since every
one must work on both PostgreSQL and SQLite.
"""

from __future__ import annotations

from alembic import context

from fmapi_usage.schema import metadata

config = context.config
connection = config.attributes.get("connection")
if context.is_offline_mode() or connection is None:
    raise RuntimeError(
        "fmapi_usage migrations run online only, on a connection passed as "
        "config.attributes['connection'] (use fmapi_usage.db.UsageDB(url).migrate())"
    )

context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite cannot ALTER most things in place: later revisions get copy-and-move batches.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
