"""The usage tables: endpoint_usage (one row per request) and served_entities.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Inference tables are not here: they are made per endpoint at run time
(:meth:`fmapi_usage.db.UsageDB.ensure_inference_table`).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "endpoint_usage",
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("client_request_id", sa.String(256), nullable=False, server_default=""),
        sa.Column("requester", sa.String(256)),
        sa.Column("requester_kind", sa.String(32)),
        sa.Column("token_id", sa.String(128)),
        sa.Column("workspace", sa.String(256)),
        sa.Column("endpoint_name", sa.String(64)),
        sa.Column("served_entity", sa.String(256)),
        sa.Column("request_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status_code", sa.Integer),
        sa.Column("input_token_count", sa.BigInteger),
        sa.Column("output_token_count", sa.BigInteger),
        sa.Column("input_character_count", sa.BigInteger),
        sa.Column("output_character_count", sa.BigInteger),
        sa.Column("request_streaming", sa.Boolean),
        sa.Column("duration_ms", sa.BigInteger),
        sa.Column("time_to_first_token_ms", sa.BigInteger, nullable=True),
        sa.Column("usage_context", sa.Text, nullable=False, server_default="{}"),
        sa.Column("finish_reason", sa.String(64)),
        sa.Column("settled_by_lease", sa.Boolean),
    )
    op.create_index("ix_endpoint_usage_request_time", "endpoint_usage", ["request_time"])
    op.create_index(
        "ix_endpoint_usage_requester_time", "endpoint_usage", ["requester", "request_time"]
    )
    op.create_index(
        "ix_endpoint_usage_endpoint_time", "endpoint_usage", ["endpoint_name", "request_time"]
    )
    op.create_table(
        "served_entities",
        sa.Column("endpoint_name", sa.String(64), primary_key=True),
        sa.Column("entity_name", sa.String(256), primary_key=True),
        sa.Column("model", sa.String(256)),
        sa.Column("config_version", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("change_time", sa.DateTime(timezone=True)),
    )


def downgrade() -> None:
    op.drop_table("served_entities")
    op.drop_index("ix_endpoint_usage_endpoint_time", table_name="endpoint_usage")
    op.drop_index("ix_endpoint_usage_requester_time", table_name="endpoint_usage")
    op.drop_index("ix_endpoint_usage_request_time", table_name="endpoint_usage")
    op.drop_table("endpoint_usage")
