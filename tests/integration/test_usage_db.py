"""The usage database (fmapi_usage.db) on a SQLite file and on a real PostgreSQL server.

Every test runs on both. PostgreSQL is one server for the module (tests/helpers/postgres.py)
with a fresh database per test, so no test sees another's rows.
"""

from __future__ import annotations

import random
import re
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from fmapi_usage.db import GROUPS, DatabaseUnavailable, UsageDB
from fmapi_usage.schema import endpoint_usage, inference_table_name, metadata
from helpers.postgres import PostgresServer
from helpers.redis_server import free_port

UTC = timezone.utc
DAY1 = datetime(2025, 3, 1, tzinfo=UTC)
DAY2 = DAY1 + timedelta(days=1)
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="module")
def pg(tmp_path_factory):
    server = PostgresServer(tmp_path_factory.mktemp("pg")).start()
    yield server
    server.close()


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/usage/usage.db"
        return
    server: PostgresServer = request.getfixturevalue("pg")
    name = f"t_{uuid.uuid4().hex[:12]}"
    # Sessions in a zone other than UTC (UTC+5:30), as a server's default may be: days and
    # times must still come out in UTC.
    yield server.create_database(name) + "?options=-c%20TimeZone%3DAsia/Kolkata"
    if server.running:
        server.drop_database(name)


@pytest.fixture
def db(url):
    usage = UsageDB(url)
    usage.migrate()
    yield usage
    usage.close()


def usage_row(i: int, when: datetime, **fields) -> dict:
    return {
        "request_id": f"req-{i}",
        "requester": "alice@example.com",
        "requester_kind": "user",
        "token_id": "tok-1",
        "workspace": "ws",
        "endpoint_name": "chat",
        "served_entity": "chat-gemma",
        "request_time": when,
        "status_code": 200,
        "input_token_count": 10,
        "output_token_count": 20,
        "input_character_count": 40,
        "output_character_count": 80,
        "request_streaming": False,
        "duration_ms": 150,
        "time_to_first_token_ms": None,
        "finish_reason": "stop",
        "settled_by_lease": False,
        **fields,
    }


# -- migrations ------------------------------------------------------------------------------


def test_migrate_twice_is_harmless_and_creates_the_tables(url):
    with UsageDB(url) as db:
        db.migrate()
        db.insert_usage([usage_row(1, DAY1)])
        db.migrate()  # again, with data: nothing changes, nothing is lost
        assert db.count_usage() == 1
        inspector = sa.inspect(db.engine)
        assert {"endpoint_usage", "served_entities", "alembic_version"} <= set(
            inspector.get_table_names()
        )
        assert {ix["name"] for ix in inspector.get_indexes("endpoint_usage")} == {
            "ix_endpoint_usage_request_time",
            "ix_endpoint_usage_requester_time",
            "ix_endpoint_usage_endpoint_time",
        }
        with db.engine.connect() as conn:
            versions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).all()
        assert versions == [("0001",)]


def test_migrations_match_schema_py(db):
    """schema.py and the migrations spell the tables out twice; they must agree."""
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                metadata)
    assert diff == []


def test_concurrent_migrate_from_many_processes(url):
    """Replicas starting together all migrate; each must succeed and the schema be made once."""
    dbs = [UsageDB(url) for _ in range(4)]
    barrier = threading.Barrier(len(dbs))
    errors: list[BaseException] = []

    def run(db: UsageDB) -> None:
        try:
            barrier.wait()
            db.migrate()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(d,)) for d in dbs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert errors == []
        assert dbs[0].insert_usage([usage_row(1, DAY1)]) == 1
        with dbs[0].engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM alembic_version")).scalar() == 1
    finally:
        for d in dbs:
            d.close()


# -- usage records ---------------------------------------------------------------------------


def test_same_batch_twice_is_stored_once(db):
    batch = [usage_row(i, DAY1 + timedelta(seconds=i)) for i in range(25)]
    assert db.insert_usage(batch) == 25
    assert db.insert_usage(batch) == 0  # the stream writer's replay after a crash
    assert db.count_usage() == 25
    # A batch that overlaps: only the new ids count.
    overlap = batch[20:] + [usage_row(i, DAY1) for i in range(25, 30)]
    assert db.insert_usage(overlap) == 5
    # The same id twice inside one batch: stored once.
    assert db.insert_usage([usage_row(99, DAY1), usage_row(99, DAY2)]) == 1
    assert db.count_usage() == 31
    assert db.insert_usage([]) == 0


def test_usage_row_round_trips(db):
    when = datetime(2025, 3, 1, 12, 30, 15, 123456, tzinfo=timezone(timedelta(hours=-5)))
    db.insert_usage([usage_row(
        1, when, usage_context={"team": "ml", "n": 1}, time_to_first_token_ms=42,
        settled_by_lease=True, request_streaming=True, client_request_id=None,
    )])
    with db.engine.connect() as conn:
        row = conn.execute(sa.select(endpoint_usage)).mappings().one()
    assert row["request_time"] == when and row["request_time"].utcoffset() == timedelta(0)
    assert row["request_time"].hour == 17  # stored in UTC
    assert row["usage_context"] == '{"team":"ml","n":1}'
    assert row["client_request_id"] == ""  # the column default
    assert (row["time_to_first_token_ms"], row["settled_by_lease"], row["request_streaming"]) == (
        42, True, True)


def test_bad_rows_are_refused_and_the_batch_stores_nothing(db):
    good = usage_row(1, DAY1)
    with pytest.raises(ValueError, match="unknown column.*input_tokens"):
        db.insert_usage([good, {**usage_row(2, DAY1), "input_tokens": 5}])
    with pytest.raises(ValueError, match="request_time must be timezone-aware"):
        db.insert_usage([good, usage_row(3, datetime(2025, 3, 1, 12, 0))])
    with pytest.raises(ValueError, match="request_time is required"):
        db.insert_usage([good, usage_row(4, None)])
    assert db.count_usage() == 0


def test_served_entities_are_stored_once_per_version(db):
    rows = [
        {"endpoint_name": "chat", "entity_name": "gemma", "model": "gemma3-270m",
         "config_version": v, "change_time": DAY1 + timedelta(hours=v)}
        for v in (1, 2)
    ]
    assert db.insert_served_entities(rows) == 2
    assert db.insert_served_entities(rows) == 0
    assert db.insert_served_entities([{**rows[1], "config_version": 3, "model": "other"}]) == 1
    with db.engine.connect() as conn:
        got = conn.execute(sa.text(
            "SELECT config_version, model FROM served_entities ORDER BY config_version"
        )).all()
    assert [tuple(r) for r in got] == [(1, "gemma3-270m"), (2, "gemma3-270m"), (3, "other")]


# -- query_usage -----------------------------------------------------------------------------

ENDPOINTS = ["chat", "embed", "code"]
PRINCIPALS = ["alice@example.com", "bob@example.com", "sp-batch"]


def random_rows(seed: int = 7, n: int = 50) -> list[dict]:
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        offset = timedelta(seconds=rnd.randrange(0, 2 * 86400), microseconds=rnd.randrange(10**6))
        when = (DAY1 + offset).astimezone(timezone(timedelta(hours=rnd.choice([0, 2, -7]))))
        rows.append(usage_row(
            i, when,
            endpoint_name=rnd.choice(ENDPOINTS),
            requester=rnd.choice(PRINCIPALS),
            token_id=rnd.choice(["tok-a", "tok-b", None]),
            served_entity=rnd.choice(["e1", "e2"]),
            status_code=rnd.choice([200, 200, 200, 429, 500]),
            input_token_count=rnd.randrange(0, 5000),
            output_token_count=rnd.randrange(0, 5000),
            input_character_count=rnd.randrange(0, 20000),
            output_character_count=rnd.choice([None, rnd.randrange(0, 20000)]),
        ))
    return rows


_ROW_KEY = {"endpoint": "endpoint_name", "principal": "requester", "token": "token_id",
            "served_entity": "served_entity", "status": "status_code"}
_SUMMED = {"input_tokens": "input_token_count", "output_tokens": "output_token_count",
           "input_characters": "input_character_count",
           "output_characters": "output_character_count"}


def expected_usage(rows, groups, since, until, requester=None) -> list[dict]:
    acc: dict[tuple, dict] = {}
    for r in rows:
        if not since <= r["request_time"] < until:
            continue
        if requester is not None and r["requester"] != requester:
            continue
        key = tuple(
            r["request_time"].astimezone(UTC).strftime("%Y-%m-%d") if g == "day" else r[_ROW_KEY[g]]
            for g in groups
        )
        a = acc.setdefault(key, {"requests": 0, **{k: 0 for k in _SUMMED}})
        a["requests"] += 1
        for out, col in _SUMMED.items():
            a[out] += r[col] or 0
    result = [{**dict(zip(groups, k)), **v} for k, v in acc.items()]
    result.sort(key=lambda x: tuple((x[g] is not None, x[g]) for g in groups))
    return result


@pytest.mark.parametrize("groups", [
    [],
    ["endpoint"],
    ["principal", "day"],
    ["day", "endpoint", "principal"],
    ["token", "status"],
    ["served_entity", "endpoint"],
    list(GROUPS),
])
def test_query_usage_sums_equal_the_rows(db, groups):
    rows = random_rows()
    assert db.insert_usage(rows) == len(rows)
    got = db.query_usage(since=DAY1, until=DAY2 + timedelta(days=1), group_by=groups)
    assert got == expected_usage(rows, groups, DAY1, DAY2 + timedelta(days=1))
    assert sum(g["requests"] for g in got) == len(rows)
    if "day" in groups:
        assert {g["day"] for g in got} == {"2025-03-01", "2025-03-02"}


def test_query_usage_requester_and_range(db):
    rows = random_rows(seed=11)
    db.insert_usage(rows)
    since, until = DAY1 + timedelta(hours=6), DAY2 + timedelta(hours=6)
    for who in PRINCIPALS:
        got = db.query_usage(since=since, until=until, group_by=["endpoint"], requester=who)
        assert got == expected_usage(rows, ["endpoint"], since, until, requester=who)
        assert got, "the random rows should give every principal some requests in range"
    assert db.query_usage(since=since, until=until, group_by=["principal"],
                          requester="nobody") == []


def test_query_usage_since_is_inclusive_until_is_exclusive(db):
    since, until = DAY1 + timedelta(hours=1), DAY1 + timedelta(hours=2)
    tick = timedelta(microseconds=1)
    db.insert_usage([
        usage_row(1, since - tick),
        usage_row(2, since),  # in
        usage_row(3, until - tick),  # in
        usage_row(4, until),
    ])
    [total] = db.query_usage(since=since, until=until, group_by=[])
    assert total["requests"] == 2 and total["input_tokens"] == 20
    # The same instant given in another zone is the same bound.
    plus2 = timezone(timedelta(hours=2))
    [total] = db.query_usage(since=since.astimezone(plus2), until=until.astimezone(plus2),
                             group_by=[])
    assert total["requests"] == 2


def test_day_grouping_splits_at_utc_midnight(db):
    db.insert_usage([
        usage_row(1, datetime(2025, 3, 1, 23, 59, tzinfo=UTC)),
        usage_row(2, datetime(2025, 3, 2, 0, 1, tzinfo=UTC)),
        # 01:30 at UTC+2 is 23:30 UTC the day before: UTC decides.
        usage_row(3, datetime(2025, 3, 2, 1, 30, tzinfo=timezone(timedelta(hours=2)))),
    ])
    got = db.query_usage(since=DAY1, until=DAY2 + timedelta(days=1), group_by=["day"])
    assert [(g["day"], g["requests"]) for g in got] == [("2025-03-01", 2), ("2025-03-02", 1)]


def test_query_usage_rejects_unknown_groups_and_naive_times(db):
    with pytest.raises(ValueError, match="'model'.*choose from endpoint, principal"):
        db.query_usage(since=DAY1, until=DAY2, group_by=["endpoint", "model"])
    with pytest.raises(ValueError, match="since must be timezone-aware"):
        db.query_usage(since=datetime(2025, 3, 1), until=DAY2, group_by=[])


# -- inference tables ------------------------------------------------------------------------


def test_inference_table_names_are_safe_and_deterministic():
    assert inference_table_name("Foo.Bar-1") == "foo_bar_1_payload"
    assert inference_table_name("chat", prefix="Team A") == "team_a_payload"
    assert inference_table_name("9lives") == "t_9lives_payload"
    hostile = "x\"; DROP TABLE endpoint_usage; -- ' OR 1=1"
    name = inference_table_name("chat", prefix=hostile)
    assert re.fullmatch(r"[a-z_][a-z0-9_]*_payload", name) and len(name) <= 60
    assert name == inference_table_name("chat", prefix=hostile)
    long_a, long_b = "e" * 80 + "a", "e" * 80 + "b"
    na, nb = inference_table_name(long_a), inference_table_name(long_b)
    assert len(na) == len(nb) == 60 and na != nb and na.endswith("_payload")
    with pytest.raises(ValueError, match="both are empty"):
        inference_table_name("")


def payload_row(i: int, when: datetime, **fields) -> dict:
    return {
        "request_id": f"req-{i}",
        "client_request_id": f"client-{i}",
        "request_time": when,
        "status_code": 200,
        "execution_time_ms": 100 + i,
        "served_entity": "chat-gemma",
        "requester": "alice@example.com",
        "request": '{"messages": [{"role": "user", "content": "hi"}]}',
        "response": '{"choices": []}',
        "sampling_fraction": 1.0,
        **fields,
    }


def test_hostile_prefix_makes_a_working_table_and_harms_nothing(db):
    db.insert_usage([usage_row(1, DAY1)])
    name = db.ensure_inference_table("chat", prefix="x\"; DROP TABLE endpoint_usage; --")
    assert name == "x___drop_table_endpoint_usage_____payload"
    assert db.insert_payloads(name, [payload_row(1, DAY1)]) == 1
    assert db.count_usage() == 1
    assert name in sa.inspect(db.engine).get_table_names()


def test_payloads_insert_once_and_read_newest_first(db):
    name = db.ensure_inference_table("Foo.Bar-1")
    assert name == "foo_bar_1_payload"
    assert db.ensure_inference_table("Foo.Bar-1") == name  # exists: nothing to do
    rows = [payload_row(i, DAY1 + timedelta(minutes=i)) for i in range(30)]
    assert db.insert_payloads(name, rows) == 30
    assert db.insert_payloads(name, rows) == 0
    got = db.query_payloads(name, since=DAY1, limit=10)
    assert [r["request_id"] for r in got] == [f"req-{i}" for i in range(29, 19, -1)]
    assert got[0]["request_time"] == (DAY1 + timedelta(minutes=29)).isoformat()
    assert datetime.fromisoformat(got[0]["request_time"]) == DAY1 + timedelta(minutes=29)
    assert set(got[0]) == {
        "request_id", "client_request_id", "request_time", "status_code", "execution_time_ms",
        "served_entity", "requester", "request", "response", "logging_error_codes",
        "sampling_fraction",
    }
    since = DAY1 + timedelta(minutes=25)
    assert [r["request_id"] for r in db.query_payloads(name, since=since, limit=100)] == [
        f"req-{i}" for i in range(29, 24, -1)]
    assert db.query_payloads(name, since=DAY1, limit=0) == []


def test_oversized_payload_marker_round_trips(db):
    name = db.ensure_inference_table("chat")
    db.insert_payloads(name, [payload_row(1, DAY1, request=None,
                                          logging_error_codes="REQUEST_PAYLOAD_TOO_LARGE")])
    [row] = db.query_payloads(name, since=DAY1, limit=5)
    assert row["request"] is None
    assert row["response"] == '{"choices": []}'
    assert row["logging_error_codes"] == "REQUEST_PAYLOAD_TOO_LARGE"
    assert row["sampling_fraction"] == 1.0


def test_query_payloads_caps_at_1000_rows(db):
    name = db.ensure_inference_table("busy")
    rows = [payload_row(i, DAY1 + timedelta(seconds=i), request=None, response=None)
            for i in range(1005)]
    assert db.insert_payloads(name, rows) == 1005
    got = db.query_payloads(name, since=DAY1, limit=5000)
    assert len(got) == 1000 and got[0]["request_id"] == "req-1004"


def test_payload_tables_only_by_their_checked_names(db):
    with pytest.raises(ValueError, match="ensure_inference_table"):
        db.insert_payloads("endpoint_usage", [payload_row(1, DAY1)])
    with pytest.raises(ValueError, match="ensure_inference_table"):
        db.insert_payloads("never_made_payload", [payload_row(1, DAY1)])
    with pytest.raises(ValueError, match="not an inference table name"):
        db.query_payloads("endpoint_usage; --", since=DAY1, limit=5)
    assert db.query_payloads("never_made_payload", since=DAY1, limit=5) == []


# -- concurrency and availability ------------------------------------------------------------


def test_reader_and_writer_work_at_once(db, url):
    """A writer mid-transaction neither blocks readers nor makes a second writer fail."""
    other = UsageDB(url)
    try:
        with db.engine.begin() as conn:  # the writer, mid-transaction
            conn.execute(sa.insert(endpoint_usage), [usage_row(1, DAY1)])
            started = time.monotonic()
            assert other.count_usage() == 0  # sees the last committed state, at once
            assert time.monotonic() - started < 2
            result: dict = {}
            writer = threading.Thread(
                target=lambda: result.update(n=other.insert_usage([usage_row(2, DAY1)])))
            writer.start()
            time.sleep(0.3)  # the second writer waits for the first (busy timeout / row locks)
        writer.join(15)
        assert result == {"n": 1}
        assert other.count_usage() == 2
    finally:
        other.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_unreachable_database_raises_database_unavailable(backend, tmp_path):
    if backend == "sqlite":
        url, where = f"sqlite:///{tmp_path}", str(tmp_path)  # a directory: cannot be opened
    else:
        port = free_port()  # nothing listens there
        url = f"postgresql+psycopg://fmapi:s3cret@127.0.0.1:{port}/fmapi"
        where = f"127.0.0.1:{port}"
    db = UsageDB(url)
    try:
        for call in (db.ping, lambda: db.insert_usage([usage_row(1, DAY1)]), db.migrate):
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable) as err:
                call()
            assert time.monotonic() - started < 5
            message = str(err.value)
            assert where in message and "unavailable" in message
            assert "s3cret" not in message
    finally:
        db.close()


def test_postgres_stopped_then_back(pg, tmp_path):
    """The database goes away: callers hear it at once, and the same object recovers after."""
    url = pg.create_database(f"t_{uuid.uuid4().hex[:12]}").replace("fmapi@", "fmapi:s3cret@")
    db = UsageDB(url)
    try:
        db.migrate()
        assert db.insert_usage([usage_row(1, DAY1)]) == 1  # leaves a pooled connection
        pg.stop()
        for call in (db.ping, lambda: db.insert_usage([usage_row(2, DAY1)]), db.count_usage):
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable) as err:
                call()
            assert time.monotonic() - started < 5
            message = str(err.value)
            assert f"127.0.0.1:{pg.port}" in message and "s3cret" not in message
            assert "unavailable" in message
        pg.start()
        db.ping()
        assert db.insert_usage([usage_row(1, DAY1), usage_row(2, DAY1)]) == 1
        assert db.count_usage() == 2
        # A restart that no call saw: the pooled connections are dead, yet the next write works.
        pg.stop()
        pg.start()
        assert db.insert_usage([usage_row(3, DAY1)]) == 1
        assert db.count_usage() == 3
    finally:
        db.close()
        pg.start()  # the module's other tests need it
