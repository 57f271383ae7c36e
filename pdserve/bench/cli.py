"""`pdserve bench`: drive a running server with a workload and report latency and throughput.

Flag names follow ``vllm bench serve`` where one exists (``--save-result``, ``--result-dir``,
``--result-filename``, ``--percentile-metrics``, ``--metric-percentiles``, ``--goodput``, ...;
see :mod:`pdserve.bench.cli_output`). The table goes to stdout. The exit status is 0, 1 when
every request failed, 2 when the server cannot be reached.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from pdserve.bench.cli_output import add_output_arguments, slos, write_outputs
from pdserve.flags.argtypes import non_negative_float, non_negative_int, positive_float, positive_int, unit_interval

if TYPE_CHECKING:
    from pdserve.bench.runner import BenchConfig

def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The `pdserve bench` flags (defaults match :class:`pdserve.bench.runner.BenchConfig`); vLLM's
    spellings are aliases."""
    g = p.add_argument_group("server")
    g.add_argument("--base-url", required=True, help="server URL, e.g. http://127.0.0.1:30000 (required)")
    g.add_argument("--endpoint", default=None, choices=["/v1/completions", "/v1/chat/completions"],
                   help="/v1/completions (token-id prompts) or /v1/chat/completions (text prompts) "
                        "(default /v1/completions; /v1/chat/completions with --backend openai-chat)")
    g.add_argument("--backend", default="openai", choices=["openai", "openai-chat", "vllm", "sglang"],
                   help="vLLM's name for the API: openai-chat means /v1/chat/completions, the others "
                        "/v1/completions (default openai)")
    g.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    g.add_argument("--tokenizer", default=None,
                   help="'default' (bundled model), an HF folder, a .gguf or a transformers name "
                        "(default: the folder /v1/models reports as root, else the model id)")
    g.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY' (default: none)")
    g = p.add_argument_group("workload")
    g.add_argument("--dataset-name", default="random", choices=["random", "shared-prefix", "sharegpt"],
                   help="(default random)")
    g.add_argument("--dataset-path", default=None, help="ShareGPT JSON file (needed for --dataset-name sharegpt)")
    g.add_argument("--num-prompts", type=positive_int, default=100, help="requests to send (default 100)")
    g.add_argument("--random-input-len", type=positive_int, default=256, help="prompt tokens (default 256)")
    g.add_argument("--random-output-len", type=positive_int, default=64,
                   help="output tokens per request, all datasets but sharegpt (default 64)")
    g.add_argument("--random-range-ratio", type=unit_interval, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)] (default 0)")
    g.add_argument("--random-prefix-len", type=non_negative_int, default=0,
                   help="shared random prefix before each prompt (default 0)")
    g.add_argument("--random-as-text", action="store_true",
                   help="send random prompts as text fixed up to the exact length (default: token ids)")
    g.add_argument("--shared-prefix-system-len", type=positive_int, default=256,
                   help="shared-prefix: system prompt tokens per group (default 256)")
    g.add_argument("--shared-prefix-question-len", type=positive_int, default=32,
                   help="shared-prefix: question tokens per request (default 32)")
    g.add_argument("--shared-prefix-groups", type=positive_int, default=4,
                   help="shared-prefix: distinct system prompts (default 4)")
    g.add_argument("--sharegpt-output-len", type=positive_int, default=None,
                   help="fixed output length (default: the gpt answer's token count)")
    g = p.add_argument_group("load")
    g.add_argument("--request-rate", type=positive_float, default=float("inf"),
                   help="requests/s; inf = all at once (default inf)")
    g.add_argument("--burstiness", type=positive_float, default=1.0,
                   help="gamma shape of arrivals; 1 = Poisson (default 1)")
    g.add_argument("--max-concurrency", type=positive_int, default=None,
                   help="cap on requests in flight (default: no cap)")
    g.add_argument("--warmup-requests", "--num-warmups", dest="warmup_requests", type=non_negative_int, default=2,
                   help="short requests sent first, not counted (default 2)")
    g.add_argument("--seed", type=int, default=0, help="workload and arrival seed (default 0)")
    g.add_argument("--temperature", type=non_negative_float, default=0.0, help="sampling temperature (default 0)")
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly max_tokens (default: on)")
    g.add_argument("--timeout", type=positive_float, default=600.0, help="seconds per request (default 600)")
    add_output_arguments(p)


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `bench` sub-command to `subparsers` (from `ArgumentParser.add_subparsers()`)."""
    p = subparsers.add_parser("bench", help="benchmark a running OpenAI-compatible server (TTFT, ITL, tok/s)",
                              description=__doc__.splitlines()[0])
    add_bench_arguments(p)
    p.set_defaults(func=run_bench)
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`~pdserve.bench.runner.BenchConfig` the parsed flags describe."""
    from pdserve.bench.client import CHAT, COMPLETIONS
    from pdserve.bench.runner import BenchConfig

    return BenchConfig(
        base_url=args.base_url, model=args.model, endpoint=args.endpoint or (CHAT if args.backend == "openai-chat" else COMPLETIONS), dataset=args.dataset_name,
        dataset_path=args.dataset_path, num_prompts=args.num_prompts, input_len=args.random_input_len,
        output_len=args.random_output_len, range_ratio=args.random_range_ratio, prefix_len=args.random_prefix_len,
        system_prompt_len=args.shared_prefix_system_len, question_len=args.shared_prefix_question_len,
        num_groups=args.shared_prefix_groups, request_rate=args.request_rate, burstiness=args.burstiness,
        max_concurrency=args.max_concurrency, warmup=args.warmup_requests, seed=args.seed,
        **slos(args), tokenizer=args.tokenizer,
        api_key=args.api_key, timeout_s=args.timeout, disable_tqdm=args.disable_tqdm,
        temperature=args.temperature, ignore_eos=args.ignore_eos, as_text=args.random_as_text,
        sharegpt_output_len=args.sharegpt_output_len,
    )


def run_bench(args: argparse.Namespace) -> int:
    from pdserve.bench.report import print_table
    from pdserve.bench.runner import run

    try:
        result = run(config_from_args(args))
    except (RuntimeError, OSError) as exc:  # server unreachable, /v1/models failed, ...
        print(f"pdserve bench: error: {exc}", file=sys.stderr)
        return 2
    print_table(result, metrics=args.percentile_metrics, percentiles=args.metric_percentiles)
    write_outputs(args, result)
    return 0 if result.summary["completed"] > 0 else 1
