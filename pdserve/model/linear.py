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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias for a dense or a prepacked `weight`."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose weight may be swapped for its prepacked form (`pack`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def pack(self) -> bool:
        packed = prepack(self.weight)
        if packed is None:
            return False
        self.weight = nn.Parameter(packed, requires_grad=False)
        return True
