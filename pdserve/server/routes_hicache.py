"""SGLang's runtime attach / detach of the KV tiers' storage backend (`/hicache/storage-backend`).

    GET     the backend attached now (null: none) and the tiers' use (`/get_load`'s `kv_tiers`)
    PUT     {"hicache_storage_backend": "file" | "mooncake",
             "hicache_storage_backend_extra_config_json": "{...}"}: attach (one attached before
             is detached first)
    DELETE  detach: storage reads are misses, nothing is written, host and device tiers go on
Refused with 400 (and nothing changed) unless the server is idle, nothing running or waiting
(SGLang's rule), when it has no KV tiers (--enable-hierarchical-cache) or for a config that
does not work (the engine connects before it answers). Like every route but /health and
/metrics, it needs the API key when the server has one.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict
from starlette.responses import Response

from pdserve.engine.config import HICACHE_BACKENDS
from pdserve.engine.kv_tiers.backends import storage_id
from pdserve.server.engine_client import EngineDeadError
from pdserve.server.errors import APIError
from pdserve.server.handler import Route, json_response, read_body
from pdserve.server.routes_admin import load_figures, unavailable
from pdserve.server.state import ServerState, get_state

router = APIRouter()
PATH = "/hicache/storage-backend"


class AttachStorage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    hicache_storage_backend: str
    hicache_storage_backend_extra_config_json: str | None = None


_ATTACH = Route(None, AttachStorage)


async def _answer(state: ServerState) -> Response:
    tiers = (await load_figures(state)).get("kv_tiers")
    if tiers is None:
        raise APIError(400, "this server has no KV tiers (start it with --enable-hierarchical-cache)",
                       code="hicache_off")
    return json_response({"hicache_storage_backend": tiers["storage"]["backend"], "kv_tiers": tiers})


async def _set(state: ServerState, backend: str | None, extra: str | None) -> Response:
    try:
        error = await state.client.hicache_storage(backend, extra, state.config.control_timeout_s)
    except (asyncio.TimeoutError, EngineDeadError) as exc:
        raise unavailable(exc) from None
    if error is not None:
        raise APIError(400, error, code="hicache_storage_refused")
    state.hicache_storage = storage_id(backend, extra)  # what /server_info tells routers now
    return await _answer(state)


@router.get(PATH)
async def storage_backend(request: Request) -> Response:
    return await _answer(get_state(request))


@router.put(PATH)
async def attach_storage(request: Request) -> Response:
    state, body = await read_body(request, _ATTACH)
    if body.hicache_storage_backend not in HICACHE_BACKENDS:
        raise APIError(400, f"hicache_storage_backend must be one of {', '.join(HICACHE_BACKENDS)}",
                       param="hicache_storage_backend")
    return await _set(state, body.hicache_storage_backend, body.hicache_storage_backend_extra_config_json)


@router.delete(PATH)
async def detach_storage(request: Request) -> Response:
    return await _set(get_state(request), None, None)
