"""Issue 30 without processes: the server's and the router's admission decisions, deadlines, the
router's reading of a whole answer's progress, and tracing that costs nothing when off."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pdserve.contract import PROMPT_TOKENS_HEADER
from pdserve.engine.messages import LoadBrief
from pdserve.router.admission import RouterAdmission, deadline_left_s, with_deadline_left
from pdserve.router.config import AdmissionConfig as RouterAdmissionConfig
from pdserve.router.config import HealthConfig, RouterConfig, WorkerSpec
from pdserve.router.forward import Failure
from pdserve.router.metrics import RouterMetrics
from pdserve.router.migrate import StreamTracker, progress_tracked
from pdserve.router.request import RouterError
from pdserve.router.usage import Usage
from pdserve.router.whole import final_answer
from pdserve.router.workers import WorkerRegistry, new_worker
from pdserve.server.admission import Admission
from pdserve.server.config import AdmissionConfig
from pdserve.server.errors import APIError

# 100 pages; 4 decode rows; a step costs 10 ms + 1 ms per token, 64 tokens per step
BRIEF = LoadBrief(num_pages=100, held_pages=10, decode_rows=4, chunk_budget=64, step_s=0.01, token_s=0.001)


def refusal(adm: Admission, brief: LoadBrief, prompts: list[tuple[str, int]], deadline: float | None = None) -> APIError:
    with pytest.raises(APIError) as info:
        adm.admit(brief, prompts, deadline)
    assert info.value.status == 503 and int(info.value.headers["Retry-After"]) >= 1
    return info.value


def test_server_admission_refuses_by_reason_and_counts() -> None:
    counted: list[str] = []
    adm = Admission(AdmissionConfig(enabled=True, max_queued_tokens=500, max_queue_wait_s=0.5), counted.append)
    adm.admit(BRIEF, [("a", 400)], None)  # nothing queued: admitted (a request alone is never too big)
    assert adm.queued_tokens() == 400
    assert refusal(adm, BRIEF, [("b", 200)]).code == "overloaded"  # 600 queued > 500
    adm.started("a")
    adm.admit(BRIEF, [("c", 50)], None)  # 450 queued
    adm.done("a")
    assert adm.queued_tokens() == 50
    full = LoadBrief(100, 96, 4, 64, 0.01, 0.001)
    refusal(adm, full, [("d", 10)])  # KV 96% held
    slow = LoadBrief(100, 10, 4, 64, 0.2, 0.01)  # 50 queued tokens: one step of 0.2 + 0.54 s > 0.5 s
    refusal(adm, slow, [("e", 10)])
    due = time.time() + 0.05  # its own prompt: 2 steps of 0.074 s > 50 ms
    assert refusal(adm, BRIEF, [("f", 100)], due).code == "deadline_exceeded"
    assert counted == ["queued_tokens", "kv", "queue_wait", "deadline"]
    adm.config = adm.config.updated({"enabled": False})
    adm.admit(full, [("g", 10_000)], time.time())  # off: everything goes
    with pytest.raises(ValueError):
        adm.config.updated({"max_kv_usage": 2.0})
    with pytest.raises(ValueError):
        adm.config.updated({"nonsense": 1})


def test_an_admitted_request_that_never_starts_stops_counting() -> None:
    adm = Admission(AdmissionConfig(enabled=True))
    adm.admit(BRIEF, [("gone", 300)], None)
    assert adm.queued_tokens() == 300
    rid, (n, _) = next(iter(adm._reserved.items()))
    adm._reserved[rid] = (n, time.monotonic() - 60)  # its client left before its stream began
    assert adm.queued_tokens() == 0


def test_router_admission_reads_the_workers_figures() -> None:
    reg = WorkerRegistry()
    cfg = RouterConfig(pd=True, health=HealthConfig(enabled=False))
    p1, p2, d = (new_worker(WorkerSpec(u, r), cfg) for u, r in
                 (("http://127.0.0.1:1", "prefill"), ("http://127.0.0.1:2", "prefill"), ("http://127.0.0.1:3", "decode")))
    for w in (p1, p2, d):
        reg.add(w)
    metrics = RouterMetrics()
    adm = RouterAdmission(RouterAdmissionConfig(enabled=True, max_queue_wait_s=1.0), reg, metrics, pd=True)
    p1.queue_wait_s, p2.queue_wait_s = 5.0, None  # p2 reported nothing yet: free
    adm.check(None)
    p2.queue_wait_s = 3.0
    with pytest.raises(RouterError) as info:
        adm.check(None)
    assert info.value.status == 503 and ("retry-after", "2") in info.value.headers
    p2.queue_wait_s = 0.5
    adm.check(2.0)
    with pytest.raises(RouterError) as info:
        adm.check(0.2)  # the deadline left is shorter than the shortest queue
    assert info.value.code == "deadline_exceeded"
    d.kv_held = 0.99
    with pytest.raises(RouterError):
        adm.check(None)
    adm.update({"enabled": False})
    adm.check(0.0)
    assert 'reason="admission_queue_wait"' in metrics.render([], 0, 0).decode()


def test_deadline_left_and_forwarded() -> None:
    t0 = time.perf_counter()
    assert deadline_left_s({"prompt": "x"}, t0) is None
    left = deadline_left_s({"ttft_deadline_ms": 2000}, t0 - 0.5)
    assert left is not None and 1.4 < left < 1.51
    assert with_deadline_left({"ttft_deadline_ms": 2000, "a": 1}, 1.5) == {"ttft_deadline_ms": 1500.0, "a": 1}
    with pytest.raises(RouterError) as info:
        deadline_left_s({"ttft_deadline_ms": 100}, t0 - 1.0)  # it waited past it: dropped before any prefill
    assert info.value.status == 503 and info.value.code == "deadline_exceeded"
    with pytest.raises(RouterError):
        deadline_left_s({"ttft_deadline_ms": -1}, t0)


class _Ctx:
    resp_headers = [("x-request-id", "r")]
    usage: Usage | None = None


def test_a_whole_answer_from_its_progress() -> None:
    assert progress_tracked({"prompt": "x"}, 3) and not progress_tracked({"prompt": "x", "stream": True}, 3)
    assert not progress_tracked({"prompt": "x", "n": 2}, 3) and not progress_tracked({"prompt": "x"}, 0)
    t = StreamTracker()
    kept = t.feed(b": pdserve-ids 5,6\n\n: pdserve-ids 7\n\n"
                  b'data: {"text": "abc", "usage": {"completion_tokens": 3}}\n\ndata: [DONE]\n\n')
    assert t.ids == [5, 6, 7] and t.done
    ctx = _Ctx()
    resp = final_answer(ctx, kept, {PROMPT_TOKENS_HEADER: "4"})  # type: ignore[arg-type]
    assert resp.status == 200 and resp.body == b'{"text": "abc", "usage": {"completion_tokens": 3}}'
    assert ctx.usage == Usage(4, 3)  # what the planner's metrics count for it
    failed = final_answer(_Ctx(), b': pdserve-status 503\ndata: {"error": {"message": "x"}}\n\ndata: [DONE]\n\n',
                          {})  # type: ignore[arg-type]
    assert isinstance(failed, Failure) and failed.status == 503 and failed.retryable
    cut = final_answer(_Ctx(), b"", {})  # type: ignore[arg-type]
    assert isinstance(cut, Failure) and cut.status == 502


def test_tracing_off_imports_no_sdk() -> None:
    code = ("import sys\n"
            "from pdserve.router.app import RouterApp\n"
            "from pdserve.router.config import RouterConfig\n"
            "import pdserve.server.app, pdserve.server.state\n"
            "app = RouterApp(RouterConfig())\n"
            "assert not app.tracer.enabled\n"
            "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_a_first_token_past_its_due_time_is_a_503_and_aborts_the_request() -> None:
    """The front gives up on a first token at the deadline's due time: 503 + Retry-After, and the
    engine's stream is closed (which sends the engine its AbortReq: the pages come back)."""
    import asyncio

    from pdserve.engine.messages import TokenOut
    from pdserve.server.generation import _first_by
    from pdserve.server.params import DEADLINE_SHARE, DUE_SHARE, deadline

    closed: list[str] = []

    async def engine(first_after: float) -> object:
        try:
            await asyncio.sleep(first_after)
            yield TokenOut(rid="r", token_ids=[1])
            yield TokenOut(rid="r", token_ids=[2], finish_reason="length")
        finally:
            closed.append("closed")

    async def run(first_after: float, due_in: float | None) -> list[list[int]]:
        due = None if due_in is None else time.time() + due_in
        return [o.token_ids async for o in _first_by(engine(first_after), due)]  # type: ignore[arg-type]

    assert asyncio.run(run(0.01, 1.0)) == [[1], [2]] and closed == ["closed"]
    assert asyncio.run(run(0.01, None)) == [[1], [2]]
    t0 = time.monotonic()
    with pytest.raises(APIError) as err:
        asyncio.run(run(5.0, 0.1))
    assert time.monotonic() - t0 < 2.0  # given up at the due time, not after the first token
    assert err.value.status == 503 and err.value.code == "deadline_exceeded" and err.value.headers == {"Retry-After": "1"}
    assert closed == ["closed"] * 3

    class Body:
        ttft_deadline_ms = 1000.0

    d = deadline(Body())
    assert d is not None and d.due - d.aim == pytest.approx((DUE_SHARE - DEADLINE_SHARE) * 1.0, abs=1e-3)


def test_engine_deadlines_drop_only_a_prefill_that_cannot_end_in_time() -> None:
    """engine/deadlines.py: a waiting request whose predicted prefill ends past its deadline is
    returned to abort (its reason kept once); one that still fits stays; one whose prefill began
    is forgotten (the front keeps its deadline from then on)."""
    from pdserve.engine.deadlines import Deadlines
    from pdserve.engine.request import Request
    from pdserve.engine.sampling_params import SamplingParams

    now = time.time()

    def req(rid: str, prompt: int, deadline: float) -> Request:
        return Request(rid=rid, prompt_len=prompt, params=SamplingParams(), tokens=[1] * prompt, deadline=deadline)

    late, fits, begun = req("late", 1000, now + 0.5), req("fits", 10, now + 30), req("begun", 1000, now + 0.5)
    begun.t_admitted = time.monotonic()
    d = Deadlines()
    assert not d
    for r in (late, fits, begun):
        d.add(r)
    live = {r.rid: r for r in (late, fits, begun)}
    # a step line of 10 ms + 1 ms per token: 1000 prompt tokens take ~1 s, 10 take 20 ms
    assert d.expire(live, 2048, 0, 0.010, 0.001) == ["late"]
    assert "0.51" in (d.reason("late") or "") and d.reason("late") is None and d.reason("fits") is None
    assert d  # "fits" still waits; "begun" is forgotten
    fits.t_admitted = time.monotonic()
    assert d.expire(live, 2048, 0, 0.010, 0.001) == [] and not d
