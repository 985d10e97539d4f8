"""The usage database: write usage records and payloads exactly once, read them back grouped.

One :class:`UsageDB` per process, over a SQLAlchemy Core engine (no ORM: rows are dicts, writes
are whole batches). It is synchronous; the service calls it through ``asyncio.to_thread``.

Exactly once: every table is keyed by ``request_id`` and every insert is insert-or-ignore
(``ON CONFLICT DO NOTHING`` on both PostgreSQL and SQLite) in one transaction, and reports how
many rows were new. A writer that crashes after the insert but before it acknowledged its
stream entries inserts the same batch again on restart and stores nothing twice.

Failures: anything that means "the database cannot be reached right now" (refused or dropped
connections, a server shutting down, SQLite's file locked past the busy timeout or not
openable, the pool exhausted) is raised as :class:`DatabaseUnavailable`, naming the database
(password hidden) and the cause, so a caller keeps its records and retries. Everything else
(bad rows, unknown names, a schema that was never migrated) is a bug and raised as it is.

SQLite: WAL journal, a busy timeout, and transactions that SQLite itself begins (pysqlite's own
transaction handling is switched off, as SQLAlchemy's documentation recommends) so that DDL is
transactional and writers take the write lock up front (``BEGIN IMMEDIATE``) instead of failing
midway when a reader's snapshot went stale. A reader and the writer work at once.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.pool import StaticPool

from fmapi_common.errors import Unavailable

from .schema import (
    UTCDateTime,
    endpoint_usage,
    inference_table,
    inference_table_name,
    is_inference_table_name,
    served_entities,
)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Keys of the PostgreSQL advisory locks that serialise schema changes across processes.
MIGRATION_LOCK_KEY = 0x666D_6170_6975_0001  # "fmapiu" 1: alembic upgrade
DDL_LOCK_KEY = 0x666D_6170_6975_0002  # "fmapiu" 2: creating an inference table

# One migration at a time in a process (processes exclude each other in the database).
_MIGRATING = threading.Lock()
SQLITE_BUSY_TIMEOUT_S = 10.0
PG_CONNECT_TIMEOUT_S = 3  # libpq's minimum is 2
MAX_PAYLOAD_ROWS = 1000

GROUPS = ("endpoint", "principal", "token", "day", "served_entity", "status")
_GROUP_COLUMNS = {
    "endpoint": endpoint_usage.c.endpoint_name,
    "principal": endpoint_usage.c.requester,
    "token": endpoint_usage.c.token_id,
    "served_entity": endpoint_usage.c.served_entity,
    "status": endpoint_usage.c.status_code,
}
_SUMS = {
    "input_tokens": endpoint_usage.c.input_token_count,
    "output_tokens": endpoint_usage.c.output_token_count,
    "input_characters": endpoint_usage.c.input_character_count,
    "output_characters": endpoint_usage.c.output_character_count,
}
_JSON_COLUMNS = frozenset({"usage_context", "request", "response"})

# SQLite reports these as OperationalError too, but they are bugs, not an unreachable database.
_SQLITE_NOT_TRANSIENT = ("no such table", "no such column", "has no column", "syntax error",
                         "already exists")


class DatabaseUnavailable(Unavailable):
    """The usage database cannot be reached now; keep what was to be written and retry."""


class UsageDB:
    """The usage tables of one database, given as a SQLAlchemy URL.

    ``postgresql+psycopg://user:pass@host:5432/db`` (``postgresql://`` means the same) or
    ``sqlite:///path/to/usage.db`` (its directory is created if missing).
    """

    def __init__(self, url: str | URL) -> None:
        self.url = _normalize_url(url)
        self.dialect = self.url.get_backend_name()
        self.where = self.url.render_as_string(hide_password=True)
        self.engine = _create_engine(self.url)
        self._created: set[str] = set()  # inference tables ensured by this object
        self._existing: set[str] = set()  # inference tables seen to exist (for reading)
        self._ddl_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the fixed tables to the newest revision (Alembic ``upgrade head``).

        Idempotent, and safe when several processes start at once: the whole upgrade runs in one
        transaction holding a lock (PostgreSQL: an advisory lock; SQLite: the write lock, taken
        by ``BEGIN IMMEDIATE``), so the others wait and then find nothing left to do.
        """
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
        # Alembic loads the revision scripts as modules; threads doing that at once race.
        with _MIGRATING, self._write("migrating the schema") as conn:
            if self.dialect == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK_KEY)))
            config.attributes["connection"] = conn
            command.upgrade(config, "head")

    def ping(self) -> None:
        """Return if the database answers; raise :class:`DatabaseUnavailable` if not."""
        with self._read("ping") as conn:
            conn.execute(sa.text("SELECT 1"))

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> UsageDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes ------------------------------------------------------------------------------

    def insert_usage(self, rows: list[dict[str, Any]]) -> int:
        """Insert usage records, ignoring request ids already stored; return how many were new."""
        return self._insert_ignore(endpoint_usage, rows)

    def insert_served_entities(self, rows: list[dict[str, Any]]) -> int:
        """Insert served-entity versions, ignoring ones already stored; return how many were new."""
        return self._insert_ignore(served_entities, rows)

    def ensure_inference_table(self, endpoint: str, prefix: str = "") -> str:
        """Create the inference table of ``endpoint`` if missing; return its (safe) name."""
        name = inference_table_name(endpoint, prefix)
        if name in self._created:
            return name
        table = inference_table(name)
        with self._ddl_lock, self._write(f"creating inference table {name}") as conn:
            if self.dialect == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(DDL_LOCK_KEY)))
            table.create(conn, checkfirst=True)
        self._created.add(name)
        self._existing.add(name)
        return name

    def insert_payloads(self, table: str, rows: list[dict[str, Any]]) -> int:
        """Insert payload rows into an inference table, ignoring request ids already stored.

        ``table`` must be a name :meth:`ensure_inference_table` returned on this object.
        """
        if table not in self._created:
            raise ValueError(
                f"unknown inference table {table!r}: call ensure_inference_table(endpoint) "
                "first and pass the name it returns"
            )
        return self._insert_ignore(inference_table(table), rows)

    # -- reads -------------------------------------------------------------------------------

    def query_usage(
        self,
        *,
        since: datetime,
        until: datetime,
        group_by: list[str],
        requester: str | None = None,
    ) -> list[dict[str, Any]]:
        """Requests and token/character sums per group, for ``since <= request_time < until``.

        ``group_by`` names any of :data:`GROUPS` (``day`` is the UTC date, ``YYYY-MM-DD``);
        each row has those keys plus ``requests``, ``input_tokens``, ``output_tokens``,
        ``input_characters`` and ``output_characters``; rows are sorted by the group keys in
        the order given (missing values first). ``requester`` keeps one principal's requests.
        """
        _check_aware(since, "since")
        _check_aware(until, "until")
        if isinstance(group_by, str):
            raise TypeError(f"group_by must be a list of names, got the string {group_by!r}")
        groups = list(dict.fromkeys(group_by))  # repeated names count once
        unknown = [g for g in groups if g not in GROUPS]
        if unknown:
            raise ValueError(
                f"cannot group usage by {', '.join(map(repr, unknown))}: "
                f"choose from {', '.join(GROUPS)}"
            )
        keys = [self._group_expr(g).label(g) for g in groups]
        c = endpoint_usage.c
        stmt = sa.select(
            *keys,
            sa.func.count().label("requests"),
            *(sa.func.coalesce(sa.func.sum(col), 0).label(name) for name, col in _SUMS.items()),
        ).where(c.request_time >= since, c.request_time < until)
        if requester is not None:
            stmt = stmt.where(c.requester == requester)
        if groups:
            stmt = stmt.group_by(*(self._group_expr(g) for g in groups))
        with self._read("querying usage") as conn:
            rows = conn.execute(stmt).mappings().all()
        out = [
            {**{g: row[g] for g in groups},
             "requests": int(row["requests"]),
             **{name: int(row[name]) for name in _SUMS}}
            for row in rows
        ]
        out.sort(key=lambda r: tuple((r[g] is not None, r[g]) for g in groups))
        return out

    def query_payloads(self, table: str, *, since: datetime, limit: int) -> list[dict[str, Any]]:
        """An inference table's rows from ``since`` on, newest first, at most ``limit`` (≤ 1000).

        ``request_time`` comes back as an ISO-8601 string (UTC). A valid name whose table does
        not exist yet (no payload logged) gives no rows.
        """
        _check_aware(since, "since")
        if not is_inference_table_name(table):
            raise ValueError(
                f"{table!r} is not an inference table name (see inference_table_name(endpoint))"
            )
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        limit = min(limit, MAX_PAYLOAD_ROWS)
        t = inference_table(table)
        with self._read(f"reading inference table {table}") as conn:
            if table not in self._existing:
                if not sa.inspect(conn).has_table(table):
                    return []
                self._existing.add(table)
            if limit == 0:
                return []
            rows = conn.execute(
                sa.select(t)
                .where(t.c.request_time >= since)
                .order_by(t.c.request_time.desc(), t.c.request_id.desc())
                .limit(limit)
            ).mappings().all()
        return [{**row, "request_time": row["request_time"].isoformat()} for row in rows]

    def count_usage(self) -> int:
        """How many usage records are stored."""
        with self._read("counting usage") as conn:
            return int(conn.execute(
                sa.select(sa.func.count()).select_from(endpoint_usage)
            ).scalar_one())

    # -- internals ---------------------------------------------------------------------------

    def _group_expr(self, group: str) -> sa.ColumnElement[Any]:
        if group != "day":
            return _GROUP_COLUMNS[group]
        t = endpoint_usage.c.request_time
        # Constants as literals, not bound parameters: PostgreSQL must see the GROUP BY
        # expression and the selected one as the same expression.
        if self.dialect == "postgresql":
            utc = sa.func.timezone(sa.literal_column("'UTC'"), t)
            return sa.func.to_char(utc, sa.literal_column("'YYYY-MM-DD'"), type_=sa.String)
        return sa.func.date(t, type_=sa.String)  # SQLite stores UTC text: 'YYYY-MM-DD HH:MM:...'

    def _insert_ignore(self, table: sa.Table, rows: list[dict[str, Any]]) -> int:
        if not rows:
            return 0
        values = [_prepare_row(table, i, row) for i, row in enumerate(rows)]
        insert = pg_dialect.insert if self.dialect == "postgresql" else sqlite_dialect.insert
        key = next(iter(table.primary_key.columns))
        stmt = insert(table).on_conflict_do_nothing().returning(key)
        with self._write(f"inserting {len(values)} row(s) into {table.name}") as conn:
            return len(conn.execute(stmt, values).all())

    @contextlib.contextmanager
    def _read(self, doing: str) -> Iterator[Connection]:
        with self._unavailable_as(doing), self.engine.connect() as conn:
            yield conn

    @contextlib.contextmanager
    def _write(self, doing: str) -> Iterator[Connection]:
        """A connection in a transaction, committed if the block returns."""
        with self._unavailable_as(doing), self.engine.connect() as conn:
            if self.dialect == "sqlite":
                conn.execution_options(sqlite_begin="IMMEDIATE")
            with conn.begin():
                yield conn

    @contextlib.contextmanager
    def _unavailable_as(self, doing: str) -> Iterator[None]:
        try:
            yield
        except sa.exc.DBAPIError as e:
            if not self._is_unavailable(e):
                raise
            raise DatabaseUnavailable(self._unavailable_message(doing, e.orig)) from e
        except sa.exc.TimeoutError as e:  # every pooled connection busy past pool_timeout
            raise DatabaseUnavailable(self._unavailable_message(doing, e)) from e

    def _is_unavailable(self, e: sa.exc.DBAPIError) -> bool:
        if e.connection_invalidated or isinstance(e, sa.exc.InterfaceError):
            return True
        if not isinstance(e, sa.exc.OperationalError):
            return False
        if self.dialect == "sqlite":
            message = str(e.orig).lower()
            return not any(m in message for m in _SQLITE_NOT_TRANSIENT)
        return True

    def _unavailable_message(self, doing: str, cause: BaseException | None) -> str:
        reason = " ".join(str(cause).split()) if cause is not None else "unknown error"
        return f"usage database {self.where} is unavailable ({doing}): {reason}"


def _normalize_url(url: str | URL) -> URL:
    u = sa.make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    backend = u.get_backend_name()
    if backend not in ("postgresql", "sqlite"):
        raise ValueError(
            f"unsupported usage database {u.render_as_string(hide_password=True)}: "
            "use postgresql+psycopg://... or sqlite:///path"
        )
    return u


def _create_engine(url: URL) -> Engine:
    if url.get_backend_name() == "postgresql":
        return sa.create_engine(
            url,
            pool_size=5,
            max_overflow=5,
            pool_timeout=10,
            pool_recycle=1800,
            pool_pre_ping=True,  # a restarted server's dead connections are replaced, not used
            connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S,
                          "application_name": "fmapi-usage"},
        )
    database = url.database or ""
    if database in ("", ":memory:"):  # one shared in-memory database (tests)
        engine = sa.create_engine(url, poolclass=StaticPool,
                                  connect_args={"check_same_thread": False})
    else:
        if not database.startswith("file:"):
            with contextlib.suppress(OSError):  # SQLite says why it cannot open the file
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            url,
            pool_size=5,
            max_overflow=5,
            pool_timeout=10,
            pool_pre_ping=True,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S},
        )
    sa.event.listen(engine, "connect", _sqlite_on_connect)
    sa.event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # pysqlite begins nothing; _sqlite_on_begin does
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")  # durable at each checkpoint; safe with WAL
    finally:
        cur.close()


def _sqlite_on_begin(conn: Connection) -> None:
    immediate = conn.get_execution_options().get("sqlite_begin") == "IMMEDIATE"
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _check_aware(value: datetime, what: str) -> None:
    if not isinstance(value, datetime):
        raise TypeError(f"{what} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware (UTC), got naive {value.isoformat()}")


def _prepare_row(table: sa.Table, index: int, row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with every column present (defaults filled in), checked, JSON as text."""
    unknown = set(row) - set(table.c.keys())
    if unknown:
        raise ValueError(
            f"{table.name} row {index}: unknown column(s) {', '.join(sorted(unknown))}; "
            f"columns are {', '.join(table.c.keys())}"
        )
    out: dict[str, Any] = {}
    for col in table.columns:
        value = row.get(col.key)
        if value is None and col.server_default is not None:
            value = col.server_default.arg  # type: ignore[attr-defined]
        if value is None and not col.nullable:
            raise ValueError(f"{table.name} row {index}: {col.key} is required")
        if value is not None and col.key in _JSON_COLUMNS and not isinstance(value, str):
            value = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        if value is not None and isinstance(col.type, UTCDateTime):
            _check_aware(value, f"{table.name} row {index}: {col.key}")
        out[col.key] = value
    return out
