"""KV transfer throughput of pdserve's backends next to this machine's own limits, in one run.

    python benchmarks/kv_transfer.py [--mib 64] [--reps 9] [--backends tcp,shm,nixl,mooncake] [--json]

Two spawned processes (tests/transfer_harness.py agents: a prefill and a decode, each with a KV
pool shaped like an 8B Llama by default: 32 layers, 8 KV heads, head dim 128, bf16, page size
16 -> 2 MiB per page) move N pages (about --mib MiB; random page ids on both sides unless
--contiguous) and report, best and median of --reps rooms:

  - tcp / shm: seconds from the prefill's first send() to its Success (decode's Ack included);
  - memcpy: one plain memcpy (numpy copyto) of the same number of bytes in the prefill process;
  - raw socket: a plain loopback TCP sendall of the same bytes between the two processes, then
    a 1-byte ack (the same round trip as a transfer).
Rounds interleave every path (memcpy, raw socket, each backend), so all see the same machine
noise; "best vs limit" compares best with best, "paired" is the median over rounds of
(limit time / path time) within the same round, the robust estimate the target is checked on.

GB/s = payload bytes / seconds (payload counted once, 1 GB = 1e9 B). Targets: shm >= 50% of
memcpy, tcp >= 70% of the raw socket. The "TTFT cost of PD vs unified" section is a hook that
the engine integration fills in (`ttft_pd_vs_unified`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.transfer_harness import Agent, AgentSpec, close_all  # noqa: E402  (the repo root is on sys.path)

# backend -> (the limit it is compared with, target share or None); nixl (UCX tcp + cma) and
# mooncake (tcp) move bytes between processes over loopback here, so the socket is their yardstick
TARGETS: dict[str, tuple[str, float | None]] = {"tcp": ("raw socket", 0.70), "shm": ("memcpy", 0.50),
                                                "nixl": ("raw socket", None), "mooncake": ("raw socket", None)}


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=float, default=64.0, help="payload per transfer, MiB (rounded to pages)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--backends", default="tcp,shm,nixl,mooncake")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--chunks", type=int, default=1, help="send() calls per room (chunked prefill)")
    ap.add_argument("--contiguous", action="store_true", help="consecutive page ids instead of random ones")
    ap.add_argument("--threads", type=int, default=_cores(), help="torch threads in each agent")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--skip-ttft", action="store_true", help="skip the PD-vs-unified TTFT servers (minutes)")
    return ap.parse_args(argv)


def page_bytes(a: argparse.Namespace) -> int:
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}[a.dtype]
    return 2 * a.layers * a.page_size * a.kv_heads * a.head_dim * itemsize


def pick_pages(n: int, num_pages: int, contiguous: bool, rng: random.Random) -> list[int]:
    return list(range(1, n + 1)) if contiguous else rng.sample(range(1, num_pages), n)


def measure(a: argparse.Namespace) -> dict[str, Any]:
    backends = [b for b in a.backends.split(",") if b]
    n = max(1, round(a.mib * 2**20 / page_bytes(a)))
    nbytes = n * page_bytes(a)
    num_pages = n + 8
    common = dict(num_layers=a.layers, kv_heads=a.kv_heads, head_dim=a.head_dim, page_size=a.page_size,
                  num_pages=num_pages, dtype=a.dtype, model="bench", torch_threads=a.threads)
    P = Agent(AgentSpec(role="prefill", backends=backends, seed=1, **common))
    D = Agent(AgentSpec(role="decode", backends=backends, seed=2, **common))
    rng = random.Random(0)
    results: dict[str, Any] = {"pages": n, "bytes": nbytes, "page_bytes": page_bytes(a), "threads": a.threads,
                               "contiguous": a.contiguous, "chunks": a.chunks}
    try:
        P.wait_ready(300)
        D.wait_ready(300)
        eps = {b: D.call("route", host="127.0.0.1", port=P.info["bootstrap_port"], rank=i)["endpoint"]
               for i, b in enumerate(backends)}
        seconds: dict[str, list[float]] = {name: [] for name in ("memcpy", "raw socket", *backends)}
        for rnd in range(a.reps + 1):  # interleaved rounds: every path sees the same noise; round 0 warms up
            sample = {"memcpy": P.call("memcpy", nbytes=nbytes, reps=1)["seconds"]}
            port = D.call("sock_recv", nbytes=nbytes, reps=2)["port"]
            sample["raw socket"] = P.call("sock_send", port=port, nbytes=nbytes, reps=2, timeout=300)["seconds"]
            for i, backend in enumerate(backends):
                room = 1000 * (i + 1) + rnd
                D.call("receiver", backend=backend, room=room, endpoint=eps[backend])
                D.call("init", room=room, pages=pick_pages(n, num_pages, a.contiguous, rng))
                src = pick_pages(n, num_pages, a.contiguous, rng)
                sample[backend] = P.call("bench_send", backend=backend, room=room, src=src, chunks=a.chunks,
                                         timeout=300)["seconds"]
                if D.call("wait", room=room, seconds=60)["state"] != 4:
                    raise RuntimeError(f"{backend}: decode did not reach Success for room {room}")
            if rnd:
                for name, t in sample.items():
                    seconds[name].append(t)
        results["seconds"] = seconds
    finally:
        close_all([P, D])
    return results


def ttft_pd_vs_unified(a: argparse.Namespace) -> dict[str, Any] | None:
    """TTFT at concurrency 1 of a prefill+decode pair (tcp) vs one unified server, same prompts,
    in one run (real servers, see pd_ttft.py); target: PD adds <= one decode step."""
    if a.skip_ttft:
        return None
    from pd_ttft import measure as measure_ttft

    return measure_ttft("tcp", 8, 256)


def report(r: dict[str, Any], ttft: dict[str, Any] | None) -> str:
    gbps = {name: (r["bytes"] / min(ts) / 1e9, r["bytes"] / statistics.median(ts) / 1e9)
            for name, ts in r["seconds"].items()}
    lines = [f"KV transfer: {r['pages']} pages x {r['page_bytes'] / 2**20:.2f} MiB = {r['bytes'] / 2**20:.1f} MiB "
             f"per room ({'contiguous' if r['contiguous'] else 'random'} page ids, {r['chunks']} send(s), "
             f"{r['threads']} torch threads)",
             "",
             f"{'path':<12} {'best GB/s':>10} {'median GB/s':>12} {'best vs limit':>22} {'paired':>8} {'target':>8}",
             "-" * 77]
    for name, (best, med) in gbps.items():
        ratio, paired, target = "(limit)", "", ""
        if name in TARGETS:
            limit, goal = TARGETS[name]
            ratio = f"{best / gbps[limit][0]:6.0%} of {limit}"
            share = statistics.median(x / y for x, y in zip(r["seconds"][limit], r["seconds"][name]))
            paired = f"{share:.0%}"
            target = "-" if goal is None else f">= {goal:.0%} {'ok' if share >= goal else 'MISS'}"
        lines.append(f"{name:<12} {best:>10.2f} {med:>12.2f} {ratio:>22} {paired:>8} {target:>8}")
    lines += ["", "TTFT cost of PD vs unified (concurrency 1): "
              + ("skipped" if ttft is None else json.dumps(ttft))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    r = measure(a)
    ttft = ttft_pd_vs_unified(a)
    if a.json:
        print(json.dumps({**r, "ttft": ttft}))
    else:
        print(report(r, ttft))


if __name__ == "__main__":
    main()
