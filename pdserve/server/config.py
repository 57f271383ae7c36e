"""Frozen configuration of the HTTP front (`pdserve serve`); the engine's knobs live in EngineConfig.

Built once by `serve.run_serve` from CLI flags (and the API-key variable, contract.API_KEY_ENV), then read by the
app, the engine client and the request handlers for the life of the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from pdserve.contract import DEFAULT_SERVER_PORT
from pdserve.disagg.config import DisaggConfig
from pdserve.discovery import DiscoveryConfig
from pdserve.engine.config import EngineConfig
from pdserve.flags.cors import CorsConfig


@dataclass(frozen=True)
class AdmissionConfig:
    """Admission control's thresholds (server/admission.py says what each one refuses)."""

    enabled: bool = False  # --admission-control
    max_kv_usage: float = 0.95  # fraction of the KV pool held by requests
    max_queued_tokens: int | None = None  # prompt tokens admitted, first token not yet out
    max_queue_wait_s: float | None = None  # their predicted compute time
    retry_after_s: float = 1.0  # the smallest Retry-After a refusal carries

    def check(self) -> None:
        """Raise ValueError (one sentence) for a value that cannot work."""
        if not 0.0 < self.max_kv_usage <= 1.0:
            raise ValueError(f"max_kv_usage must be in (0, 1], got {self.max_kv_usage}")
        if self.max_queued_tokens is not None and self.max_queued_tokens < 1:
            raise ValueError(f"max_queued_tokens must be >= 1, got {self.max_queued_tokens}")
        if self.max_queue_wait_s is not None and self.max_queue_wait_s <= 0:
            raise ValueError(f"max_queue_wait_s must be > 0, got {self.max_queue_wait_s}")
        if not self.retry_after_s >= 0:
            raise ValueError(f"retry_after_s must be >= 0, got {self.retry_after_s}")

    def updated(self, values: dict[str, Any]) -> AdmissionConfig:
        """A copy with `values` (JSON from the admin API) applied and checked; ValueError names the field."""
        known = {f.name: f.type for f in fields(self)}
        for name, value in values.items():
            if name not in known:
                raise ValueError(f"unknown admission field {name!r} (known: {', '.join(known)})")
            ok = value is None and "None" in str(known[name]) or (
                isinstance(value, bool) if name == "enabled" else
                isinstance(value, (int, float)) and not isinstance(value, bool))
            if not ok:
                raise ValueError(f"admission field {name!r} got {value!r}")
        new = replace(self, **values)
        new.check()
        return new


@dataclass(frozen=True)
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    disagg: DisaggConfig = field(default_factory=DisaggConfig)  # PD role, backend, bootstrap
    host: str = "127.0.0.1"
    port: int = DEFAULT_SERVER_PORT
    api_key: str | None = None  # protects every route but /health and /metrics
    served_model_name: str | None = None  # default: the model folder's name
    served_model_aliases: tuple[str, ...] = ()  # more names requests may use (--served-model-name a b c)
    generation_config: str = "auto"  # sampling defaults: "auto" (the model's generation_config.json),
    # "none" (pdserve's own), or a folder holding a generation_config.json
    max_body_bytes: int = 8 * 1024 * 1024  # larger request bodies get 413
    max_n: int = 16  # cap on `n` (choices per prompt)
    max_prompts: int = 64  # cap on prompts in one batched request
    max_tokens_cap: int | None = None  # cap on max_tokens; None = the engine's max_model_len
    max_stop: int = 16  # cap on stop strings / stop token ids
    completion_default_max_tokens: int = 16  # OpenAI's default for /v1/completions
    generate_default_max_tokens: int = 128  # SGLang's default for /generate
    engine_start_timeout_s: float = 900.0  # model load (first run converts the bundled GGUF)
    control_timeout_s: float = 30.0  # /get_load, /flush_cache round trips to the engine
    health_generate_timeout_s: float = 30.0
    shutdown_timeout_s: float = 10.0  # per stage: draining connections, stopping the engine
    tool_call_parser: str | None = None  # tool_choice "auto" (server/tool_parsers.py); None: the model family's
    cors: CorsConfig = field(default_factory=CorsConfig)  # browser pages on other origins (vLLM's defaults)
    responses_kept: int = 1000  # /v1/responses stored for previous_response_id and GET (oldest dropped first)
    log_level: str = "info"
    access_log: bool = False
    log_requests: bool = False  # one log line per finished request
    metrics_prefix: str = "sglang"  # /metrics names are "<prefix>:<name>" (SGLang's names)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)  # at start; POST /admission changes it
    enable_trace: bool = False  # OpenTelemetry spans per request (pdserve/tracing)
    otlp_traces_endpoint: str = "localhost:4317"  # http://... : OTLP HTTP/protobuf; host:port: OTLP gRPC
    discovery: DiscoveryConfig | None = None  # --discovery: register in etcd once ready (server/registration.py)
    advertise_host: str | None = None  # the host routers reach (default --host, or this machine's name)
