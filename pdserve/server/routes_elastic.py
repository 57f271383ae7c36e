"""`POST /drain`, `GET /drain`, `POST /switch_role`: a server leaves, or changes role, without failing a request.

API-key protected like every route but /health and /metrics (middleware.py). The work is
server/elastic.py's; these handlers read the body and answer its report:

    POST /drain        {"timeout_s": 300}              -> 200 {"status": "drained", "seconds", "deregister_s",
                                                              "in_flight": 0, "used_pages": 0, "role", "epoch"}
                                                          504 still draining after timeout_s (POST again)
    GET  /drain                                        -> 200 {"phase", "in_flight", "role", "epoch", "last"}
    POST /switch_role  {"role": "prefill"|"decode",    -> 200 once it serves in the new role: {"role", "epoch",
                        "bootstrap_port": N?,               "switched", "seconds", "drain_s", "swap_s",
                        "timeout_s": 300}                   "register_s", ...}; 400 bad role or a server that
                                                            cannot switch (unified, tp/dp > 1, shm)
"""

from __future__ import annotations

import msgspec
from typing import TypeVar

from fastapi import APIRouter, Request
from starlette.responses import Response

from pdserve.server.elastic import Elastic
from pdserve.server.errors import APIError
from pdserve.server.handler import json_response
from pdserve.server.params import decode_json_object
from pdserve.server.state import get_state

router = APIRouter()
DEFAULT_TIMEOUT_S = 300.0


class DrainBody(msgspec.Struct, forbid_unknown_fields=True):
    timeout_s: float = DEFAULT_TIMEOUT_S


class SwitchBody(msgspec.Struct, forbid_unknown_fields=True):
    role: str
    bootstrap_port: int | None = None  # a switch to prefill: its bootstrap server's port (default: the server's)
    timeout_s: float = DEFAULT_TIMEOUT_S


S = TypeVar("S", DrainBody, SwitchBody)


def _body(raw: bytes, kind: type[S]) -> S:
    data = decode_json_object(raw if raw.strip() else b"{}")
    try:
        body = msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        raise APIError(400, f"bad body: {exc}", param=str(exc).rpartition("$.")[2].rstrip("`") or None) from None
    if not 0 < body.timeout_s <= 3600:
        raise APIError(400, "timeout_s must be in (0, 3600]", param="timeout_s")
    port = getattr(body, "bootstrap_port", None)
    if port is not None and not 0 < port < 65536:
        raise APIError(400, "bootstrap_port must be in 1..65535", param="bootstrap_port")
    return body


def _elastic(request: Request) -> Elastic:
    return request.app.state.elastic


@router.post("/drain")
async def drain(request: Request) -> Response:
    state = get_state(request)
    body = _body(await request.body(), DrainBody)
    return json_response(await _elastic(request).drain(state, body.timeout_s))


@router.get("/drain")
async def drain_status(request: Request) -> Response:
    state = get_state(request)
    el = _elastic(request)
    return json_response({"phase": el.phase, "in_flight": state.client.num_in_flight,
                          "role": state.config.disagg.mode, "epoch": state.config.disagg.epoch, "last": el.last})


@router.post("/switch_role")
async def switch_role(request: Request) -> Response:
    state = get_state(request)
    body = _body(await request.body(), SwitchBody)
    return json_response(await _elastic(request).switch(state, body.role, body.timeout_s, body.bootstrap_port))
