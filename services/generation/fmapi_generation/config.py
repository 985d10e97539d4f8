"""Generation service configuration (env ``FMAPI_GENERATION_*`` or ``--kebab-case`` flags)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from fmapi_common.config import ServiceConfig
from fmapi_common.cpus import parse_cpu_list


class GenerationConfig(ServiceConfig):
    model_config = SettingsConfigDict(env_prefix="FMAPI_GENERATION_")

    # Local model directory (Hugging Face layout: config.json, safetensors, tokenizer), e.g.
    # the output of `fmapi models import`.
    model_path: str
    # Name the model is served (and registered with routing) under; default: the directory name.
    served_model_name: str | None = None
    # Routing service to register with; unset = run standalone (tests, benchmarks).
    routing_addr: str | None = None
    # Quota service (one address, or several comma-separated) that admits the requests the
    # gateway hands over with their admission (it saves the gateway a CountTokens call); unset,
    # such a request is refused (FAILED_PRECONDITION), never run unmetered.
    quota_addr: str | None = None
    # How long one admission call may take.
    quota_timeout_seconds: float = Field(5.0, gt=0)
    # Address other services use to reach this one (defaults to host:bound port).
    advertise_host: str | None = None
    # Provisioned-throughput endpoint this replica is reserved for, if any.
    dedicated_endpoint: str | None = None

    # --- engine (vLLM)
    dtype: str = "auto"
    # Context length; default: the model's own.
    max_model_len: int | None = Field(None, ge=16)
    tensor_parallel_size: int = Field(1, ge=1)
    # Share of accelerator memory vLLM may take; default 0.9 on GPU, 0.2 on CPU (where vLLM's
    # memory check refuses higher values on a shared machine; the KV cache is sized below).
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    # CPU only: KV cache size in GiB (exported as VLLM_CPU_KVCACHE_SPACE).
    cpu_kvcache_space_gib: int = Field(1, ge=1)
    # CPU only: the CPUs vLLM's engine processes (engine core and worker) are confined to, as a
    # list such as "0" or "0-2,5"; this process and every other keep all theirs. The engine
    # core and its worker hand each step over by busy-waiting (sched_yield) for each other:
    # on the same cores that costs little, spread over every core it takes a whole core from
    # the request path (measured on 2 cores, tiny model, 16 streams: about 40% more tokens/s).
    # Unset: every CPU this process may use but the last one (the cores vLLM gives its OpenMP
    # threads), when it may use at least two; "all": no confinement.
    engine_cpus: str | None = None
    # Skip torch.compile / CUDA graphs: much faster start, slower decoding. Default: on for
    # CPU (compiling Gemma 3 270M takes about 4 minutes on 2 cores), off on GPU.
    enforce_eager: bool | None = None
    # Most sequences decoded at once; default: vLLM's.
    max_num_seqs: int | None = Field(None, ge=1)
    # Chunked prefill: a prompt is prefilled in chunks, in the same engine steps as other
    # requests' decoding. Two knobs make it fair (vLLM schedules running requests first, so
    # without a per-request cap one long prefill takes every step's whole token budget and new
    # requests wait for all of it):
    enable_chunked_prefill: bool = True
    # Tokens one engine step may process (all requests together). Default: 512 on CPU (a new
    # request waits at most one step of that size), vLLM's own on GPU.
    max_num_batched_tokens: int | None = Field(None, ge=16)
    # Most prompt tokens one request may prefill in a step while other requests are waiting or
    # running (vLLM's long_prefill_token_threshold; alone, a request uses the whole budget).
    # Default: 256 on CPU, 1024 on GPU; 0 turns the cap off.
    long_prefill_token_threshold: int | None = Field(None, ge=0)
    seed: int = 0
    # Structured outputs (JSON schema, tool calls). Compact JSON keeps small models from
    # looping on whitespace.
    structured_outputs_backend: Literal["xgrammar", "guidance"] = "xgrammar"
    compact_json: bool = True

    # --- requests
    # Longest prompt accepted, in tokens, for requests whose endpoint sets no cap of its own
    # (GenerateRequest.max_prompt_tokens); 0 = the context length. Prefill cost grows with the
    # square of the length: on 2 CPU cores Gemma 3 270M prefills 20k tokens in about a minute.
    max_prompt_tokens: int = Field(8192, ge=0)
    # Structured outputs (response_format json_schema, forced tool calls): the largest schema
    # accepted (bytes of its JSON), and how long compiling its grammar may take. The grammar is
    # compiled in a separate worker process (killed when it runs past the limit) before the
    # request reaches the engine; xgrammar backend only.
    max_schema_bytes: int = Field(65536, ge=1024)
    grammar_compile_timeout_s: float = Field(5.0, gt=0)
    # Jinja chat template file; overrides the model's own (a request may override both).
    chat_template: str | None = None
    # Extra stop strings for chat requests (JSON list); default: "stop_strings" in the model's
    # generation_config.json (set by `fmapi models import` for base models it gives a template).
    chat_stop: list[str] | None = None
    # vLLM tool-call parser name (e.g. "hermes") to support tool_choice "auto"; unset = "auto"
    # is refused with INVALID_ARGUMENT ("required" and named functions always work).
    tool_call_parser: str | None = None
    max_n: int = Field(16, ge=1)
    max_top_logprobs: int = Field(20, ge=0)
    # Run one short generation before reporting SERVING (first real request is not slow).
    warmup: bool = True
    # vLLM's own Prometheus metrics (vllm:time_to_first_token_seconds, vllm:num_requests_waiting,
    # vllm:kv_cache_usage_perc, ...) on this service's /metrics; off saves the engine's per-step
    # statistics (the observability benchmark measures what they cost).
    engine_metrics: bool = True

    @field_validator("engine_cpus")
    @classmethod
    def _cpu_list(cls, v: str | None) -> str | None:
        if v is not None and v != "all":
            parse_cpu_list(v)
        return v

    def engine_cpu_set(self, available: set[int]) -> set[int] | None:
        """The CPUs to confine the engine's processes to (None: leave them as they are), given
        the ones this process may use."""
        if self.engine_cpus == "all":
            return None
        if self.engine_cpus is not None:
            chosen = parse_cpu_list(self.engine_cpus) & available
            if not chosen:
                raise ValueError(f"engine_cpus {self.engine_cpus!r}: none of them is one this "
                                 f"process may use ({sorted(available)})")
            return chosen
        if len(available) < 2:
            return None
        return set(sorted(available)[:-1])
