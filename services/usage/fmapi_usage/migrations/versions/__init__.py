"""Alembic revisions, oldest first by number. A revision, once released, never changes."""
