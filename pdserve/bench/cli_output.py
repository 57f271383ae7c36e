"""`pdserve bench`'s output flags and what they write (the table, the JSON, the plots)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pdserve.launch.argtypes import positive_float

if TYPE_CHECKING:
    from pdserve.bench.runner import BenchResult


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("goodput and output")
    g.add_argument("--slo-ttft-ms", type=positive_float, default=None, help="TTFT SLO for goodput (default: none)")
    g.add_argument("--slo-tpot-ms", type=positive_float, default=None, help="TPOT SLO for goodput (default: none)")
    g.add_argument("--result-dir", default=None, help="write bench.json and PNG plots here (default: nothing written)")
    g.add_argument("--no-plots", action="store_true", help="write bench.json only")
    g.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def write_outputs(args: argparse.Namespace, result: BenchResult) -> list[Path]:
    """The files the flags ask for; returns their paths."""
    from pdserve.bench.report import plot, write_json

    if not args.result_dir:
        return []
    out = Path(args.result_dir)
    written = [write_json(result, out / "bench.json")]
    if not args.no_plots:
        written += plot(result, out)
    print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return written
