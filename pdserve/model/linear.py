"""The model's dense GEMMs: `F.linear`, or on CPU a weight prepacked once for oneDNN.

A decode step multiplies a few rows by every weight of the model, so the GEMMs are
memory-bound and small-M: MKL's sgemm (behind `F.linear`) reads the [out, in] weight row-major
and is slow for 2-64 rows. oneDNN (in every x86 torch build, `torch.ops.mkldnn`) reorders the
weight once, at load, into the blocked layout its JIT kernels stream, as vLLM's CPU backend
does. Measured on this 2-core AVX2 EPYC, every GEMM of the bundled model's 30 layers plus its
LM head (538 MB of fp32), cold weights, one pass (a one-off timing, benchmarks/README.md):

    rows        1       4      16      64     256
    F.linear  46.5    92.7   110.1   187.0   577.4  ms
    prepacked 30.0    37.0    62.0   158.0   520.0  ms

The packed weight replaces the dense one (no second copy); a weight oneDNN cannot pack (a
dtype the CPU has no kernel for: bf16 without AVX-512/AVX-NE-CONVERT) stays dense. On CUDA
nothing is packed and the model runs the same `F.linear`. Results differ from `F.linear` by
float rounding only (a different summation order).

Weight-only quantization (`--quantization fp16`, issue 29): fbgemm's fp16 GEMM (in every x86
torch build, `torch.ops.quantized.linear_dynamic_fp16`) keeps the weights in half precision,
packed once, and computes in fp32: half the bytes a decode step streams. The candidates, one
thread, every GEMM of 10 layers of the bundled model's shapes, interleaved A/B (ratio to the
prepacked fp32 time; a 2-core AVX2/AVX-512 box at load 7-11):

    rows                                      1      4      16     64
    fp16, fbgemm                            0.27   0.83   0.94   0.99     (256 rows 0.91, 512 1.12)
    int8 per channel, aten _weight_int8pack_mm  2.4   14     30     39
    int4 groups of 32, aten _weight_int4pack_mm_for_cpu (30 layers + head)  5.2  22  56  83

On the whole bundled model (benchmarks/quant_agreement.py, 2 threads, load 7.6): greedy output
equal to fp32's on 61/64 prompts' first 32 tokens; decode step batch 1 x 256 0.66x, batch 64
0.95x the prepacked fp32 time. torchao 0.18 has no CPU kernel of its own for these (its wheel carries CUDA extensions only;
its CPU int4 layout is a prototype over the same aten op), so int8/int4 are not offered: they
would slow decode down. A GGUF's Q4_1/Q8_0 blocks map exactly onto the int4 layout (scale d,
zero m + 8d) but no kernel that pays exists for them here either; GGUF weights are served as
converted (fp32, or fp16 with this flag).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def can_prepack(device: torch.device) -> bool:
    return device.type == "cpu" and torch.backends.mkldnn.is_available()


def prepack(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` [out, in] in oneDNN's blocked layout, or None where oneDNN has no kernel."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    except RuntimeError:  # e.g. bf16 on a CPU without the instructions
        return None


def can_quantize(method: str, device: torch.device, dtype: torch.dtype) -> bool:
    return (method == "fp16" and device.type == "cpu" and dtype == torch.float32
            and "fbgemm" in torch.backends.quantized.supported_engines)


def pack_fp16(weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.ScriptObject:
    """`weight` [out, in] (and `bias`) as fbgemm's packed fp16 matrix; `linear_fp16` multiplies by it."""
    return torch.ops.quantized.linear_prepack_fp16(weight.detach().float(), bias)


def linear_fp16(x: torch.Tensor, packed: torch.ScriptObject) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic_fp16(x, packed)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias for a dense or a prepacked `weight`."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose weight may be swapped for its prepacked form (`pack`) or its fp16 packed
    form (`quantize`; the fp32 weight is then dropped)."""

    fp16: torch.ScriptObject | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp16 is not None:
            return linear_fp16(x, self.fp16)
        return linear(x, self.weight, self.bias)

    def pack(self) -> bool:
        packed = prepack(self.weight)
        if packed is None:
            return False
        self.weight = nn.Parameter(packed, requires_grad=False)
        return True

    def quantize(self) -> None:
        """fp16 weights (fbgemm): the bias goes into the packed params, weight and bias are freed."""
        self.fp16 = pack_fp16(self.weight, self.bias)
        self.weight = nn.Parameter(torch.empty(0), requires_grad=False)
        self.bias = None
