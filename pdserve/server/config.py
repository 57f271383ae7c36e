"""Frozen configuration of the HTTP front (`pdserve serve`); the engine's knobs live in EngineConfig.

Built once by `serve.run_serve` from CLI flags (and the API-key variable, contract.API_KEY_ENV), then read by the
app, the engine client and the request handlers for the life of the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.contract import DEFAULT_SERVER_PORT
from pdserve.disagg.config import DisaggConfig
from pdserve.discovery import DiscoveryConfig
from pdserve.engine.config import EngineConfig
from pdserve.flags.cors import CorsConfig


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
    discovery: DiscoveryConfig | None = None  # --discovery: register in etcd once ready (server/registration.py)
    advertise_host: str | None = None  # the host routers reach (default --host, or this machine's name)
