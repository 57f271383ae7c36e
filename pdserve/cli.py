"""`pdserve` command line: generate | convert | serve | router | launch | bench.

Subcommand modules are imported lazily so `pdserve --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pdserve.engine_args import add_engine_arguments, engine_config_from_args


def _add_generate(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate text offline with the engine in this process")
    add_engine_arguments(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from pdserve.engine.llm import LLM
    from pdserve.engine.sampling_params import SamplingParams

    llm = LLM(**asdict(engine_config_from_args(args)))
    prompts: list[Any] = args.prompt
    if args.chat:
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.sampling_seed)
    for prompt, out in zip(args.prompt, llm.generate(prompts, params)):
        print(f"### {prompt}\n{out.text}\n[{len(out.output_ids)} tokens, finish: {out.finish_reason}]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pdserve.bench.cli import add_bench_parser
    from pdserve.cli_convert import add_convert_parser
    from pdserve.launch import add_launch_parser
    from pdserve.router.cli import add_router_parser
    from pdserve.server.launch_server import add_serve_parser

    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
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


if __name__ == "__main__":
    sys.exit(main())
