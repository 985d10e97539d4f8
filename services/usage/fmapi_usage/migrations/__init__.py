"""Alembic migrations of the usage database (run by :meth:`fmapi_usage.db.UsageDB.migrate`)."""
