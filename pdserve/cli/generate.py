"""`pdserve generate`: offline generation with the engine in this process (`LLM`)."""

from __future__ import annotations

import argparse
from typing import Any

from pdserve.engine.args import add_engine_arguments, engine_config_from_args


def add_generate_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate text offline with the engine in this process")
    add_engine_arguments(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
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
