"""Mid-stream migration: a stream whose worker dies after tokens were sent continues on another.

Per streaming request that can migrate (`migratable`: a body for one sequence, n = 1, no
logprobs, and `--migration-limit` > 0), the router asks the worker for the token ids of every
event (`pdserve_stream_ids`: the worker puts `: pdserve-ids 5,6` SSE comment lines in front of
the event they belong to; clients would ignore them, the router strips them anyway) and relays
the stream through a `StreamTracker`:

    upstream bytes ──▶ re-framed on blank lines ──▶ ids comments taken out, counted as
                       delivered once their event is handed to the client ──▶ client

When the stream breaks (connection lost, the worker killed) before its `[DONE]`, `migrate`
re-issues the original body to another routable worker of the role — a decode serves it with a
local prefill, as it does any request without bootstrap fields — with `pdserve_resume_ids` = the
ids already delivered: that worker prefills prompt + delivered ids, counts them as output (so
max_tokens, stop checks and usage see every token once), sends no role delta or echo again, and
continues the same client stream from the next token. Up to `migration_limit` times, each on a
worker not tried yet; when none is left, the client gets the usual SSE error event. A
non-streaming PD request moves the same way (`progress_tracked`, router/whole.py): the decode
streams its progress to the router, which answers the client once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from pdserve.contract import BOOTSTRAP_KEYS, CREATED, IDS_COMMENT, RESPONSE_ID, RESUME_IDS, STREAM_IDS, TTFT_DEADLINE
from pdserve.router.http.client import UpstreamError, UpstreamPool
from pdserve.router.policies import Policy
from pdserve.router.request import RequestCtx
from pdserve.router.workers import Worker, WorkerRegistry

logger = logging.getLogger("pdserve.router")
_enc = msgspec.json.Encoder()


def migratable(body: dict[str, Any], limit: int, route: str = "") -> bool:
    """Can this request's stream move to another worker mid-way?"""
    return body.get("stream") is True and _one_plain_sequence(body, limit, route)


def progress_tracked(body: dict[str, Any], limit: int, route: str = "") -> bool:
    """Can this non-streaming request move to another worker mid-way (router/whole.py)?"""
    return body.get("stream") is not True and _one_plain_sequence(body, limit, route)


def _one_plain_sequence(body: dict[str, Any], limit: int, route: str) -> bool:
    """One sequence (n = 1, one prompt), no logprobs nor echo, and migration on. Not /v1/responses:
    its events are items, not token deltas a resumed stream could continue, nor the chat answer
    router/whole.py assembles."""
    if limit <= 0 or route == "/v1/responses":
        return False
    n = body.get("n", 1)
    sp = body.get("sampling_params")
    if n not in (1, None) or (isinstance(sp, dict) and sp.get("n", 1) not in (1, None)):
        return False
    for key in ("prompt", "text", "input_ids"):
        value = body.get(key)
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            return False  # a batch
    return not (body.get("logprobs") or body.get("return_logprob") or body.get("echo"))


class StreamTracker:
    """Relays SSE events whole; remembers the token ids of those handed to the client."""

    def __init__(self) -> None:
        self.buf = b""
        self.ids: list[int] = []
        self.done = False  # `[DONE]` went to the client
        self.head: dict[str, Any] | None = None  # id / created of the first event, kept on migration

    def feed(self, chunk: bytes) -> bytes:
        self.buf += chunk.replace(b"\r\n", b"\n")
        *events, self.buf = self.buf.split(b"\n\n")
        return b"".join(self._event(e) for e in events)

    def flush(self) -> bytes:
        rest, self.buf = self.buf, b""
        return self._event(rest) if rest.strip() else b""

    def restart(self) -> None:
        """A new upstream: an event cut off by the broken one is dropped (its ids were never counted)."""
        self.buf = b""

    def _event(self, event: bytes) -> bytes:
        kept = []
        for line in event.split(b"\n"):
            if line.startswith(IDS_COMMENT):
                self.ids.extend(int(x) for x in line[len(IDS_COMMENT):].split(b",") if x.strip())
            elif line:
                kept.append(line)
                if line.strip() == b"data: [DONE]":
                    self.done = True
                elif self.head is None and line.startswith(b"data: {"):
                    self.head = _head(line[6:])
        return b"\n".join(kept) + b"\n\n" if kept else b""


def _head(data: bytes) -> dict[str, Any]:
    """What a resumed stream must repeat: the chunks' id and created time (OpenAI), or the
    request id of `/generate`'s meta_info."""
    try:
        obj = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return {}
    if not isinstance(obj, dict):
        return {}
    meta = obj.get("meta_info")
    if isinstance(meta, dict) and isinstance(meta.get("id"), str):
        return {"rid": meta["id"]}
    head: dict[str, Any] = {}
    if isinstance(obj.get("id"), str):
        head[RESPONSE_ID] = obj["id"]
    if isinstance(obj.get("created"), int):
        head[CREATED] = obj["created"]
    return head


def tracked_payload(body: dict[str, Any], extra: dict[str, Any] | None = None) -> bytes:
    """The worker's body: ids of each streamed event asked for."""
    return _enc.encode({**body, **(extra or {}), STREAM_IDS: True})


async def migrate(ctx: RequestCtx, body: dict[str, Any], tracker: StreamTracker, tried: set[str],
                  registry: WorkerRegistry, role: str, policy: Policy, pool: UpstreamPool, limit: int,
                  timeout: float, on_move: Callable[[Worker, float], None] | None = None,
                  write: Callable[[bytes], Awaitable[None]] | None = None) -> bool:
    """Continue the client's stream on other workers (`write`: where its bytes go, the client by
    default; router/whole.py collects a whole answer); True once it ended with `[DONE]`."""
    # a local prefill there; its first token came already: no deadline to drop it for
    resume = {k: v for k, v in body.items() if k not in BOOTSTRAP_KEYS and k != TTFT_DEADLINE}
    write = write or ctx.req.writer.write
    for _ in range(limit):
        if tracker.done:
            return True
        candidates = [w for w in registry.routable(role) if w.url not in tried]
        if not candidates:
            return False
        w = policy.select(candidates, ctx.text)
        tried.add(w.url)
        t0 = time.perf_counter()
        tracker.restart()
        payload = tracked_payload(resume, {**(tracker.head or {}), RESUME_IDS: list(tracker.ids)})
        w.in_flight += 1
        resp = None
        try:
            resp = await pool.request(w.host, w.port, "POST", ctx.req.target, w.fwd_headers + ctx.fwd_headers,
                                      payload, timeout)
            if resp.status != 200:
                w.record(resp.status < 500, f"answered {resp.status} to a migrated stream")
                logger.warning("request %s: %s answered %d to its migrated stream", ctx.rid, w.url, resp.status)
                continue
            logger.info("request %s: stream migrated to %s after %d tokens", ctx.rid, w.url, len(tracker.ids))
            first = True
            while (chunk := await resp.next_chunk()) is not None:
                if first and on_move is not None:
                    on_move(w, time.perf_counter() - t0)
                first = False
                await write(tracker.feed(chunk))
            await write(tracker.flush())
            w.record(True)
            return tracker.done
        except UpstreamError as exc:
            w.record(False, str(exc))
            logger.warning("request %s: migrated stream on %s failed: %s", ctx.rid, w.url, exc)
        finally:
            w.in_flight -= 1
            w.processed += 1
            if resp is not None:
                resp.release()
    return tracker.done
