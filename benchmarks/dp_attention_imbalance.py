"""Issue 13: DP-attention imbalance, measured, and removed by PD.

    python benchmarks/dp_attention_imbalance.py                     # ~6 min on 2 cores; writes the report
    python benchmarks/dp_attention_imbalance.py --duration 30 --out /tmp/dpai
    python benchmarks/dp_attention_imbalance.py --model mla-moe --ep-size 2   # issue 28: the MLA + MoE model
    python benchmarks/dp_attention_imbalance.py --model mla-moe --ep-size 2 --quick   # smoke run, small model

With DP attention every rank joins every layer's MLP collectives in every step, so a rank that
runs a prefill chunk makes every other rank's decode step wait for it. One seeded workload, two
systems on the bundled model (or, `--model mla-moe`, the random DeepSeek-V3-shaped model of
benchmarks/_moe_model.py, whose DP-attention ranks are also its EP ranks with `--ep-size 2`: each
layer's experts then wait on an all-to-all as the dense MLP waits on its gather), each behind
pdserve's router and given both cores:

  (a) unified:  `pdserve serve --tp-size 2 --dp-size 2 --enable-dp-attention` (one core per rank);
  (b) PD:       a prefill `--dp-size 2` (replicas) on core 0 and a decode `--tp-size 2 --dp-size 2
                --enable-dp-attention` on core 1 (its two ranks only decode, and commit KV).

Workload (Poisson arrivals, seeded, the same requests at the same offsets for both): short
chat streams pinned to dp rank 1 (`data_parallel_rank`), long prompts (>= 1024 tokens, short
output) pinned to rank 0. Rank 1 never prefills anything long: its streams' inter-token gaps
show what the other rank's prefill costs them. In PD the decode's rank 0 gets the long requests'
decode only (the prefill computes the prompt on its own engine).

Recorded: client-side TTFT and ITL of every request (SSE on /generate); each decode-side
engine's per-step trace (`/get_load?step_trace=1`: start, seconds, tokens, idle forward).
Output (--out): report.md (table with p50/p99/max ITL of rank 1's streams, TTFT, goodput, the
target and whether it is met), results.json, steps.png (per-rank step time over time for both
systems), itl_cdf.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pdserve.bench.report import machine  # noqa: E402
from pdserve.flags.procs import kill_group  # noqa: E402

SERVER = [sys.executable, "-m", "pdserve.cli", "serve", "--threads", "1", "--log-stats-interval", "0"]
DPA = ["--tp-size", "2", "--dp-size", "2", "--enable-dp-attention"]
MLA_MOE = "mla-moe"  # --model: benchmarks/_moe_model.py's model (its small size under --quick)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """Processes of one system (servers pinned with taskset, and the router), stopped together."""

    def __init__(self, out: Path, name: str) -> None:
        self.out, self.name, self.procs = out, name, []  # type: ignore[var-annotated]

    def spawn(self, tag: str, cmd: list[str], cores: str | None = None) -> None:
        logs = self.out / f"logs-{self.name}"  # ignored by git
        logs.mkdir(exist_ok=True)
        log = open(logs / f"{tag}.log", "wb")
        full = ["taskset", "-c", cores, *cmd] if cores else cmd
        self.procs.append(subprocess.Popen(full, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True))

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                kill_group(p)


def wait_ready(url: str, path: str = "/health", timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{url} not ready")


def start(system: str, out: Path, args: argparse.Namespace) -> tuple[Cluster, str, list[str]]:
    """The cluster, the router URL, and the URLs of the servers whose ranks decode."""
    c = Cluster(out, system)
    common = ["--model", args.model_dir, "--chunk-budget", str(args.chunk_budget), "--num-pages", str(args.num_pages)]
    dpa = [*DPA, "--ep-size", str(args.ep_size)]
    rport = free_port()
    if system == "unified":
        url = f"http://127.0.0.1:{free_port()}"
        c.spawn("server", [*SERVER, *common, *dpa, "--port", url.rsplit(":", 1)[1]], "0-1")
        wait_ready(url)
        router = [sys.executable, "-m", "pdserve.cli", "router", "--worker-urls", url]
        decoders = [url]
    else:
        pre, dec, boot = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}", free_port()
        pd = ["--disaggregation-transfer-backend", args.backend]
        c.spawn("prefill", [*SERVER, *common, "--dp-size", "2", "--disaggregation-mode", "prefill", *pd,
                            "--disaggregation-bootstrap-port", str(boot), "--port", pre.rsplit(":", 1)[1]], "0")
        c.spawn("decode", [*SERVER, *common, *dpa, "--disaggregation-mode", "decode", *pd,
                           "--disaggregation-bootstrap-port", str(free_port()), "--port", dec.rsplit(":", 1)[1]], "1")
        wait_ready(pre)
        wait_ready(dec)
        router = [sys.executable, "-m", "pdserve.cli", "router", "--pd-disaggregation", "--prefill", pre, str(boot),
                  "--decode", dec]
        decoders = [dec]
    c.spawn("router", [*router, "--port", str(rport), "--policy", "round_robin"])
    url = f"http://127.0.0.1:{rport}"
    wait_ready(url, "/readiness", 60)
    return c, url, decoders


def workload(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Poisson arrivals of two classes over --duration seconds (seeded): rank 1's streams, rank 0's
    long prompts. Prompts are random token ids (exact lengths)."""
    rng = random.Random(args.seed)
    reqs: list[dict[str, Any]] = []
    for kind, rate, rank, n_in, n_out in (("stream", args.stream_rate, 1, args.stream_input, args.stream_output),
                                          ("long", args.long_rate, 0, args.long_input, args.long_output)):
        t = rng.expovariate(rate)
        while t < args.duration:
            ids = [rng.randrange(300, 40000) for _ in range(n_in)]
            reqs.append({"t": t, "kind": kind, "rank": rank, "ids": ids, "out": n_out})
            t += rng.expovariate(rate)
    return sorted(reqs, key=lambda r: r["t"])


async def one(client: httpx.AsyncClient, url: str, r: dict[str, Any], t0: float) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, t0 + r["t"] - time.monotonic()))
    body = {"input_ids": r["ids"], "stream": True, "data_parallel_rank": r["rank"],
            "sampling_params": {"max_new_tokens": r["out"], "temperature": 0, "ignore_eos": True}}
    sent = time.monotonic()
    stamps: list[float] = []
    ok = False
    async with client.stream("POST", url + "/generate", json=body, timeout=600) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                stamps.append(time.monotonic())
            elif line.startswith("data: [DONE]"):
                ok = resp.status_code == 200
    return {"kind": r["kind"], "ok": ok and len(stamps) >= r["out"], "ttft": stamps[0] - sent if stamps else None,
            "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": len(stamps)}


async def drive(url: str, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as client:
        t0 = time.monotonic() + 0.5
        return await asyncio.gather(*(one(client, url, r, t0) for r in reqs))


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) * 1000 if xs else float("nan")


def summarize(system: str, recs: list[dict[str, Any]], wall: float, args: argparse.Namespace) -> dict[str, Any]:
    streams = [r for r in recs if r["kind"] == "stream"]
    itl = [g for r in streams if r["ok"] for g in r["itl"]]
    ttft_s = [r["ttft"] for r in streams if r["ttft"] is not None]
    ttft_l = [r["ttft"] for r in recs if r["kind"] == "long" and r["ttft"] is not None]
    good = sum(1 for r in recs if r["ok"] and r["ttft"] <= (args.slo_ttft_s if r["kind"] == "stream" else args.slo_ttft_long_s)
               and (not r["itl"] or max(r["itl"]) <= args.slo_itl_max_s))
    return {"system": system, "requests": len(recs), "failed": sum(not r["ok"] for r in recs),
            "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99), "itl_max_ms": pct(itl, 100),
            "stream_ttft_p50_ms": pct(ttft_s, 50), "long_ttft_p50_ms": pct(ttft_l, 50),
            "goodput_req_s": good / wall, "good": good, "wall_s": wall}


def traces(urls: list[str]) -> list[list[list[float]]]:
    out = []
    for u in urls:
        load = httpx.get(u + "/get_load", params={"step_trace": 1}, timeout=60).json()
        out += [r.get("step_trace", []) for r in load["dp_ranks"]]
    return out


args_chunk_marker = 32  # a rank-0 step forwarding more tokens than this holds a prefill chunk


def run_title(results: dict[str, Any], args: argparse.Namespace) -> str:
    """What every plot of the run says it shows: machine, model, load, date (of the run's start)."""
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(min(r["t0_wall"] for r in results.values()
                                                                 if isinstance(r, dict))))
    model = results.get("model", "bundled SmolLM2-135M")
    return (f"{machine()} · model {model}, tp 2 dp 2 · streams {args.stream_rate:g}/s "
            f"{args.stream_input}/{args.stream_output} tokens on rank 1, long prompts {args.long_rate:g}/s "
            f"{args.long_input}/{args.long_output} on rank 0, {args.duration:g} s · {date}")


def plot(results: dict[str, Any], out: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True, sharey=True)
    for ax, system in zip(axes, ("unified", "pd")):
        res = results[system]
        t0 = res["t0_wall"]
        r0, r1 = ([s for s in trace if s[0] >= t0] for trace in res["steps"][:2])
        kinds = (("rank 1 step (its streams' decode, or idle)", r1, lambda s: True, "tab:green", "o", 10),
                 (f"rank 0 step with a prefill chunk (> {args_chunk_marker} tokens)", r0,
                  lambda s: s[2] > args_chunk_marker, "tab:red", "x", 28),
                 ("rank 0 step, decode or idle", r0, lambda s: s[2] <= args_chunk_marker, "tab:blue", ".", 6))
        for label, trace, keep, color, marker, size in kinds:
            pts = [s for s in trace if keep(s)]
            ax.scatter([s[0] - t0 for s in pts], [s[1] * 1000 for s in pts], s=size, c=color, marker=marker,
                       label=label)
        ax.set_yscale("log")
        ax.set_ylabel("step time (ms)")
        title = "unified, tp 2 dp 2 DP attention" if system == "unified" else "PD decode, tp 2 dp 2 DP attention"
        ax.set_title(f"{title}: rank 1 stream ITL p99 {res['summary']['itl_p99_ms']:.0f} ms")
    axes[1].set_xlabel("seconds since the workload started")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    run = run_title(results, args)
    fig.suptitle(f"DP-attention step times per rank\n{run}", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(out / "steps.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for system in ("unified", "pd"):
        itl = sorted(g * 1000 for r in results[system]["records"] if r["kind"] == "stream" for g in r["itl"])
        ax.plot(itl, np.linspace(0, 1, len(itl)), label=system)
    ax.set_xscale("log")
    ax.set_xlabel("inter-token latency of rank 1's streams (ms)")
    ax.set_ylabel("CDF")
    ax.legend()
    fig.suptitle(f"Rank 1 streams' inter-token latency CDF\n{run}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "itl_cdf.png", dpi=110)
    plt.close(fig)


def report(results: dict[str, Any], args: argparse.Namespace, out: Path) -> str:
    rows = [results[s]["summary"] for s in ("unified", "pd")]
    u, p = rows
    ratio = p["itl_p99_ms"] / u["itl_p99_ms"]
    lines = ["| system | requests (failed) | rank-1 ITL p50 / p99 / max (ms) | stream TTFT p50 (ms) | "
             "long TTFT p50 (ms) | goodput (req/s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['requests']} ({r['failed']}) | {r['itl_p50_ms']:.0f} / {r['itl_p99_ms']:.0f} / "
                     f"{r['itl_max_ms']:.0f} | {r['stream_ttft_p50_ms']:.0f} | {r['long_ttft_p50_ms']:.0f} | "
                     f"{r['goodput_req_s']:.3f} ({r['good']}) |")
    met = ratio <= 0.5 and p["goodput_req_s"] >= u["goodput_req_s"]
    lines += ["", f"p99 ITL PD / unified = {ratio:.2f} (target <= 0.5); goodput PD / unified = "
              f"{p['goodput_req_s'] / max(u['goodput_req_s'], 1e-9):.2f} (target >= 1): **{'met' if met else 'missed'}**",
              "", f"model: {results.get('model', 'bundled SmolLM2-135M')}",
              "", f"workload: {args.duration:.0f} s, streams {args.stream_rate}/s x ({args.stream_input} in, "
              f"{args.stream_output} out) on rank 1, long {args.long_rate}/s x ({args.long_input} in, {args.long_output} "
              f"out) on rank 0, chunk budget {args.chunk_budget}, seed {args.seed}; SLO: TTFT <= {args.slo_ttft_s} s "
              f"(long {args.slo_ttft_long_s} s), every gap <= {args.slo_itl_max_s} s"]
    text = "\n".join(lines)
    (out / "report.md").write_text(text + "\n")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None,
                    help="default results/dp_attention_imbalance (--model mla-moe: ..._mla_moe; --quick: ..._quick)")
    ap.add_argument("--model", default="default",
                    help=f"'default' (the bundled model), '{MLA_MOE}' (benchmarks/_moe_model.py), or an HF folder")
    ap.add_argument("--ep-size", type=int, default=1, help="the DP-attention servers' --ep-size (1 or 2)")
    ap.add_argument("--quick", action="store_true",
                    help=f"a short smoke run: 20 s, 512-token long prompts ({MLA_MOE}: its small size)")
    defaults = {"duration": 60.0, "stream_rate": 0.4, "stream_input": 64, "stream_output": 48, "long_rate": 0.08,
                "long_input": 1024, "long_output": 4, "chunk_budget": 256, "num_pages": 1200, "backend": "shm",
                "slo_ttft_s": 5.0, "slo_ttft_long_s": 40.0, "slo_itl_max_s": 1.0, "seed": 0}
    for dest, default in defaults.items():  # --stream-rate 0.4 and so on, each typed as its default
        ap.add_argument("--" + dest.replace("_", "-"), type=type(default), default=default)
    ap.add_argument("--plot-only", action="store_true", help="redraw the plots and report from --out/results.json")
    args = ap.parse_args()
    if args.quick:
        args.duration, args.long_input, args.long_rate = 20.0, 512, 0.15
    if args.model == MLA_MOE:
        from _moe_model import moe_model

        args.model_dir = str(moe_model("quick" if args.quick else "full"))
    else:
        args.model_dir = args.model
    tag = {"default": "", MLA_MOE: "_mla_moe"}.get(args.model, "_" + Path(args.model).name)
    tag += "_quick" if args.quick else ""
    args.out = args.out or ROOT / "benchmarks" / "results" / f"dp_attention_imbalance{tag}"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        results = json.loads((args.out / "results.json").read_text())
        plot(results, args.out, args)
        print(report(results, args, args.out))
        return
    reqs = workload(args)
    print(f"{len(reqs)} requests ({sum(r['kind'] == 'long' for r in reqs)} long) over {args.duration:.0f} s; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[str, Any] = {"model": f"{Path(args.model_dir).name}, ep size {args.ep_size}"
                               if args.model != "default" else "bundled SmolLM2-135M"}
    for system in ("unified", "pd"):
        cluster, url, decoders = start(system, args.out, args)
        try:
            t0_wall, t0 = time.time(), time.monotonic()
            recs = asyncio.run(drive(url, reqs))
            wall = time.monotonic() - t0
            results[system] = {"records": recs, "summary": summarize(system, recs, wall, args),
                               "steps": traces(decoders), "t0_wall": t0_wall}
            print(json.dumps(results[system]["summary"]), flush=True)
        finally:
            cluster.stop()
    (args.out / "results.json").write_text(json.dumps(results))
    plot(results, args.out, args)
    print(report(results, args, args.out))


if __name__ == "__main__":
    main()
