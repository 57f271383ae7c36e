"""Tensor-parallel overhead on this machine, in one run:

1. per decode step, the time rank 0 spends in collectives (all-reduce + logit gather, which
   includes waiting for the slowest rank) and its share of the step, plus the step-plan
   broadcast, for tp 1, 2 and 3. The bundled model (9 heads) cannot split in 2, so the steps
   run on a random Llama of the bundled model's depth whose heads divide by 1, 2 and 3 (30
   layers, hidden 768, 12 heads, 6 KV heads, intermediate 1536, vocab 49152; about 1.6x the
   bundled model's weights), and on the bundled model itself for tp 1 and 3;
2. KV transfer GB/s of a room with heterogeneous TP (prefill tp != decode tp: (1, 3), (3, 1))
   against homogeneous TP ((1, 1), (3, 3)) for the same bytes: the bundled model's KV (30 layers,
   3 KV heads, head dim 64, fp32, page 16), every rank's transfer manager in this process
   (tests/tp_rank_pools.py), median of --reps rooms of --pages random pages. Target: each
   heterogeneous pair >= 80% of the faster homogeneous one.

    python benchmarks/tp_overhead.py [--batch 1 16] [--tokens 32] [--pages 128] [--reps 7]
                                     [--backends tcp shm] [--skip-steps] [--skip-transfer]

A 2-core box gains no speed from TP (2 or 3 ranks share 2 cores); what part 1 shows is the cost
of the collectives, which a machine with a core (or a GPU) per rank keeps and a single rank does
not pay. One run; compare only within it.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from pdserve import LLM, SamplingParams  # noqa: E402
from pdserve.model.bundled import resolve_model  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
HETERO_TARGET = 0.80


def divisible_model(out: Path) -> Path:
    """A random Llama of the bundled model's depth whose heads divide by 1, 2 and 3."""
    import transformers

    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=768, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=12, num_key_value_heads=6, max_position_embeddings=2048,
                                   tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0,
                                   bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    bundled = resolve_model("default")
    for name in TOKENIZER_FILES:
        if (bundled / name).exists():
            shutil.copy(bundled / name, out / name)
    return out


def step_costs(model: str, tp: int, batch: int, tokens: int) -> dict[str, float]:
    with LLM(model, kv_cache_gb=0.25, tp_size=tp) as llm:
        spent = {"coll": 0.0, "plan": 0.0}
        if llm.engine.ranks is not None:
            group = llm.engine.ranks.group
            for name, key in (("all_reduce", "coll"), ("gather_vocab", "coll"), ("send_bytes", "plan")):
                inner = getattr(group, name)

                def timed(x, _inner=inner, _key=key):  # instance attribute: the layers call it
                    t = time.perf_counter()
                    out = _inner(x)
                    spent[_key] += time.perf_counter() - t
                    return out
                setattr(group, name, timed)
        prompts = [llm.tokenizer.encode(f"Story {i}: once upon a time") for i in range(batch)]
        greedy = dict(temperature=0.0, ignore_eos=True)
        llm.generate(prompts, SamplingParams(max_new_tokens=2, **greedy), use_tqdm=False)  # warm-up
        llm.engine.flush_cache()
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_new_tokens=1, **greedy), use_tqdm=False)  # prefill only
        prefill = time.perf_counter() - t
        llm.engine.flush_cache()
        spent.update(coll=0.0, plan=0.0)
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_new_tokens=tokens, **greedy), use_tqdm=False)
        total = time.perf_counter() - t
    steps = tokens - 1
    return {"step_ms": (total - prefill) / steps * 1e3, "coll_ms": spent["coll"] / (steps + 1) * 1e3,
            "plan_ms": spent["plan"] / (steps + 1) * 1e3}


def print_steps(args: argparse.Namespace) -> None:
    work = Path(tempfile.gettempdir()) / "pdserve-tp-bench-model"
    models = [("random 768/12h/6kv", str(divisible_model(work)), (1, 2, 3)), ("bundled 576/9h/3kv", "default", (1, 3))]
    print(f"{'model':<20} {'tp':>3} {'batch':>6} {'step ms':>9} {'collectives ms':>15} {'share':>6} "
          f"{'plan bcast ms':>14}")
    for label, model, sizes in models:
        for batch in args.batch:
            for tp in sizes:
                r = step_costs(model, tp, batch, args.tokens)
                share = r["coll_ms"] / r["step_ms"] if r["step_ms"] > 0 else 0.0
                print(f"{label:<20} {tp:>3} {batch:>6} {r['step_ms']:>9.1f} {r['coll_ms']:>15.1f} {share:>6.0%} "
                      f"{r['plan_ms']:>14.2f}", flush=True)


def room_seconds(backend: str, P: int, D: int, pages: int, reps: int) -> tuple[float, int]:
    """Median seconds of one room from P prefill ranks to D decode ranks, and its bytes."""
    from pdserve.disagg.transfer.backends.shm_pool import sweep_stale_pools
    from tests.tp_rank_pools import Shape, managers, move_room, rank_pools

    total = 3  # the bundled model's KV heads
    shape = Shape(layers=30, pages=pages * 2 + 1, page_size=16, head_dim=64)
    src = rank_pools(shape, total, P, backend, "prefill", seed=1)
    dst = rank_pools(shape, total, D, backend, "decode", seed=0)
    pre = managers(src, shape.page_size, total, backend, "prefill")
    dec = managers(dst, shape.page_size, total, backend, "decode")
    rng = random.Random(3)
    times = []
    try:
        for rep in range(reps + 1):  # the first room warms the sessions up
            src_pages, dst_pages = rng.sample(range(shape.pages), pages), rng.sample(range(shape.pages), pages)
            t = time.perf_counter()
            move_room(pre, dec, total, src_pages, dst_pages)
            if rep:
                times.append(time.perf_counter() - t)
    finally:
        for m in pre + dec:
            m.close()
        sweep_stale_pools()
    page_bytes = 2 * shape.layers * shape.page_size * total * shape.head_dim * 4  # K and V, every head
    return statistics.median(times), pages * page_bytes


def print_transfers(args: argparse.Namespace) -> list[str]:
    print(f"\n{'backend':<8} {'(P, D)':>7} {'MB':>7} {'ms':>8} {'GB/s':>7} {'vs best homogeneous':>20}")
    missed = []
    for backend in args.backends:
        rates: dict[tuple[int, int], float] = {}
        for P, D in ((1, 1), (3, 3), (1, 3), (3, 1)):
            sec, nbytes = room_seconds(backend, P, D, args.pages, args.reps)
            rates[(P, D)] = nbytes / sec / 1e9
            homo = max(rates.get((1, 1), 0.0), rates.get((3, 3), 0.0))
            ratio = f"{rates[(P, D)] / homo:.0%}" if P != D else "-"
            if P != D and rates[(P, D)] / homo < HETERO_TARGET:
                missed.append(f"{backend} ({P}, {D}) {rates[(P, D)] / homo:.0%}")
            print(f"{backend:<8} {str((P, D)):>7} {nbytes / 1e6:>7.1f} {sec * 1e3:>8.1f} {rates[(P, D)]:>7.2f} "
                  f"{ratio:>20}", flush=True)
    return missed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--pages", type=int, default=128, help="pages per room (the bundled model: 0.74 MB each)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--backends", nargs="+", default=["tcp", "shm"], choices=["tcp", "shm", "nixl", "mooncake"])
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--skip-transfer", action="store_true")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    if not args.skip_steps:
        print_steps(args)
    if not args.skip_transfer:
        missed = print_transfers(args)
        print(f"heterogeneous >= {HETERO_TARGET:.0%} of homogeneous: "
              + ("met" if not missed else "MISSED for " + ", ".join(missed)))


if __name__ == "__main__":
    main()
