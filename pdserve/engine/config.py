"""Frozen configuration dataclasses: every engine knob in one place, with its default.

`EngineConfig` holds the engine's knobs and, nested, its parallel layout (`ParallelConfig`):
both cross process boundaries as msgspec JSON (the engine process spawn, tp_worker's
RankSpec). The layout may also be spelled flat, `EngineConfig(tp_size=2)` and `cfg.tp_size`
(the flag tables, `LLM(tp_size=2)`): those keywords fold into `parallel` (`_flat_layout`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from typing import Any

from pdserve.engine.spec.config import SpecConfig


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


# the names model.loader.DTYPES accepts (kept here as strings so the CLI needs no torch), and
# "auto" (engine/memory.py: the model's dtype on CUDA, float32 on CPU) and vLLM's half / float
DTYPE_CHOICES = ("auto", "float32", "fp32", "float", "bfloat16", "bf16", "float16", "fp16", "half")
ATTENTION_BACKENDS = ("auto", "cpp", "torch_native")  # engine/attention.py's decode_in_place
QUANTIZATIONS = ("fp16",)  # weight-only, model/linear.py (int8/int4: no CPU kernel that pays, see there)


@dataclass(frozen=True)
class ParallelConfig:
    """The parallel layout of one server: tp ranks (one process each) over nnodes machines, dp
    ranks behind one HTTP front (engine replicas, or DP-attention ranks sharing one
    tensor-parallel MLP), and where the processes meet."""

    tp_size: int = 1  # tensor-parallel ranks (one process each; engine/tp_worker.py)
    nnodes: int = 1  # machines the tp ranks span (tp_size / nnodes ranks on each)
    node_rank: int = 0  # this machine's index; 0 runs the scheduler and the HTTP front
    dist_init_addr: str | None = None  # HOST:PORT of node 0's rendezvous (default: 127.0.0.1, any port)
    dp_size: int = 1  # data-parallel ranks behind one front (replicas, or attention ranks)
    enable_dp_attention: bool = False  # dp attention ranks share one tensor-parallel MLP (tp == dp)
    load_balance_method: str = "round_robin"  # how the front spreads requests over dp ranks
    ep_size: int = 1  # a mixture's routed experts over the tp ranks (DP attention: the dp ranks): 1 or tp_size;
    # 0 = tp_size (vLLM's --enable-expert-parallel)
    dp_rank: int = 0  # set by the front for each dp rank's engine process
    dp_store: str | None = None  # DP attention: the FileStore path the ranks meet at (set by the front)

    def check_parallel(self) -> None:
        """Raise ValueError (one sentence) for a tp/dp/nnodes/node-rank combination that cannot work."""
        if self.dp_size < 1:
            raise ValueError(f"--dp-size must be >= 1, got {self.dp_size}")
        if self.enable_dp_attention and self.tp_size != self.dp_size:
            raise ValueError(f"--enable-dp-attention needs --tp-size equal to --dp-size (one attention rank per "
                             f"dp rank; attention tp inside a dp rank is not supported yet), got tp "
                             f"{self.tp_size} and dp {self.dp_size}")
        if self.enable_dp_attention and self.dp_size < 2:
            raise ValueError("--enable-dp-attention needs --dp-size >= 2")
        if self.ep_size < 0 or self.ep_ranks not in (1, self.tp_size):
            raise ValueError(f"--ep-size must be 1 or --tp-size {self.tp_size} (the experts spread over the tp "
                             f"ranks, or under DP attention the dp ranks), got {self.ep_size}")
        if self.dp_size > 1 and self.nnodes > 1:
            raise ValueError("--dp-size > 1 runs on one machine: it cannot be combined with --nnodes > 1 yet")
        if self.tp_size < 1 or self.nnodes < 1 or self.tp_size % self.nnodes:
            raise ValueError(f"--tp-size {self.tp_size} must be a positive multiple of --nnodes {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank {self.node_rank} must be in [0, --nnodes {self.nnodes})")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ValueError("--nnodes > 1 needs --dist-init-addr HOST:PORT (node 0's address)")

    @property
    def ranks_per_node(self) -> int:
        return self.tp_size // self.nnodes

    @property
    def attn_tp_size(self) -> int:
        """Tensor-parallel ranks of one engine (scheduler): 1 under DP attention (tp == dp)."""
        return 1 if self.enable_dp_attention else self.tp_size

    @property
    def ep_ranks(self) -> int:
        """Expert-parallel ranks (1: every rank holds every expert, sliced under TP)."""
        return self.tp_size if self.ep_size == 0 else self.ep_size

    @property
    def num_processes(self) -> int:
        """Engine processes of the whole server on this machine (they share its cores)."""
        per_dp = 1 if self.enable_dp_attention else self.ranks_per_node
        return self.dp_size * per_dp

    def rendezvous(self) -> tuple[str, int]:
        """(host, port) of node 0's TCPStore; port 0 means any free one (single node only)."""
        if not self.dist_init_addr:
            return "127.0.0.1", 0
        host, _, port = self.dist_init_addr.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--dist-init-addr must be HOST:PORT, got {self.dist_init_addr!r}")
        return host.strip("[]"), int(port)


HICACHE_WRITE_POLICIES = ("write_through", "write_through_selective", "write_back")
HICACHE_PREFETCH_POLICIES = ("best_effort", "wait_complete", "timeout")
HICACHE_BACKENDS = ("file", "mooncake")


@dataclass(frozen=True)
class HiCacheConfig:
    """KV tiers below the device pool (engine/kv_tiers; SGLang's HiCache flags): a host tier of
    `ratio` x the device pool's pages (or `size_gb`), and optionally a storage tier shared by
    instances (`storage_backend` with its JSON `storage_extra`)."""

    enable: bool = False  # --enable-hierarchical-cache
    ratio: float = 2.0  # host-tier pages per device page
    size_gb: float = 0.0  # host tier in GiB (> 0 wins over ratio)
    write_policy: str = "write_through"  # when pages go down a tier (kv_tiers/tiers.py)
    storage_backend: str | None = None  # None | file | mooncake
    storage_extra: str | None = None  # --hicache-storage-backend-extra-config (JSON object)
    # how long a request waits for its prefix from storage: SGLang's default best_effort never
    # waits, so a request an idle server admits at once gains nothing; a bounded wait does
    prefetch_policy: str = "timeout"
    prefetch_timeout_s: float = 1.0  # prefetch_policy timeout: the wait's bound

    def check(self, prefix_cache: bool, layout: ParallelConfig) -> None:
        """Raise ValueError (one sentence) for tiers that cannot work with this engine."""
        if not self.enable:
            return
        if not prefix_cache:
            raise ValueError("--enable-hierarchical-cache needs the radix cache: drop --disable-radix-cache")
        if layout.tp_size > 1 or layout.dp_size > 1:
            raise ValueError("--enable-hierarchical-cache with --tp-size or --dp-size > 1 is not supported yet "
                             "(every rank would copy its own KV heads between tiers)")
        if self.ratio <= 0 or self.size_gb < 0:
            raise ValueError("--hicache-ratio must be > 0 and --hicache-size >= 0")
        if self.write_policy not in HICACHE_WRITE_POLICIES:
            raise ValueError(f"--hicache-write-policy must be one of {', '.join(HICACHE_WRITE_POLICIES)}")
        if self.prefetch_policy not in HICACHE_PREFETCH_POLICIES:
            raise ValueError(f"--hicache-storage-prefetch-policy must be one of {', '.join(HICACHE_PREFETCH_POLICIES)}")
        if self.storage_backend is not None and self.storage_backend not in HICACHE_BACKENDS:
            raise ValueError(f"--hicache-storage-backend must be one of {', '.join(HICACHE_BACKENDS)}")
        if self.storage_extra is not None and self.storage_backend is None:
            raise ValueError("--hicache-storage-backend-extra-config needs --hicache-storage-backend")


LAYOUT_FIELDS = tuple(f.name for f in dataclasses.fields(ParallelConfig))
_LAYOUT_READS = LAYOUT_FIELDS + ("attn_tp_size", "ep_ranks", "num_processes", "ranks_per_node", "rendezvous")


def _flat_layout(cls: type) -> type:
    """Let `cls(tp_size=2, ...)` (and dataclasses.replace with those keywords) fold the flat
    layout keywords into its `parallel`, and `obj.tp_size` (and the layout's sizes) read it.
    Only __init__ and reads change: msgspec, asdict and == see the field `parallel` alone."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        layout = {k: kwargs.pop(k) for k in LAYOUT_FIELDS if k in kwargs}
        if layout:
            kwargs["parallel"] = dataclasses.replace(kwargs.get("parallel") or ParallelConfig(), **layout)
        init(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[misc]
    for name in _LAYOUT_READS:
        setattr(cls, name, property(lambda self, name=name: getattr(self.parallel, name)))
    return cls


@_flat_layout
@dataclass(frozen=True)
class EngineConfig:
    model: str = "default"  # HF folder, .gguf file, Hub id org/name, or "default" (bundled SmolLM2-135M)
    revision: str | None = None  # a Hub id's branch, tag or commit (default: its main branch)
    download_dir: str | None = None  # the Hugging Face cache for Hub ids (default: HF_HUB_CACHE)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # compute dtype; auto: the model's on CUDA, float32 on CPU (engine/memory.py)
    page_size: int = 16
    kv_cache_gb: float | None = None  # KV pool size in GiB (default: 1 on CPU; CUDA: from memory)
    num_pages: int | None = None
    gpu_memory_utilization: float | None = None  # vLLM's: weights + activations + pool in this share
    mem_fraction_static: float | None = None  # SGLang's: weights + pool in this share of the device
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
    cpu_prepack: bool = True  # CPU: GEMM weights prepacked for oneDNN at load (model/linear.py)
    attention_backend: str = "auto"  # decode attention: auto | cpp (pages read in place) | torch_native (gather)
    quantization: str | None = None  # weight-only: fp16 (fbgemm) instead of the prepacked fp32 weights
    warmup: bool = True  # the engine process runs one short request before it reports ready
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # the tp/dp layout (flat keywords fold in)
    kv_events_config: str | None = None  # JSON (pdserve/kv_events): publish KV events; None = off
    hicache: HiCacheConfig = field(default_factory=HiCacheConfig)  # KV tiers below the pool (off by default)
    speculative: SpecConfig = field(default_factory=SpecConfig)  # speculative decoding (engine/spec/); off
    enable_priority_scheduling: bool = False  # admit and preempt by the request's priority (lower first)

    def check_parallel(self) -> None:
        """Raise ValueError (one sentence) for a layout that cannot work, here or with the engine's knobs."""
        self.parallel.check_parallel()
        self.hicache.check(self.enable_prefix_cache, self.parallel)
        if self.parallel.dp_size > 1 and self.kv_events_config is not None:
            raise ValueError("--kv-events-config with --dp-size > 1 is not supported yet (one publisher per dp rank "
                             "would need advertising)")


def set_torch_threads(threads: int | None) -> None:
    """torch's intra-op threads for this process: `threads`, or every core it may use."""
    import torch

    torch.set_num_threads(max(1, threads or default_threads()))


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """glibc: serve a step's large temporaries (a decode's gathered KV, GEMM outputs: MBs each,
    freed every layer) from the heap instead of a fresh mmap each time, whose page faults and
    zeroing cost more than the work (batch 64 x 288 tokens: a step 2.2x faster, batch 1 1.2x).
    The role tcmalloc/jemalloc play when vLLM's CPU backend preloads them. Call it after the
    weights and the KV pool are allocated: they keep their own mmaps. False where not glibc."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    # 32 MiB is glibc's largest mmap threshold on 64-bit; freed heap above 512 MiB is returned
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 512 << 20))
