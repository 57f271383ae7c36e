"""Command-line flags for every EngineConfig knob, shared by `pdserve generate` and `serve`.

Each knob has pdserve's flag plus SGLang's and vLLM's spellings as aliases (`ENGINE_FLAGS`;
README's "Engine knobs" table lists both); every spelling sets the same EngineConfig field.
Values are checked by argparse (`type=`, `choices=`) so a bad one fails at parse time, and
flag combinations by `check_engine_args` before anything is loaded. This module imports no
torch: `pdserve --help` must stay fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pdserve.engine.config import ATTENTION_BACKENDS, DTYPE_CHOICES, HICACHE_BACKENDS, HICACHE_PREFETCH_POLICIES, \
    HICACHE_WRITE_POLICIES, QUANTIZATIONS, EngineConfig
from pdserve.engine.spec.config import SPEC_FLAGS
from pdserve.flags.argtypes import device, fraction, non_negative_float, non_negative_int, positive_float, \
    positive_int
from pdserve.flags.table import Flag, add_flags, flag_values, with_values
from pdserve.kv_events import parse_kv_events_config

ENGINE_FLAGS: tuple[Flag, ...] = (
    Flag(("--revision",), "revision", str, "a Hub model's branch, tag or commit", shown="its main branch"),
    Flag(("--download-dir",), "download_dir", str, "Hugging Face cache folder for Hub models",
         shown="$HF_HUB_CACHE, else ~/.cache/huggingface/hub", metavar="DIR"),
    Flag(("--device",), "device", device, "auto | cpu | cuda | cuda:N (auto: cuda when available)",
         metavar="DEVICE"),
    Flag(("--dtype",), "dtype", str, "compute dtype; auto: the model's on CUDA (a float32 model: bfloat16, "
         "else float16), float32 on CPU; half = float16", DTYPE_CHOICES),
    Flag(("--page-size", "--block-size"), "page_size", positive_int, "tokens per KV page"),
    Flag(("--quantization",), "quantization", str,
         "weight-only quantization of the GEMM weights (CPU, float32 compute): fp16 halves the bytes a decode "
         "step reads (fbgemm)", QUANTIZATIONS),
    Flag(("--attention-backend",), "attention_backend", str,
         "decode attention: cpp reads the KV pages in place (C++ kernel, built once and cached), torch_native "
         "gathers them for SDPA, auto = cpp where it builds (CPU, float32)", ATTENTION_BACKENDS),
    Flag(("--kv-cache-gb",), "kv_cache_gb", positive_float, "KV pool size in GiB",
         shown="1 on CPU; on CUDA the pool is sized by --gpu-memory-utilization 0.9"),
    Flag(("--num-pages", "--num-gpu-blocks-override"), "num_pages", positive_int,
         "KV pool size in pages", shown="from the size or the memory flags"),
    Flag(("--gpu-memory-utilization",), "gpu_memory_utilization", fraction,
         "vLLM's: this share of the device's total memory holds the weights, activations and the KV pool "
         "(CPU: of this machine's memory)", shown="0.9 on CUDA when no other size is given"),
    Flag(("--mem-fraction-static",), "mem_fraction_static", fraction,
         "SGLang's: this share of the device's total memory holds the weights and the KV pool (static "
         "memory); the rest stays for activations and other processes", shown="off"),
    Flag(("--max-model-len", "--context-length"), "max_model_len", positive_int,
         "context length (default: the model's max_position_embeddings, capped by the KV pool)"),
    Flag(("--max-running", "--max-running-requests", "--max-num-seqs"), "max_running", positive_int,
         "requests in the running batch"),
    Flag(("--chunk-budget", "--chunked-prefill-size", "--max-num-batched-tokens"), "chunk_budget",
         positive_int, "tokens per forward, shared by chunked prefill and decode"),
    Flag(("--decode-headroom",), "decode_headroom", non_negative_float,
         "fraction of the running requests' remaining decode kept free at admission"),
    Flag(("--threads",), "threads", positive_int,
         "torch intra-op threads in the engine process (default: every core it may use)"),
    Flag(("--max-top-logprobs", "--max-logprobs"), "max_top_logprobs", non_negative_int, "cap on top_logprobs"),
    Flag(("--seed", "--random-seed"), "seed", int, "engine random seed"),
    Flag(("--tokenizer", "--tokenizer-path"), "tokenizer", str,
         "HF folder (or .gguf, or 'default') to take the tokenizer from (default: the model's)", metavar="PATH"),
    Flag(("--chat-template",), "chat_template", str,
         "Jinja chat template: a file path, or the template text itself (default: the tokenizer's)",
         metavar="FILE_OR_TEXT"),
    Flag(("--log-stats-interval",), "log_stats_interval_s", non_negative_float,
         "seconds between the engine's stats lines while it has work (0: never)", metavar="SECONDS"),
    Flag(("--tp-size", "--tensor-parallel-size", "-tp"), "tp_size", positive_int,
         "tensor-parallel ranks, one process each (gloo on CPU, NCCL on CUDA)"),
    Flag(("--dp-size", "--data-parallel-size", "-dp"), "dp_size", positive_int,
         "data-parallel ranks behind one HTTP front: engine replicas, each with its own scheduler and KV pool "
         "(with --enable-dp-attention: attention ranks sharing one tensor-parallel MLP)"),
    Flag(("--ep-size", "--expert-parallel-size"), "ep_size", positive_int,
         "expert-parallel ranks of a mixture-of-experts model: 1, or --tp-size (each rank holds 1/ep of the "
         "routed experts, whole; under --enable-dp-attention the dp ranks, tokens sent all-to-all)"),
    Flag(("--load-balance-method",), "load_balance_method", str,
         "how the front spreads requests over dp ranks (a request's data_parallel_rank wins; a PD prefill "
         "puts each room on bootstrap_room %% dp-size)", ("round_robin", "shortest_queue")),
    Flag(("--nnodes",), "nnodes", positive_int, "machines the tp ranks span"),
    Flag(("--node-rank",), "node_rank", non_negative_int,
         "this machine's index (0 runs the scheduler and the HTTP front; others only their tp ranks)"),
    Flag(("--dist-init-addr",), "dist_init_addr", str,
         "HOST:PORT of node 0's rendezvous; the process group binds the interface toward HOST", metavar="HOST:PORT"),
    Flag(("--kv-events-config",), "kv_events_config", str,
         "publish KV-cache events (JSON, e.g. '{\"endpoint\": \"tcp://127.0.0.1:5557\"}'; '{}' binds 127.0.0.1 "
         "on a free port, shown in /server_info); the router's cache_aware and conditional PD use them",
         metavar="JSON"),
)

# KV tiers (engine/kv_tiers), SGLang's HiCache names
HICACHE_FLAGS: tuple[Flag, ...] = (
    Flag(("--hicache-ratio",), "hicache.ratio", positive_float,
         "host KV tier size as a multiple of the device pool's pages"),
    Flag(("--hicache-size",), "hicache.size_gb", non_negative_float,
         "host KV tier size in GiB (0: use --hicache-ratio)"),
    Flag(("--hicache-write-policy",), "hicache.write_policy", str,
         "when pages go down a tier: write_through (at once), write_through_selective (pages hit twice), "
         "write_back (when evicted)", HICACHE_WRITE_POLICIES),
    Flag(("--hicache-storage-backend",), "hicache.storage_backend", str,
         "a storage tier below host memory, shared by every instance that names the same store",
         HICACHE_BACKENDS, shown="none"),
    Flag(("--hicache-storage-backend-extra-config",), "hicache.storage_extra", str,
         'the backend\'s JSON: file {"path": DIR, "max_bytes": "64gb"}; mooncake {"master_server_address": '
         '"HOST:PORT", "metadata_server": "P2PHANDSHAKE", "protocol": "tcp", "global_segment_size": "4gb", '
         '"local_buffer_size": "64mb"} (or MOONCAKE_* variables)', metavar="JSON"),
    Flag(("--hicache-storage-prefetch-policy",), "hicache.prefetch_policy", str,
         "a request whose prefix continues in storage: best_effort (never waits for it), wait_complete, "
         "timeout (waits at most --hicache-storage-prefetch-timeout)", HICACHE_PREFETCH_POLICIES),
    Flag(("--hicache-storage-prefetch-timeout",), "hicache.prefetch_timeout_s", positive_float,
         "seconds a request waits for its prefix from storage under the timeout policy", metavar="SECONDS"),
)
HICACHE_SWITCH = Flag(("--enable-hierarchical-cache",), "hicache.enable", None,
                      "KV tiers below the device pool: evicted pages go to host memory (and a storage backend), "
                      "a prefix found there is loaded back instead of recomputed")


MODEL_FLAG = Flag(("--model", "--model-path"), "model", str,
                  "HF folder, .gguf file, Hub id org/name, or 'default' (bundled SmolLM2-135M-Instruct); "
                  "also positional: pdserve serve MODEL")
ENGINE_SWITCHES: tuple[Flag, ...] = (
    Flag(("--disable-prefix-cache", "--disable-radix-cache", "--no-enable-prefix-caching"), "enable_prefix_cache",
         None, "turn the radix prefix cache off", const=False),
    Flag(("--enable-prefix-caching",), "enable_prefix_cache", None, "vLLM's: the radix prefix cache (on by default)",
         const=True),
    Flag(("--enable-dp-attention",), "enable_dp_attention", None,
         "dp ranks keep their own requests, KV pools and whole attention while the MLP is "
         "tensor-parallel over all of them (needs --tp-size == --dp-size)"),
    Flag(("--enable-expert-parallel",), "ep_size", None,
         "vLLM's spelling of --ep-size equal to --tp-size", const=0),
    Flag(("--disable-cpu-prepack",), "cpu_prepack", None,
         "CPU: keep GEMM weights dense (F.linear) instead of prepacked for oneDNN", const=False),
    Flag(("--skip-server-warmup", "--skip-warmup"), "warmup", None,
         "report ready without running the warm-up request", const=False),
    Flag(("--enable-priority-scheduling",), "enable_priority_scheduling", None,
         "admit and preempt by each request's `priority` (lower value first; FCFS within a priority); "
         "without it a priority other than 0 is refused (400)"),
    HICACHE_SWITCH,
)


# read by the front itself (no EngineConfig field), and peers' flags that change nothing here
TOKEN_FLAG = Flag(("--hf-token",), None, str, "token for gated or private Hub models (sets HF_TOKEN for the "
                  "server and its engine)", shown="$HF_TOKEN, else huggingface_hub's login")
NOOP_FLAGS: tuple[Flag, ...] = (
    Flag(("--trust-remote-code",), None, None, "accepted (vLLM's and SGLang's)",
         noop="pdserve runs its own code for each architecture it serves; none comes from the model repository"),
    Flag(("--enable-metrics",), None, None, "accepted (SGLang's)", noop="/metrics is always served"),
)
ENGINE_EXTRAS = (TOKEN_FLAG, *NOOP_FLAGS)
_SIZES = {"num_pages": "--num-pages", "kv_cache_gb": "--kv-cache-gb", "gpu_memory_utilization":
          "--gpu-memory-utilization", "mem_fraction_static": "--mem-fraction-static"}


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The engine's flags (--help shows EngineConfig's defaults; a flag not given is None) and
    an optional positional MODEL (vLLM's `vllm serve MODEL`)."""
    group = p.add_argument_group("model and engine (SGLang's and vLLM's spellings are aliases)")
    group.add_argument("model_tag", nargs="?", metavar="MODEL", help="the model, as --model")
    add_flags(group, (MODEL_FLAG, *ENGINE_FLAGS, *ENGINE_SWITCHES, *ENGINE_EXTRAS), EngineConfig())
    add_flags(p.add_argument_group("KV tiers (SGLang's HiCache flags; with --enable-hierarchical-cache)"),
              HICACHE_FLAGS, EngineConfig())
    add_flags(p.add_argument_group("speculative decoding (engine/spec/)"), SPEC_FLAGS, EngineConfig())


def check_engine_args(args: argparse.Namespace) -> None:
    """Flag combinations that cannot work; raises ValueError with one sentence."""
    config = engine_config_from_args(args)
    config.check_parallel()
    given = [f.names[0] for f in HICACHE_FLAGS if getattr(args, f.dest) is not None]
    if given and not config.hicache.enable:
        raise ValueError(f"{given[0]} needs --enable-hierarchical-cache")
    if config.hicache.storage_backend is not None:
        from pdserve.engine.kv_tiers.backends import check_backend_config

        check_backend_config(config.hicache.storage_backend, config.hicache.storage_extra)
    config.speculative.check()
    sizes = [flag for name, flag in _SIZES.items() if getattr(args, name, None) is not None]
    if len(sizes) > 1:
        raise ValueError(f"{' and '.join(sizes)} each size the KV pool: give one of them")
    if args.enable_prefix_caching and args.disable_prefix_cache:
        raise ValueError("--enable-prefix-caching and --disable-prefix-cache contradict each other")
    if args.num_pages is not None and args.num_pages < 2:
        raise ValueError("--num-pages must be at least 2")
    if args.max_model_len is not None and args.num_pages is not None and args.page_size is not None:
        if args.max_model_len > (args.num_pages - 1) * args.page_size:
            raise ValueError(f"--max-model-len {args.max_model_len} does not fit in {args.num_pages} pages of "
                             f"{args.page_size} tokens (at most {(args.num_pages - 1) * args.page_size})")
    if args.kv_events_config is not None:
        parse_kv_events_config(args.kv_events_config)
    template = args.chat_template
    if template is not None and "{" not in template and not Path(template).is_file():
        raise ValueError(f"--chat-template {template!r} is neither a file nor a Jinja template")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    values = flag_values(args, (MODEL_FLAG, *ENGINE_FLAGS, *ENGINE_SWITCHES, *HICACHE_FLAGS, *SPEC_FLAGS),
                         EngineConfig())
    tag = getattr(args, "model_tag", None)
    if tag is not None:
        if args.model is not None and args.model != tag:
            raise ValueError(f"the model is given twice: {tag!r} and --model {args.model!r}")
        values["model"] = tag
    template = values.get("chat_template")
    if template is not None and "{" not in template and Path(template).is_file():
        values["chat_template"] = Path(template).read_text(encoding="utf-8")
    return with_values(EngineConfig(), values)
