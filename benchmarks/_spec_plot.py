"""The plot of benchmarks/spec_decode.py, drawn from its results.json (after a run, or alone with
--plot-only): output tokens/s, TPOT p50, ITL p50 and the accepted length, each as bars per system
grouped by (workload, batch), under a title that names the run (machine, model, load, date).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.patches import Patch

from pdserve.bench.report import titled_figure

PANELS = (("tok_s", "output tokens/s (higher is better)", "{:.1f}"),
          ("tpot_p50_ms", "TPOT p50, ms per token (lower is better)", "{:.0f}"),
          ("itl_p50_ms", "ITL p50, ms per streamed chunk (a verify sends its tokens in one)", "{:.0f}"),
          ("accept_length", "accepted length, tokens per verify (1: no gain)", "{:.2f}"))


def _machine_load(load: str) -> str:
    """`uptime`'s three load averages, or the recorded sentence's own range ("9-12")."""
    m = re.search(r"load average:?\s*([0-9.]+(?:-[0-9.]+)?(?:, [0-9.]+)*)", load)
    return m.group(1) if m else load


def run_title(results: dict[str, Any]) -> str:
    """What the plot shows: machine, model, load (the benchmark's and the machine's), date."""
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(results["started_at"]))
    return (f"{results['machine']} · model {results['model']} · {'quick' if results['quick'] else 'full'} run: "
            f"batch 1 = {results['batch1_requests']} requests in turn, batch 16 = {16 * results['rounds']} in flight, "
            f"{results['output_len']} tokens max, greedy, k = {results['k']}, pdserve threads "
            f"{results['threads'] or 'all'} · machine load average {_machine_load(results['load'])} · {date}")


def _grouped(ax: Axes, rows: list[dict[str, Any]], key: str, fmt: str, colors: dict[str, str],
             cells: list[tuple[str, int]]) -> None:
    """Bars of rows[key] per system, one group per (workload, batch); a missing value says n/a."""
    width = 0.84 / max(sum((r["workload"], r["batch"]) == c for r in rows) for c in cells)
    for i, cell in enumerate(cells):
        here = [r for r in rows if (r["workload"], r["batch"]) == cell]
        for j, r in enumerate(here):
            x = i + (j - (len(here) - 1) / 2) * width
            if r.get(key) is None:
                ax.annotate("n/a", (x, 0), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=6,
                            color="grey")
                continue
            bars = ax.bar(x, r[key], width, color=colors[r["system"]])
            ax.bar_label(bars, labels=[fmt.format(r[key])], fontsize=7, padding=1)
    ax.set_xticks(range(len(cells)), [f"{w}, batch {b}" for w, b in cells])
    ax.margins(y=0.12)
    ax.grid(alpha=0.3, axis="y")


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    """out/spec_decode.png from a results.json's dict; returns the paths written."""
    rows = results["rows"]
    systems = list(dict.fromkeys(r["system"] for r in rows))
    cells = list(dict.fromkeys((r["workload"], r["batch"]) for r in rows))
    colors = {s: f"C{i}" for i, s in enumerate(systems)}
    fig = titled_figure((12, 8.2), "Speculative decoding (benchmarks/spec_decode.py)", run_title(results))
    for ax, (key, label, fmt) in zip(fig.subplots(2, 2).flat, PANELS):
        _grouped(ax, rows, key, fmt, colors, cells)
        ax.set_title(label, fontsize=9)
    fig.axes[3].axhline(1.0, color="grey", lw=0.8, ls="--")
    fig.legend(handles=[Patch(color=colors[s], label=s) for s in systems], loc="outside lower center",
               ncols=len(systems), fontsize=8, title="system (pd-*: pdserve launch --mode pd, accepted length not "
               "scraped there; off: no speculation)", title_fontsize=8)
    path = out / "spec_decode.png"
    fig.savefig(path, dpi=110)
    return [path]
