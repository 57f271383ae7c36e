"""--quantization fp16: fbgemm's fp16 GEMMs equal fp32 GEMMs over fp16-rounded weights, the
engine serves with them (a tied LM head included), and a setup without a kernel is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.model.linear import Linear, can_quantize
from pdserve.model.loader import load_model

pytestmark = pytest.mark.skipif(not can_quantize("fp16", torch.device("cpu"), torch.float32),
                                reason="no fbgemm (not x86)")


def test_fp16_linear_equals_rounded_weights() -> None:
    torch.manual_seed(0)
    lin = Linear(96, 40, bias=True)
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    x = torch.randn(5, 96)
    lin.quantize()
    assert lin.weight.numel() == 0 and lin.bias is None  # the fp32 copy is freed
    torch.testing.assert_close(lin(x), x @ w.half().float().T + b, rtol=1e-5, atol=1e-5)


def test_quantized_model_stays_close_and_generates(tiny_model_dir: Path) -> None:
    cpu = torch.device("cpu")
    ref = load_model(tiny_model_dir, cpu, torch.float32, 64, cpu_prepack=False)
    q = load_model(tiny_model_dir, cpu, torch.float32, 64, quantization="fp16")
    assert q.tied_fp16 is not None and all(m.fp16 is not None for m in q.modules() if isinstance(m, Linear))
    h = torch.randn(3, ref.config.hidden_size)
    a, b = ref.logits(h), q.logits(h)
    assert a is not None and b is not None
    assert (a - b).abs().max() < 1e-2 * a.abs().max()
    llm = LLM(str(tiny_model_dir), quantization="fp16", num_pages=64, page_size=4, threads=1)
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.output_ids) == 6
    llm.engine.check_integrity()


def test_quantization_needs_float32_on_cpu(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="--quantization fp16 needs --dtype float32"):
        load_model(tiny_model_dir, torch.device("cpu"), torch.bfloat16, 64, quantization="fp16")
