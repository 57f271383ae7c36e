"""Benchmark output: a terminal table, a JSON file, and PNG plots (matplotlib, Agg, no pyplot).

- :func:`print_table`: the summary laid out like ``vllm bench serve``'s result block;
- :func:`write_json` / :func:`read_json`: config + summary (with the 1 s time series) +
  per-request fields; infinities are written as the string ``"inf"`` (strict JSON);
- :func:`plot` (:func:`figures`): ITL distribution (histogram + CDF), TTFT distribution, output
  tokens/s over time (rolling window) and ITL over time for one run; every figure's title
  carries the run's parameters (:func:`run_subtitle`), log axes get 1-2-5 ticks, every panel
  with lines has a legend;
- :func:`plot_compare`: overlaid, labelled ITL and TTFT CDFs (and output tokens/s over time)
  of several runs, e.g. PD-disaggregated vs unified, titled with the runs' parameters;
- :func:`titled_figure` and :func:`machine`: for the benchmarks' own plots, whose titles name
  their run the same way (machine, model, load, date).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from pdserve.bench.metrics import RequestRecord
from pdserve.bench.runner import BenchConfig, BenchResult

_WIDTH = 50
_SECTIONS = (("ttft_ms", "Time to First Token", "TTFT"),
             ("tpot_ms", "Time per Output Token (excl. 1st token)", "TPOT"),
             ("itl_ms", "Inter-token Latency", "ITL"),
             ("e2el_ms", "End-to-end Latency", "E2EL"))


def _row(label: str, value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.2f}"
    return f"{label:<40}{value!s:<10}"


def _rule(title: str = "", fill: str = "-") -> str:
    return f"{(' ' + title + ' ') if title else ''}".center(_WIDTH, fill)


def format_table(result: BenchResult, metrics: tuple[str, ...] = ("ttft", "tpot", "itl", "e2el"),
                 percentiles: tuple[float, ...] | None = None) -> str:
    """The result block as text (see :func:`print_table`): a section per metric of ``metrics``
    with mean, median and max, plus ``percentiles`` (default p90 and p99)."""
    s, cfg = result.summary, result.config
    rate = "inf" if math.isinf(cfg.request_rate) else f"{cfg.request_rate:g}"
    lines = [_rule("Serving Benchmark Result", "="),
             _row("Successful requests:", s["completed"]),
             _row("Failed requests:", s["failed"]),
             _row("Request rate configured (req/s):", rate),
             _row("Maximum request concurrency:", cfg.max_concurrency or "-"),
             _row("Benchmark duration (s):", s["duration_s"]),
             _row("Total input tokens:", s["total_input_tokens"]),
             _row("Total generated tokens:", s["total_output_tokens"]),
             _row("Request throughput (req/s):", s["request_throughput"]),
             _row("Output token throughput (tok/s):", s["output_throughput"]),
             _row("Total token throughput (tok/s):", s["total_token_throughput"])]
    if s.get("goodput") is not None:
        slos = ", ".join(f"{k} <= {s[f'slo_{k}_ms']:g} ms" for k in ("ttft", "tpot", "e2el")
                         if s.get(f"slo_{k}_ms") is not None)
        lines.append(_row("Request goodput (req/s):", s["goodput"]))
        lines.append(_row(f"  ({slos}):", f"{s['good_requests']} good"))
    values = {"ttft_ms": [r.ttft for r in result.records if r.success],
              "tpot_ms": [t for t in (r.tpot for r in result.records if r.success) if t is not None],
              "itl_ms": [g for r in result.records if r.success for g in r.itl],
              "e2el_ms": [r.latency for r in result.records if r.success]}
    for key, title, short in _SECTIONS:
        if key[:-3] not in metrics:
            continue
        lines.append(_rule(title))
        lines.append(_row(f"Mean {short} (ms):", float(s[key]["mean"])))
        lines.append(_row(f"Median {short} (ms):", float(s[key]["median"])))
        for q in percentiles or (90.0, 99.0):
            v = float(np.percentile(np.asarray(values[key]) * 1000.0, q)) if values[key] else 0.0
            lines.append(_row(f"P{q:g} {short} (ms):", v))
        lines.append(_row(f"Max {short} (ms):", float(s[key]["max"])))
    lines.append("=" * _WIDTH)
    for error, count in (s.get("errors") or {}).items():
        lines.append(f"(!) {count} x {error}")
    return "\n".join(lines)


def print_table(result: BenchResult, file: TextIO | None = None,
                metrics: tuple[str, ...] = ("ttft", "tpot", "itl", "e2el"),
                percentiles: tuple[float, ...] | None = None) -> str:
    """Print the summary table (like ``vllm bench serve``'s) and return it."""
    text = format_table(result, metrics, percentiles)
    print(text, file=file or sys.stdout, flush=True)
    return text


def _jsonable(value: Any) -> Any:
    """Infinity as "inf", NaN as None; containers recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def result_dict(result: BenchResult) -> dict[str, Any]:
    """What :func:`write_json` writes."""
    started = _dt.datetime.fromtimestamp(result.started_at, tz=_dt.timezone.utc).isoformat()
    return _jsonable({
        "config": dataclasses.asdict(result.config),
        "started_at": result.started_at,
        "started_at_iso": started,
        "duration_s": result.duration_s,
        "summary": result.summary,
        "requests": [dataclasses.asdict(r) for r in result.records],
    })


def write_json(result: BenchResult, path: str | Path) -> Path:
    """Write config, summary (with time series) and per-request fields to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result_dict(result), indent=1), encoding="utf-8")
    return path


def read_json(path: str | Path) -> BenchResult:
    """A :class:`BenchResult` back from a file :func:`write_json` wrote."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    cfg = {k: (math.inf if v == "inf" else v) for k, v in data["config"].items()}
    fields = {f.name for f in dataclasses.fields(BenchConfig)}
    records = [RequestRecord(**r) for r in data["requests"]]
    return BenchResult(config=BenchConfig(**{k: v for k, v in cfg.items() if k in fields}),
                       summary=data["summary"], records=records, duration_s=data["duration_s"],
                       started_at=data["started_at"])


# ---- plots ---------------------------------------------------------------------------------

def _itl_ms(result: BenchResult) -> np.ndarray:
    return np.asarray([g for r in result.records if r.success for g in r.itl], dtype=float) * 1000.0


def _ttft_ms(result: BenchResult) -> np.ndarray:
    return np.asarray([r.ttft for r in result.records if r.success], dtype=float) * 1000.0


def machine() -> str:
    """The machine a benchmark ran on, for plot titles: its name, cores and architecture."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"machine {platform.node() or 'unknown'} ({cores} cores, {platform.machine()})"


def run_subtitle(result: BenchResult, url: bool = True) -> str:
    """What a plot shows: URL (unless `url` is False), model, load (rate or concurrency), lengths,
    date and machine."""
    cfg = result.config
    load = []
    load.append("all at once" if math.isinf(cfg.request_rate) else f"{cfg.request_rate:g} req/s"
                + (f" (burstiness {cfg.burstiness:g})" if cfg.burstiness != 1 else ""))
    if cfg.max_concurrency:
        load.append(f"concurrency {cfg.max_concurrency}")
    lengths = (f"sharegpt{'' if cfg.sharegpt_output_len is None else f', out {cfg.sharegpt_output_len}'}"
               if cfg.dataset == "sharegpt" else
               f"{cfg.dataset} in {cfg.input_len} / out {cfg.output_len} tokens"
               + (f" ±{cfg.range_ratio:.0%}" if cfg.range_ratio else ""))
    date = _dt.datetime.fromtimestamp(result.started_at, tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    where = f"{cfg.base_url}{cfg.endpoint} · " if url else ""
    return (f"{where}model {cfg.model} · {', '.join(load)} · {cfg.num_prompts} requests, {lengths} · {date} · "
            f"{machine()}")


def _log_ticks(ax: Axes) -> None:
    """Readable log-scale x ticks: 1-2-5 per decade as plain numbers, no minor labels."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=15))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _cdf(ax: Axes, values: np.ndarray, label: str | None = None) -> None:
    if values.size == 0:
        return
    xs = np.sort(values)
    ax.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post", label=label)
    if xs[0] > 0 and (xs[-1] / max(np.median(xs), 1e-9) > 20 or xs[-1] / xs[0] > 100):  # > 2 decades
        _log_ticks(ax)


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def titled_figure(size: tuple[float, float], title: str, subtitle: str) -> Figure:
    """A figure titled `title`, with `subtitle` wrapped at its " · " separators to the width."""
    fig = Figure(figsize=size, layout="constrained")
    width, lines = int(size[0] * 13), [""]
    for part in subtitle.split(" · "):
        if lines[-1] and len(lines[-1]) + 3 + len(part) > width:
            lines.append(part)
        else:
            lines[-1] = f"{lines[-1]} · {part}" if lines[-1] else part
    fig.suptitle("\n".join([title, *lines]), fontsize=9)
    return fig


def _distribution(values: np.ndarray, name: str, subtitle: str) -> Figure:
    fig = titled_figure((11, 4.4), f"{name} distribution", subtitle)
    hist_ax, cdf_ax = fig.subplots(1, 2)
    if values.size:
        hist_ax.hist(values, bins=min(60, max(10, values.size // 5)), color="tab:blue", label=f"{values.size} samples")
        _cdf(cdf_ax, values, label="CDF")
        for q, style in ((50, "--"), (99, ":")):
            v = float(np.percentile(values, q))
            for ax in (hist_ax, cdf_ax):
                ax.axvline(v, color="tab:red", linestyle=style, label=f"p{q} {v:.1f} ms")
        hist_ax.legend()
        cdf_ax.legend(loc="lower right")
    else:
        _no_data(hist_ax)
        _no_data(cdf_ax)
    hist_ax.set(title=f"{name} histogram", xlabel=f"{name} (ms)", ylabel="count")
    cdf_ax.set(title=f"{name} CDF", xlabel=f"{name} (ms)", ylabel="fraction <= x", ylim=(0, 1.02))
    cdf_ax.grid(alpha=0.3)
    return fig


def _name(out_dir: Path, prefix: str, stem: str) -> Path:
    """``<prefix>_<stem>.png`` (no extra "_" when ``prefix`` ends in "_", "-" or "/")."""
    sep = "" if not prefix or prefix[-1] in "_-/" else "_"
    return out_dir / f"{prefix}{sep}{stem}.png"


def _series(ts: dict[str, Any], key: str) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in ts.get(key, [])], dtype=float)


def rolling_throughput(result: BenchResult, points: int = 200) -> tuple[np.ndarray, np.ndarray, float]:
    """(times, output tokens/s, window s): tokens that arrived in the trailing window at each
    time. The window is 1/20 of the run or 3 median token gaps, whichever is longer, between 2
    and 30 s, so a slow server gives a curve, not a comb of empty 1 s buckets."""
    ok = [r for r in result.records if r.success and r.chunk_times]
    end = max([result.duration_s] + [t for r in ok for t in r.chunk_times])
    gaps = [g for r in ok for g in r.itl]
    window = float(min(30.0, max(2.0, end / 20, 3 * float(np.median(gaps)) if gaps else 0.0)))
    window = round(window, 1)
    times = np.asarray([t for r in ok for t in r.chunk_times])
    weights = np.asarray([r.output_tokens / len(r.chunk_times) for r in ok for _ in r.chunk_times])
    order = np.argsort(times)
    times, cum = times[order], np.concatenate([[0.0], np.cumsum(weights[order])])
    grid = np.linspace(0.0, end, points)
    hi = np.searchsorted(times, grid, side="right")
    lo = np.searchsorted(times, grid - window, side="right")
    return grid, (cum[hi] - cum[lo]) / window, window


def figures(result: BenchResult) -> dict[str, Figure]:
    """The plots of one run, by file stem (see :func:`plot`)."""
    sub = run_subtitle(result)
    figs = {"itl_distribution": _distribution(_itl_ms(result), "ITL", sub),
            "ttft_distribution": _distribution(_ttft_ms(result), "TTFT", sub)}
    ts = result.summary["time_series"]
    t = np.asarray(ts["t_s"], dtype=float)

    fig = titled_figure((9, 4.4), "Output tokens/s over time", sub)
    ax = fig.subplots()
    grid, rate, window = rolling_throughput(result)
    ax.plot(grid, rate, color="tab:blue", label=f"output tok/s (rolling {window:g} s window)")
    ax.axhline(result.summary["output_throughput"], color="tab:red", linestyle="--",
               label=f"run mean {result.summary['output_throughput']:.1f} tok/s")
    ax.set(title=f"rolling {window:g} s window", xlabel="time since start (s)", ylabel="tokens/s")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.grid(alpha=0.3)
    figs["output_throughput_over_time"] = fig

    fig = titled_figure((9, 4.4), "Inter-token latency over time", sub)
    ax = fig.subplots()
    points = [(r.chunk_times[k + 1], g * 1000.0) for r in result.records if r.success
              for k, g in enumerate(r.itl) if k + 1 < len(r.chunk_times)]
    if points:
        xs, ys = zip(*points)
        ax.scatter(xs, ys, s=4, alpha=0.3, color="tab:gray", label="each gap", zorder=1)
    centers = t + ts["bucket_s"] / 2
    ax.plot(centers, _series(ts, "itl_max_ms"), color="tab:orange", linestyle="--", linewidth=1, alpha=0.8,
            label="max per 1 s", zorder=2)
    ax.plot(centers, _series(ts, "itl_mean_ms"), color="tab:blue", marker=".", linewidth=2, label="mean per 1 s",
            zorder=3)  # drawn last: the max line never hides it
    ax.set(title="each gap, and the mean and max per 1 s bucket", xlabel="time since start (s)", ylabel="ITL (ms)")
    ax.legend()
    ax.grid(alpha=0.3)
    figs["itl_over_time"] = fig
    return figs


def plot(result: BenchResult, out_dir: str | Path, prefix: str = "") -> list[Path]:
    """ITL and TTFT distributions, output tokens/s and ITL over time as PNGs in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, fig in figures(result).items():
        paths.append(_name(out, prefix, stem))
        fig.savefig(paths[-1], dpi=100)
    return paths


def _label(name: str, values: np.ndarray) -> str:
    if values.size == 0:
        return f"{name} (no data)"
    return f"{name} (p50 {np.percentile(values, 50):.1f}, p99 {np.percentile(values, 99):.1f} ms)"


def plot_compare(results: dict[str, BenchResult], out_dir: str | Path, prefix: str = "compare",
                 run: str | None = None) -> list[Path]:
    """Overlaid ITL CDFs, TTFT CDFs and output tokens/s over time of ``results`` (label → run);
    each figure's title names the run: `run`, else the first result's parameters."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    sub = run or f"{', '.join(results)} · {run_subtitle(next(iter(results.values())), url=False)}"
    for stem, title, values_of in (("itl_cdf", "ITL", _itl_ms), ("ttft_cdf", "TTFT", _ttft_ms)):
        fig = titled_figure((8, 5), f"{title} CDF", sub)
        ax = fig.subplots()
        for name, result in results.items():
            values = values_of(result)
            _cdf(ax, values, _label(name, values))
        ax.set(title=f"{title} CDF", xlabel=f"{title} (ms)", ylabel="fraction <= x", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        paths.append(_name(out, prefix, stem))
        fig.savefig(paths[-1], dpi=100)
    fig = titled_figure((9, 4.4), "Output tokens/s over time", sub)
    ax = fig.subplots()
    for name, result in results.items():
        grid, rate, window = rolling_throughput(result)
        ax.plot(grid, rate, label=f"{name} (mean {result.summary['output_throughput']:.1f} tok/s, "
                                  f"rolling {window:g} s)")
    ax.set(title="Output tokens/s over time (rolling window)", xlabel="time since start (s)", ylabel="tokens/s")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_name(out, prefix, "output_throughput_over_time"))
    fig.savefig(paths[-1], dpi=100)
    return paths
