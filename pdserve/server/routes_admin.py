"""Health, info, load, abort, cache and metrics endpoints (SGLang-compatible shapes).

Stateless handlers over `ServerState` (`/admission` reads and changes admission control's
thresholds at runtime, API-key protected like every route but /health and /metrics):
`/health` is cheap (engine process alive, and 503 while the server drains or switches roles:
server/elastic.py),
`/health_generate` runs one 1-token generation, `/get_load`, `/flush_cache` and
`/kv_events/snapshot` are control round trips to the engine process, `/metrics` refreshes the engine gauges then renders
Prometheus text. `/server_info` never shows the API key.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from pdserve.contract import DRAINING, SERVER_INFO_PATHS, ServerInfo, encode_server_info
from pdserve.engine.messages import GenerateReq, LoadInfo
from pdserve.engine.sampling_params import SamplingParams
from pdserve.server.dp_client import DPLoadResp
from pdserve.server.engine_client import EngineDeadError
from pdserve.server.errors import APIError
from pdserve.server.handler import Route, json_response, read_body
from pdserve.server.params import decode_json_object
from pdserve.server.protocol import AbortRequest
from pdserve.server.state import ServerState, get_state
from pdserve.server.tier_metrics import tier_figures

router = APIRouter()

VERSION = "0.1.0"
_ABORT = Route(None, AbortRequest)


def unavailable(exc: BaseException) -> APIError:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return APIError(503, "the engine did not answer in time", code="engine_timeout")
    return APIError(503, f"the engine is unavailable: {exc}", code="engine_unavailable")


@router.get("/health")
async def health(request: Request) -> Response:
    state = get_state(request)
    if not state.client.alive or state.client.closing:
        raise APIError(503, state.client.dead_reason or "the server is shutting down", code="unhealthy")
    elastic = request.app.state.elastic
    if not elastic.serving:
        raise APIError(503, f"the server is {elastic.phase}", code=DRAINING)
    return Response(status_code=200)


@router.get("/health_generate")
async def health_generate(request: Request) -> Response:
    state = get_state(request)
    ids = [state.tokenizer.bos_token_id if state.tokenizer.bos_token_id is not None else 0]
    req = GenerateReq(rid=f"health-{uuid.uuid4().hex}", input_ids=ids,
                      params=SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True))

    async def run() -> None:
        it = state.client.generate(req)
        async with contextlib.aclosing(it):
            async for out in it:
                if out.error:
                    raise APIError(503, f"health generation failed: {out.error}", code="unhealthy")

    try:
        await asyncio.wait_for(run(), state.config.health_generate_timeout_s)
    except (asyncio.TimeoutError, EngineDeadError) as exc:
        raise unavailable(exc) from None
    return Response(status_code=200)


def _server_info(state: ServerState, draining: bool = False) -> dict[str, Any]:
    """The contract's ServerInfo (what a router reads) with this server's own keys beside it."""
    cfg = state.config
    server = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("engine", "api_key", "disagg")}
    pd, layout = cfg.disagg, cfg.engine.parallel
    shared = ServerInfo(
        disaggregation_mode=pd.mode, disaggregation_transfer_backend=pd.backend,
        disaggregation_bootstrap_port=pd.bootstrap_port, disaggregation_failure_policy=pd.failure_policy,
        disaggregation_decode_enable_radix_cache=pd.decode_enable_radix_cache,
        kv_events_endpoint=state.info.kv_events_endpoint, max_model_len=state.max_model_len,
        tp_size=layout.tp_size, dp_size=layout.dp_size, enable_dp_attention=layout.enable_dp_attention,
        load_balance_method=layout.load_balance_method, epoch=pd.epoch, draining=draining,
        hicache_storage=state.hicache_storage)
    return encode_server_info(shared, {
        "version": VERSION,
        "model_path": state.info.model_path,
        "served_model_name": state.model_name,
        "disaggregation": {k: v for k, v in dataclasses.asdict(pd).items() if k != "cluster_token"},
        "api_key_required": cfg.api_key is not None,
        "context_length": state.max_model_len,
        "max_total_num_tokens": state.info.num_pages * state.info.page_size,
        "num_pages": state.info.num_pages,
        "page_size": state.info.page_size,
        "max_running_requests": state.info.max_running,
        "device": state.info.device,
        **_model_kind(state),
        "engine_pid": state.info.pid,
        "uptime_s": round(time.time() - state.started, 3),
        **server,
        "engine": dataclasses.asdict(cfg.engine),
    })


def _model_kind(state: ServerState) -> dict[str, Any]:
    """What /server_info says of the model's attention and experts, and how the experts are placed."""
    mc = state.info.model_config
    return {"attention_kind": mc.get("attention_kind"), "kv_bytes_per_token": mc.get("kv_bytes_per_token"),
            "num_experts": mc.get("moe.num_experts", 0), "num_experts_per_tok": mc.get("moe.top_k", 0),
            "ep_size": state.config.engine.parallel.ep_ranks if "moe.num_experts" in mc else 1}


@router.get(SERVER_INFO_PATHS[0])
@router.get(SERVER_INFO_PATHS[1])
async def server_info(request: Request) -> Response:
    return json_response(_server_info(get_state(request), not request.app.state.elastic.serving))


@router.get("/model_info")
@router.get("/get_model_info")
async def model_info(request: Request) -> Response:
    state = get_state(request)
    mc = state.info.model_config
    return json_response({
        "model_path": state.info.model_path,
        "tokenizer_path": state.info.model_path,
        "served_model_name": state.model_name,
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": "default",
        "has_image_understanding": False,
        "has_audio_understanding": False,
        "model_type": "llama",
        "architectures": [mc.get("architecture") or "LlamaForCausalLM"],
        "context_length": state.max_model_len,
        "max_model_len": state.max_model_len,
        "vocab_size": state.vocab_size,
        "model_config": mc,
    })


def model_card(state: ServerState, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(state.started), "owned_by": "pdserve",
            "root": state.info.model_path, "parent": None, "max_model_len": state.max_model_len}


@router.get("/v1/models")
async def models(request: Request) -> Response:
    state = get_state(request)
    names = [state.model_name, *state.config.served_model_aliases]
    return json_response({"object": "list", "data": [model_card(state, n) for n in names]})


def _rank_load(x: LoadInfo) -> dict[str, Any]:
    """One dp rank's figures in /get_load (`step_trace`: [start, seconds, tokens, idle] rows)."""
    out: dict[str, Any] = {
        "dp_rank": x.dp_rank, "pid": x.pid, "num_running_reqs": x.num_running, "num_waiting_reqs": x.num_waiting,
        "kv_usage": x.kv_usage, "steps": x.steps, "idle_steps": x.idle_steps,
        "mean_step_ms": x.step_seconds / x.steps * 1000.0 if x.steps else 0.0,
    }
    if x.transfer is not None:
        out["kv_transfers"] = {"success": x.transfer.success, "failed": x.transfer.failed, "bytes": x.transfer.bytes}
    if x.step_trace is not None:
        out["step_trace"] = [[s.start, s.seconds, s.tokens, s.idle] for s in x.step_trace]
    return out


async def load_figures(state: ServerState, step_trace: bool = False) -> dict[str, Any]:
    try:
        resp = await state.client.get_load(state.config.control_timeout_s, step_trace)
    except (asyncio.TimeoutError, EngineDeadError) as exc:
        raise unavailable(exc) from None
    load = resp.load
    ranks = resp.ranks if isinstance(resp, DPLoadResp) else [load]
    state.metrics.set_load(load, state.client.num_in_flight, ranks)
    return {
        "num_running_reqs": load.num_running,
        "num_waiting_reqs": load.num_waiting,
        "num_reqs": load.num_running + load.num_waiting,
        "load": load.num_running + load.num_waiting,
        "num_in_flight": state.client.num_in_flight,
        "num_pages": load.num_pages,
        "free_pages": load.free_pages,
        "cached_pages": load.cached_pages,
        "evictable_pages": load.evictable_pages,
        "used_pages": load.num_pages - load.free_pages - load.cached_pages,
        "page_size": load.page_size,
        "kv_usage": load.kv_usage,
        "integrity_errors": resp.integrity_errors,
        "dp_size": len(ranks),
        "dp_ranks": [_rank_load(x) for x in ranks],
        "admission": state.admission.figures(state.client.brief),  # what admission control sees
        **({"kv_tiers": tier_figures(load.tiers, load)} if load.tiers is not None else {}),
        **({} if load.experts is None else {"expert_load": {  # routed (token, expert) pairs since start
            "experts": load.experts.experts, "ep_ranks": load.experts.ep_ranks, "layers": load.experts.layers}}),
    }


@router.get("/get_load")
async def get_load(request: Request) -> Response:
    """The server's load; `dp_ranks` has each data-parallel rank's (`?step_trace=1`: its last steps)."""
    trace = request.query_params.get("step_trace", "0") not in ("0", "false", "")
    return json_response(await load_figures(get_state(request), trace))


@router.get("/admission")
async def admission(request: Request) -> Response:
    """Admission control's thresholds, what it sees now and its refusals by reason."""
    state = get_state(request)
    adm = state.admission
    return json_response({**dataclasses.asdict(adm.config), **adm.figures(state.client.brief),
                          "rejected": dict(adm.rejected)})


@router.post("/admission")
async def set_admission(request: Request) -> Response:
    """Change admission control at runtime: a JSON object of AdmissionConfig fields (400 naming a bad one)."""
    state = get_state(request)
    data = decode_json_object(await request.body())
    try:
        state.admission.config = state.admission.config.updated(data)
    except (ValueError, TypeError) as exc:
        raise APIError(400, str(exc), param="admission") from None
    return await admission(request)


@router.post("/abort_request")
async def abort_request(request: Request) -> Response:
    state, body = await read_body(request, _ABORT)
    try:
        if body.abort_all:
            aborted = state.client.in_flight()
            for rid in aborted:
                state.client.abort(rid)
        elif body.rid:
            aborted = state.client.abort(body.rid)
        else:
            raise APIError(400, "send 'rid' or 'abort_all': true", param="rid")
    except EngineDeadError as exc:
        raise unavailable(exc) from None
    return json_response({"success": True, "aborted": aborted})


@router.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache(request: Request) -> Response:
    state = get_state(request)
    try:
        ok = await state.client.flush_cache(state.config.control_timeout_s)
    except (asyncio.TimeoutError, EngineDeadError) as exc:
        raise unavailable(exc) from None
    if not ok:
        raise APIError(400, "cache not flushed: requests are still running; retry when idle", code="flush_failed")
    return json_response({"success": True, "message": "cache flushed"})


@router.get("/kv_events/snapshot")
async def kv_events_snapshot(request: Request) -> Response:
    """Every cached page (hash, parent hash, tokens) and the KV-event seq it is current at: what
    a subscriber resyncs from, and the cache's debug dump (pdserve/kv_events)."""
    state = get_state(request)
    try:
        resp = await state.client.kv_snapshot(state.config.control_timeout_s)
    except (asyncio.TimeoutError, EngineDeadError) as exc:
        raise unavailable(exc) from None
    if resp.snapshot is None:
        raise APIError(404, "KV events are off on this server (start it with --kv-events-config)",
                       code="kv_events_off")
    return json_response(resp.snapshot)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = get_state(request)
    with contextlib.suppress(APIError):
        await load_figures(state)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
