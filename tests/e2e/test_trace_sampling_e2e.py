"""Trace sampling: with ``OTEL_TRACES_SAMPLER=parentbased_traceidratio`` and a ratio, Envoy
traces that share of the requests and every service follows its decision, so each request's
trace is whole (Envoy, the gateway, the embedding server, quota) or absent; a caller cannot
raise the share; every response still names its trace id."""

from __future__ import annotations

import secrets
import time

import httpx
import pytest

from fmapi_cli.system import ROOT, System, SystemOptions
from helpers.otlp import OtlpCollector

SERVER = 2  # OTLP span kind
REQUESTS = 60  # a third plain, a third with x-client-trace-id, a third with a sampled traceparent


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    collector = OtlpCollector().start()
    system = System(SystemOptions(
        runtime_dir=tmp_path_factory.mktemp("sampled"), http_port=0,
        endpoints_file=ROOT / "infra" / "endpoints" / "embeddings-only.yaml",
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
             "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_BSP_SCHEDULE_DELAY": "100",
             "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
             "OTEL_TRACES_SAMPLER_ARG": "0.5"}))
    system.start()
    yield system, collector
    system.stop()
    collector.stop()


def _settled(collector: OtlpCollector, trace_ids: set[str]) -> dict[str, list]:
    """The spans of these traces, by trace, once every trace has Envoy's server span (Envoy
    exports its spans every few seconds, the services every 0.1 s) and nothing new came for a
    second; as they are after 30 s otherwise."""
    seen, quiet_since = -1, time.monotonic()
    deadline = time.monotonic() + 30
    while True:
        spans = [s for s in collector.spans() if s.trace_id in trace_ids]
        by_trace: dict[str, list] = {}
        for s in spans:
            by_trace.setdefault(s.trace_id, []).append(s)
        if len(spans) != seen:
            seen, quiet_since = len(spans), time.monotonic()
        elif (time.monotonic() - quiet_since > 1.0
              and all(any(s.service == "envoy" and s.kind == SERVER for s in got)
                      for got in by_trace.values())):
            return by_trace
        if time.monotonic() > deadline:
            return by_trace
        time.sleep(0.1)


def test_half_the_requests_are_traced_and_each_trace_is_whole(sampled):
    system, collector = sampled
    trace_ids = []
    with httpx.Client(base_url=system.base_url, timeout=60,
                      headers={"authorization": f"Bearer {system.admin_token}"}) as c:
        for i in range(REQUESTS):
            # Two thirds ask to be traced, in the two ways a client could: neither raises the
            # share (a caller who could would undo the cost the sampling saves).
            asks = ({} if i % 3 == 0 else
                    {"x-client-trace-id": secrets.token_hex(8)} if i % 3 == 1 else
                    {"traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"})
            r = c.post("/v1/embeddings", json={"model": "all-minilm-l6-v2",
                                               "input": f"sentence number {i}"}, headers=asks)
            assert r.status_code == 200, r.text
            # Traced or not, the response names its trace, for a user to hand to an SRE.
            assert len(r.headers["x-fmapi-trace-id"]) == 32
            trace_ids.append(r.headers["x-fmapi-trace-id"])
    assert len(set(trace_ids)) == REQUESTS

    by_trace = _settled(collector, set(trace_ids))
    # Each request is sampled with probability 0.5: 10 to 50 of 60 traced fails about once in
    # 10^7 runs, and all 20 of one way of asking traced about once in 10^6.
    assert 10 <= len(by_trace) <= REQUESTS - 10, f"{len(by_trace)} of {REQUESTS} traced"
    for way in (1, 2):
        asked = trace_ids[way::3]
        assert sum(t in by_trace for t in asked) < len(asked), f"all that asked ({way}) traced"
    # An x-client-trace-id forces no trace: Envoy samples it as any other request (it would
    # otherwise get a draw of its own first, and 3 in 4 be traced at 0.5).
    stats = dict(line.split(": ", 1) for line in system.envoy_admin(
        "/stats?filter=^http\\.public\\.tracing\\.").text.splitlines())
    assert stats["http.public.tracing.client_enabled"] == "0", stats
    assert int(stats["http.public.tracing.random_sampling"]) >= len(by_trace), stats
    for tid, got in by_trace.items():
        kinds = {(s.service, s.kind) for s in got}
        names = {s.name for s in got}
        # Whole: Envoy's server span and the gateway's, the embedding server's Embed and the
        # admission it asked quota for; never a service's spans without Envoy's.
        assert {("envoy", SERVER), ("gateway", SERVER), ("embedding", SERVER),
                ("quota", SERVER)} <= kinds, f"trace {tid} is partial: {sorted(kinds)}"
        assert any("Embed" in n for n in names) and any("AdmitMany" in n for n in names)
