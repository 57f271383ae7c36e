"""Build a model from a Hugging Face folder (config.json + one or many *.safetensors).

With tensor parallelism each rank reads only its slices (safetensors slices read just those
bytes), so a rank's memory is about 1/tp of the weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open

from pdserve.model.config import ModelConfig
from pdserve.model.linear import can_prepack, can_quantize
from pdserve.model.llama import LlamaForCausalLM
from pdserve.model.moe import ExpertComm
from pdserve.model.moe_lm import MoEForCausalLM
from pdserve.model.rope import RotaryEmbedding
from pdserve.model.tp import Collectives, NoCollectives, TPShard

log = logging.getLogger(__name__)

SliceFn = Callable[[str], "tuple[int, int, int] | None"]  # name -> (dim, start, stop) or None: all

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def iter_safetensors(folder: Path, part: SliceFn = lambda name: None) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in model folder {folder}")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                cut = part(name)
                if cut is None:
                    yield name, st.get_tensor(name)
                else:
                    dim, start, stop = cut
                    sl = st.get_slice(name)
                    yield name, sl[start:stop] if dim == 0 else sl[:, start:stop]


def checkpoint_numel(folder: str | Path) -> int:
    """Elements in the checkpoint's tensors, read from the safetensors headers (nothing loads)."""
    total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                numel = 1
                for dim in st.get_slice(name).get_shape():
                    numel *= dim
                total += numel
    return total


def load_model(folder: str | Path, device: torch.device, dtype: torch.dtype, max_positions: int,
               tp: TPShard = TPShard(), comm: Collectives = NoCollectives(),
               cpu_prepack: bool = True, experts: ExpertComm | None = None,
               quantization: str | None = None) -> LlamaForCausalLM:
    """The model on `device`, its GEMM weights prepacked for oneDNN (CPU, `cpu_prepack`) or
    quantized (`quantization`: "fp16"; ValueError where this device has no kernel for it).
    `experts`: where a mixture's routed experts live (parallel/ep.py under EP; None: all here)."""
    if quantization is not None and not can_quantize(quantization, device, dtype):
        raise ValueError(f"--quantization {quantization} needs --dtype float32 on a CPU with fbgemm (x86), "
                         f"not {dtype} on {device}")
    folder = Path(folder)
    cfg = ModelConfig.from_folder(folder)
    if quantization is not None and (cfg.moe is not None or cfg.mla is not None):
        raise ValueError(f"--quantization {quantization} covers dense models only (not MoE or MLA yet)")
    with torch.device("meta"):
        if cfg.moe is None and cfg.mla is None:
            model = LlamaForCausalLM(cfg, max_positions=1, tp=tp, comm=comm)
        else:
            model = MoEForCausalLM(cfg, max_positions=1, tp=tp, comm=comm, experts=experts)
    model = model.to_empty(device=device).to(dtype)
    model.keep_fp32()
    model.rope = RotaryEmbedding(cfg, max_positions).to(device)  # fp32 tables, rebuilt off meta
    model.load_weights(iter_safetensors(folder, lambda name: tp.weight_slice(cfg, name)))
    model.after_load()
    model.eval().requires_grad_(False)
    if quantization is not None:
        log.info("%d GEMM weights quantized to %s", model.quantize(), quantization)
    elif cpu_prepack and can_prepack(device) and not model.prepack():
        log.info("GEMM weights stay dense: oneDNN has no %s kernel on this CPU", dtype)
    return model
