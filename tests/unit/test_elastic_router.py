"""The router's side of issue 26 without processes: token events of relayed streams (router/usage.py),
a stale_epoch answer (retried elsewhere, the worker out until its /server_info is read again), a
draining prefill (no recompute on the decode: a new pair)."""

from __future__ import annotations

import asyncio

import msgspec

from pdserve.contract import COMPLETION_TOKENS_HEADER, DRAINING, PROMPT_TOKENS_HEADER, STALE_EPOCH
from pdserve.router.config import RouterConfig, WorkerSpec
from pdserve.router.forward import Failure, note_stale
from pdserve.router.pd import recomputes
from pdserve.router.usage import StreamMeter, Usage
from pdserve.router.workers import new_worker
from pdserve.contract import ServerInfo


def _frame(obj: object) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


def test_a_chat_stream_counts_its_token_events_only() -> None:
    meter = StreamMeter({PROMPT_TOKENS_HEADER: "12"}, t0=0.0)
    role = _frame({"choices": [{"delta": {"role": "assistant", "content": ""}}]})
    meter.feed(role)
    assert meter.events == 0  # sent at once: no token, no TTFT
    meter.feed(_frame({"choices": [{"delta": {"content": " Paris"}}]}) + b": pdserve-ids 5\n"
               + _frame({"choices": [{"delta": {"content": "."}}]}))
    meter.feed(_frame({"choices": [{"delta": {"content": " It"}}]}))
    meter.feed(_frame({"choices": [{"delta": {}, "finish_reason": "stop"}]}) + _frame({"choices": [], "usage": {}})
               + b"data: [DONE]\n\n")
    usage = meter.usage()
    assert (usage.prompt_tokens, usage.output_tokens) == (12, 3)
    assert usage.ttft_s == meter.t_first > 0 and usage.itl_s == (meter.t_last - meter.t_first) / 2


def test_a_whole_answer_reads_its_counts_from_headers() -> None:
    assert Usage.whole({PROMPT_TOKENS_HEADER: "7", COMPLETION_TOKENS_HEADER: "9"}) == Usage(7, 9)
    assert Usage.whole({PROMPT_TOKENS_HEADER: "x"}) == Usage(None, None)  # a foreign worker says nothing


def test_stale_epoch_is_retried_and_takes_the_worker_out_until_its_info_is_read() -> None:
    w = new_worker(WorkerSpec("http://127.0.0.1:9", "decode"), RouterConfig(pd=True))
    w.healthy, w.info, w.epoch = True, ServerInfo(disaggregation_mode="decode", epoch=1), 1
    stale = msgspec.json.encode({"error": {"message": "stale", "code": STALE_EPOCH}})
    other = msgspec.json.encode({"error": {"message": "bad", "code": "bad_request"}})
    assert Failure.answer(409, stale, "application/json").retryable
    assert not Failure.answer(409, other, "application/json").retryable  # a client's own 409 is relayed
    note_stale(w, 409, other)
    assert w.routable()
    note_stale(w, 409, stale)
    assert w.stale and w.info is None and not w.routable()


def test_a_draining_prefill_does_not_keep_the_decode_leg() -> None:
    d = new_worker(WorkerSpec("http://127.0.0.1:9", "decode"), RouterConfig(pd=True))
    d.info = ServerInfo(disaggregation_failure_policy="recompute")

    async def answered() -> tuple[int, bytes, str]:
        return 503, b"", "application/json"

    async def run() -> tuple[bool, bool]:
        task = asyncio.ensure_future(answered())
        await task
        drain = msgspec.json.encode({"error": {"message": "draining", "code": DRAINING}})
        busy = msgspec.json.encode({"error": {"message": "engine", "code": "engine_unavailable"}})
        return (recomputes(d, task, Failure.answer(503, drain, "application/json")),
                recomputes(d, task, Failure.answer(503, busy, "application/json")))

    assert asyncio.run(run()) == (False, True)
