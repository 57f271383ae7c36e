"""Device-aware defaults (engine/memory.py): `--dtype auto` and the KV pool's size from the
device's memory with vLLM's `--gpu-memory-utilization` and SGLang's `--mem-fraction-static`.

No GPU here: the arithmetic runs against a fake device memory (a CUDA device object is only
named, never touched), and the CPU path for real on the tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pdserve import LLM
from pdserve.engine.config import EngineConfig
from pdserve.engine.memory import (CPU_DEFAULT_KV_GB, GIB, DeviceMemory, activation_bytes, compute_dtype,
                                   device_memory, memory_based, pool_gib)
from pdserve.model.config import ModelConfig

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")
H100 = DeviceMemory(total=80 * GIB, free=79 * GIB)


def test_dtype_auto_is_float32_on_cpu_and_the_models_on_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    auto = EngineConfig()
    assert auto.dtype == "auto"
    assert compute_dtype(auto, CPU, tmp_path) == "float32"
    assert compute_dtype(auto, CUDA, tmp_path) == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float16"}))  # transformers 5 writes `dtype`
    assert compute_dtype(auto, CUDA, tmp_path) == "float16"
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))  # fp32 model: a half type on GPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert compute_dtype(auto, CUDA, tmp_path) == "float16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert compute_dtype(auto, CUDA, tmp_path) == "bfloat16"
    assert compute_dtype(EngineConfig(dtype="half"), CPU, tmp_path) == "float16"
    assert compute_dtype(EngineConfig(dtype="float"), CUDA, tmp_path) == "float32"
    assert compute_dtype(EngineConfig(dtype="bfloat16"), CPU, tmp_path) == "bfloat16"


def test_cuda_default_is_vllms_utilization_and_cpu_keeps_one_gib() -> None:
    weights, act = 16 * GIB, 2 * GIB
    assert memory_based(EngineConfig(), CUDA) and not memory_based(EngineConfig(), CPU)
    assert pool_gib(EngineConfig(), CUDA, H100, weights, act) == pytest.approx(0.9 * 80 - 16 - 2)
    assert pool_gib(EngineConfig(), CPU, H100, weights, act) == CPU_DEFAULT_KV_GB
    assert pool_gib(EngineConfig(kv_cache_gb=3.0), CUDA, H100, weights, act) == 3.0  # an explicit size wins
    assert not memory_based(EngineConfig(num_pages=100), CUDA)


def test_gpu_memory_utilization_is_vllms_share_of_the_total() -> None:
    cfg = EngineConfig(gpu_memory_utilization=0.5)
    mem = DeviceMemory(total=80 * GIB, free=60 * GIB)  # another process holds 20 GiB: not counted
    assert pool_gib(cfg, CUDA, mem, 10 * GIB, GIB) == pytest.approx(40 - 10 - 1)
    with pytest.raises(ValueError, match="leaves no room.*weights take 10.00 GiB"):
        pool_gib(EngineConfig(gpu_memory_utilization=0.1), CUDA, mem, 10 * GIB, GIB)
    with pytest.raises(ValueError, match="only 20.00 GiB .* is free"):  # the share is more than is free
        pool_gib(EngineConfig(gpu_memory_utilization=0.95), CUDA, DeviceMemory(80 * GIB, 20 * GIB), 10 * GIB, 0)
    # before loading (tensor parallelism): the weights are still to come out of what is free
    with pytest.raises(ValueError, match="is free"):
        pool_gib(cfg, CUDA, DeviceMemory(80 * GIB, 35 * GIB), 10 * GIB, GIB, pending=10 * GIB)


def test_mem_fraction_static_is_sglangs_share_for_weights_and_pool() -> None:
    cfg = EngineConfig(mem_fraction_static=0.8)
    # after the weights loaded 50 GiB are free; 20% of 80 GiB stays for activations and others
    assert pool_gib(cfg, CUDA, DeviceMemory(80 * GIB, 50 * GIB), 16 * GIB, 0) == pytest.approx(50 - 16)
    # planned before loading: the weights still to load come off too
    assert pool_gib(cfg, CUDA, DeviceMemory(80 * GIB, 66 * GIB), 16 * GIB, 0, pending=16 * GIB) == pytest.approx(34)
    with pytest.raises(ValueError, match="--mem-fraction-static 0.5 leaves no room"):
        pool_gib(EngineConfig(mem_fraction_static=0.5), CUDA, DeviceMemory(80 * GIB, 30 * GIB), 0, 0)


def test_cpu_processes_of_one_server_share_the_host() -> None:
    cfg = EngineConfig(gpu_memory_utilization=0.5, dp_size=2)
    assert pool_gib(cfg, CPU, DeviceMemory(16 * GIB, 16 * GIB), GIB, 0) == pytest.approx(0.5 * 8 - 1)


def test_cpu_gpu_memory_utilization_for_real(tiny_model_dir: Path) -> None:
    util = 0.01
    llm = LLM(str(tiny_model_dir), page_size=4, threads=1, gpu_memory_utilization=util)
    engine = llm.engine
    assert engine.pool.k.dtype == torch.float32 and engine.config.dtype == "float32"  # auto on CPU
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    act = activation_bytes(ModelConfig.from_folder(tiny_model_dir), engine.config, 4)
    expected = int(util * device_memory(CPU).total - weights - act) // engine.pool.page_bytes()
    assert abs(engine.kv.capacity + 1 - expected) <= 1  # capacity leaves out the reserved page


def test_cpu_mem_fraction_static_for_real(tiny_model_dir: Path) -> None:
    mem = device_memory(CPU)
    target = 512 * 2**20  # the pool this fraction leaves if free memory stays as it is now
    fraction = 1.0 - (mem.free - target) / mem.total
    llm = LLM(str(tiny_model_dir), page_size=4, threads=1, mem_fraction_static=fraction)
    pool = llm.engine.kv.capacity * llm.engine.pool.page_bytes()
    assert target / 4 < pool < target * 4  # a shared machine: free memory moves a little meanwhile


def test_a_hub_like_folder_with_half_dtype_loads_half(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    llm = LLM(str(model), num_pages=32, page_size=4, threads=1, dtype="half")
    assert llm.engine.pool.k.dtype == torch.float16 and llm.engine.config.dtype == "float16"
