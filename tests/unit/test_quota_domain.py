"""The quota's pure parts: buckets from rules, never-fits, the reported limit, header values."""

from __future__ import annotations

import pytest

from fmapi_common.config import load_config
from fmapi_common.errors import InvalidArgument
from fmapi_common.ratelimit import format_duration, ratelimit_headers
from fmapi_quota.config import QuotaConfig
from fmapi_quota.domain import (
    INPUT,
    OUTPUT,
    REQUESTS,
    THROUGHPUT,
    TOKEN_DIMS,
    Admission,
    BucketState,
    Caller,
    RateLimit,
    Rule,
    buckets,
    most_restrictive,
    never_fits,
    validate,
)


def _adm(**kw) -> Admission:
    base = dict(request_id="r1", endpoint="chat", caller=Caller("alice"), input_tokens=100,
                reserved_output_tokens=50)
    return Admission(**{**base, **kw})


def test_each_limited_dimension_of_each_rule_is_one_bucket():
    a = _adm(rules=[Rule("endpoint", 100, 10_000, 0), Rule("principal", 10, 0, 600)],
             caller=Caller("bob", "service_principal"))
    bs = buckets(a, 10)
    assert [(b.dim, b.who, b.capacity, b.amount) for b in bs] == [
        (REQUESTS, "endpoint", 100, 1),
        (INPUT, "endpoint", 10_000, 100),
        (REQUESTS, "p:service_principal:bob", 10, 1),
        (OUTPUT, "p:service_principal:bob", 600, 50),
    ]
    # Refilled continuously: a per-minute limit of 600 is 10 per second.
    assert bs[3].per_ms * 1000 == pytest.approx(10)
    assert "service principal bob" in bs[3].label and "600" in bs[3].label


def test_users_and_service_principals_of_one_name_are_different_buckets():
    rules = [Rule("principal", 10)]
    u = buckets(_adm(rules=rules, caller=Caller("x", "user")), 10)
    s = buckets(_adm(rules=rules, caller=Caller("x", "service_principal")), 10)
    assert u[0].who != s[0].who


def test_provisioned_throughput_is_one_bucket_of_input_plus_output():
    bs = buckets(_adm(tokens_per_second=200, burst_seconds=0), default_burst_seconds=5)
    assert [(b.dim, b.capacity, b.amount) for b in bs] == [(THROUGHPUT, 1000, 150)]
    assert bs[0].per_ms == pytest.approx(0.2)
    assert buckets(_adm(tokens_per_second=200, burst_seconds=2), 5)[0].capacity == 400


def test_a_request_larger_than_a_bucket_can_never_fit():
    a = _adm(reserved_output_tokens=700, rules=[Rule("principal", 0, 0, 600)])
    err = never_fits(a, buckets(a, 10))
    assert isinstance(err, InvalidArgument) and err.param == "max_tokens" and "600" in err.message
    a = _adm(input_tokens=2000, rules=[Rule("endpoint", 0, 1000, 0)])
    assert never_fits(a, buckets(a, 10)).param == "input"
    a = _adm(input_tokens=2000, reserved_output_tokens=10, tokens_per_second=100)
    assert never_fits(a, buckets(a, 10)).param == "input"
    a = _adm(input_tokens=500, reserved_output_tokens=600, tokens_per_second=100)
    assert never_fits(a, buckets(a, 10)).param == "max_tokens"
    a = _adm(input_tokens=600, reserved_output_tokens=400, rules=[Rule("principal", 1, 600, 400)])
    assert never_fits(a, buckets(a, 10)) is None  # exactly the capacity fits


def test_the_reported_limit_is_the_one_with_least_left():
    a = _adm(rules=[Rule("endpoint", 100, 10_000, 5_000), Rule("principal", 10, 2_000, 0)])
    bs = buckets(a, 10)  # r/endpoint, i/endpoint, o/endpoint, r/p, i/p
    states = [BucketState(90, 6000), BucketState(9_000, 6000), BucketState(4_950, 600),
              BucketState(3, 42_000), BucketState(1_900, 3000)]
    assert most_restrictive(bs, states, (REQUESTS,)) == RateLimit(10, 3, 42_000)
    assert most_restrictive(bs, states, TOKEN_DIMS) == RateLimit(2_000, 1_900, 3000)
    # Ties go to the smaller limit; negative (debt) reads as 0 remaining.
    states[1] = BucketState(1_900, 1)
    assert most_restrictive(bs, states, TOKEN_DIMS).limit == 2_000
    states[3] = BucketState(-2, 5)
    assert most_restrictive(bs, states, (REQUESTS,)).remaining == 0
    assert most_restrictive(bs[:1], states[:1], TOKEN_DIMS) is None


@pytest.mark.parametrize("ms,text", [
    (0, "0s"), (12, "12ms"), (999, "999ms"), (1000, "1s"), (1500, "1.5s"), (59_927, "59.927s"),
    (60_000, "1m0s"), (360_000, "6m0s"), (61_010, "1m1.01s"), (3_600_000, "1h0m0s"), (-5, "0s"),
])
def test_durations_are_written_like_openai(ms, text):
    assert format_duration(ms) == text


def test_ratelimit_headers():
    h = ratelimit_headers(RateLimit(60, 59, 1000), RateLimit(150_000, 149_984, 6))
    assert h == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s", "x-ratelimit-limit-tokens": "150000",
        "x-ratelimit-remaining-tokens": "149984", "x-ratelimit-reset-tokens": "6ms",
    }
    assert ratelimit_headers(None, None) == {}


@pytest.mark.parametrize("change,param", [
    (dict(request_id=""), "request_id"),
    (dict(endpoint="a{b}"), "endpoint"),
    (dict(caller=Caller("")), "caller.principal"),
    (dict(input_tokens=-1), "input_tokens"),
    (dict(usage_context={f"k{i}": "v" for i in range(17)}), "usage_context"),
    (dict(usage_context={"k": "v" * 257}), "usage_context"),
    (dict(client_request_id="x" * 257), "client_request_id"),
    (dict(rules=[Rule("principal", 1), Rule("principal", 2)]), "rules"),
    (dict(rules=[Rule("endpoint", -1)]), "rules"),
])
def test_malformed_requests_are_refused_naming_the_field(change, param):
    with pytest.raises(InvalidArgument) as err:
        validate(_adm(**change))
    assert err.value.param == param


def test_config_requires_redis_url(monkeypatch):
    monkeypatch.delenv("FMAPI_QUOTA_REDIS_URL", raising=False)
    monkeypatch.setenv("FMAPI_QUOTA_INSECURE", "true")
    with pytest.raises(SystemExit) as exc:
        load_config(QuotaConfig, [], prog="fmapi-quota")
    assert "FMAPI_QUOTA_REDIS_URL" in str(exc.value) and "--redis-url" in str(exc.value)
    cfg = load_config(QuotaConfig, ["--redis-url", "redis://x", "--lease-seconds", "30"])
    assert cfg.lease_seconds == 30 and cfg.usage_backlog_max == 200_000


def test_the_proto_request_becomes_an_admission():
    from fmapi.quota.v1 import quota_pb2 as pb
    from fmapi_quota.servicer import admission_from_pb

    req = pb.AdmitRequest(
        request_id="r", endpoint="e", capacity_mode=pb.CAPACITY_MODE_PAY_PER_TOKEN,
        caller=pb.Caller(principal="sp", principal_kind=pb.PRINCIPAL_KIND_SERVICE_PRINCIPAL),
        input_tokens=3, reserved_output_tokens=4, usage_context={"a": "b"},
        rules=[pb.LimitRule(key=pb.LIMIT_KEY_PRINCIPAL, requests_per_minute=7)],
        provisioned_throughput=pb.ProvisionedThroughput(tokens_per_second=50),
    )
    a = admission_from_pb(req)
    assert a.caller.principal_kind == "service_principal" and a.usage_context == {"a": "b"}
    assert a.rules == [Rule("principal", 7)]
    assert a.tokens_per_second == 0  # pay-per-token: the capacity bucket does not apply
    req.capacity_mode = pb.CAPACITY_MODE_PROVISIONED_THROUGHPUT
    assert admission_from_pb(req).tokens_per_second == 50
    req.provisioned_throughput.tokens_per_second = 0
    with pytest.raises(InvalidArgument):
        admission_from_pb(req)
    req.caller.principal_kind = pb.PRINCIPAL_KIND_UNSPECIFIED
    with pytest.raises(InvalidArgument) as err:
        admission_from_pb(req)
    assert err.value.param == "caller.principal_kind"
