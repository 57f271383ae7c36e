"""Issue 28: what MLA + MoE cost under each parallel layout, on a random DeepSeek-V3-shaped model.

    python benchmarks/moe_mla.py            # the ~390 M-parameter model (benchmarks/_moe_model.py)
    python benchmarks/moe_mla.py --quick    # the small model, short runs: a smoke test

Four servers, one after the other, each on both cores (one engine process per rank, 1 thread):

    tp2        --tp-size 2                 MLA: q heads split, the latent WHOLE on both ranks; TP-MoE
    tp2-ep2    --tp-size 2 --ep-size 2     EP: each rank its 16 experts' pairs of the same tokens
    dpa2       --tp-size 2 --dp-size 2 --enable-dp-attention      each rank its own requests'
                                           latents; TP-MoE over both ranks' gathered rows
    dpa2-ep2   dpa2 + --ep-size 2          EP: tokens to their experts' rank all-to-all

Measured per server (every rank gets the same --kv-cache-gb):
  - KV bytes per token (/server_info: the latent, all layers) next to what K and V of every head
    would take (MHA with the same heads and head dims);
  - tokens the server's pools hold (/get_load: pages x page size) and per GiB of KV memory the
    server allocated (ranks x --kv-cache-gb). Target: DP attention 2 holds >= 1.9x TP 2's tokens;
  - decode step time at batch 1 and 16 (median of the decode steps in the ranks' step traces,
    `/get_load?step_trace=1`; under DP attention each rank decodes half the batch).
Output (--out): report.md, results.json, moe_mla.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from _moe_model import ROOT, moe_model
from dp_attention_imbalance import Cluster, free_port, wait_ready

SYSTEMS = {
    "tp2": ["--tp-size", "2"],
    "tp2-ep2": ["--tp-size", "2", "--ep-size", "2"],
    "dpa2": ["--tp-size", "2", "--dp-size", "2", "--enable-dp-attention"],
    "dpa2-ep2": ["--tp-size", "2", "--dp-size", "2", "--enable-dp-attention", "--ep-size", "2"],
}


def serve(model: Path, system: str, args: argparse.Namespace) -> tuple[Cluster, str]:
    c = Cluster(args.out, system)
    url = f"http://127.0.0.1:{free_port()}"
    c.spawn("server", [sys.executable, "-m", "pdserve.cli", "serve", "--model", str(model), "--threads", "1",
                       "--log-stats-interval", "0", "--kv-cache-gb", str(args.kv_cache_gb), "--page-size", "16",
                       "--chunk-budget", "512", "--max-model-len", "2048", *SYSTEMS[system],
                       "--port", url.rsplit(":", 1)[1]])
    try:
        wait_ready(url)
    except BaseException:
        c.stop()
        raise
    return c, url


async def batch(url: str, n: int, prompt_len: int, new: int, seed: int) -> None:
    """n requests at once (under DP attention spread evenly over the ranks), greedy, ignore EOS."""
    rng = random.Random(seed)
    dp = httpx.get(url + "/get_load", timeout=30).json()["dp_size"]
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(i: int) -> None:
            body: dict[str, Any] = {"input_ids": [rng.randrange(300, 40000) for _ in range(prompt_len)],
                                    "sampling_params": {"max_new_tokens": new, "temperature": 0, "ignore_eos": True}}
            if dp > 1:
                body["data_parallel_rank"] = i % dp
            r = await client.post(url + "/generate", json=body)
            r.raise_for_status()

        await asyncio.gather(*(one(i) for i in range(n)))


def decode_step_ms(url: str, since: float, per_rank: int) -> float:
    """Median time of the steps since `since` that decoded `per_rank` rows on a rank (no prefill
    chunk in them), over every rank that decoded."""
    load = httpx.get(url + "/get_load", params={"step_trace": 1}, timeout=60).json()
    times = [s[1] for r in load["dp_ranks"] for s in r.get("step_trace", []) if s[0] >= since and s[2] == per_rank
             and not s[3]]
    return statistics.median(times) * 1000 if times else float("nan")


def measure(model: Path, system: str, args: argparse.Namespace) -> dict[str, Any]:
    cluster, url = serve(model, system, args)
    try:
        info = httpx.get(url + "/server_info", timeout=30).json()
        load = httpx.get(url + "/get_load", timeout=30).json()
        ranks = 2
        res: dict[str, Any] = {
            "system": system, "attention_kind": info["attention_kind"], "ep_size": info["ep_size"],
            "kv_bytes_per_token": info["kv_bytes_per_token"], "pool_tokens": load["num_pages"] * load["page_size"],
            "kv_gib": ranks * args.kv_cache_gb}
        res["tokens_per_kv_gib"] = res["pool_tokens"] / res["kv_gib"]
        asyncio.run(batch(url, 4, 32, 4, seed=1))  # warm-up
        dp = load["dp_size"]
        for b in (1, 16):
            since = time.time()
            asyncio.run(batch(url, b, args.prompt_len, args.new_tokens, seed=b))
            res[f"decode_ms_b{b}"] = decode_step_ms(url, since, b if dp == 1 else max(1, b // dp))
        print(json.dumps(res), flush=True)
        return res
    finally:
        cluster.stop()


def mha_bytes_per_token(model: Path) -> int:
    """What K and V of every head would take per token (fp32, all layers): MHA with MLA's head dims."""
    c = json.loads((model / "config.json").read_text())
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    return c["num_hidden_layers"] * c["num_attention_heads"] * (qk + c["v_head_dim"]) * 4


def report(rows: dict[str, dict[str, Any]], model: Path, args: argparse.Namespace) -> str:
    mha = mha_bytes_per_token(model)
    lines = [f"model: {model.name} (random weights), --kv-cache-gb {args.kv_cache_gb} per rank, 2 ranks, "
             f"load average at start {args.load:.1f}", "",
             "| server | KV bytes/token | tokens the pools hold | KV memory (GiB) | tokens per KV GiB | "
             "decode step b1 (ms) | decode step b16 (ms) |", "|---|---|---|---|---|---|---|"]
    for r in rows.values():
        lines.append(f"| {r['system']} | {r['kv_bytes_per_token']} | {r['pool_tokens']} | {r['kv_gib']:g} | "
                     f"{r['tokens_per_kv_gib']:.0f} | {r['decode_ms_b1']:.1f} | {r['decode_ms_b16']:.1f} |")
    hold = rows["dpa2"]["pool_tokens"] / rows["tp2"]["pool_tokens"]
    lines += ["", f"KV bytes per token: the latent {rows['tp2']['kv_bytes_per_token']} B vs K and V of every head "
              f"{mha} B ({mha / rows['tp2']['kv_bytes_per_token']:.1f}x)",
              f"DP attention 2 holds {hold:.2f}x the tokens of TP 2 with the same KV memory (target >= 1.9): "
              f"**{'met' if hold >= 1.9 else 'missed'}** (under TP every rank stores every token's latent)"]
    for attn in ("tp2", "dpa2"):
        for b in (1, 16):
            ep, tp = rows[f"{attn}-ep2"][f"decode_ms_b{b}"], rows[attn][f"decode_ms_b{b}"]
            lines.append(f"{attn}: decode step at batch {b}, EP / TP-MoE = {ep:.1f} / {tp:.1f} ms = {ep / tp:.2f}")
    text = "\n".join(lines)
    (args.out / "report.md").write_text(text + "\n")
    return text


def plot(rows: dict[str, dict[str, Any]], out: Path) -> None:
    """moe_mla.png: tokens the pools hold, and decode step times at batch 1 and 16, per server."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8))
    names = list(rows)
    ax = fig.add_subplot(1, 2, 1)
    colors = ["tab:blue" if n.startswith("dpa") else "tab:gray" for n in names]
    ax.bar(names, [rows[n]["pool_tokens"] / 1000 for n in names], color=colors)
    ax.set_ylabel("tokens the KV pools hold (thousands)")
    ax.set_title("same KV memory per rank")
    ax = fig.add_subplot(1, 2, 2)
    for i, b in enumerate((1, 16)):
        ax.bar([j + 0.4 * i for j in range(len(names))], [rows[n][f"decode_ms_b{b}"] for n in names], width=0.4,
               label=f"batch {b}")
    ax.set_xticks([j + 0.2 for j in range(len(names))], names)
    ax.set_ylabel("decode step (ms, median)")
    ax.set_title("EP vs TP-MoE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "moe_mla.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="default results/moe_mla (--quick: results/moe_mla_quick)")
    ap.add_argument("--quick", action="store_true", help="the small model, 16 new tokens")
    ap.add_argument("--kv-cache-gb", type=float, default=0.25)
    args = ap.parse_args()
    args.out = args.out or ROOT / "benchmarks" / "results" / ("moe_mla_quick" if args.quick else "moe_mla")
    args.out.mkdir(parents=True, exist_ok=True)
    args.prompt_len, args.new_tokens = (64, 16) if args.quick else (128, 48)
    args.load = os.getloadavg()[0]
    model = moe_model("quick" if args.quick else "full")
    print(f"model {model}; load average {args.load:.2f}", flush=True)
    rows = {s: measure(model, s, args) for s in SYSTEMS}
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.out)
    print(report(rows, model, args))


if __name__ == "__main__":
    main()
