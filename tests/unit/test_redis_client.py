"""The services' Redis client: commands packed in C (hiredis), byte for byte as redis-py's own
packer would, on whichever connection kind the URL asks for."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError

from fmapi_common.redis_client import make_redis


def _client(url: str):
    return make_redis(url, name="test", timeout=0.5, max_connections=2)


@pytest.mark.parametrize(("url", "kind"), [
    ("redis://127.0.0.1:6379/0", Connection),
    ("rediss://127.0.0.1:6380/0", SSLConnection),
    ("unix:///tmp/redis.sock", UnixDomainSocketConnection),
])
def test_the_url_still_chooses_the_connection_kind(url, kind):
    cls = _client(url).connection_pool.connection_class
    assert issubclass(cls, kind) and cls is not kind


def test_commands_are_packed_as_redis_py_packs_them():
    fast = _client("redis://127.0.0.1:6379/0").connection_pool.make_connection()
    plain = Connection()
    commands = [
        ("EVALSHA", "0" * 40, 3, "fmapi:quota:{e}:leases", "fmapi:quota:{e}:usage", b"k\x00\xff",
         "fmapi:quota:{e}:", 600000, 3600000, 0, 60000.0, "req-é", '["a","b"]', 7, 2**70,
         repr(1 / 3), -1, ""),
        ("CLIENT SETNAME", "fmapi-quota"),  # a command name of two words goes as two
        ("SET", "k", memoryview(b"view")),
    ]
    for cmd in commands:
        assert b"".join(fast.pack_command(*cmd)) == b"".join(plain.pack_command(*cmd))


def test_a_value_redis_cannot_take_is_refused_as_before():
    fast = _client("redis://127.0.0.1:6379/0").connection_pool.make_connection()
    for bad in (True, None, [1]):
        with pytest.raises(DataError):
            fast.pack_command("SET", "k", bad)
