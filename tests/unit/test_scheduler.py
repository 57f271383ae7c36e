"""Scheduler without a model: budgets, chunking, admission headroom and preemption."""

from __future__ import annotations

from pdserve.engine.kv_manager import KVManager
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler


def make(rid: str, n: int, new: int = 4) -> Request:
    return Request(rid=rid, prompt_len=n, params=SamplingParams(max_new_tokens=new), tokens=list(range(100, 100 + n)))


def run_forward(s: Scheduler) -> list[tuple[str, int, int]]:
    """Schedule one forward and apply it as the engine would (sampling a dummy token)."""
    batch = s.schedule()
    assert batch is not None
    plan = [(c.req.rid, c.start, c.length) for c in batch.chunks]
    for c in batch.chunks:
        c.req.num_computed = c.end
        if c.samples:
            c.req.tokens.append(7)
    return plan


def test_chunked_prefill_respects_budget_and_decodes_first() -> None:
    kv = KVManager(num_pages=64, page_size=4, enable_prefix_cache=False)
    s = Scheduler(kv, chunk_budget=8, max_running=8, decode_headroom=0.0)
    s.add(make("a", 6))
    s.add(make("b", 10))
    assert run_forward(s) == [("a", 0, 6), ("b", 0, 2)]
    # a decodes (1 token) before b continues its prefill with the rest of the budget
    assert run_forward(s) == [("a", 6, 1), ("b", 2, 7)]
    assert run_forward(s) == [("a", 7, 1), ("b", 9, 1)]  # b's last prompt token samples
    assert s.running[1].num_output == 1
    kv.check_integrity(s.live())


def test_max_running_caps_admission() -> None:
    kv = KVManager(num_pages=64, page_size=4, enable_prefix_cache=False)
    s = Scheduler(kv, chunk_budget=100, max_running=2, decode_headroom=0.0)
    for i in range(3):
        s.add(make(f"r{i}", 4))
    assert [p[0] for p in run_forward(s)] == ["r0", "r1"]
    assert len(s.waiting) == 1


def test_admission_keeps_decode_headroom() -> None:
    kv = KVManager(num_pages=9, page_size=4, enable_prefix_cache=False)  # 8 usable pages
    s = Scheduler(kv, chunk_budget=100, max_running=8, decode_headroom=1.0)
    s.add(make("a", 8, new=20))  # needs 2 pages now, 5 more for its decode
    s.add(make("b", 8, new=20))
    assert [p[0] for p in run_forward(s)] == ["a"]  # b's 2 pages + a's 5 of headroom > 6 free
    assert len(s.waiting) == 1


def test_preemption_under_memory_pressure_recomputes() -> None:
    kv = KVManager(num_pages=5, page_size=2, enable_prefix_cache=True)  # 4 usable pages = 8 tokens
    s = Scheduler(kv, chunk_budget=16, max_running=4, decode_headroom=0.0)
    a, b = make("a", 3, new=5), make("b", 3, new=8)  # a alone fills the pool at its end
    s.add(a)
    s.add(b)
    run_forward(s)  # both prefill: 2 pages each, pool full
    assert kv.allocator.num_free == 0
    assert run_forward(s) == [("a", 3, 1), ("b", 3, 1)]  # 4 tokens each still fit 2 pages
    plan = run_forward(s)  # a needs a 3rd page for its 5th token: b (newest) is preempted
    assert plan == [("a", 4, 1)]
    assert s.num_preemptions == 1 and s.waiting.peek() is b and b.num_computed == 0
    kv.check_integrity(s.live())
    while a in s.running and a.num_output < 5:
        run_forward(s)
        if a.num_output >= 5:
            s.finish(a)
    kv.check_integrity(s.live())
    plan = run_forward(s)  # b comes back, hitting its own cached first page
    assert plan[0][0] == "b" and plan[0][1] > 0


def prio(rid: str, n: int, priority: int, arrival: int, new: int = 4) -> Request:
    r = make(rid, n, new)
    r.priority, r.arrival = priority, arrival
    return r


def test_priority_orders_admission_fcfs_within_a_priority() -> None:
    kv = KVManager(num_pages=64, page_size=4, enable_prefix_cache=False)
    s = Scheduler(kv, chunk_budget=100, max_running=2, decode_headroom=0.0, by_priority=True)
    for rid, p, t in (("low0", 5, 1), ("high0", 0, 2), ("low1", 5, 3), ("high1", 0, 4)):
        s.add(prio(rid, 4, p, t))
    assert [p[0] for p in run_forward(s)] == ["high0", "high1"]
    assert [r.rid for r in s.waiting] == ["low0", "low1"]


def test_priority_off_is_fcfs() -> None:
    kv = KVManager(num_pages=64, page_size=4, enable_prefix_cache=False)
    s = Scheduler(kv, chunk_budget=100, max_running=2, decode_headroom=0.0)
    for rid, p, t in (("low0", 5, 1), ("high0", 0, 2), ("low1", 5, 3)):
        s.add(prio(rid, 4, p, t))
    assert [p[0] for p in run_forward(s)] == ["low0", "high0"]


def test_a_more_important_request_preempts_the_least_important_running() -> None:
    kv = KVManager(num_pages=64, page_size=4, enable_prefix_cache=True)
    s = Scheduler(kv, chunk_budget=100, max_running=2, decode_headroom=0.0, by_priority=True)
    low_old, low_new = prio("low_old", 4, 5, 1, new=50), prio("low_new", 4, 5, 2, new=50)
    s.add(low_old)
    s.add(low_new)
    run_forward(s)
    run_forward(s)  # both decoding; the batch is full
    high = prio("high", 6, 0, 3)
    s.add(high)
    plan = run_forward(s)
    assert plan[0][0] == "high" and plan[0][1] + plan[0][2] == 6  # first in the batch (its prefix cached)
    assert [r.rid for r in s.running] == ["high", "low_old"]  # the newest of the lowest priority went
    assert s.num_preemptions == 1 and low_new.num_computed == 0 and s.waiting.peek() is low_new
    same = prio("same", 4, 5, 4)
    s.add(same)  # a request of the running ones' priority never preempts
    run_forward(s)
    assert s.num_preemptions == 1 and [r.rid for r in s.waiting] == ["low_new", "same"]
    kv.check_integrity(s.live())
    while s.has_work():  # the preempted request still completes
        for r in list(s.running):
            if r.num_output >= r.params.max_new_tokens:
                s.finish(r)
        if s.has_work():
            run_forward(s)
    assert low_new.num_output >= 50
    kv.check_integrity(s.live())


def test_step_model_fits_a_line_and_predicts_queue_time() -> None:
    from pdserve.engine.stats import StepModel, prefill_seconds

    m = StepModel()
    assert m.line() == (0.0, 0.0)
    for tokens in (1, 64, 128, 1, 32, 128, 8):
        m.add(tokens, 0.02 + 0.001 * tokens)
    a, b = m.line()
    assert abs(a - 0.02) < 1e-6 and abs(b - 0.001) < 1e-8
    # 300 prompt tokens, 128 a step with 8 decode rows: 120 + 120 + 60 → two full steps and one of 68
    assert abs(prefill_seconds(300, 128, 8, a, b) - (2 * (0.02 + 0.128) + 0.02 + 0.068)) < 1e-9
    assert prefill_seconds(0, 128, 8, a, b) == 0.0
