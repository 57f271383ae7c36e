"""Issue 16: what sharing a prompt's pages among its n copies saves (offline engine, bundled model).

One prompt of --prompt-len tokens, n copies with distinct seeds (temperature 0.8), --max-tokens
each: run once with the copies sharing (GenerateReq.share_prompt_with, what the server sends
for n > 1) and once as n independent requests. Prints forward tokens, time to the last copy's
first token, and total time, per mode, and the ratios. The sampled tokens of the two modes are
compared too (sharing changes which rows are computed, never the math: they should agree).

    python benchmarks/n_sharing.py --n 4 --prompt-len 512 --max-tokens 8
"""

from __future__ import annotations

import argparse
import random
import time

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import Engine
from pdserve.engine.messages import GenerateReq
from pdserve.engine.sampling_params import SamplingParams


def run(engine: Engine, prompt: list[int], n: int, max_tokens: int, share: bool, tag: str) -> dict:
    start_tokens = engine.num_forward_tokens
    rids = [f"{tag}-{j}" for j in range(n)]
    t0 = time.perf_counter()
    for j, rid in enumerate(rids):
        params = SamplingParams(max_new_tokens=max_tokens, temperature=0.8, seed=100 + j, ignore_eos=True)
        engine.add_request(GenerateReq(rid, prompt, params, share_prompt_with=rids[0] if share and j else None))
    first: dict[str, float] = {}
    tokens: dict[str, list[int]] = {rid: [] for rid in rids}
    done: set[str] = set()
    while len(done) < n:
        for out in engine.step():
            if out.token_ids and out.rid not in first:
                first[out.rid] = time.perf_counter() - t0
            tokens[out.rid] += out.token_ids
            if out.finished:
                done.add(out.rid)
    engine.flush_cache()  # the next mode starts cold too
    return {"forward_tokens": engine.num_forward_tokens - start_tokens, "last_ttft_s": max(first.values()),
            "total_s": time.perf_counter() - t0, "tokens": [tokens[r] for r in rids]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    engine = Engine.build(EngineConfig(model="default", threads=args.threads, max_model_len=2048))
    rng = random.Random(0)
    prompt = [rng.randrange(100, 40000) for _ in range(args.prompt_len)]
    run(engine, prompt[:32], 1, 2, False, "warm")
    shared = run(engine, prompt, args.n, args.max_tokens, True, "shared")
    alone = run(engine, prompt, args.n, args.max_tokens, False, "alone")
    print(f"n={args.n} prompt={args.prompt_len} max_tokens={args.max_tokens}")
    print(f"{'mode':<12}{'forward tokens':>16}{'last TTFT s':>14}{'total s':>10}")
    for name, r in (("shared", shared), ("independent", alone)):
        print(f"{name:<12}{r['forward_tokens']:>16}{r['last_ttft_s']:>14.3f}{r['total_s']:>10.3f}")
    print(f"ratio shared/independent: forward tokens {shared['forward_tokens'] / alone['forward_tokens']:.2f}, "
          f"last TTFT {shared['last_ttft_s'] / alone['last_ttft_s']:.2f}, total {shared['total_s'] / alone['total_s']:.2f}")
    print("sampled tokens equal:", shared["tokens"] == alone["tokens"])


if __name__ == "__main__":
    main()
