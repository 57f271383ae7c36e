"""Tensor-parallel overhead on this machine: per decode step, the time rank 0 spends in
collectives (all-reduce + logit gather, which includes waiting for the slowest rank) and its
share of the step, for tp 1 and tp 3 on the bundled model (9 heads: tp 2 does not divide it).

    python benchmarks/tp_overhead.py [--batch 1 16] [--tokens 32]

A 2-core box gains no speed from TP (3 ranks share 2 cores); what this shows is the cost of
the collectives and of the step-plan broadcast, which a machine with a core (or a GPU) per rank
keeps and a single rank does not pay. One run; compare only within it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pdserve import LLM, SamplingParams  # noqa: E402


def measure(tp: int, batch: int, tokens: int) -> dict[str, float]:
    with LLM("default", kv_cache_gb=0.25, tp_size=tp) as llm:
        eng = llm.engine
        spent = {"coll": 0.0, "plan": 0.0}
        if eng.ranks is not None:
            group = eng.ranks.group
            for name, key in (("all_reduce", "coll"), ("gather_vocab", "coll"), ("send_bytes", "plan")):
                inner = getattr(group, name)

                def timed(x, _inner=inner, _key=key):  # instance attribute: the layers call it
                    t = time.perf_counter()
                    out = _inner(x)
                    spent[_key] += time.perf_counter() - t
                    return out
                setattr(group, name, timed)
        prompts = [llm.tokenizer.encode(f"Story {i}: once upon a time") for i in range(batch)]
        p = SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True)
        llm.generate(prompts, SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True), use_tqdm=False)
        llm.engine.flush_cache()
        short = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
        t = time.perf_counter()
        llm.generate(prompts, short, use_tqdm=False)  # prefill only: subtracted below
        prefill = time.perf_counter() - t
        llm.engine.flush_cache()
        spent.update(coll=0.0, plan=0.0)
        t = time.perf_counter()
        llm.generate(prompts, p, use_tqdm=False)
        total = time.perf_counter() - t
        steps = tokens - 1
        step = (total - prefill) / steps
        coll = spent["coll"] / (steps + 1)
        plan = spent["plan"] / (steps + 1)
    return {"step_ms": step * 1e3, "coll_ms": coll * 1e3, "plan_ms": plan * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"{'tp':>3} {'batch':>6} {'step ms':>9} {'collectives ms':>15} {'share':>6} {'plan bcast ms':>14}")
    for batch in args.batch:
        for tp in (1, 3):
            r = measure(tp, batch, args.tokens)
            share = r["coll_ms"] / r["step_ms"] if r["step_ms"] > 0 else 0.0
            print(f"{tp:>3} {batch:>6} {r['step_ms']:>9.1f} {r['coll_ms']:>15.1f} {share:>6.0%} {r['plan_ms']:>14.2f}")


if __name__ == "__main__":
    main()
