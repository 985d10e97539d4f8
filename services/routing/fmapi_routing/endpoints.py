"""The endpoint registry: a typed YAML document, validated at start-up.

Pure domain code: no gRPC, no Redis.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

Task = Literal["llm/v1/chat", "llm/v1/completions", "llm/v1/embeddings"]
CapacityMode = Literal["pay_per_token", "provisioned_throughput"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServedEntity(_Strict):
    name: str = ""
    model: str
    traffic_percentage: int = Field(100, ge=0, le=100)


_PER_MINUTE = Field(0, ge=0, le=2**53)


class RateLimits(_Strict):
    """Per-minute limits in three dimensions (0 = unlimited)."""

    requests_per_minute: int = _PER_MINUTE
    input_tokens_per_minute: int = _PER_MINUTE
    output_tokens_per_minute: int = _PER_MINUTE


class PrincipalLimit(_Strict):
    principal: str = Field(min_length=1, max_length=256)
    limits: RateLimits


class Limits(RateLimits):
    """The per-minute fields are every principal's default; ``endpoint`` is a ceiling for
    everyone together; ``principals`` override the default for named principals."""

    endpoint: RateLimits = RateLimits()
    principals: list[PrincipalLimit] = []
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


class Endpoint(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    task: Task
    description: str = ""
    served_entities: list[ServedEntity] = Field(min_length=1)
    capacity_mode: CapacityMode = "pay_per_token"
    limits: Limits = Limits()
    provisioned_throughput: ProvisionedThroughput | None = None
    embedding: EmbeddingSettings | None = None
    generation: GenerationSettings | None = None
    fallbacks: list[str] = []
    retired: bool = False
    replacement: str = ""

    @model_validator(mode="after")
    def _check(self) -> Endpoint:
        for i, se in enumerate(self.served_entities):
            if not se.name:
                se.name = se.model if len(self.served_entities) == 1 else f"{se.model}-{i}"
        if sum(se.traffic_percentage for se in self.served_entities) != 100:
            raise ValueError(f"endpoint {self.name}: traffic percentages must add up to 100")
        if self.task == "llm/v1/embeddings" and self.embedding is None:
            self.embedding = EmbeddingSettings()
        if self.capacity_mode == "provisioned_throughput" and self.provisioned_throughput is None:
            raise ValueError(f"endpoint {self.name}: provisioned_throughput settings are required")
        return self

    def pick_model(self, rng: random.Random) -> str:
        """Choose a served model by the traffic split."""
        if len(self.served_entities) == 1:
            return self.served_entities[0].model
        weights = [se.traffic_percentage for se in self.served_entities]
        return rng.choices(self.served_entities, weights=weights)[0].model


class Registry(_Strict):
    endpoints: list[Endpoint]
    # model -> addresses of replicas that never register themselves (always considered live).
    static_replicas: dict[str, list[str]] = {}
    _by_name: dict[str, Endpoint] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> Registry:
        names = [e.name for e in self.endpoints]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"duplicate endpoint names: {sorted(dupes)}")
        known = set(names)
        for e in self.endpoints:
            for ref in [*e.fallbacks, *([e.replacement] if e.replacement else [])]:
                if ref not in known:
                    raise ValueError(f"endpoint {e.name} refers to unknown endpoint {ref!r}")
            if e.retired and not e.replacement:
                raise ValueError(f"retired endpoint {e.name} must name its replacement")
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
