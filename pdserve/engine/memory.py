"""How big the KV pool is, and in which dtype the model computes: the device-aware defaults.

Lifecycle: `build_parts` (engine/build.py) calls `compute_dtype` before anything loads, then
`pool_gib` once the weights are on the device (or, with tensor parallelism, before: every
rank must agree on the size, so the weights are estimated from the checkpoint's headers).

    --dtype auto                    CUDA: the model's torch_dtype (a float32 model: bfloat16 where
                                    the GPU has it, else float16); CPU: float32
    --num-pages N / --kv-cache-gb G N pages / G GiB (the CPU default when nothing is given: 1 GiB)
    --gpu-memory-utilization U      vLLM's: U x the device's total memory holds this engine's
                                    weights, its activations and the pool:
                                        pool = U x total - weights - activations
                                    (the CUDA default when nothing is given: 0.9)
    --mem-fraction-static F         SGLang's: F x total is static memory (weights + pool); the rest
                                    stays for activations and for what others hold:
                                        pool = free after the weights loaded - (1 - F) x total

"Total" and "free" are the GPU's (`torch.cuda.mem_get_info`) or, on CPU, the machine's
(MemTotal or the cgroup's limit, and MemAvailable). A pool that comes out at no page, or one
larger than what is free, is a ValueError with one line saying what to change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pdserve.engine.config import EngineConfig
from pdserve.model.config import ModelConfig
from pdserve.model.loader import checkpoint_numel, resolve_dtype

log = logging.getLogger(__name__)
CPU_DEFAULT_KV_GB = 1.0
CUDA_DEFAULT_UTILIZATION = 0.9
GIB = 1 << 30


@dataclass(frozen=True)
class DeviceMemory:
    total: int  # bytes
    free: int  # bytes free now


NO_MEMORY = DeviceMemory(0, 0)  # for a fixed size, which reads none


def _host_memory() -> DeviceMemory:
    info: dict[str, int] = {}
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0]) * 1024
    total = info["MemTotal"]
    try:  # a container's limit (cgroup v2) is its machine
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return DeviceMemory(total, min(info.get("MemAvailable", info["MemFree"]), total))


def device_memory(device: torch.device) -> DeviceMemory:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return DeviceMemory(total, free)
    return _host_memory()


def compute_dtype(config: EngineConfig, device: torch.device, model_folder: Path) -> str:
    """The dtype name to compute in (`--dtype`; "auto" resolved as the module docstring says)."""
    name = {"half": "float16", "float": "float32"}.get(config.dtype, config.dtype)
    if name != "auto":
        return name
    if device.type != "cuda":
        return "float32"
    import json

    data = json.loads((model_folder / "config.json").read_text())
    declared = str(data.get("torch_dtype") or data.get("dtype") or "float32").removeprefix("torch.")
    if declared in ("bfloat16", "float16"):
        return declared
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def activation_bytes(cfg: ModelConfig, config: EngineConfig, itemsize: int) -> int:
    """An estimate of one forward's temporaries (vLLM profiles a forward; pdserve estimates it):
    a chunk's hidden states, q/k/v, the gate-up product and the sampled rows' fp32 logits."""
    tokens = config.chunk_budget
    per_token = 6 * cfg.hidden_size + 3 * cfg.intermediate_size + 2 * cfg.num_attention_heads * cfg.head_dim
    return tokens * per_token * itemsize + 2 * config.max_running * cfg.vocab_size * 4


def memory_based(config: EngineConfig, device: torch.device) -> bool:
    """Does the pool's size depend on the device's memory (rather than on a fixed size)?"""
    if config.num_pages is not None or config.kv_cache_gb is not None:
        return False
    return (config.gpu_memory_utilization is not None or config.mem_fraction_static is not None
            or device.type == "cuda")


def pool_gib(config: EngineConfig, device: torch.device, mem: DeviceMemory, weights: int, activations: int,
             pending: int = 0) -> float:
    """GiB for the KV pool (the module docstring's table); `pending`: bytes of the weights not on
    the device yet when `mem` was read (tensor parallelism sizes the pool before loading)."""
    if config.kv_cache_gb is not None or not memory_based(config, device):
        return config.kv_cache_gb if config.kv_cache_gb is not None else CPU_DEFAULT_KV_GB
    where = "the GPU" if device.type == "cuda" else "this machine"
    if device.type != "cuda" and config.parallel.num_processes > 1:  # the server's engines share the host
        share = config.parallel.num_processes
        mem, where = DeviceMemory(mem.total // share, mem.free // share), f"1/{share} of this machine"
    if config.mem_fraction_static is not None:
        fraction = config.mem_fraction_static
        pool = mem.free - pending - (1.0 - fraction) * mem.total
        flag = f"--mem-fraction-static {fraction:g}"
        if pool <= 0:
            raise ValueError(f"{flag} leaves no room for the KV pool: {mem.free / GIB:.2f} GiB of {where}'s "
                             f"{mem.total / GIB:.2f} GiB is free after the weights and {(1 - fraction):.0%} of it "
                             "is kept for activations and other processes; raise it or give --kv-cache-gb")
    else:
        util = config.gpu_memory_utilization or CUDA_DEFAULT_UTILIZATION
        pool = util * mem.total - weights - activations
        flag = f"--gpu-memory-utilization {util:g}"
        if pool <= 0:
            raise ValueError(f"{flag} leaves no room for the KV pool: it allows {util * mem.total / GIB:.2f} GiB of "
                             f"{where}'s {mem.total / GIB:.2f} GiB and the weights take {weights / GIB:.2f} GiB, "
                             f"activations about {activations / GIB:.2f} GiB; raise it or give --kv-cache-gb")
        if pool + pending > mem.free:
            raise ValueError(f"{flag} asks for a {pool / GIB:.2f} GiB KV pool but only {mem.free / GIB:.2f} GiB of "
                             f"{where} is free (other processes hold the rest); lower it or give --kv-cache-gb")
    log.info("KV pool from %s: %.2f GiB (%s: %.2f GiB total, %.2f GiB free; weights %.2f GiB)", flag, pool / GIB,
             where, mem.total / GIB, mem.free / GIB, weights / GIB)
    return pool / GIB


def with_dtype(config: EngineConfig, device: torch.device, model_folder: Path) -> EngineConfig:
    """`config` with its dtype concrete (what every rank and the pool then use)."""
    return replace(config, dtype=compute_dtype(config, device, model_folder))


def planned_pool_gib(config: EngineConfig, device: torch.device, cfg: ModelConfig, model_folder: Path) -> float:
    """The pool's GiB decided before the weights load (tensor parallelism: every rank must agree):
    a memory-based size estimates this rank's weights from the checkpoint's size."""
    if not memory_based(config, device):
        return pool_gib(config, device, NO_MEMORY, 0, 0)
    if config.parallel.nnodes > 1 and config.mem_fraction_static is not None:
        raise ValueError("--mem-fraction-static with --nnodes > 1 is not supported (each node sees its own free "
                         "memory): give --gpu-memory-utilization, --kv-cache-gb or --num-pages")
    itemsize = torch.empty((), dtype=resolve_dtype(config.dtype)).element_size()
    weights = checkpoint_numel(model_folder) * itemsize // config.parallel.attn_tp_size
    return pool_gib(config, device, device_memory(device), weights, activation_bytes(cfg, config, itemsize),
                    pending=weights)
