"""Issues 15 and 25: multi-turn chat — what a decode-side prefix cache, conditional PD and a KV
hierarchy (host tier + shared store) buy.

    python benchmarks/multi_turn.py                       # the full run (tens of minutes on 2 cores)
    python benchmarks/multi_turn.py --quick --configs unified pd pd_cond --out /tmp/mt
    python benchmarks/multi_turn.py --workload many_users  # working set >= 8x the device pool

One seeded workload, four systems started one after the other (each behind `pdserve router`,
so the router hop is on every side; every server publishes KV events, `--kv-events-config {}`):

  unified       one `pdserve serve` on every core; router cache_aware;
  pd            1P1D, prefill and decode each pinned to half the cores; router cache_aware;
  pd_cache      pd + `--disaggregation-decode-enable-radix-cache` on the decode (the decode keeps
                earlier turns' KV and only the new part of a prompt moves);
  pd_cache_cond pd_cache + the router's conditional disaggregation
                (`--pd-local-prefill-threshold`): a turn whose uncached part on the decode is small
                is prefilled on the decode itself, no transfer at all;
  pd_cond       (extra, not in the default set) pd + conditional, without the decode cache flag;
  pd_hicache_file / pd_hicache_mooncake
                pd + KV tiers on both servers (--enable-hierarchical-cache, host tier 16x the
                pool) over one shared store: a directory, or a mooncake_master with a store holder
                started as `pdserve launch` starts them (benchmarks/_hicache.py); the decode writes
                every finished turn back, so the next turn's prefill reads the reply instead of
                computing it.

`--workload many_users` (issue 25): every conversation has its own long system prompt (a user's
document), so the working set (every user's history) is >= 8x a small device pool
(`--small-pages`); unified servers, one after the other:
  small                  the small pool, no tiers: a returning user's pages were evicted
  small_hicache          + a host tier (16x the pool): evicted pages are demoted and loaded back
  small_hicache_file     + a file store below it
  unbounded              a pool that holds everything (`--big-pages`): the hit rate to match

Workload: `--conversations` chats share one system prompt (`--system-len` tokens); each has
`--turns` turns; a turn appends a new user message (`--user-len` tokens) to the history
(system, earlier user messages and the model's real replies), asks for `--reply-len` tokens
(greedy, EOS ignored) and, once the reply is in, waits an exponential think time
(`--think-s` mean) before the next turn. Conversations start as a Poisson process at `--rate`
conversations/s. Token counts are the server's own (`usage.prompt_tokens`). Every system gets
the same conversations at the same offsets (greedy replies are the same on every system).

Measured per system: TTFT p50/p99 and ITL p50/p99 over every turn, goodput (turns/s meeting
both SLOs), KV bytes moved per request (the decode's `sglang:kv_transfer_bytes_total` delta /
turns) and the router's `sgl_router_pd_decisions_total`. Output (in --out): report.md (table,
ratios, targets met/missed), results.json and PNGs (bars per metric, TTFT and ITL CDFs).
Targets: pd_cache moves <= 0.3x pd's KV bytes with TTFT p50 <= 0.6x pd's; pd_cache_cond keeps
p99 ITL <= 0.5x unified's with TTFT p50 <= 1.2x unified's; pd_hicache_* TTFT p50 <= 0.6x pd's and
<= 1.3x unified's; many_users: small_hicache's prefix hit rate (cached / prompt tokens, from the
usage) >= 0.9x unbounded's and its TTFT p50 <= 0.5x small's. Rows with tiers also report each
tier's hit tokens and the store's bytes read / written (servers' /get_load).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pdserve.bench.metrics import RequestRecord, summarize  # noqa: E402
from pdserve.bench.report import plot_compare  # noqa: E402
from pdserve.bench.runner import BenchConfig, BenchResult  # noqa: E402
from pdserve.flags.procs import kill_group  # noqa: E402
from benchmarks._hicache import hicache_flags, start_stores, stop_stores, tier_totals  # noqa: E402
from benchmarks._multi_turn_report import plot_bars, run_title, write_report  # noqa: E402,F401

CONFIGS = ("unified", "pd", "pd_cache", "pd_cache_cond", "pd_cond", "pd_hicache_file", "pd_hicache_mooncake",
           "small", "small_hicache", "small_hicache_file", "unbounded")
DEFAULT_CONFIGS = ("unified", "pd", "pd_cache", "pd_cache_cond", "pd_hicache_file", "pd_hicache_mooncake")
MANY_USER_CONFIGS = ("small", "small_hicache", "small_hicache_file", "unbounded")
SERVER_ARGS = "--max-model-len 4096"
DECODE_CACHE_FLAG = "--disaggregation-decode-enable-radix-cache"  # the decode-side prefix cache (issue 15 A)
WORDS = ("river stone lantern orbit maple signal harbor velvet copper meadow falcon ember quartz canyon willow "
         "summit cobalt thistle beacon glacier saffron tundra marble pepper violet anchor cedar prism").split()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- processes ----------------------------------------------------------------------------------
class Proc:
    def __init__(self, name: str, cmd: list[str], log: Path, cpus: list[int] | None) -> None:
        self.name = name
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        kill_group(self.proc)
        self.log.close()


def wait_ready(url: str, path: str, procs: list[Proc], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.proc.poll() is not None:
                raise RuntimeError(f"{p.name} exited with {p.proc.returncode} at start (see its log)")
        try:
            with urllib.request.urlopen(url + path, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{url}{path} not ready after {timeout:.0f} s")


def start_system(name: str, args: argparse.Namespace, out: Path) -> tuple[list[Proc], str, str | None]:
    """Servers and router for `name`; returns (processes, router url, decode url or None). The
    shared KV store of a system with one (`args.stores`) starts first and is stopped last."""
    cpus = sorted(os.sched_getaffinity(0))
    half = max(1, len(cpus) // 2)
    stores, tier_flags = hicache_flags(name, out, host_gb=0.5 if name.startswith("pd") else None)
    start_stores(stores)
    args.stores = stores
    pool = {"small": ["--num-pages", str(args.small_pages)], "unbounded": ["--num-pages", str(args.big_pages)]}
    common = ["--kv-events-config", "{}", *args.server_args.split(), *tier_flags,
              *pool.get(name.split("_")[0], [])]
    serve = [sys.executable, "-m", "pdserve.cli", "serve", "--model", args.model, "--host", "127.0.0.1"]
    logs = out / f"logs-{name}"
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[Proc] = []
    router_port = free_port()
    router = [sys.executable, "-m", "pdserve.cli", "router", "--host", "127.0.0.1", "--port", str(router_port),
              "--policy", "cache_aware"]
    decode_url = None
    args.server_urls = []
    if not name.startswith("pd"):
        port = free_port()
        procs.append(Proc("unified", [*serve, "--port", str(port), "--threads", str(len(cpus)), *common],
                          logs / "unified.log", cpus))
        router += ["--worker-urls", f"http://127.0.0.1:{port}"]
        args.server_urls = [f"http://127.0.0.1:{port}"]
    else:
        p_port, d_port, boot = free_port(), free_port(), free_port()
        pd = ["--disaggregation-transfer-backend", args.backend]
        procs.append(Proc("prefill", [*serve, "--port", str(p_port), "--threads", str(half), *common, *pd,
                                      "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(boot)],
                          logs / "prefill.log", cpus[:half]))
        extra = [DECODE_CACHE_FLAG] if name in ("pd_cache", "pd_cache_cond") else []
        procs.append(Proc("decode", [*serve, "--port", str(d_port), "--threads", str(len(cpus) - half or 1), *common,
                                     *pd, "--disaggregation-mode", "decode", "--disaggregation-bootstrap-port",
                                     str(free_port()), *extra], logs / "decode.log", cpus[half:] or cpus))
        decode_url = f"http://127.0.0.1:{d_port}"
        args.server_urls = [f"http://127.0.0.1:{p_port}", decode_url]
        router += ["--pd-disaggregation", "--prefill", f"http://127.0.0.1:{p_port}", str(boot), "--decode", decode_url]
        if name.endswith("_cond"):
            router += ["--pd-local-prefill-threshold", str(args.threshold)]
    try:
        for p in procs:
            wait_ready(f"http://127.0.0.1:{p.proc.args[p.proc.args.index('--port') + 1]}", "/health", procs)
        procs.append(Proc("router", router, logs / "router.log", None))
        url = f"http://127.0.0.1:{router_port}"
        wait_ready(url, "/readiness", procs)
    except BaseException:
        for p in reversed(procs):
            p.stop()
        stop_stores(stores)
        raise
    return procs, url, decode_url


def scrape(url: str | None, pattern: str) -> dict[str, float]:
    if url is None:
        return {}
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return {m.group(1) or "": float(m.group(2)) for m in re.finditer(pattern, text)}


KV_BYTES = r'sglang:kv_transfer_bytes_total(?:\{[^}]*\})?() ([\d.e+]+)'
DECISIONS = r'router_pd_decisions_total\{decision="(\w+)"\} ([\d.e+]+)'


# -- workload -----------------------------------------------------------------------------------
def words(rng: random.Random, n: int) -> str:
    """About `n` tokens of text (one short word is about one token); counts are the server's."""
    return " ".join(rng.choice(WORDS) for _ in range(n))


def conversations(args: argparse.Namespace) -> list[tuple[float, str, list[str], list[float]]]:
    """Per conversation: start offset, system prompt (shared; many_users: each its own), user
    messages, think times."""
    rng = random.Random(args.seed)
    shared = "You are a helpful assistant. Background notes: " + words(rng, args.system_len)
    out, t = [], 0.0
    for i in range(args.conversations):
        system = shared if args.workload == "multi_turn" else \
            f"You are user {i}'s assistant. Their document: " + words(rng, args.system_len)
        users = [words(rng, args.user_len) + "?" for _ in range(args.turns)]
        thinks = [rng.expovariate(1 / args.think_s) if args.think_s > 0 else 0.0 for _ in range(args.turns)]
        out.append((t, system, users, thinks))
        t += rng.expovariate(args.rate)
    return out


async def one_turn(session: aiohttp.ClientSession, url: str, messages: list[dict[str, str]], reply_len: int,
                   origin: float, cached: list[int]) -> tuple[RequestRecord, str]:
    rec = RequestRecord()
    body = {"messages": messages, "max_tokens": reply_len, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    st = time.perf_counter()
    rec.start = st - origin
    text: list[str] = []
    last = st
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return rec, ""
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                data = json.loads(line[5:])
                usage = data.get("usage")
                if isinstance(usage, dict):
                    rec.prompt_len = int(usage.get("prompt_tokens") or 0)
                    rec.output_tokens = int(usage.get("completion_tokens") or 0)
                    cached.append(int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0))
                for ch in data.get("choices") or []:
                    piece = (ch.get("delta") or {}).get("content")
                    if piece:
                        now = time.perf_counter()
                        if not text:
                            rec.ttft = now - st
                        else:
                            rec.itl.append(now - last)
                        last = now
                        rec.chunk_times.append(now - origin)
                        text.append(piece)
        rec.latency = time.perf_counter() - st
        rec.success = bool(text)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
        rec.latency = time.perf_counter() - st
    return rec, "".join(text)


async def drive(url: str, args: argparse.Namespace) -> tuple[list[RequestRecord], float, int]:
    """Every conversation's turns; the records, the duration and the cached prompt tokens."""
    convs = conversations(args)
    records: list[RequestRecord] = []
    cached: list[int] = []
    timeout = aiohttp.ClientTimeout(total=args.timeout_s)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        origin = time.perf_counter()

        async def chat(start: float, system: str, users: list[str], thinks: list[float]) -> None:
            await asyncio.sleep(max(0.0, start - (time.perf_counter() - origin)))
            messages = [{"role": "system", "content": system}]
            for user, think in zip(users, thinks):
                messages.append({"role": "user", "content": user})
                rec, reply = await one_turn(session, url, messages, args.reply_len, origin, cached)
                records.append(rec)
                if not rec.success:
                    return
                messages.append({"role": "assistant", "content": reply})
                await asyncio.sleep(think)

        await asyncio.gather(*(chat(*c) for c in convs))
        return records, time.perf_counter() - origin, sum(cached)


def run_system(name: str, args: argparse.Namespace) -> tuple[dict[str, Any], BenchResult]:
    print(f"== {name}: starting", flush=True)
    procs, url, decode = start_system(name, args, args.out)
    try:
        warm = argparse.Namespace(**{**vars(args), "conversations": 1, "turns": 1, "seed": args.seed + 999})
        asyncio.run(drive(url, warm))  # one unrelated turn: compile/warm paths outside the measurement
        kv0, dec0, tiers0 = scrape(decode, KV_BYTES), scrape(url, DECISIONS), tier_totals(args.server_urls)
        t0 = time.time()
        records, duration, cached = asyncio.run(drive(url, args))
        time.sleep(1.0)  # the last turns' write-backs land
        kv1, dec1, tiers1 = scrape(decode, KV_BYTES), scrape(url, DECISIONS), tier_totals(args.server_urls)
    finally:
        for p in reversed(procs):
            p.stop()
        stop_stores(args.stores)
    s = summarize(records, duration, args.slo_ttft_ms, args.slo_tpot_ms)
    done = s["completed"]
    row = {"system": name, "completed": done, "failed": s["failed"], "ttft_p50": s["ttft_ms"]["median"],
           "ttft_p99": s["ttft_ms"]["p99"], "itl_p50": s["itl_ms"]["median"], "itl_p99": s["itl_ms"]["p99"],
           "goodput": s["goodput"], "mean_prompt": sum(r.prompt_len for r in records if r.success) / max(done, 1),
           "kv_bytes_per_req": (sum(kv1.values()) - sum(kv0.values())) / max(done, 1),
           "decisions": {k: v - dec0.get(k, 0.0) for k, v in dec1.items()}, "duration_s": duration,
           "hit_rate": cached / max(1, sum(r.prompt_len for r in records if r.success)),
           "tiers": {k: v - tiers0.get(k, 0) for k, v in tiers1.items()}}
    cfg = BenchConfig(base_url=url, model=None, tokenizer="default", num_prompts=len(records), seed=args.seed,
                      slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms)
    print(json.dumps(row), flush=True)
    return row, BenchResult(cfg, s, records, duration, t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", choices=CONFIGS,
                    help="systems, one after the other (default: by workload)")
    ap.add_argument("--workload", default="multi_turn", choices=("multi_turn", "many_users"))
    ap.add_argument("--small-pages", type=int, default=96, help="many_users: the small device pool (pages)")
    ap.add_argument("--big-pages", type=int, default=4096, help="many_users: the unbounded pool (pages)")
    ap.add_argument("--page-size", type=int, default=16, help="the servers' --page-size (for the working set)")
    ap.add_argument("--conversations", type=int, default=24)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--system-len", type=int, default=600, help="words in the shared system prompt")
    ap.add_argument("--user-len", type=int, default=40, help="words per user message")
    ap.add_argument("--reply-len", type=int, default=48, help="tokens per reply")
    ap.add_argument("--rate", type=float, default=0.1, help="conversation starts per second (Poisson)")
    ap.add_argument("--think-s", type=float, default=2.0, help="mean think time between turns (exponential)")
    ap.add_argument("--threshold", type=int, default=256, help="--pd-local-prefill-threshold of the *_cond systems")
    ap.add_argument("--slo-ttft-ms", type=float, default=4000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=150.0)
    ap.add_argument("--model", default="default")
    ap.add_argument("--backend", default="tcp", help="PD transfer backend")
    ap.add_argument("--server-args", default=SERVER_ARGS, help="extra `pdserve serve` flags for all")
    ap.add_argument("--timeout-s", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 3 short conversations of 4 turns")
    ap.add_argument("--out", type=Path, help="default: benchmarks/results/multi_turn (many_users: ..._many_users)")
    args = ap.parse_args()
    many = args.workload == "many_users"
    args.configs = args.configs or list(MANY_USER_CONFIGS if many else DEFAULT_CONFIGS)
    args.out = args.out or ROOT / "benchmarks" / "results" / ("multi_turn_many_users" if many else "multi_turn")
    if many and not args.quick:  # 24 users x (600-word document + 4 turns) over 96 pages: ~10x the pool
        args.conversations, args.turns, args.system_len, args.rate, args.think_s = 24, 4, 600, 0.2, 6.0
    if args.quick:
        args.conversations, args.turns, args.system_len, args.user_len, args.reply_len = 3, 4, 120, 12, 8
        args.rate, args.think_s, args.threshold = 1.0, 0.2, 64
        if many:  # 6 users x (~80-token document + 3 short turns) over 16 pages: ~3x the pool
            args.conversations, args.turns, args.system_len, args.user_len = 6, 3, 50, 8
            args.small_pages, args.think_s = 16, 1.0
    if many and args.server_args == SERVER_ARGS:  # a context the small pool can hold
        args.server_args = f"--max-model-len {(args.small_pages - 1) * args.page_size} --page-size {args.page_size}"
    args.out.mkdir(parents=True, exist_ok=True)
    run = run_title(args, time.time())
    rows, results, skipped = [], {}, []
    for name in args.configs:
        try:
            row, res = run_system(name, args)
        except (RuntimeError, TimeoutError) as exc:  # e.g. a server that does not know a flag yet
            print(f"== {name}: not run: {exc}", flush=True)
            skipped.append(f"{name} ({exc})")
            continue
        rows.append(row)
        results[name] = res
    if not rows:
        return 1
    args.skipped = skipped
    plots = plot_bars(rows, args.out, run) + plot_compare(results, args.out, prefix="cdf_", run=run)
    (args.out / "results.json").write_text(json.dumps(
        {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "stores"},
         "rows": rows}, indent=1))
    print(write_report(args, rows, plots))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
