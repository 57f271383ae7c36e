"""Issue 30: holding a TTFT SLO past capacity, with and without admission control; tracing's cost.

One cluster (tests/chaos/cluster.py: a prefill and two decodes, `pdserve serve` processes, and
pdserve's PD router, 127.0.0.1), seeded streaming /generate requests (prompt --prompt-len tokens,
--max-new out, greedy, ignore EOS):

  capacity   a closed loop at --concurrency: completed requests/s (the 1x of the sweep) and the
             smallest TTFT seen; the TTFT deadline is --deadline-ms, else 6x that TTFT (at least
             1.5 s): a deadline the machine cannot meet even idle refuses everything, which says
             nothing about overload (on a shared 2-core box one request alone took 2.3 s)
  sweep      Poisson arrivals at 0.5x .. 3x capacity for --seconds each, twice:
               off  no admission control, no deadline in the body (what a plain cluster does)
               on   servers and router with admission control (POST /admission), each request
                    carrying ttft_deadline_ms = --deadline-ms
             per rate: goodput (requests/s whose first token came within the deadline), p99 TTFT
             of the accepted requests, refusal rate (503 / 429 / 408), client timeouts.
             Target: goodput at 3x >= 0.9x the peak goodput; accepted p99 TTFT <= the deadline.
  tracing    the capacity loop again on a cluster started with --enable-trace (spans to a local
             OTLP/HTTP receiver): throughput on vs off (target: <= 2% lower; off is free: no SDK).

Writes results/overload/results.json and results/overload/overload.png.

    python benchmarks/overload.py [--quick] [--seconds 20] [--deadline-ms MS]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pdserve.router.config import AdmissionConfig, LimitsConfig  # noqa: E402
from pdserve.router.server import EmbeddedRouter  # noqa: E402
from tests.chaos.cluster import AUTH, Chaos, chaos_cluster, router_config  # noqa: E402
from tests.chaos.otlp_receiver import HTTPReceiver, Spans  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "overload"
RATES = (0.5, 1.0, 1.5, 2.0, 3.0)


def body(seed: int, prompt_len: int, max_new: int, deadline_ms: float | None) -> dict[str, Any]:
    rng = random.Random(seed)
    b: dict[str, Any] = {"input_ids": [rng.randrange(300, 40000) for _ in range(prompt_len)], "stream": True,
                         "sampling_params": {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}}
    if deadline_ms is not None:
        b["ttft_deadline_ms"] = deadline_ms
    return b


async def one(client: httpx.AsyncClient, url: str, b: dict[str, Any]) -> dict[str, Any]:
    t0 = time.monotonic()
    out: dict[str, Any] = {"status": None, "ttft": None, "ok": False}
    try:
        async with asyncio.timeout(120):
            async with client.stream("POST", url + "/generate", json=b) as r:
                out["status"] = r.status_code
                if r.status_code != 200:
                    await r.aread()
                    return out
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        if '"error"' in line:
                            return out
                        if out["ttft"] is None:
                            out["ttft"] = time.monotonic() - t0
                out["ok"] = True
    except (httpx.HTTPError, TimeoutError):
        out["status"] = None
    return out


async def closed_loop(url: str, n: int, concurrency: int, a: argparse.Namespace, seed: int) -> tuple[float, float]:
    """Completed requests/s with `concurrency` always in flight, and the smallest TTFT (s)."""
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120, headers=AUTH, limits=httpx.Limits(max_connections=concurrency + 4)) as c:
        async def go(i: int) -> dict[str, Any]:
            async with sem:
                return await one(c, url, body(seed + i, a.prompt_len, a.max_new, None))

        t0 = time.monotonic()
        got = await asyncio.gather(*(go(i) for i in range(n)))
        ttfts = [g["ttft"] for g in got if g["ok"] and g["ttft"] is not None]
        return sum(g["ok"] for g in got) / (time.monotonic() - t0), min(ttfts, default=float("nan"))


async def open_loop(url: str, rate: float, a: argparse.Namespace, deadline_ms: float | None,
                    seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=120, headers=AUTH, limits=httpx.Limits(max_connections=512)) as c:
        tasks, t, t0 = [], 0.0, time.monotonic()
        while t < a.seconds:
            tasks.append(asyncio.create_task(one(c, url, body(seed + len(tasks), a.prompt_len, a.max_new,
                                                                 deadline_ms))))
            gap = rng.expovariate(rate)
            t += gap
            await asyncio.sleep(max(0.0, t0 + t - time.monotonic()))
        got = await asyncio.gather(*tasks)
    limit = a.deadline_ms / 1000.0
    ttfts = sorted(g["ttft"] for g in got if g["ok"] and g["ttft"] is not None)
    good = sum(1 for g in got if g["ok"] and g["ttft"] is not None and g["ttft"] <= limit)
    refused = sum(1 for g in got if g["status"] in (503, 429, 408))
    return {"rate": rate, "requests": len(got), "goodput": good / a.seconds, "accepted": len(ttfts),
            "p99_ttft": ttfts[min(len(ttfts) - 1, int(0.99 * (len(ttfts) - 1)))] if ttfts else None,
            "refusal_rate": refused / len(got), "timeouts": sum(1 for g in got if g["status"] is None)}


def admission(c: Chaos, router: EmbeddedRouter, on: bool) -> None:
    for s in c.servers.values():
        httpx.post(s.url + "/admission", json={"enabled": on}, headers=AUTH, timeout=10).raise_for_status()
    httpx.post(router.url + "/admission", json={"enabled": on}, headers=AUTH, timeout=10).raise_for_status()


def sweep(c: Chaos, a: argparse.Namespace) -> dict[str, Any]:
    cfg = router_config(c.pair, [c.pair.decode, c.decode2], admission=AdmissionConfig(enabled=False),
                        limits=LimitsConfig(max_concurrent=4 * a.concurrency, queue_size=16 * a.concurrency,
                                            queue_timeout_s=(a.deadline_ms or 60_000.0) / 1000.0))
    with EmbeddedRouter(cfg) as router:
        asyncio.run(closed_loop(router.url, 4, 4, a, 1))  # warm-up
        capacity, ttft0 = asyncio.run(closed_loop(router.url, a.requests, a.concurrency, a, 100))
        if a.deadline_ms is None:
            a.deadline_ms = max(1500.0, 6000.0 * ttft0)
        print(f"capacity: {capacity:.2f} req/s ({a.prompt_len} in / {a.max_new} out, concurrency {a.concurrency}), "
              f"smallest TTFT {ttft0:.2f} s: TTFT deadline {a.deadline_ms:.0f} ms")
        runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        for mode in ("off", "on"):
            admission(c, router, mode == "on")
            for k, x in enumerate(RATES):
                seed = 10_000 * (k + 1) + (500_000 if mode == "on" else 0)  # new prompts: no prefix hits
                row = asyncio.run(open_loop(router.url, x * capacity, a, a.deadline_ms if mode == "on" else None,
                                            seed))
                row["x"] = x
                runs[mode].append(row)
                p99 = f"{row['p99_ttft']:.2f} s" if row["p99_ttft"] is not None else "-"
                print(f"admission {mode:3s} {x:.1f}x ({row['rate']:.2f} req/s): goodput {row['goodput']:.2f} req/s, "
                      f"accepted p99 TTFT {p99}, refused {row['refusal_rate']:.0%}, timeouts {row['timeouts']}")
                time.sleep(2.0)
                c.settled(timeout=120)
        admission(c, router, False)
    return {"capacity": capacity, "runs": runs}


def traced_capacity(tmp: Path, a: argparse.Namespace, on: bool) -> float:
    spans = Spans()
    receiver = HTTPReceiver(spans) if on else None
    args = ["--enable-trace", "--otlp-traces-endpoint", receiver.url] if receiver else []
    where = tmp / ("trace-on" if on else "trace-off")
    where.mkdir()
    try:
        with chaos_cluster(where, args) as c:
            asyncio.run(closed_loop(c.router.url, 4, 4, a, 1))
            return asyncio.run(closed_loop(c.router.url, a.requests, a.concurrency, a, 100))[0]
    finally:
        if receiver is not None:
            receiver.stop()


def plot(result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (g, t) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, rows in result["runs"].items():
        xs = [r["x"] for r in rows]
        g.plot(xs, [r["goodput"] for r in rows], marker="o", label=f"admission {mode}")
        t.plot(xs, [r["p99_ttft"] or 0 for r in rows], marker="o", label=f"admission {mode}")
    g.set(xlabel="offered load (x capacity)", ylabel="goodput (req/s within the TTFT deadline)")
    t.axhline(result["deadline_ms"] / 1000.0, color="grey", linestyle="--", label="deadline")
    t.set(xlabel="offered load (x capacity)", ylabel="p99 TTFT of accepted requests (s)", yscale="log")
    g.legend()
    t.legend()
    fig.tight_layout()
    fig.savefig(OUT / "overload.png", dpi=100)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a short run: 6 s per rate, 16 calibration requests")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--prompt-len", type=int, default=200)
    p.add_argument("--max-new", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=48, help="requests of the capacity loop")
    p.add_argument("--deadline-ms", type=float, default=None, help="TTFT deadline (default: 6x the smallest "
                   "TTFT of the capacity loop, at least 1500)")
    p.add_argument("--skip-tracing", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.seconds, a.requests = 6.0, 16
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (numbers mean little on a busy machine)")
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="overload-") as tmp:
        (Path(tmp) / "sweep").mkdir()
        with chaos_cluster(Path(tmp) / "sweep") as c:
            result = sweep(c, a)
        result["deadline_ms"] = a.deadline_ms
        runs = result["runs"]["on"]
        peak = max(r["goodput"] for r in runs)
        result["goodput_3x_over_peak"] = runs[-1]["goodput"] / peak if peak else 0.0
        print(f"admission on: goodput at 3x = {result['goodput_3x_over_peak']:.2f} x peak (target >= 0.9)")
        if not a.skip_tracing:
            off, on = traced_capacity(Path(tmp), a, False), traced_capacity(Path(tmp), a, True)
            result["tracing"] = {"off_rps": off, "on_rps": on, "overhead": 1 - on / off if off else None}
            print(f"tracing: {off:.2f} req/s off, {on:.2f} req/s on ({(1 - on / off):+.1%} overhead; target <= 2%)")
    (OUT / "results.json").write_text(json.dumps(result, indent=1))
    plot(result)
    print(f"wrote {OUT / 'results.json'} and {OUT / 'overload.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
