"""Frozen configuration dataclasses: every engine knob in one place, with its default."""

from __future__ import annotations

import os
from dataclasses import dataclass


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class EngineConfig:
    model: str = "default"  # HF folder, .gguf file, or "default" (bundled SmolLM2-135M)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # compute dtype; fp32 on CPU (no native bf16 here)
    page_size: int = 16
    kv_cache_gb: float = 1.0  # KV pool size when num_pages is not given
    num_pages: int | None = None
    max_model_len: int | None = None  # default: the model's max_position_embeddings, capped
    max_running: int = 64  # requests in the running batch
    chunk_budget: int = 512  # tokens per forward (chunked prefill + decode)
    enable_prefix_cache: bool = True
    decode_headroom: float = 0.5  # fraction of running requests' remaining decode to keep free
    threads: int | None = None  # torch intra-op threads (CPU); None = all cores we may use
    max_top_logprobs: int = 20
    seed: int = 0
    tp_size: int = 1  # tensor-parallel ranks (one process each; engine/tp_worker.py)


def set_torch_threads(threads: int | None) -> None:
    """torch's intra-op threads for this process: `threads`, or every core it may use."""
    import torch

    torch.set_num_threads(max(1, threads or default_threads()))
