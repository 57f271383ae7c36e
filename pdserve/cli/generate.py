"""`pdserve generate`: offline generation with the engine in this process (`LLM`)."""

from __future__ import annotations

import argparse
from typing import Any

from pdserve.engine.args import add_engine_arguments, check_engine_args, engine_config_from_args
from pdserve.flags.argtypes import non_negative_float, non_negative_int, unit_interval


def add_generate_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="generate text offline with the engine in this process")
    add_engine_arguments(p)
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    g.add_argument("--max-new-tokens", type=non_negative_int, default=64, help="tokens per prompt (default 64)")
    g.add_argument("--temperature", type=non_negative_float, default=0.0, help="0: greedy (default 0)")
    g.add_argument("--top-p", type=unit_interval, default=1.0, help="nucleus sampling mass (default 1)")
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed (default: none)")
    p.set_defaults(func=run_generate)
    return p


def run_generate(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from pdserve.engine.llm import LLM
    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.model.bundled import check_model

    check_engine_args(args)
    config = engine_config_from_args(args)
    check_model(config.model)  # FileNotFoundError / ValueError: one line, exit 2 (cli.main)
    llm = LLM(**{f.name: getattr(config, f.name) for f in fields(config)})
    prompts: list[Any] = args.prompt
    if args.chat:
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.sampling_seed)
    for prompt, out in zip(args.prompt, llm.generate(prompts, params)):
        print(f"### {prompt}\n{out.text}\n[{len(out.output_ids)} tokens, finish: {out.finish_reason}]")
    return 0
