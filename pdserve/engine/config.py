"""Frozen configuration dataclasses: every engine knob in one place, with its default."""

from __future__ import annotations

import os
from dataclasses import dataclass


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


# the names model.loader.DTYPES accepts (kept here as strings so the CLI needs no torch)
DTYPE_CHOICES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


@dataclass(frozen=True)
class EngineConfig:
    model: str = "default"  # HF folder, .gguf file, or "default" (bundled SmolLM2-135M)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # compute dtype; fp32 on CPU (no native bf16 here)
    page_size: int = 16
    kv_cache_gb: float = 1.0  # KV pool size when neither num_pages nor mem_fraction_static is given
    num_pages: int | None = None
    mem_fraction_static: float | None = None  # KV pool = this fraction of memory left after the weights
    max_model_len: int | None = None  # default: the model's max_position_embeddings, capped
    max_running: int = 64  # requests in the running batch
    chunk_budget: int = 512  # tokens per forward (chunked prefill + decode)
    enable_prefix_cache: bool = True
    decode_headroom: float = 0.5  # fraction of running requests' remaining decode to keep free
    threads: int | None = None  # torch intra-op threads (CPU); None = all cores we may use
    max_top_logprobs: int = 20
    seed: int = 0
    tokenizer: str | None = None  # tokenizer folder (default: the model's)
    chat_template: str | None = None  # Jinja source (default: the tokenizer's)
    log_stats_interval_s: float = 10.0  # engine stats line while busy; 0 = never
    warmup: bool = True  # the engine process runs one short request before it reports ready


def set_torch_threads(threads: int | None) -> None:
    """torch's intra-op threads for this process: `threads`, or every core it may use."""
    import torch

    torch.set_num_threads(max(1, threads or default_threads()))
