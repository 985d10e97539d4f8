"""Endpoints as declared (the YAML under ``infra/endpoints/``, the admin API), validated.

The one definition of what an endpoint is and which registries are valid, used by routing
(which stores the registry) and the gateway (which reads the Databricks-shaped admin calls).
:func:`to_pb` / :func:`from_pb` convert to and from ``fmapi.routing.v1.Endpoint``.
No gRPC calls, no Redis.
""" 

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import yaml
from google.protobuf import json_format
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from fmapi.routing.v1 import routing_pb2 as pb

from .errors import InvalidArgument

Task = Literal["llm/v1/chat", "llm/v1/completions", "llm/v1/embeddings"]
CapacityMode = Literal["pay_per_token", "provisioned_throughput"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServedEntity(_Strict):
    name: str = Field("", max_length=256)
    model: str = Field(min_length=1, max_length=256)
    traffic_percentage: int = Field(100, ge=0, le=100)


_PER_MINUTE = Field(0, ge=0, le=2**53)


class RateLimits(_Strict):
    """Per-minute limits in three dimensions (0 = unlimited)."""

    requests_per_minute: int = _PER_MINUTE
    input_tokens_per_minute: int = _PER_MINUTE
    output_tokens_per_minute: int = _PER_MINUTE
    # Input and output tokens together (the managed product's ``tokens``).
    tokens_per_minute: int = _PER_MINUTE


class PrincipalLimit(_Strict):
    principal: str = Field(min_length=1, max_length=256)
    limits: RateLimits
    # The managed product's ``rate_limits[].key`` it was given (it applies to the named principal
    # whatever that principal's kind); kept so the override reads back as it was written.
    key: Literal["user", "service_principal"] = "user"

    @field_validator("key", mode="before")
    @classmethod
    def _unset_key_is_user(cls, v):
        return v or "user"


class Limits(RateLimits):
    """The per-minute fields are every principal's default; ``endpoint`` is a ceiling for
    everyone together; ``principals`` override the default for named principals."""

    endpoint: RateLimits = RateLimits()
    principals: list[PrincipalLimit] = []
    # Service principals' own default, when given (the managed product keeps one per key); when
    # None, the per-principal default above applies to them too.
    service_principal_default: RateLimits | None = None
    default_max_tokens: int = Field(0, ge=0)
    # Longest prompt accepted, in tokens (0 = the model's context length).
    max_prompt_tokens: int = Field(0, ge=0, le=2**31 - 1)
    # Overall cap on one request's duration, streaming included (0 = the gateway's default).
    request_timeout_seconds: int = Field(0, ge=0, le=86400)

    @model_validator(mode="after")
    def _one_override_each(self) -> Limits:
        names = [p.principal for p in self.principals]
        if len(names) != len(set(names)):
            raise ValueError("limits.principals names a principal twice")
        return self


class ProvisionedThroughput(_Strict):
    min_tokens_per_second: int = Field(0, ge=0)
    max_tokens_per_second: int = Field(0, ge=0)
    chunk_tokens_per_second: int = Field(0, ge=0)


class EmbeddingSettings(_Strict):
    normalize: bool = True
    query_instruction: str = ""
    truncate: bool = True
    supported_dimensions: list[int] = []


class GenerationSettings(_Strict):
    chat_template: str = ""
    max_model_len: int = 0


class InferenceTableConfig(_Strict):
    enabled: bool = False
    catalog_name: str = Field("", max_length=255)
    schema_name: str = Field("", max_length=255)
    table_name_prefix: str = Field("", max_length=255)
    # Share of requests kept, in (0, 1]; 0 = every request.
    sampling_fraction: float = Field(0.0, ge=0.0, le=1.0)


class AiGateway(_Strict):
    usage_tracking_enabled: bool = False
    inference_table: InferenceTableConfig = InferenceTableConfig()
    # The chosen served entity has no live replica: try the others, then ``fallbacks``.
    fallback_enabled: bool = False


ConfigUpdate = Literal["NOT_UPDATING", "IN_PROGRESS", "UPDATE_FAILED"]
MAX_TAGS = 64


class Endpoint(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    task: Task
    description: str = Field("", max_length=4096)
    served_entities: list[ServedEntity] = Field(min_length=1)
    capacity_mode: CapacityMode = "pay_per_token"
    limits: Limits = Limits()
    provisioned_throughput: ProvisionedThroughput | None = None
    embedding: EmbeddingSettings | None = None
    generation: GenerationSettings | None = None
    fallbacks: list[str] = Field([], max_length=16)
    retired: bool = False
    replacement: str = Field("", max_length=63)
    tags: dict[str, str] = Field({}, max_length=MAX_TAGS)
    ai_gateway: AiGateway = AiGateway()
    # Kept by the registry (ignored in declarations):
    config_version: int = Field(0, ge=0)
    config_update: ConfigUpdate = "NOT_UPDATING"
    pending_served_entities: list[ServedEntity] = []
    create_time_ms: int = Field(0, ge=0)
    update_time_ms: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> Endpoint:
        name_served(self.served_entities)
        name_served(self.pending_served_entities)
        check_traffic(self.served_entities, f"endpoint {self.name}")
        for k, v in self.tags.items():
            if not 0 < len(k) <= 255 or len(v) > 255:
                raise ValueError(f"endpoint {self.name}: tag keys have 1 to 255 characters, "
                                 "values up to 255")
        if self.task == "llm/v1/embeddings" and self.embedding is None:
            self.embedding = EmbeddingSettings()
        if self.capacity_mode == "provisioned_throughput" and self.provisioned_throughput is None:
            raise ValueError(f"endpoint {self.name}: provisioned_throughput settings are required")
        return self

    def declared(self) -> dict:
        """What a declaration sets (the registry's own bookkeeping left out), for comparisons."""
        return self.model_dump(exclude=_BOOKKEEPING)


_BOOKKEEPING = {"config_version", "config_update", "pending_served_entities", "create_time_ms",
                "update_time_ms"}


def name_served(entities: list[ServedEntity]) -> None:
    """Name unnamed served entities after their model (``<model>-<i>`` when there are several)."""
    for i, se in enumerate(entities):
        if not se.name:
            se.name = se.model if len(entities) == 1 else f"{se.model}-{i}"
    names = [se.name for se in entities]
    if len(names) != len(set(names)):
        raise ValueError("served entity names must be unique")


def check_traffic(entities: list[ServedEntity], what: str) -> None:
    if entities and sum(se.traffic_percentage for se in entities) != 100:
        raise ValueError(f"{what}: traffic percentages must add up to 100")


def broken_reference(endpoints: Mapping[str, Endpoint]) -> tuple[str, str, str] | None:
    """The first reference between endpoints that does not hold, as ``(endpoint, field,
    message)`` with ``field`` ``fallbacks[i]`` or ``replacement``; None when all hold."""
    for e in endpoints.values():
        for i, ref in enumerate(e.fallbacks):
            if ref not in endpoints:
                return e.name, f"fallbacks[{i}]", (
                    f"endpoint '{e.name}' falls back to unknown endpoint '{ref}'")
        if e.retired and not e.replacement:
            return e.name, "replacement", f"retired endpoint '{e.name}' must name its replacement"
        if e.replacement and e.replacement not in endpoints:
            return e.name, "replacement", (
                f"endpoint '{e.name}' names unknown endpoint '{e.replacement}' as its replacement")
    return None


class Registry(_Strict):
    endpoints: list[Endpoint] = []
    # model -> addresses of replicas that never register themselves (always considered live).
    static_replicas: dict[str, list[str]] = {}
    _by_name: dict[str, Endpoint] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> Registry:
        names = [e.name for e in self.endpoints]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"duplicate endpoint names: {sorted(dupes)}")
        broken = broken_reference({e.name: e for e in self.endpoints})
        if broken is not None:
            raise ValueError(broken[2])
        return self

    def get(self, name: str) -> Endpoint | None:
        return self._by_name.get(name)

    def model_post_init(self, _ctx) -> None:
        self._by_name = {e.name: e for e in self.endpoints}


def load_registry(path: str | Path) -> Registry:
    """Read and validate the YAML; raise ``ValueError`` with a readable message."""
    text = Path(path).read_text()
    try:
        return Registry.model_validate(yaml.safe_load(text) or {})
    except ValidationError as exc:
        raise ValueError(f"invalid endpoints file {path}: {exc}") from None


def invalid_argument(exc: ValidationError | ValueError, where: str) -> InvalidArgument:
    """The 400 for a refused declaration: ``where`` (e.g. "endpoints[2]"), then the first
    problem's field and message; ``param`` names the field."""
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        param = ".".join(x for x in (where, loc) if x) or None
        msg = err["msg"].removeprefix("Value error, ")
        return InvalidArgument(f"{param}: {msg}" if param else msg, param=param)
    return InvalidArgument(f"{where}: {exc}" if where else str(exc), param=where or None)


# The registry's hash in Redis (routing writes it; the usage writer reads inference-table
# settings from it): endpoint name -> the endpoint as JSON.
REGISTRY_KEY = "fmapi:registry:endpoints"

# ---------------------------------------------------------------- proto <-> domain

TASKS = {
    "llm/v1/chat": pb.TASK_CHAT,
    "llm/v1/completions": pb.TASK_COMPLETIONS,
    "llm/v1/embeddings": pb.TASK_EMBEDDINGS,
}
TASK_NAMES = {v: k for k, v in TASKS.items()}
MODES = {
    "pay_per_token": pb.CAPACITY_MODE_PAY_PER_TOKEN,
    "provisioned_throughput": pb.CAPACITY_MODE_PROVISIONED_THROUGHPUT,
}
_UPDATE = {
    "NOT_UPDATING": pb.CONFIG_UPDATE_STATE_NOT_UPDATING,
    "IN_PROGRESS": pb.CONFIG_UPDATE_STATE_IN_PROGRESS,
    "UPDATE_FAILED": pb.CONFIG_UPDATE_STATE_UPDATE_FAILED,
}


def to_pb(ep: Endpoint) -> pb.Endpoint:
    d = ep.model_dump()
    d["task"] = TASKS[ep.task]
    d["capacity_mode"] = MODES[ep.capacity_mode]
    d["config_update"] = _UPDATE[ep.config_update]
    for key in ("provisioned_throughput", "embedding", "generation"):
        if d[key] is None:
            del d[key]
    if d["limits"]["service_principal_default"] is None:
        del d["limits"]["service_principal_default"]
    return json_format.ParseDict(d, pb.Endpoint())


def from_pb(msg: pb.Endpoint) -> Endpoint:
    """The domain endpoint of a message (raises ``ValidationError`` naming the bad field)."""
    d = json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                  always_print_fields_with_no_presence=True,
                                  use_integers_for_enums=True)
    d["task"] = TASK_NAMES.get(msg.task, "")
    d["capacity_mode"] = next((k for k, v in MODES.items() if v == msg.capacity_mode),
                              "pay_per_token")
    d["config_update"] = next((k for k, v in _UPDATE.items() if v == msg.config_update),
                              "NOT_UPDATING")
    for key in ("provisioned_throughput", "embedding", "generation"):
        if not msg.HasField(key):
            d.pop(key, None)
    return Endpoint.model_validate(d)  # int64 arrive as strings: pydantic reads them

