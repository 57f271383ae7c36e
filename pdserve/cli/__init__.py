"""`pdserve` command line: generate | convert | serve | router | launch | bench | profile | planner.

Also `python -m pdserve`. Building the parser imports no torch (each subcommand imports its
heavy modules only when it runs), so `pdserve --help` is fast.
"""

from __future__ import annotations

import argparse
import sys

from pdserve.flags.argtypes import OneLineParser


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("pdserve")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    from pdserve.bench.cli import add_bench_parser
    from pdserve.cli.convert import add_convert_parser
    from pdserve.cli.generate import add_generate_parser
    from pdserve.launch.cluster import add_launch_parser
    from pdserve.planner.cli import add_planner_parser, add_profile_parser
    from pdserve.router.cli import add_router_parser
    from pdserve.server.serve import add_serve_parser

    parser = OneLineParser(prog="pdserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pdserve {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_generate_parser, add_convert_parser, add_serve_parser, add_router_parser, add_launch_parser,
                add_bench_parser, add_profile_parser, add_planner_parser):
        p = add(sub)
        p.add_argument("--version", action="version", version=f"pdserve {version()}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"pdserve: error: {e}", file=sys.stderr)
        return 2
