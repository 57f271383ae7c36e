"""Command-line flags for every EngineConfig knob, shared by `pdserve generate` and `serve`."""

from __future__ import annotations

import argparse
from typing import Any

from pdserve.engine.config import EngineConfig

ENGINE_FLAGS = {  # flag → (EngineConfig field, type, help)
    "--device": ("device", str, "auto | cpu | cuda | cuda:N"),
    "--dtype": ("dtype", str, "compute dtype (float32 on CPU)"),
    "--page-size": ("page_size", int, "tokens per KV page"),
    "--kv-cache-gb": ("kv_cache_gb", float, "KV pool size in GiB (when --num-pages is not given)"),
    "--num-pages": ("num_pages", int, "KV pool size in pages"),
    "--max-model-len": ("max_model_len", int, "context length (default: the model's, capped by the pool)"),
    "--max-running": ("max_running", int, "requests in the running batch"),
    "--chunk-budget": ("chunk_budget", int, "tokens per forward (chunked prefill + decode)"),
    "--decode-headroom": ("decode_headroom", float, "fraction of running decode kept free at admission"),
    "--threads": ("threads", int, "torch intra-op threads in the engine process"),
    "--max-top-logprobs": ("max_top_logprobs", int, "cap on top_logprobs"),
    "--seed": ("seed", int, "engine random seed"),
    "--tp-size": ("tp_size", int, "tensor-parallel ranks, one process each (alias --tensor-parallel-size)"),
    "--nnodes": ("nnodes", int, "machines the tp ranks span"),
    "--node-rank": ("node_rank", int, "this machine's index (0 runs the scheduler and the HTTP front)"),
    "--dist-init-addr": ("dist_init_addr", str, "HOST:PORT of node 0's rendezvous; the process group binds "
                                                "the interface of HOST"),
}


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--model-path", dest="model", default="default",
                   help="HF folder, .gguf file, or 'default' (bundled SmolLM2-135M-Instruct)")
    defaults = EngineConfig()
    for flag, (name, typ, text) in ENGINE_FLAGS.items():
        p.add_argument(flag, type=typ, default=None, help=f"{text} (default {getattr(defaults, name)})")
    p.add_argument("--tensor-parallel-size", dest="tp_size", type=int, default=None, help="alias of --tp-size")
    p.add_argument("--disable-prefix-cache", action="store_true", help="turn the radix prefix cache off")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    kwargs: dict[str, Any] = {"model": args.model}
    for flag, (name, _, _) in ENGINE_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            kwargs[name] = value
    if args.disable_prefix_cache:
        kwargs["enable_prefix_cache"] = False
    return EngineConfig(**kwargs)
