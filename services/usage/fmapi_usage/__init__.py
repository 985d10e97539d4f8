"""fmapi usage service: per-request usage records and per-endpoint inference (payload) tables.

Modelled on Databricks' ``system.serving.endpoint_usage``, ``system.serving.served_entities``
and inference tables, stored in PostgreSQL (production) or a SQLite file (the zero-setup
default). :mod:`fmapi_usage.schema` declares the tables, :mod:`fmapi_usage.db` reads and writes
them, and ``migrations/`` (Alembic) creates and upgrades the fixed ones.
"""
