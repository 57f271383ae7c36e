"""`pdserve bench`'s goodput and output flags (vLLM's names) and what they write.

- the table always goes to stdout (``--percentile-metrics`` / ``--metric-percentiles`` pick
  its rows, like vLLM's);
- ``--save-result``: ``--result-dir``/``--result-filename`` (vLLM's default name when not
  given) with vLLM's field names (:mod:`pdserve.bench.vllm_json`), per-request lists with
  ``--save-detailed``;
- ``--result-dir`` also gets ``bench.json`` (pdserve's full record, read back by
  :func:`pdserve.bench.report.read_json`) and, unless ``--no-plots``, the PNG plots; with only
  ``--save-result`` the plots go next to the result file, named after it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pdserve.flags.argtypes import positive_float

if TYPE_CHECKING:
    from pdserve.bench.runner import BenchResult

PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")


def goodput_item(text: str) -> tuple[str, float]:
    """``KEY:VALUE`` with KEY one of ttft, tpot, e2el and VALUE in ms (vLLM's --goodput)."""
    key, sep, value = text.partition(":")
    if not sep or key not in ("ttft", "tpot", "e2el"):
        raise argparse.ArgumentTypeError(f"expected ttft:MS, tpot:MS or e2el:MS, got {text!r}")
    return key, positive_float(value)


def metric_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in PERCENTILE_METRICS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(PERCENTILE_METRICS)}")
    return names


def percentile_list(text: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in text.split(",") if v.strip())
    if not values or not all(0 < v <= 100 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated percentiles in (0, 100], got {text!r}")
    return values


def metadata_item(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("goodput and output (vLLM's flag names)")
    g.add_argument("--goodput", nargs="+", type=goodput_item, default=None, metavar="KEY:MS",
                   help="SLOs for goodput, e.g. --goodput ttft:500 tpot:50 (keys ttft, tpot, e2el) (default: none)")
    g.add_argument("--slo-ttft-ms", type=positive_float, default=None, help="TTFT SLO for goodput (default: none)")
    g.add_argument("--slo-tpot-ms", type=positive_float, default=None, help="TPOT SLO for goodput (default: none)")
    g.add_argument("--percentile-metrics", type=metric_list, default=("ttft", "tpot", "itl"),
                   help="metrics whose percentiles are reported, from ttft,tpot,itl,e2el (default ttft,tpot,itl)")
    g.add_argument("--metric-percentiles", type=percentile_list, default=(99.0,),
                   help="percentiles reported for them, e.g. 50,90,99 (default 99)")
    g.add_argument("--save-result", action="store_true",
                   help="write the result JSON with vLLM's field names (--result-dir / --result-filename)")
    g.add_argument("--save-detailed", action="store_true",
                   help="with --save-result: also per-request lens, TTFTs, ITLs and errors")
    g.add_argument("--result-filename", default=None,
                   help="result file name (default: vLLM's <backend>-<rate>qps[-concurrency<N>]-<model>-<date>.json)")
    g.add_argument("--result-dir", default=None,
                   help="folder for the result file, bench.json and PNG plots (default: current folder, "
                        "and no bench.json without it)")
    g.add_argument("--label", default=None, help="label stored in the result file (default: none)")
    g.add_argument("--metadata", nargs="+", type=metadata_item, default=None, metavar="KEY=VALUE",
                   help="extra fields stored in the result file (default: none)")
    g.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    g.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def slos(args: argparse.Namespace) -> dict[str, float | None]:
    """slo_ttft_ms / slo_tpot_ms / slo_e2el_ms from --goodput (and the --slo-* flags)."""
    out: dict[str, float | None] = {"slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms,
                                    "slo_e2el_ms": None}
    for key, value in args.goodput or []:
        out[f"slo_{key}_ms"] = value
    return out


def write_outputs(args: argparse.Namespace, result: BenchResult) -> list[Path]:
    """The files the flags ask for; returns their paths."""
    from pdserve.bench.report import plot, write_json
    from pdserve.bench.vllm_json import default_filename, vllm_result, write_vllm_json

    written: list[Path] = []
    plot_dir, prefix = (Path(args.result_dir), "") if args.result_dir else (None, "")
    if args.save_result:
        name = args.result_filename or default_filename(result)
        path = Path(args.result_dir or ".") / name
        data = vllm_result(result, args.percentile_metrics, args.metric_percentiles, args.save_detailed,
                           args.label, dict(args.metadata or []))
        written.append(write_vllm_json(data, path))
        if plot_dir is None:
            plot_dir, prefix = path.parent, path.stem + "_"
    if args.result_dir:
        written.append(write_json(result, Path(args.result_dir) / "bench.json"))
    if plot_dir is not None and not args.no_plots:
        written += plot(result, plot_dir, prefix)
    if written:
        print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return written
