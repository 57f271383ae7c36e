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
