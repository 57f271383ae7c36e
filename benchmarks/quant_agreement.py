"""Issue 29: does `--quantization` keep the model's answers, and does it make decode faster?

    python benchmarks/quant_agreement.py [--quantization fp16] [--prompts 64] [--tokens 32] [--rounds 15]

1. Greedy agreement: the same prompts, greedy, `--tokens` new tokens each (EOS ignored), on an
   fp32 engine and on a quantized one; prints how many prompts give exactly the same first
   `--tokens` tokens (the issue's bar: >= 90%).
2. Decode speed, A/B in this one process: a decode step (ModelRunner.forward, no sampling) of
   batch 1 and batch 64 at 256 tokens of context, alternating fp32 / quantized for `--rounds`
   rounds; medians and their ratio. Run `uptime` first: the machine is shared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

from profile_step import make_batch  # noqa: E402

from pdserve import LLM, SamplingParams  # noqa: E402

SUBJECTS = ["the sea", "a lighthouse", "Python lists", "the moon landing", "bread", "a chess opening",
            "volcanoes", "the French revolution", "a small robot", "rain", "prime numbers", "tea"]
TEMPLATES = ["Write one sentence about {}.", "Explain {} to a child:", "Three facts about {}:\n1.",
             "A short poem about {}:\n", "Q: What do you know about {}?\nA:", "{} is"]


def prompts(llm: LLM, n: int) -> list[list[int]]:
    texts = [t.format(s) for s in SUBJECTS for t in TEMPLATES][:n]
    chat = [llm.tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts[::2]]
    plain = [llm.tokenizer.encode(t) for t in texts[1::2]]
    return (chat + plain)[:n]


def agreement(ref: LLM, quant: LLM, n: int, tokens: int) -> tuple[int, int]:
    ps = prompts(ref, n)
    params = SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True)
    a = ref.generate(ps, params, use_tqdm=False)
    b = quant.generate(ps, params, use_tqdm=False)
    return sum(x.output_ids == y.output_ids for x, y in zip(a, b)), len(ps)


def step_ab(ref: LLM, quant: LLM, rows: int, rounds: int) -> tuple[float, float]:
    batches = [(llm, make_batch(llm, rows, 256, 1)) for llm in (ref, quant)]
    times: list[list[float]] = [[], []]
    for llm, batch in batches:  # warm-up
        llm.engine.runner.forward(batch)
    for _ in range(rounds):
        for i, (llm, batch) in enumerate(batches):
            t0 = time.perf_counter()
            llm.engine.runner.forward(batch)
            times[i].append((time.perf_counter() - t0) * 1e3)
    for llm, batch in batches:
        llm.engine.kv.allocator.free([p for c in batch.chunks for p in c.req.pages])
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantization", default="fp16")
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}")
    kw = dict(enable_prefix_cache=False, kv_cache_gb=1.0, threads=args.threads)
    with LLM(args.model, **kw) as ref, LLM(args.model, quantization=args.quantization, **kw) as quant:
        same, n = agreement(ref, quant, args.prompts, args.tokens)
        print(f"greedy agreement: {same}/{n} prompts ({same / n:.0%}) give the same first {args.tokens} tokens "
              f"with --quantization {args.quantization} as with fp32 (bar: 90%)")
        for rows in (1, 64):
            a, b = step_ab(ref, quant, rows, args.rounds)
            print(f"decode step, batch {rows} at 256 tokens: fp32 {a:.1f} ms, {args.quantization} {b:.1f} ms "
                  f"({b / a:.2f}x), medians of {args.rounds} interleaved rounds")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
