"""The usage API's time arguments: durations back from now, ISO-8601 times, clear 400s."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fmapi_common.errors import InvalidArgument
from fmapi_gateway.usage_api import parse_time

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize("text, expected", [
    ("7d", NOW - timedelta(days=7)),
    ("12h", NOW - timedelta(hours=12)),
    ("30m", NOW - timedelta(minutes=30)),
    ("2026-11-01", datetime(2026, 11, 1, tzinfo=UTC)),  # no offset: UTC
    ("2026-11-01T10:00:00+02:00", datetime(2026, 11, 1, 8, 0, tzinfo=UTC)),
    ("", NOW),
])
def test_times_and_durations(text, expected):
    assert parse_time(text, "since", NOW, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "7w", "-1d", "999999d", "1e9s"])
def test_bad_times_are_400s_naming_the_argument(text):
    with pytest.raises(InvalidArgument) as err:
        parse_time(text, "since", NOW, NOW)
    assert err.value.param == "since" and "since" in err.value.message


def test_times_outside_what_a_timestamp_holds_are_400s():
    from fmapi_gateway.usage_api import _ts

    when = parse_time("9999-12-31T23:59:59-14:00", "until", NOW, NOW)
    with pytest.raises(InvalidArgument) as err:
        _ts(when, "until")
    assert err.value.param == "until"


@pytest.mark.parametrize("limit", ["0", "-3", "1001", "99999999999999999999", "ten"])
async def test_payload_limits_are_checked_before_anything_is_asked(limit):
    from fmapi_gateway.usage_api import UsageApi

    api = UsageApi(None, None)  # no usage service: a checked limit would get 503, not 400
    with pytest.raises(InvalidArgument) as err:
        await api.payloads("e", {"limit": limit})
    assert err.value.param == "limit"
