"""The report of benchmarks/multi_turn.py: the run's title, its bar charts, the targets table
(each a ratio against a peer row of the same run) and report.md."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from pdserve.bench.report import machine, titled_figure


def run_title(args: argparse.Namespace, started: float) -> str:
    """What every plot of the run says it shows: machine, model, load, date."""
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    return (f"{machine()} · model {args.model} · {args.conversations} conversations x {args.turns} turns, Poisson "
            f"starts at {args.rate:g}/s, replies {args.reply_len} tokens, seed {args.seed} · {date}")


def plot_bars(rows: list[dict[str, Any]], out: Path, run: str) -> list[Path]:
    paths = []
    for keys, label, fname in ((("ttft_p50", "ttft_p99"), "TTFT (ms)", "ttft.png"),
                               (("itl_p50", "itl_p99"), "inter-token latency (ms)", "itl.png"),
                               (("kv_bytes_per_req",), "KV bytes moved per request", "kv_bytes.png"),
                               (("goodput",), "goodput (turns/s within SLOs)", "goodput.png")):
        fig = titled_figure((7, 4.6), f"Multi-turn chat: {label}", run)
        ax = fig.subplots()
        width = 0.8 / len(keys)
        for j, key in enumerate(keys):
            ax.bar([i + j * width for i in range(len(rows))], [r[key] for r in rows], width, label=key)
        ax.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(rows))], [r["system"] for r in rows])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
        if len(keys) > 1:
            ax.legend()
        paths.append(out / fname)
        fig.savefig(paths[-1], dpi=110)
    return paths


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


_COND = (("itl_p99", "unified", "<=", 0.5), ("ttft_p50", "unified", "<=", 1.2))
_TIERED_PD = (("ttft_p50", "pd", "<=", 0.6), ("ttft_p50", "unified", "<=", 1.3))
_MANY = (("hit_rate", "unbounded", ">=", 0.9), ("ttft_p50", "small", "<=", 0.5))
# system -> (metric, the system it is compared with, <= or >=, the ratio to reach)
TARGETS: dict[str, tuple[tuple[str, str, str, float], ...]] = {
    "pd_cache": (("kv_bytes_per_req", "pd", "<=", 0.3), ("ttft_p50", "pd", "<=", 0.6)),
    "pd_cache_cond": _COND, "pd_cond": _COND, "pd_hicache_file": _TIERED_PD, "pd_hicache_mooncake": _TIERED_PD,
    "small_hicache": _MANY, "small_hicache_file": _MANY}


def targets(by: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for system, checks in TARGETS.items():
        if system not in by or any(base not in by for _, base, _, _ in checks):
            continue
        parts, met = [], True
        for metric, base, op, limit in checks:
            r = _ratio(by[system][metric], by[base][metric])
            met &= r <= limit if op == "<=" else r >= limit
            parts.append(f"{metric} {r:.2f}x {base} (target {op} {limit:g})")
        lines.append(f"- {system}: {', '.join(parts)} -> {'MET' if met else 'MISSED'}")
    return lines or ["- (the targets need a system and the systems it is compared with)"]


def write_report(args: argparse.Namespace, rows: list[dict[str, Any]], plots: list[Path]) -> str:
    by = {r["system"]: r for r in rows}
    title = "many users, a working set larger than the device pool" if args.workload == "many_users" else \
        "decode cache, conditional PD, KV hierarchy"
    lines = [f"# Multi-turn chat: {title}", "",
             f"`python benchmarks/multi_turn.py {' '.join(sys.argv[1:])}`", "",
             f"{args.conversations} conversations x {args.turns} turns, Poisson starts at {args.rate:g}/s, shared "
             f"system prompt ~{args.system_len} words, user messages ~{args.user_len} words, replies {args.reply_len} "
             f"tokens (greedy, EOS ignored), think time mean {args.think_s:g} s, seed {args.seed}; conditional "
             f"threshold {args.threshold} tokens; SLOs TTFT <= {args.slo_ttft_ms:g} ms, TPOT <= "
             f"{args.slo_tpot_ms:g} ms. Machine: {len(os.sched_getaffinity(0))} cores (PD: half each).", "",
             "| system | turns | mean prompt | hit rate | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | KV bytes/req "
             "| goodput | decisions | tier hits (tokens) | store MB read / written |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dec = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["decisions"].items())) or "-"
        t = r.get("tiers") or {}
        hits = ", ".join(f"{k[4:]} {t[k]:.0f}" for k in ("hit_device", "hit_host", "hit_storage") if k in t) or "-"
        store = f"{t['storage_bytes_read'] / 1e6:.1f} / {t['storage_bytes_written'] / 1e6:.1f}" \
            if t.get("storage_bytes_written") else "-"
        lines.append(f"| {r['system']} | {r['completed']}/{r['completed'] + r['failed']} | {r['mean_prompt']:.0f} | "
                     f"{r.get('hit_rate', 0.0):.2f} | {r['ttft_p50']:.0f} | {r['ttft_p99']:.0f} | {r['itl_p50']:.0f} | "
                     f"{r['itl_p99']:.0f} | {r['kv_bytes_per_req']:.0f} | {r['goodput']:.3f} | {dec} | {hits} | "
                     f"{store} |")
    lines += ["", "Latencies in ms, goodput in turns/s; hit rate: cached / prompt tokens (usage)."]
    if args.workload == "many_users":
        ws = args.conversations * (args.system_len + args.turns * (args.user_len + args.reply_len))
        lines += [f"Working set about {ws} tokens = {ws / (args.small_pages * args.page_size):.1f}x the small "
                  f"pool ({args.small_pages} pages of {args.page_size})."]
    if getattr(args, "skipped", None):
        lines += ["", "Not run: " + "; ".join(args.skipped) + "."]
    lines += ["", "## Targets", "", *targets(by), "",
              *[f"![{p.stem}]({p.name})" for p in plots]]
    text = "\n".join(lines) + "\n"
    (args.out / "report.md").write_text(text)
    return text
