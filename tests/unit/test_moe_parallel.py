"""MoE and MLA models over several ranks (model/tp.py, parallel/ep.py): what each rank holds,
EP ranks sharing the same tokens (TP attention) summing to the whole layer, and tp ranks (real
processes, gloo) with TP-MoE or EP equal to HF token for token. (EP under DP attention, all-to-all
between engine processes: tests/integration/test_moe_servers.py; the all-to-all itself:
test_ep.py.)"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.engine.config import EngineConfig
from pdserve.engine.tp_worker import check_model_fits
from pdserve.model.config import ModelConfig
from pdserve.model.moe import SparseMoeBlock
from pdserve.model.tp import TPShard
from pdserve.parallel.ep import EPShare
from tests.hf_reference import hf_greedy
from tests.tiny_moe import tiny_moe_config
from tests.unit.test_ep import HIDDEN, moe_config

V3 = ModelConfig.from_dict({**tiny_moe_config("deepseek_v3", vocab_size=64).to_dict(),
                            "architectures": ["DeepseekV3ForCausalLM"]})  # 4 heads, 16 experts of I 32
L1 = "model.layers.1."


def test_each_rank_holds_its_heads_experts_and_shared_slice() -> None:
    assert V3.mla is not None and V3.moe is not None
    tp, ep, dpa = TPShard(1, 2), TPShard(1, 2, expert_parallel=True), TPShard(1, 2, dp_attention=True,
                                                                                 expert_parallel=True)
    local = tp.local_config(V3)  # TP-MoE: heads, dense I, experts' I and the shared expert's I halved
    assert (local.num_attention_heads, local.intermediate_size) == (2, 48)
    assert (local.moe.intermediate_size, local.moe.shared_intermediate_size) == (16, 16)  # type: ignore[union-attr]
    qk, kv_b = V3.mla.qk_head_dim, V3.mla.qk_nope_head_dim + V3.mla.v_head_dim
    assert tp.weight_slice(V3, L1 + "self_attn.q_b_proj.weight") == (0, 2 * qk, 4 * qk)
    assert tp.weight_slice(V3, L1 + "self_attn.kv_b_proj.weight") == (0, 2 * kv_b, 4 * kv_b)
    assert tp.weight_slice(V3, L1 + "self_attn.o_proj.weight") == (1, 2 * V3.mla.v_head_dim, 4 * V3.mla.v_head_dim)
    for whole in ("self_attn.q_a_proj.weight", "self_attn.kv_a_proj_with_mqa.weight", "mlp.gate.weight",
                  "self_attn.kv_a_layernorm.weight", "mlp.gate.e_score_correction_bias"):
        assert tp.weight_slice(V3, L1 + whole) is None  # the latent is whole on every rank
    assert tp.kv_heads(V3) == (0, 1)  # the pool: one latent "head", all of it
    assert tp.weight_slice(V3, L1 + "mlp.experts.5.up_proj.weight") == (0, 16, 32)
    assert tp.weight_slice(V3, L1 + "mlp.experts.5.down_proj.weight") == (1, 16, 32)
    # EP: whole experts (the loader keeps this rank's), the shared expert still sliced under TP attention
    assert ep.weight_slice(V3, L1 + "mlp.experts.5.up_proj.weight") is None
    assert ep.weight_slice(V3, L1 + "mlp.shared_experts.gate_proj.weight") == (0, 16, 32)
    assert ep.local_config(V3).moe.intermediate_size == 32  # type: ignore[union-attr]
    # DP attention with EP: attention and shared expert whole, only the dense layer's MLP sliced
    assert dpa.weight_slice(V3, L1 + "mlp.shared_experts.down_proj.weight") is None
    assert dpa.weight_slice(V3, L1 + "self_attn.q_b_proj.weight") is None
    assert dpa.weight_slice(V3, "model.layers.0.mlp.down_proj.weight") == (1, 48, 96)
    assert dpa.local_config(V3).moe.shared_intermediate_size == 32  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="num_attention_heads is 4"):
        TPShard(0, 3).local_config(V3)


def test_ep_flags_and_what_they_fit() -> None:
    assert EngineConfig(tp_size=2, ep_size=0).parallel.ep_ranks == 2  # --enable-expert-parallel
    assert EngineConfig(tp_size=2).parallel.ep_ranks == 1
    EngineConfig(tp_size=3, dp_size=3, enable_dp_attention=True, ep_size=3).check_parallel()
    with pytest.raises(ValueError, match="--ep-size must be 1 or --tp-size 2"):
        EngineConfig(tp_size=2, ep_size=3).check_parallel()
    dense = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=4)
    with pytest.raises(ValueError, match="has no experts"):
        check_model_fits(EngineConfig(tp_size=2, ep_size=2).parallel, dense)


def test_ep_ranks_sharing_the_tokens_sum_to_the_whole_layer() -> None:
    """TP attention: each of n ranks computes its experts' pairs of the SAME tokens and its slice of
    the shared expert; the sum over ranks (the layer's all-reduce) is the whole layer's output."""
    moe = replace(moe_config(8), shared_intermediate_size=24)  # sliced in 2 and in 3
    torch.manual_seed(0)
    whole = SparseMoeBlock(HIDDEN, moe)
    with torch.no_grad():
        for p in whole.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(11, HIDDEN)
    for n in (2, 3):  # 8 experts over 3 ranks: 2, 3, 3
        total, rows = torch.zeros_like(x), []
        for r in range(n):
            shard = TPShard(r, n, expert_parallel=True)
            share = EPShare(r, n)
            part = SparseMoeBlock(HIDDEN, shard.local_moe(moe), share)
            lo, hi = share.local_range(8)
            i = shard.local_moe(moe).shared_intermediate_size
            state = {k: v for k, v in whole.state_dict().items() if not k.startswith(("experts.", "shared_experts."))}
            gate, up = whole.shared_experts.gate_up_proj.weight.split(24)  # type: ignore[union-attr]
            state.update({"experts.gate_up_proj": whole.experts.gate_up_proj[lo:hi],
                          "experts.down_proj": whole.experts.down_proj[lo:hi],
                          "shared_experts.gate_up_proj.weight": torch.cat((gate[r * i:(r + 1) * i],
                                                                           up[r * i:(r + 1) * i])),
                          "shared_experts.down_proj.weight":
                              whole.shared_experts.down_proj.weight[:, r * i:(r + 1) * i]})  # type: ignore[union-attr]
            part.load_state_dict(state)
            with torch.no_grad():
                total += part(x)
            rows.append(part.expert_rows)
            assert torch.equal(part.expert_load, torch.bincount(part.gate(x)[0].flatten(), minlength=8))
        with torch.no_grad():
            torch.testing.assert_close(total, whole(x), rtol=1e-5, atol=1e-5)
            want = torch.bincount(whole.gate(x)[0].flatten(), minlength=8)
        assert torch.equal(torch.cat(rows), want)  # every pair computed once, on its expert's rank


GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True, logprobs=True)


@pytest.mark.parametrize("arch, layout", [("deepseek_v3", {"tp_size": 2, "ep_size": 0}), ("qwen2_moe", {"tp_size": 2})])
def test_tp_and_ep_ranks_equal_hf(arch: str, layout: dict, moe_dir) -> None:
    """DeepSeek-V3: MLA with q heads split and the latent whole, EP 2 (vLLM's --enable-expert-parallel)
    with the shared expert sliced; Qwen2-MoE: TP-MoE (every expert's I sliced), its gated shared
    expert, a dense layer, GQA heads split: HF's greedy tokens and logprobs."""
    folder: Path = moe_dir(arch)
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 49000) for _ in range(rng.randint(1, 40))] for _ in range(5)]
    with LLM(str(folder), num_pages=96, page_size=4, chunk_budget=24, threads=1, **layout) as llm:
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
        llm.engine.check_integrity()
        routed = int(llm.engine.model.expert_load().sum())
    for prompt, out in zip(prompts, outs):
        ids, lps = hf_greedy(folder, prompt, GREEDY.max_new_tokens)
        assert out.output_ids == ids
        assert out.logprobs is not None and max(abs(a - b) for a, b in zip(out.logprobs, lps)) < 1e-4
    cfg = ModelConfig.from_folder(folder)
    assert cfg.moe is not None  # rank 0 routes every token (TP attention): its counters are the global load
    assert routed == llm.engine.num_forward_tokens * cfg.moe.top_k * len(cfg.moe.sparse_layers)
