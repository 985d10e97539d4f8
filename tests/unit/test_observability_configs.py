"""The observability configs in infra/: the Grafana dashboard, the Prometheus alert rules and the
OpenTelemetry Collector config are well formed, and name only what they must.

Also home of a small PromQL metric-name extractor (:func:`promql_metric_names`) and of the loaders
:func:`dashboard_queries` / :func:`alert_queries`, which tests/e2e/test_dashboards_e2e.py uses to
check every metric named here against what a running system exports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "infra" / "grafana" / "fmapi-dashboard.json"
ALERTS = ROOT / "infra" / "grafana" / "alerts.yaml"
COLLECTOR = ROOT / "infra" / "otel" / "collector.yaml"

# ---------------------------------------------------------------- PromQL metric names

# Aggregations, keywords, modifiers and functions: never metric names. (A function is
# recognised by the "(" that follows it anyway; the functions are listed as well, to be safe.)
_WORDS = """
sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio
by without on ignoring group_left group_right bool offset and or unless atan2 start end
inf nan le
abs absent absent_over_time ceil changes clamp clamp_max clamp_min day_of_month day_of_week
day_of_year days_in_month delta deriv exp floor histogram_avg histogram_count histogram_fraction
histogram_quantile histogram_stddev histogram_stdvar histogram_sum holt_winters double_exponential_smoothing
hour idelta increase irate label_join label_replace ln log2 log10 minute month predict_linear
rate resets round scalar sgn sort sort_desc sort_by_label sort_by_label_desc sqrt time timestamp
vector year avg_over_time min_over_time max_over_time sum_over_time count_over_time
quantile_over_time stddev_over_time stdvar_over_time last_over_time present_over_time
mad_over_time acos acosh asin asinh atan atanh cos cosh sin sinh tan tanh deg pi rad
label_values label_names query_result metrics
"""
PROMQL_WORDS = frozenset(_WORDS.split())

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VAR = re.compile(r"\$(?:\{[^}]*\}|\w+)")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)",
                         re.IGNORECASE)
# A whole identifier (not part of a number such as 1e3 or a duration such as 5m) that is not
# called as a function.
_IDENT = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (Grafana's ``$variables`` allowed)."""
    text = _STRING.sub('""', expr)
    text = _GRAFANA_VAR.sub("1m", text)
    text = _MATCHERS.sub("{}", text)
    text = _RANGE.sub("[]", text)
    text = _LABEL_LIST.sub(" ", text)
    return {name for name in _IDENT.findall(text) if name.lower() not in PROMQL_WORDS}


def balanced(expr: str) -> bool:
    """Brackets balance and nest properly outside string literals (a cheap syntax check)."""
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for ch in _STRING.sub('""', expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack and expr.count('"') % 2 == 0


_LABEL_VALUES = re.compile(r"label_values\(\s*([^,()]*(?:\{[^}]*\})?)\s*,")


def dashboard_queries(dashboard: dict | None = None) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable of the dashboard."""
    if dashboard is None:
        dashboard = json.loads(DASHBOARD.read_text())
    out = []

    def panels(items):
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dashboard.get("panels", [])):
        for t in p.get("targets", []):
            out.append((f"panel {p.get('title')!r} ({t.get('refId')})", t.get("expr", "")))
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        query = v.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        m = _LABEL_VALUES.search(query)
        out.append((f"variable {v.get('name')!r}", m.group(1) if m else query))
    return out


def alert_rules(doc: dict | None = None) -> list[dict]:
    if doc is None:
        doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alert_queries(doc: dict | None = None) -> list[tuple[str, str]]:
    return [(f"alert {r.get('alert') or r.get('record')!r}", r.get("expr", ""))
            for r in alert_rules(doc)]


def metric_users() -> dict[str, list[str]]:
    """Every metric name the dashboard and the alert rules read -> where each is read."""
    users: dict[str, list[str]] = {}
    for where, expr in [*dashboard_queries(), *alert_queries()]:
        for name in promql_metric_names(expr):
            users.setdefault(name, []).append(where)
    return users


# ---------------------------------------------------------------- the extractor itself

@pytest.mark.parametrize(("expr", "names"), [
    (('histogram_quantile(0.95, sum by (le, endpoint) (rate(fmapi_e2e_request_latency_seconds_bucket'
      '{endpoint=~"$endpoint",status!="not_a_metric_total"}[$__rate_interval])))'),
     {"fmapi_e2e_request_latency_seconds_bucket"}),
    (("sum by (model_name) (vllm:num_requests_running) / on (model_name) group_left "
      "max(vllm:kv_cache_usage_perc offset 5m) > bool 0.5"),
     {"vllm:num_requests_running", "vllm:kv_cache_usage_perc"}),
    ('max by (model) (fmapi_model_replicas) == 0 and on(model) up{job="routing"} or vector(1)',
     {"fmapi_model_replicas", "up"}),
    ("sum(rate(a_total[5m])) by (endpoint) / sum without (status) (rate(b_total{x='y'}[1m] @ end()))",
     {"a_total", "b_total"}),
    ("1e3 * rate(x_sum[${__rate_interval}]) / rate(x_count[5m:1m]) + count_values(\"le\", up_ish)",
     {"x_sum", "x_count", "up_ish"}),
    ("fmapi_usage_backlog", {"fmapi_usage_backlog"}),
    ("time() - max(sum_over_time(rate(sum_of_things_total[1h])[1d:5m]))", {"sum_of_things_total"}),
])
def test_the_extractor_finds_metric_names_and_nothing_else(expr, names):
    assert promql_metric_names(expr) == names


def test_the_dashboard_loader_reads_targets_nested_panels_and_variables():
    dashboard = {
        "panels": [
            {"type": "row", "title": "r", "panels": [
                {"title": "inner", "targets": [{"refId": "A", "expr": "rate(a_total[1m])"}]}]},
            {"title": "outer", "targets": [{"refId": "B", "expr": "b"}]},
        ],
        "templating": {"list": [
            {"type": "datasource", "name": "datasource", "query": "prometheus"},
            {"type": "query", "name": "ep", "query": "label_values(c_total{x=\"y\"}, endpoint)"},
            {"type": "query", "name": "m", "query": {"query": "label_values(d, model)"}},
        ]},
    }
    got = {where: sorted(promql_metric_names(q)) for where, q in dashboard_queries(dashboard)}
    assert got == {"panel 'inner' (A)": ["a_total"], "panel 'outer' (B)": ["b"],
                   "variable 'ep'": ["c_total"], "variable 'm'": ["d"]}


# ---------------------------------------------------------------- the dashboard

def test_the_dashboard_loads_and_every_panel_queries_something():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    assert len(panels) >= 15
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in panels:
        exprs = [t.get("expr", "").strip() for t in p.get("targets", [])]
        assert exprs and any(exprs), f"panel {p['title']!r} has no query"
        assert all(exprs), f"panel {p['title']!r} has an empty query"
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            assert balanced(t["expr"]), (p["title"], t["expr"])
            assert promql_metric_names(t["expr"]), (p["title"], t["expr"])
        pos = p["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, p["title"]


def test_the_dashboard_has_the_datasource_and_endpoint_variables():
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    endpoint = variables["endpoint"]
    assert endpoint["type"] == "query"
    assert endpoint["query"] == "label_values(fmapi_requests_total, endpoint)"
    assert endpoint["datasource"]["uid"] == "${datasource}"


def test_the_dashboard_covers_every_signal():
    used = {name for _, q in dashboard_queries() for name in promql_metric_names(q)}
    wanted = {
        "fmapi_requests_total", "fmapi_e2e_request_latency_seconds_bucket",
        "fmapi_prompt_tokens_total", "fmapi_generation_tokens_total",
        "fmapi_time_to_first_token_seconds_bucket", "fmapi_time_per_output_token_seconds_bucket",
        "vllm:num_requests_running", "vllm:num_requests_waiting",
        "vllm:request_queue_time_seconds_bucket", "vllm:kv_cache_usage_perc",
        "fmapi_quota_refusals_total", "fmapi_authz_decisions_total",
        "fmapi_embedding_batch_size_bucket", "fmapi_embedding_queue_wait_seconds_bucket",
        "fmapi_model_replicas", "fmapi_usage_backlog", "envoy_http_downstream_rq_xx",
    }
    assert wanted <= used, sorted(wanted - used)


# ---------------------------------------------------------------- the alert rules

DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


def test_every_alert_rule_is_complete():
    doc = yaml.safe_load(ALERTS.read_text())
    assert doc["groups"] and all(g["name"] and g["rules"] for g in doc["groups"])
    rules = alert_rules(doc)
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "alert names repeat"
    for r in rules:
        assert r["alert"] and isinstance(r.get("expr"), str) and r["expr"].strip(), r
        assert DURATION.match(str(r.get("for", ""))), (r["alert"], r.get("for"))
        assert r["labels"]["severity"] in {"critical", "warning", "info"}, r["alert"]
        assert r["annotations"]["summary"].strip(), r["alert"]
        assert r["annotations"]["description"].strip(), r["alert"]
        assert balanced(r["expr"]), (r["alert"], r["expr"])
        assert promql_metric_names(r["expr"]), (r["alert"], r["expr"])


def test_the_alerts_watch_what_they_must():
    by_metric = {}
    for r in alert_rules():
        for name in promql_metric_names(r["expr"]):
            by_metric.setdefault(name, []).append(r)
    assert {"fmapi_requests_total", "fmapi_model_replicas",
            "fmapi_time_to_first_token_seconds_bucket", "fmapi_usage_backlog",
            "fmapi_authz_decisions_total"} <= set(by_metric)
    (errors,) = by_metric["fmapi_requests_total"]
    assert '"5.."' in errors["expr"] and "0.05" in errors["expr"] and errors["for"] == "5m"
    (replicas,) = by_metric["fmapi_model_replicas"]
    assert "== 0" in replicas["expr"] and replicas["for"] == "1m"
    (ttft,) = by_metric["fmapi_time_to_first_token_seconds_bucket"]
    assert "histogram_quantile(0.95" in ttft["expr"] and "> 2" in ttft["expr"]
    assert ttft["for"] == "10m"
    (backlog,) = by_metric["fmapi_usage_backlog"]
    assert "> 10000" in backlog["expr"] and backlog["for"] == "5m"
    (authz,) = by_metric["fmapi_authz_decisions_total"]
    assert 'decision="unavailable"' in authz["expr"]


# ---------------------------------------------------------------- the collector

PLACEHOLDER = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _collector() -> dict:
    return yaml.safe_load(COLLECTOR.read_text())


def test_every_pipeline_component_is_defined():
    cfg = _collector()
    pipelines = cfg["service"]["pipelines"]
    assert set(pipelines) == {"traces", "metrics"}
    for name, pipeline in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            assert pipeline.get(kind) or kind == "processors", (name, kind)
            for component in pipeline.get(kind, []):
                assert component in (cfg.get(kind) or {}), f"{name}: {kind} {component!r} undefined"
    for ext in cfg["service"].get("extensions", []):
        assert ext in cfg.get("extensions", {}), ext
    assert pipelines["traces"]["receivers"] == ["otlp"]
    assert pipelines["traces"]["exporters"] == ["otlp/traces"]
    assert sorted(pipelines["metrics"]["receivers"]) == ["otlp", "prometheus"]
    assert pipelines["metrics"]["exporters"] == ["prometheus"]
    for pipeline in pipelines.values():
        # The memory limiter must see data first; batching comes after it.
        assert pipeline["processors"] == ["memory_limiter", "batch"]


def test_the_collector_listens_and_exports_where_documented():
    cfg = _collector()
    otlp = cfg["receivers"]["otlp"]["protocols"]
    assert otlp["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert otlp["http"]["endpoint"] == "0.0.0.0:4318"
    assert cfg["exporters"]["prometheus"]["endpoint"] == "0.0.0.0:8889"
    # Scraped names pass through as they are (the dashboard reads them so).
    assert cfg["exporters"]["prometheus"]["add_metric_suffixes"] is False
    traces = cfg["exporters"]["otlp/traces"]
    assert PLACEHOLDER.fullmatch(traces["endpoint"]).group(1) == "TRACES_OTLP_ENDPOINT"
    assert PLACEHOLDER.fullmatch(str(traces["tls"]["insecure"])), traces["tls"]


def test_the_collector_scrapes_every_service_and_envoy():
    jobs = {j["job_name"]: j for j in _collector()["receivers"]["prometheus"]["config"]["scrape_configs"]}
    fmapi = jobs["fmapi"]
    assert fmapi.get("metrics_path", "/metrics") == "/metrics"
    services = {}
    for static in fmapi["static_configs"]:
        for target in static["targets"]:
            services[static["labels"]["service"]] = target
    assert set(services) == {"gateway", "auth", "quota", "routing", "embedding", "generation", "usage"}
    for service, target in services.items():
        host, port = PLACEHOLDER.findall(target)
        assert host[0] == "FMAPI_METRICS_HOST"
        # The same setting the service itself reads (its env prefix + METRICS_PORT), a default port.
        assert port[0] == f"FMAPI_{service.upper()}_METRICS_PORT" and port[1].isdigit()
    envoy = jobs["envoy"]
    assert envoy["metrics_path"] == "/stats/prometheus"
    (target,) = [t for s in envoy["static_configs"] for t in s["targets"]]
    assert PLACEHOLDER.search(target)


def test_the_metrics_port_settings_named_are_the_services_own():
    from fmapi_auth.config import AuthConfig
    from fmapi_embedding.config import EmbeddingConfig
    from fmapi_gateway.config import GatewayConfig
    from fmapi_generation.config import GenerationConfig
    from fmapi_quota.config import QuotaConfig
    from fmapi_routing.config import RoutingConfig
    from fmapi_usage.config import UsageConfig

    real = {cls.model_config["env_prefix"] + "METRICS_PORT"
            for cls in (AuthConfig, EmbeddingConfig, GatewayConfig, GenerationConfig, QuotaConfig,
                        RoutingConfig, UsageConfig)
            if "metrics_port" in cls.model_fields}
    named = {n for n, _ in PLACEHOLDER.findall(COLLECTOR.read_text())
             if n.endswith("_METRICS_PORT") and n != "FMAPI_ENVOY_METRICS_PORT"}
    assert named == real


def test_every_placeholder_is_an_env_reference():
    """${env:NAME} or ${env:NAME:-default} only: a bare "$" would be taken for a reference (the
    prometheus receiver's relabel "$1" must be written "$$1")."""
    text = "\n".join(line.split("#", 1)[0] for line in COLLECTOR.read_text().splitlines())
    rest = PLACEHOLDER.sub("", text).replace("$$", "")
    assert "$" not in rest, [line for line in rest.splitlines() if "$" in line]
