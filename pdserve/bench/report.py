"""Benchmark output: a terminal table, a JSON file, and PNG plots (matplotlib, Agg, no pyplot).

- :func:`print_table`: the summary laid out like ``vllm bench serve``'s result block;
- :func:`write_json` / :func:`read_json`: config + summary (with the 1 s time series) +
  per-request fields; infinities are written as the string ``"inf"`` (strict JSON);
- :func:`plot`: ITL distribution (histogram + CDF), TTFT distribution, output tokens/s over time
  and ITL over time for one run;
- :func:`plot_compare`: overlaid, labelled ITL and TTFT CDFs (and output tokens/s over time)
  of several runs, e.g. PD-disaggregated vs unified.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pdserve.bench.metrics import RequestRecord
from pdserve.bench.runner import BenchConfig, BenchResult

_WIDTH = 50
_SECTIONS = (("ttft_ms", "Time to First Token", "TTFT"),
             ("tpot_ms", "Time per Output Token (excl. 1st token)", "TPOT"),
             ("itl_ms", "Inter-token Latency", "ITL"),
             ("e2el_ms", "End-to-end Latency", "E2EL"))
_STAT_LABELS = (("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p99", "P99"), ("max", "Max"))


def _row(label: str, value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.2f}"
    return f"{label:<40}{value!s:<10}"


def _rule(title: str = "", fill: str = "-") -> str:
    return f"{(' ' + title + ' ') if title else ''}".center(_WIDTH, fill)


def format_table(result: BenchResult) -> str:
    """The result block as text (see :func:`print_table`)."""
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
        slos = ", ".join(f"{k} <= {s[f'slo_{k}_ms']:g} ms" for k in ("ttft", "tpot") if s.get(f"slo_{k}_ms") is not None)
        lines.append(_row("Request goodput (req/s):", s["goodput"]))
        lines.append(_row(f"  ({slos}):", f"{s['good_requests']} good"))
    for key, title, short in _SECTIONS:
        lines.append(_rule(title))
        for stat, label in _STAT_LABELS:
            lines.append(_row(f"{label} {short} (ms):", float(s[key][stat])))
    lines.append("=" * _WIDTH)
    for error, count in (s.get("errors") or {}).items():
        lines.append(f"(!) {count} x {error}")
    return "\n".join(lines)


def print_table(result: BenchResult, file: TextIO | None = None) -> str:
    """Print the summary table (like ``vllm bench serve``'s) and return it."""
    text = format_table(result)
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


def _cdf(ax: Axes, values: np.ndarray, label: str | None = None) -> None:
    if values.size == 0:
        return
    xs = np.sort(values)
    ax.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post", label=label)
    if xs[0] > 0 and xs[-1] / max(np.median(xs), 1e-9) > 20:
        ax.set_xscale("log")


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def _distribution(values: np.ndarray, name: str, path: Path) -> Path:
    fig = Figure(figsize=(11, 4), layout="constrained")
    hist_ax, cdf_ax = fig.subplots(1, 2)
    if values.size:
        hist_ax.hist(values, bins=min(60, max(10, values.size // 5)), color="tab:blue")
        _cdf(cdf_ax, values)
        for q, style in ((50, "--"), (99, ":")):
            v = float(np.percentile(values, q))
            for ax in (hist_ax, cdf_ax):
                ax.axvline(v, color="tab:red", linestyle=style, label=f"p{q} {v:.1f} ms")
        hist_ax.legend()
    else:
        _no_data(hist_ax)
        _no_data(cdf_ax)
    hist_ax.set(title=f"{name} histogram", xlabel=f"{name} (ms)", ylabel="count")
    cdf_ax.set(title=f"{name} CDF", xlabel=f"{name} (ms)", ylabel="fraction <= x", ylim=(0, 1.02))
    cdf_ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    return path


def _name(out_dir: Path, prefix: str, stem: str) -> Path:
    """``<prefix>_<stem>.png`` (no extra "_" when ``prefix`` ends in "_", "-" or "/")."""
    sep = "" if not prefix or prefix[-1] in "_-/" else "_"
    return out_dir / f"{prefix}{sep}{stem}.png"


def _series(ts: dict[str, Any], key: str) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in ts.get(key, [])], dtype=float)


def plot(result: BenchResult, out_dir: str | Path, prefix: str = "") -> list[Path]:
    """ITL and TTFT distributions, output tokens/s and ITL over time as PNGs in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [_distribution(_itl_ms(result), "ITL", _name(out, prefix, "itl_distribution")),
             _distribution(_ttft_ms(result), "TTFT", _name(out, prefix, "ttft_distribution"))]
    ts = result.summary["time_series"]
    t = np.asarray(ts["t_s"], dtype=float)

    fig = Figure(figsize=(9, 4), layout="constrained")
    ax = fig.subplots()
    ax.step(t, _series(ts, "output_tok_s"), where="post", label="output tok/s")
    ax.axhline(result.summary["output_throughput"], color="tab:red", linestyle="--",
               label=f"run mean {result.summary['output_throughput']:.1f} tok/s")
    ax.set(title="Output tokens/s over time (1 s buckets)", xlabel="time since start (s)", ylabel="tokens/s")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_name(out, prefix, "output_throughput_over_time"))
    fig.savefig(paths[-1], dpi=100)

    fig = Figure(figsize=(9, 4), layout="constrained")
    ax = fig.subplots()
    points = [(r.chunk_times[k + 1], g * 1000.0) for r in result.records if r.success
              for k, g in enumerate(r.itl) if k + 1 < len(r.chunk_times)]
    if points:
        xs, ys = zip(*points)
        ax.scatter(xs, ys, s=4, alpha=0.3, color="tab:gray", label="each gap")
    ax.plot(t + ts["bucket_s"] / 2, _series(ts, "itl_mean_ms"), marker=".", label="mean per 1 s")
    ax.plot(t + ts["bucket_s"] / 2, _series(ts, "itl_max_ms"), marker=".", label="max per 1 s")
    ax.set(title="Inter-token latency over time", xlabel="time since start (s)", ylabel="ITL (ms)")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_name(out, prefix, "itl_over_time"))
    fig.savefig(paths[-1], dpi=100)
    return paths


def _label(name: str, values: np.ndarray) -> str:
    if values.size == 0:
        return f"{name} (no data)"
    return f"{name} (p50 {np.percentile(values, 50):.1f}, p99 {np.percentile(values, 99):.1f} ms)"


def plot_compare(results: dict[str, BenchResult], out_dir: str | Path, prefix: str = "compare") -> list[Path]:
    """Overlaid ITL CDFs, TTFT CDFs and output tokens/s over time of ``results`` (label → run)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for stem, title, values_of in (("itl_cdf", "ITL", _itl_ms), ("ttft_cdf", "TTFT", _ttft_ms)):
        fig = Figure(figsize=(8, 5), layout="constrained")
        ax = fig.subplots()
        for name, result in results.items():
            values = values_of(result)
            _cdf(ax, values, _label(name, values))
        ax.set(title=f"{title} CDF", xlabel=f"{title} (ms)", ylabel="fraction <= x", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        paths.append(_name(out, prefix, stem))
        fig.savefig(paths[-1], dpi=100)
    fig = Figure(figsize=(9, 4), layout="constrained")
    ax = fig.subplots()
    for name, result in results.items():
        ts = result.summary["time_series"]
        ax.step(ts["t_s"], _series(ts, "output_tok_s"), where="post",
                label=f"{name} (mean {result.summary['output_throughput']:.1f} tok/s)")
    ax.set(title="Output tokens/s over time (1 s buckets)", xlabel="time since start (s)", ylabel="tokens/s")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_name(out, prefix, "output_throughput_over_time"))
    fig.savefig(paths[-1], dpi=100)
    return paths
