"""/v1/responses through the router: the answers workers keep, and `previous_response_id`.

A worker keeps each /v1/responses answer it gave (server/responses.py); the next request of a
conversation may go to another worker (a policy's choice, or PD, where the prefill never saw
the answer). So before forwarding a request that names a `previous_response_id`, the router
finds the worker that keeps it (asking the workers that answer: decodes in PD mode, else the
regular ones, until one has it), reads its conversation (`GET /v1/responses/{id}/input_items`,
paged, oldest first) and output (`GET /v1/responses/{id}`), and sends that conversation plus
the new input as the request's `input`, with contract.PREVIOUS_RESPONSE naming the id it
replaced (the answer shows it as `previous_response_id`). Both PD legs then render the same
prompt. An id no worker keeps is a 400 `previous_response_not_found`, as OpenAI answers.

`GET` / `DELETE /v1/responses/{id}` and `GET /v1/responses/{id}/input_items` go to the worker
that keeps the id (404 when none does).
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import msgspec

from pdserve.contract import PREVIOUS_RESPONSE
from pdserve.router.config import RouterConfig
from pdserve.router.http.client import UpstreamError, UpstreamPool
from pdserve.router.http.protocol import Request, Response
from pdserve.router.request import RequestCtx, RouteFn, RouterError
from pdserve.router.workers import Worker, WorkerRegistry

PATH = "/v1/responses"
PAGE = 100  # input items per page (OpenAI's largest)
_dec = msgspec.json.Decoder()
_enc = msgspec.json.Encoder()


class Responses:
    def __init__(self, cfg: RouterConfig, registry: WorkerRegistry, pool: UpstreamPool) -> None:
        self.cfg, self.registry, self.pool = cfg, registry, pool
        self.timeout = cfg.health.timeout_s * 6

    def routes(self) -> dict[str, dict[str, RouteFn]]:
        return {PATH + "/{id}": {"GET": self.pass_through, "DELETE": self.pass_through}}

    async def _get(self, w: Worker, method: str, target: str, rid: str) -> tuple[int, bytes, str | None]:
        resp = await self.pool.request(w.host, w.port, method, target, w.fwd_headers + f"x-request-id: {rid}\r\n"
                                       .encode(), b"", self.timeout)
        try:
            return resp.status, await resp.read(), resp.content_type
        finally:
            resp.release()

    async def _holder(self, response_id: str, rid: str) -> tuple[Worker, dict[str, Any]] | None:
        """The worker that keeps `response_id`, and the response object."""
        workers = self.registry.routable("decode" if self.cfg.pd else "regular")
        target = f"{PATH}/{quote(response_id, safe='')}"

        async def ask(w: Worker) -> tuple[Worker, dict[str, Any]] | None:
            try:
                status, body, _ = await self._get(w, "GET", target, rid)
            except UpstreamError:
                return None
            return (w, _dec.decode(body)) if status == 200 else None

        found = [f for f in await asyncio.gather(*(ask(w) for w in workers)) if f is not None]
        return found[0] if found else None

    async def _items(self, w: Worker, response_id: str, rid: str) -> list[dict[str, Any]]:
        """Every input item of the response, oldest first."""
        items: list[dict[str, Any]] = []
        after = ""
        while True:
            target = f"{PATH}/{quote(response_id, safe='')}/input_items?order=asc&limit={PAGE}{after}"
            status, body, _ = await self._get(w, "GET", target, rid)
            if status != 200:
                raise RouterError(502, f"worker {w.url} answered {status} for the items of {response_id}")
            page = _dec.decode(body)
            items += page["data"]
            if not page.get("has_more") or not page["data"]:
                return items
            after = f"&after={quote(page['last_id'], safe='')}"

    async def expand(self, ctx: RequestCtx) -> None:
        """Replace the body's `previous_response_id` by the conversation it names (module docstring)."""
        body = ctx.json()
        previous = body.get("previous_response_id")
        if previous is None:
            return
        if not isinstance(previous, str):
            raise RouterError(400, "previous_response_id must be a string", param="previous_response_id")
        try:
            found = await self._holder(previous, ctx.rid)
            if found is None:
                raise RouterError(400, f"Previous response with id {previous!r} not found",
                                  code="previous_response_not_found", param="previous_response_id")
            worker, response = found
            items = await self._items(worker, previous, ctx.rid)
        except UpstreamError as exc:
            raise RouterError(502, f"reading {previous} from a worker: {exc}", code=f"worker_{exc.kind}") from None
        new = body.get("input")
        new = [{"type": "message", "role": "user", "content": new}] if isinstance(new, str) else list(new or [])
        body = {k: v for k, v in body.items() if k != "previous_response_id"}
        body.update(input=[*items, *response.get("output", []), *new], **{PREVIOUS_RESPONSE: previous})
        ctx.replace_body(body)

    async def pass_through(self, req: Request, rid: str) -> Response:
        """GET / DELETE /v1/responses/{id}[/input_items]: answered by the worker that keeps it."""
        response_id = req.path[len(PATH) + 1:].split("/")[0]
        found = await self._holder(response_id, rid)
        if found is None:
            raise RouterError(404, f"No response with id {response_id!r}", code="response_not_found",
                              param="response_id")
        try:
            status, body, ctype = await self._get(found[0], req.method, req.target, rid)
        except UpstreamError as exc:
            raise RouterError(502, f"worker {found[0].url}: {exc}", code=f"worker_{exc.kind}") from None
        return Response(body, status, ctype, [("x-request-id", rid)])
