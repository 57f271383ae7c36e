"""What every request handler needs, gathered once the engine is ready (set by the app lifespan).

Created in `app.lifespan` after `EngineClient.start()` returns the engine's `EngineReady`:
the tokenizer is loaded from the model folder the engine resolved, the metrics registry is
made, and the caps are fixed. Stored in `app.state.server`; read-only afterwards, but for
`hicache_storage`, which /hicache/storage-backend changes, and `config`, which a live role switch
replaces with one of the new PD mode and epoch (server/elastic.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from pdserve.engine.kv_tiers.backends import storage_id
from pdserve.engine.messages import EngineReady
from pdserve.model.bundled import served_name
from pdserve.model.config import ModelConfig, sampling_defaults
from pdserve.model.tokenizer import Tokenizer
from pdserve.server.admission import Admission, AdmissionConfig
from pdserve.server.config import ServerConfig
from pdserve.server.dp_client import EngineHandle
from pdserve.server.errors import APIError
from pdserve.server.metrics import ServerMetrics
from pdserve.server.responses import ResponseStore
from pdserve.server.tool_parsers import family_parser
from pdserve.tracing import NoTracer, Tracer, make_tracer


@dataclass
class ServerState:
    config: ServerConfig
    client: EngineHandle
    info: EngineReady
    tokenizer: Tokenizer
    metrics: ServerMetrics
    model_name: str
    model_names: tuple[str, ...] = ()  # every name a request's `model` may use (404 otherwise)
    tool_parser: str = "hermes"  # tool_choice "auto": --tool-call-parser, else the model family's
    responses: ResponseStore = field(default_factory=lambda: ResponseStore(0))  # /v1/responses answers kept
    sampling_defaults: dict[str, Any] = field(default_factory=dict)  # from generation_config.json
    started: float = field(default_factory=time.time)
    admission: Admission = field(default_factory=lambda: Admission(AdmissionConfig()))
    tracer: Tracer = field(default_factory=NoTracer)  # OpenTelemetry spans (pdserve/tracing), off: NoTracer
    hicache_storage: str | None = None  # the KV tiers' store now attached (/server_info; storage_id)

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    @property
    def max_tokens_cap(self) -> int:
        cap = self.config.max_tokens_cap
        return min(cap, self.max_model_len) if cap else self.max_model_len

    @classmethod
    def create(cls, config: ServerConfig, client: EngineHandle, info: EngineReady) -> "ServerState":
        tokenizer = Tokenizer(info.tokenizer_path or info.model_path, config.engine.chat_template)
        name = config.served_model_name or served_name(config.engine.model, info.model_path)
        names = (name, *config.served_model_aliases)
        if not config.served_model_name:  # no explicit names: the --model argument is one too
            names += (config.engine.model, info.model_path)
        gen = {"auto": info.model_path, "none": None}.get(config.generation_config, config.generation_config)
        metrics = ServerMetrics(name, config.metrics_prefix, config.log_requests)
        role = {"null": "server"}.get(config.disagg.mode, config.disagg.mode)
        tracer = make_tracer(f"pdserve-{role}", config.otlp_traces_endpoint) if config.enable_trace else NoTracer()
        h = config.engine.hicache
        return cls(config=config, client=client, info=info, tokenizer=tokenizer, metrics=metrics, model_name=name,
                   model_names=tuple(dict.fromkeys(names)), sampling_defaults=sampling_defaults(gen) if gen else {},
                   tool_parser=config.tool_call_parser or family_parser(
                       ModelConfig.from_folder(info.model_path).architecture, tokenizer.chat_template),
                   responses=ResponseStore(config.responses_kept),
                   admission=Admission(config.admission, metrics.admission_rejected), tracer=tracer,
                   hicache_storage=storage_id(h.storage_backend, h.storage_extra) if h.enable else None)


def get_state(request: Request) -> ServerState:
    state: ServerState | None = getattr(request.app.state, "server", None)
    if state is None:
        raise APIError(503, "the server is starting up")
    return state
