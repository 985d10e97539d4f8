"""The usage database's tables, as SQLAlchemy Core metadata.

Two fixed tables, created and upgraded by the Alembic migrations in ``migrations/`` (which
spell the same columns out again: a migration is history and must not change when this file
does; a test checks that the two agree):

- ``endpoint_usage``: one row per request, keyed by ``request_id`` so that a record delivered
  twice (the stream writer retries after a crash) is stored once. Modelled on Databricks'
  ``system.serving.endpoint_usage``.
- ``served_entities``: which model each endpoint's entity served, per configuration version
  (``system.serving.served_entities``).

Inference tables (one per endpoint, holding request and response payloads) are created at run
time, when an endpoint first logs a payload: their names come from :func:`inference_table_name`,
which only ever yields ``[a-z0-9_]`` names, so no endpoint name or prefix reaches SQL as anything
but a safe identifier. They live in their own :class:`~sqlalchemy.MetaData`, out of the
migrations' sight.

Times are stored in UTC. SQLite has no time zones (SQLAlchemy writes a datetime's wall-clock
fields and drops its offset), so :class:`UTCDateTime` converts every value to UTC on the way in
and marks it UTC on the way out, on both databases alike.
"""

from __future__ import annotations

import hashlib
import re
import threading
from datetime import datetime, timezone

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

INFERENCE_SUFFIX = "_payload"
MAX_TABLE_NAME = 60  # PostgreSQL's identifiers stop at 63 bytes; leave room to spare


class UTCDateTime(sa.types.TypeDecorator):
    """``TIMESTAMP WITH TIME ZONE`` that takes aware datetimes only and gives them back in UTC."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}: {value!r}")
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()}: give a timezone-aware one (UTC)")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:  # SQLite: stored in UTC, read back naive
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


metadata = sa.MetaData()

endpoint_usage = sa.Table(
    "endpoint_usage",
    metadata,
    sa.Column("request_id", sa.String(128), primary_key=True),
    sa.Column("client_request_id", sa.String(256), nullable=False, server_default=""),
    sa.Column("requester", sa.String(256)),  # the principal
    sa.Column("requester_kind", sa.String(32)),  # 'user' | 'service_principal'
    sa.Column("token_id", sa.String(128)),
    sa.Column("workspace", sa.String(256)),
    sa.Column("endpoint_name", sa.String(64)),
    sa.Column("served_entity", sa.String(256)),
    sa.Column("request_time", UTCDateTime(), nullable=False),
    sa.Column("status_code", sa.Integer),
    sa.Column("input_token_count", sa.BigInteger),
    sa.Column("output_token_count", sa.BigInteger),
    sa.Column("input_character_count", sa.BigInteger),
    sa.Column("output_character_count", sa.BigInteger),
    sa.Column("request_streaming", sa.Boolean),
    sa.Column("duration_ms", sa.BigInteger),
    sa.Column("time_to_first_token_ms", sa.BigInteger, nullable=True),
    sa.Column("usage_context", sa.Text, nullable=False, server_default="{}"),  # JSON object
    sa.Column("finish_reason", sa.String(64)),
    # The request's settlement never came; it was settled at its reserved size.
    sa.Column("settled_by_lease", sa.Boolean),
    sa.Index("ix_endpoint_usage_request_time", "request_time"),
    sa.Index("ix_endpoint_usage_requester_time", "requester", "request_time"),
    sa.Index("ix_endpoint_usage_endpoint_time", "endpoint_name", "request_time"),
)

served_entities = sa.Table(
    "served_entities",
    metadata,
    sa.Column("endpoint_name", sa.String(64), primary_key=True),
    sa.Column("entity_name", sa.String(256), primary_key=True),
    sa.Column("model", sa.String(256)),
    sa.Column("config_version", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("change_time", UTCDateTime()),
)

_UNSAFE = re.compile(r"[^a-z0-9_]")
_VALID_NAME = re.compile(rf"^[a-z_][a-z0-9_]{{0,{MAX_TABLE_NAME - 1}}}$")


def inference_table_name(endpoint: str, prefix: str = "") -> str:
    """The inference table of ``endpoint``: ``(prefix or endpoint) + "_payload"``, made safe.

    Lower-cased, every character outside ``[a-z0-9_]`` replaced by ``_``, ``t_`` in front of a
    leading digit, at most 60 characters (a name cut short ends in a hash of the whole, so two
    long names that share a start still differ). The result is a plain identifier whatever the
    input, so it can never carry SQL.
    """
    base = prefix or endpoint
    if not base:
        raise ValueError("an inference table needs an endpoint name or a prefix; both are empty")
    name = _UNSAFE.sub("_", base.lower())
    if name[0].isdigit():
        name = "t_" + name
    room = MAX_TABLE_NAME - len(INFERENCE_SUFFIX)
    if len(name) > room:
        digest = hashlib.sha256(base.encode()).hexdigest()[:8]
        name = f"{name[: room - 9]}_{digest}"
    return name + INFERENCE_SUFFIX


def is_inference_table_name(name: str) -> bool:
    """Whether ``name`` could have come from :func:`inference_table_name`."""
    return bool(_VALID_NAME.match(name)) and name.endswith(INFERENCE_SUFFIX)


_inference_metadata = sa.MetaData()
_inference_lock = threading.Lock()


def inference_table(name: str) -> sa.Table:
    """The :class:`~sqlalchemy.Table` of the inference table called ``name`` (a safe name)."""
    if not is_inference_table_name(name):
        raise ValueError(
            f"{name!r} is not an inference table name (use inference_table_name(endpoint))"
        )
    with _inference_lock:
        table = _inference_metadata.tables.get(name)
        if table is not None:
            return table
        return sa.Table(
            name,
            _inference_metadata,
            sa.Column("request_id", sa.String(128), primary_key=True),
            sa.Column("client_request_id", sa.String(256)),
            sa.Column("request_time", UTCDateTime(), nullable=False),
            sa.Column("status_code", sa.Integer),
            sa.Column("execution_time_ms", sa.BigInteger),
            sa.Column("served_entity", sa.String(256)),
            sa.Column("requester", sa.String(256)),
            sa.Column("request", sa.Text, nullable=True),  # JSON text; None when not logged
            sa.Column("response", sa.Text, nullable=True),  # JSON text; None when not logged
            # e.g. 'REQUEST_PAYLOAD_TOO_LARGE': a payload over 1 MiB was left out.
            sa.Column("logging_error_codes", sa.String(256), nullable=False, server_default=""),
            sa.Column("sampling_fraction", sa.Float),
            sa.Index(_index_name(name, "request_time"), "request_time"),
        )


def _index_name(table: str, column: str) -> str:
    """``ix_<table>_<column>``, shortened with a hash where it would pass 63 characters."""
    name = f"ix_{table}_{column}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[:54]}_{digest}"
