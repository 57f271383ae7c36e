"""`pdserve` command line: generate | convert | serve | router | launch | bench.

Subcommand modules are imported lazily so `pdserve --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from pdserve.bench.cli import add_bench_parser
    from pdserve.cli.convert import add_convert_parser
    from pdserve.cli.generate import add_generate_parser
    from pdserve.launch.cluster import add_launch_parser
    from pdserve.router.cli import add_router_parser
    from pdserve.server.serve import add_serve_parser

    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    add_convert_parser(sub)
    add_serve_parser(sub)
    add_router_parser(sub)
    add_launch_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"pdserve: error: {e}", file=sys.stderr)
        return 2

