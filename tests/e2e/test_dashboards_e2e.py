"""The dashboard and the alert rules (infra/grafana/) read only metrics a running system exports.

A known workload goes through Envoy (embeddings, a streamed and a non-streamed chat completion, a
bad token, output-token quota refusals); then every service's Prometheus ``/metrics`` (and
Envoy's ``/stats/prometheus``) is scraped, and every metric name that a dashboard query or an
alert rule reads must be among the samples some process exports (Envoy's names only when the
system has an ``envoy-metrics`` port). A failure lists each missing name and the panels and alerts
that read it.
"""

from __future__ import annotations

import importlib.util
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families


def _configs():
    """The extractor and loaders, shared with the unit tests of the same configs."""
    path = Path(__file__).resolve().parents[1] / "unit" / "test_observability_configs.py"
    spec = importlib.util.spec_from_file_location("_fmapi_observability_configs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


configs = _configs()

ENVOY_METRICS = "envoy-metrics"
PRINCIPAL = "dashboards-e2e"


@dataclass(frozen=True)
class Sample:
    source: str
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


_SAMPLE_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?=[{\s])", re.MULTILINE)


def exposed_name(name: str, exposed: set[str]) -> str:
    """The name a sample has on the wire, which is what Prometheus stores and PromQL reads.

    The parser's sample names keep the suffixes (x_total, x_bucket, x_sum, x_count; its family
    names drop them), but it also adds ``_total`` to a counter exposed without it (Envoy's
    ``envoy_http_downstream_rq_xx``): that one is taken back off."""
    if name not in exposed and name.endswith("_total") and name[:-len("_total")] in exposed:
        return name[:-len("_total")]
    return name


def scrape(system) -> tuple[list[Sample], list[str]]:
    """Every sample of every ``*-metrics`` port (Envoy's at /stats/prometheus), and the errors."""
    samples, errors = [], []
    for key, port in sorted(system.ports.items()):
        if not key.endswith("-metrics"):
            continue
        path = "/stats/prometheus" if key == ENVOY_METRICS else "/metrics"
        try:
            r = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)
            r.raise_for_status()
            exposed = set(_SAMPLE_LINE.findall(r.text))
            for family in text_string_to_metric_families(r.text):
                for s in family.samples:
                    samples.append(Sample(key, exposed_name(s.name, exposed),
                                          tuple(sorted(s.labels.items())), s.value))
        except (httpx.HTTPError, ValueError) as exc:
            errors.append(f"{key} (port {port}{path}): {exc!r}")
    return samples, errors


def total(samples: Iterable[Sample], name: str, **labels: str) -> float:
    return sum(s.value for s in samples
               if s.name == name and all(dict(s.labels).get(k) == v for k, v in labels.items()))


def workload(system, client: openai.OpenAI, http: httpx.Client) -> dict[str, int]:
    """Known traffic through Envoy; returns how many requests of each kind were answered how."""
    done = {"embeddings": 0, "chat": 0, "q_ok": 0, "q_429": 0}
    for text in ("a cat on a mat", "a dog on a log", "a bird on a wire"):
        client.embeddings.create(model="all-minilm-l6-v2", input=[text, text.upper()])
        done["embeddings"] += 1

    client.chat.completions.create(model="tiny-chat", max_tokens=8,
                                   messages=[{"role": "user", "content": "hello"}])
    done["chat"] += 1
    stream = client.chat.completions.create(model="tiny-chat", max_tokens=8, stream=True,
                                            messages=[{"role": "user", "content": "stream"}])
    assert sum(1 for _ in stream) > 0
    done["chat"] += 1

    bad = httpx.post(f"{system.base_url}/v1/embeddings", timeout=30,
                     headers={"authorization": "Bearer fmapi_not_a_real_token"},
                     json={"model": "all-minilm-l6-v2", "input": "x"})
    assert bad.status_code == 401, bad.text

    # q-chat-tokens allows each principal 100 output tokens a minute: a principal of this test's
    # own (its budget apart from the other tests'), 60 tokens reserved per request, the second
    # or a later one is refused.
    r = http.post("/api/2.0/token/create", json={"comment": "dashboards e2e",
                                                 "principal": PRINCIPAL, "endpoints": ["*"]})
    assert r.status_code == 200, r.text
    token = r.json()["token_value"]
    for _ in range(6):
        r = httpx.post(f"{system.base_url}/v1/chat/completions", timeout=120,
                       headers={"authorization": f"Bearer {token}"},
                       json={"model": "q-chat-tokens", "max_tokens": 60, "ignore_eos": True,
                             "messages": [{"role": "user", "content": "count"}]})
        if r.status_code == 429:
            done["q_429"] += 1
            break
        assert r.status_code == 200, r.text
        done["q_ok"] += 1
    assert done["q_429"] == 1, "no 429 from q-chat-tokens"
    return done


def test_every_dashboard_and_alert_metric_is_exported(system, client, http):
    users = configs.metric_users()
    envoy = ENVOY_METRICS in system.ports
    if not envoy:
        # Envoy's metrics listener is optional here: without it its names cannot be checked.
        users = {n: w for n, w in users.items() if not n.startswith("envoy_")}
    before, _ = scrape(system)
    done = workload(system, client, http)
    answered = done["embeddings"] + done["chat"] + done["q_ok"]

    def problems(after: list[Sample], errors: list[str]) -> list[str]:
        exported = {s.name for s in after}
        out = [f"scrape failed: {e}" for e in errors]
        for name in sorted(set(users) - exported):
            out.append(f"missing {name!r}, read by: {'; '.join(sorted(set(users[name])))}")

        def grew(name: str, at_least: float, **labels: str) -> None:
            got = total(after, name, **labels) - total(before, name, **labels)
            if got < at_least:
                sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
                out.append(f"{name}{{{sel}}} grew by {got:g}, expected >= {at_least:g}")

        # The workload shows where the panels look.
        grew("fmapi_requests_total", done["embeddings"], endpoint="all-minilm-l6-v2", status="200")
        grew("fmapi_requests_total", done["chat"], endpoint="tiny-chat", status="200")
        grew("fmapi_requests_total", 1, endpoint="q-chat-tokens", status="429")
        grew("fmapi_time_to_first_token_seconds_count", done["chat"], endpoint="tiny-chat")
        grew("fmapi_generation_tokens_total", 1, endpoint="tiny-chat")
        grew("fmapi_quota_refusals_total", 1, endpoint="q-chat-tokens")
        grew("fmapi_authz_decisions_total", 1, decision="unauthenticated")
        grew("fmapi_authz_decisions_total", answered, decision="allowed")
        grew("fmapi_embedding_batch_size_count", 1)
        grew("vllm:generation_tokens_total", 1)
        grew("fmapi_usage_rows_written_total", answered)
        for model in ("all-minilm-l6-v2", "tiny"):
            if total(after, "fmapi_model_replicas", model=model) < 1:
                out.append(f"fmapi_model_replicas{{model=\"{model}\"}} is not >= 1")
        if envoy:
            grew("envoy_http_downstream_rq_xx", 1, envoy_response_code_class="4",
                 envoy_http_conn_manager_prefix="public")
        return out

    # Usage records reach SQL through the writer (and vLLM's gauges update on its next step):
    # up to ~10 s for the numbers to settle.
    deadline = time.monotonic() + 10
    while True:
        found = problems(*scrape(system))
        if not found or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    note = "" if envoy else f"\n(no {ENVOY_METRICS!r} port in system.ports: Envoy's metrics not checked)"
    assert not found, "\n".join(found) + note
