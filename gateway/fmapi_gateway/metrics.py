"""What the gateway reports about each request: Prometheus metrics per endpoint, and the GenAI
attributes of the request's span (OpenTelemetry's semantic conventions for generative AI).

Names follow vLLM's where one exists (``time_to_first_token_seconds``,
``time_per_output_token_seconds``, ``e2e_request_latency_seconds``, ``prompt_tokens_total``,
``generation_tokens_total``), prefixed ``fmapi_`` and labelled by endpoint rather than model: the
engine's own ``vllm:*`` metrics (per model) are on the generation service's ``/metrics``.

Every request that named an existing endpoint is counted once, when it ends: an admitted one at
its settlement (the same numbers its usage record gets), a refused one where it was refused.
Labels are bounded: ``endpoint`` only ever holds an endpoint that exists (a request for an
unknown name counts under ``""``), ``status`` an HTTP status, ``principal_kind`` user or
service_principal.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client.registry import Collector

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_TPOT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 1.0)

REQUESTS = prometheus_client.Counter(
    "fmapi_requests", "Requests that ended, by endpoint, HTTP status and principal kind",
    ["endpoint", "status", "principal_kind"])
E2E = prometheus_client.Histogram(
    "fmapi_e2e_request_latency_seconds", "Admission to the last byte, per endpoint", ["endpoint"],
    buckets=_LATENCY)
TTFT = prometheus_client.Histogram(
    "fmapi_time_to_first_token_seconds", "Admission to the first generated token, per endpoint",
    ["endpoint"], buckets=_TTFT)
TPOT = prometheus_client.Histogram(
    "fmapi_time_per_output_token_seconds",
    "Mean time between output tokens after the first, per request and endpoint", ["endpoint"],
    buckets=_TPOT)
PROMPT_TOKENS = prometheus_client.Counter(
    "fmapi_prompt_tokens", "Input tokens of admitted requests (the model's tokenizer)", ["endpoint"])
GENERATION_TOKENS = prometheus_client.Counter(
    "fmapi_generation_tokens", "Output tokens generated", ["endpoint"])


def finished(endpoint: str, status: int, principal_kind: str, *, duration: float | None = None,
             ttft: float | None = None, input_tokens: int = 0, output_tokens: int = 0) -> None:
    """One request ended (once per request)."""
    REQUESTS.labels(endpoint, str(status), principal_kind).inc()
    if duration is not None:
        E2E.labels(endpoint).observe(duration)
    if ttft is not None:
        TTFT.labels(endpoint).observe(ttft)
        if duration is not None and output_tokens > 1:
            TPOT.labels(endpoint).observe(max(0.0, duration - ttft) / (output_tokens - 1))
    if input_tokens:
        PROMPT_TOKENS.labels(endpoint).inc(input_tokens)
    if output_tokens:
        GENERATION_TOKENS.labels(endpoint).inc(output_tokens)


# ---------------------------------------------------------------- spans

FIRST_TOKEN_EVENT = "gen_ai.first_token"
TTFT_ATTRIBUTE = "gen_ai.response.time_to_first_token"
_OPERATIONS = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings"}


def admitted_span(span, *, operation: str, endpoint: str, model: str, principal: str,
                  principal_kind: str, request_id: str, sampling=None) -> None:
    """What a request is, on its server span (never its text, never a token)."""
    if not span.is_recording():
        return
    attrs = {
        "gen_ai.operation.name": _OPERATIONS.get(operation, operation),
        "gen_ai.request.model": model,
        "gen_ai.system": "vllm" if operation != "embeddings" else "sentence_transformers",
        "fmapi.endpoint": endpoint,
        "fmapi.principal": principal,
        "fmapi.principal_kind": principal_kind,
        "fmapi.request_id": request_id,
    }
    if sampling is not None:
        if sampling.HasField("max_tokens"):
            attrs["gen_ai.request.max_tokens"] = sampling.max_tokens
        if sampling.HasField("temperature"):
            attrs["gen_ai.request.temperature"] = sampling.temperature
        if sampling.HasField("top_p"):
            attrs["gen_ai.request.top_p"] = sampling.top_p
        if sampling.HasField("seed"):
            attrs["gen_ai.request.seed"] = sampling.seed
    span.set_attributes(attrs)


def settled_span(span, *, input_tokens: int, output_tokens: int, finish_reason: str,
                 status_code: int) -> None:
    if not span.is_recording():
        return
    span.set_attributes({
        "gen_ai.usage.input_tokens": input_tokens,
        "gen_ai.usage.output_tokens": output_tokens,
        "fmapi.status_code": status_code,
    })
    if finish_reason:
        span.set_attribute("gen_ai.response.finish_reasons", [finish_reason])


# ---------------------------------------------------------------- per-endpoint export


class _EndpointOnly(Collector):
    """This process's metric families, reduced to one endpoint's samples."""

    def __init__(self, endpoint: str) -> None:
        self._endpoint = endpoint

    def collect(self):
        for family in prometheus_client.REGISTRY.collect():
            samples = [s for s in family.samples if s.labels.get("endpoint") == self._endpoint]
            if samples:
                family.samples = samples
                yield family


def endpoint_export(endpoint: str) -> bytes:
    """``GET /api/2.0/serving-endpoints/{name}/metrics``: the endpoint's metrics in Prometheus
    text, as this gateway replica counted them (Prometheus sums the replicas' exports)."""
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(_EndpointOnly(endpoint))
    return prometheus_client.generate_latest(registry)
