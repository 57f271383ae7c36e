"""Mixture-of-experts and MLA models through the offline engine vs HF transformers 5.24 (fp32):
greedy tokens equal, chosen and top logprobs within 1e-4, batched with chunked prefill, prefix
hits and preemption; the MLA pool's bytes per token are the latent's; routers equal HF's
router modules; the grouped expert GEMMs equal the per-expert loop."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.disagg import KVLayout
from pdserve.engine.kv_cache import KVPool, LatentPool
from pdserve.model import moe as moe_mod
from pdserve.model.config import ModelConfig
from pdserve.model.moe import Experts, LocalExperts, Router
from pdserve.model.moe_config import moe_from_dict
from tests.hf_reference import hf_greedy_rows
from tests.tiny_moe import ARCHS, tiny_moe_config

TOL = 1e-4


def prompts(n: int, lo: int, hi: int, seed: int, prefix: list[int] | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    return [(prefix or []) + [rng.randrange(3, 49000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def assert_matches_hf(llm: LLM, folder: Path, batch: list[list[int]], params: SamplingParams) -> None:
    outs = llm.generate(batch, params, use_tqdm=False)
    for prompt, out in zip(batch, outs):
        ids, rows = hf_greedy_rows(folder, prompt, params.max_new_tokens)
        assert out.output_ids == ids
        assert out.logprobs is not None and out.top_logprobs is not None
        for tok, lp, top, row in zip(ids, out.logprobs, out.top_logprobs, rows):
            assert abs(lp - float(row[tok])) < TOL
            kth = float(row.topk(params.top_logprobs).values[-1])
            for t in top:  # each is HF's logprob of that token, and they are HF's top k
                assert abs(t.logprob - float(row[t.token_id])) < TOL and t.logprob > kth - TOL
    llm.engine.check_integrity()


def greedy(n: int, top: int = 3) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=top)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_greedy_and_top_logprobs_equal_hf(arch: str, moe_dir) -> None:
    folder = moe_dir(arch)
    llm = LLM(str(folder), num_pages=256, page_size=4, chunk_budget=24, threads=1)  # long prompts chunk
    assert_matches_hf(llm, folder, prompts(8, 1, 60, seed=1), greedy(10))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe_renorm", "deepseek_v3", "deepseek_v2_lite"])
def test_prefix_hits_and_preemption_keep_output_exact(arch: str, moe_dir) -> None:
    folder = moe_dir(arch)
    llm = LLM(str(folder), num_pages=40, page_size=4, chunk_budget=64, threads=1, decode_headroom=0.0)
    system = prompts(1, 24, 24, seed=2)[0]
    assert_matches_hf(llm, folder, [system + [7, 8, 9]], greedy(4))  # caches the 24-token system prompt
    batch = prompts(6, 4, 12, seed=3, prefix=system)
    before = llm.engine.stats.cache_hits
    assert_matches_hf(llm, folder, batch, greedy(24))
    assert llm.engine.stats.cache_hits > before  # attention over cached latents / K,V
    assert llm.engine.scheduler.num_preemptions > 0  # 6 x ~60 tokens do not fit 39 pages of 4


def test_mla_pool_holds_one_latent_per_token(moe_dir) -> None:
    llm = LLM(str(moe_dir("deepseek_v3")), num_pages=64, page_size=4, threads=1)
    cfg, pool = llm.engine.model_config, llm.engine.pool
    assert cfg.mla is not None
    latent = cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim  # 32 + 8
    assert isinstance(pool, LatentPool) and pool.tensors[0].shape == (3, 64 * 4, 1, latent)
    assert cfg.kv_bytes_per_token == 3 * latent * 4
    assert pool.page_bytes() == 4 * cfg.kv_bytes_per_token
    heads_kv = 3 * 2 * cfg.num_attention_heads * (cfg.mla.qk_head_dim + cfg.mla.v_head_dim) // 2 * 4
    assert cfg.kv_bytes_per_token < heads_kv / 3  # the expanded per-head K/V would be > 3x larger
    assert KVPool.pages_for_budget(cfg, 4, 1.0, 4) == (1 << 30) // (4 * cfg.kv_bytes_per_token)


def test_expert_load_counts_every_routed_pair(moe_dir) -> None:
    llm = LLM(str(moe_dir("qwen3_moe")), num_pages=128, page_size=4, threads=1)
    llm.generate(prompts(3, 5, 20, seed=4), greedy(5), use_tqdm=False)
    load = llm.engine.model.expert_load()
    assert load.shape == (3, 8)  # every layer is sparse
    assert load.sum(1).tolist() == [llm.engine.num_forward_tokens * 3] * 3  # top-3 per token
    assert (load > 0).sum() > 8  # spread over experts, not one


ROUTERS = {
    "mixtral": ("MixtralForCausalLM", "mixtral", "mixtral.modeling_mixtral", "MixtralTopKRouter", {}),
    "qwen2": ("Qwen2MoeForCausalLM", "qwen2_moe", "qwen2_moe.modeling_qwen2_moe", "Qwen2MoeTopKRouter", {}),
    "qwen3_renorm": ("Qwen3MoeForCausalLM", "qwen3_moe_renorm", "qwen3_moe.modeling_qwen3_moe", "Qwen3MoeTopKRouter",
                     {}),
    "v2_greedy": ("DeepseekV2ForCausalLM", "deepseek_v2_lite", "deepseek_v2.modeling_deepseek_v2",
                  "DeepseekV2TopkRouter", {"routed_scaling_factor": 1.5}),
    "v2_group_limited": ("DeepseekV2ForCausalLM", "deepseek_v2_lite", "deepseek_v2.modeling_deepseek_v2",
                         "DeepseekV2TopkRouter", {"topk_method": "group_limited_greedy", "n_group": 4,
                                                  "topk_group": 2, "routed_scaling_factor": 2.0}),
    "v3_noaux_tc": ("DeepseekV3ForCausalLM", "deepseek_v3", "deepseek_v3.modeling_deepseek_v3", "DeepseekV3TopkRouter",
                    {}),
}


@pytest.mark.parametrize("kind", sorted(ROUTERS))
def test_router_equals_hf_router(kind: str) -> None:
    import importlib

    arch, tiny, module, cls, extra = ROUTERS[kind]
    hf_cfg = tiny_moe_config(tiny, vocab_size=64)
    for k, v in extra.items():
        setattr(hf_cfg, k, v)
    torch.manual_seed(5)
    hf = getattr(importlib.import_module(f"transformers.models.{module}"), cls)(hf_cfg)
    moe = moe_from_dict(arch, hf_cfg.to_dict())
    assert moe is not None
    ours = Router(64, moe)
    with torch.no_grad():
        hf.weight.normal_(0.0, 0.3)
        ours.weight.copy_(hf.weight)
        if ours.e_score_correction_bias is not None:
            hf.e_score_correction_bias.normal_(0.0, 0.2)
            ours.e_score_correction_bias.copy_(hf.e_score_correction_bias)
        x = torch.randn(50, 64)
        _, hf_w, hf_ids = hf(x)
        ids, w = ours(x)
    hf_order, order = hf_ids.argsort(-1), ids.argsort(-1)
    assert torch.equal(ids.gather(1, order), hf_ids.gather(1, hf_order))
    torch.testing.assert_close(w.gather(1, order), hf_w.float().gather(1, hf_order), rtol=1e-6, atol=1e-6)


def test_grouped_gemms_equal_the_per_expert_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(6)
    experts = Experts(32, 16, 0, 6)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.3)
        experts.down_proj.normal_(0, 0.3)
    x, ids = torch.randn(20, 32), torch.randint(0, 5, (20, 2))  # expert 5 gets no rows
    routed = LocalExperts().dispatch(x, ids, 6)
    assert routed.counts[5] == 0 and sum(routed.counts) == 40
    grouped = experts(routed.rows, routed.counts)
    monkeypatch.setattr(moe_mod, "GROUPED_MM", False)
    loop = experts(routed.rows, routed.counts)
    torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-5)
    pairs = routed.combine(loop).view(20, 2, 32)  # back in (token, slot) order: row i of pairs is token i's
    for t in range(20):
        for s in range(2):
            e = int(ids[t, s])
            gate, up = (experts.gate_up_proj[e] @ x[t]).split(16)
            want = experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up)
            torch.testing.assert_close(pairs[t, s], want, rtol=1e-5, atol=1e-5)


def test_sparse_layers_follow_each_family() -> None:
    base = {"num_hidden_layers": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 8, "intermediate_size": 16}
    qwen = moe_from_dict("Qwen2MoeForCausalLM", {**base, "num_experts": 4, "decoder_sparse_step": 2,
                                                 "mlp_only_layers": [3], "shared_expert_intermediate_size": 8})
    assert qwen is not None and qwen.sparse_layers == (1, 5) and qwen.shared_gate
    ds = moe_from_dict("DeepseekV3ForCausalLM", {**base, "n_routed_experts": 8, "first_k_dense_replace": 2,
                                                 "moe_layer_freq": 1, "n_group": 4, "topk_group": 2})
    assert ds is not None and ds.sparse_layers == (2, 3, 4, 5) and ds.scoring == "sigmoid" and ds.correction_bias
    with pytest.raises(ValueError, match="n_group 3 must divide the 8 experts"):
        moe_from_dict("DeepseekV3ForCausalLM", {**base, "n_routed_experts": 8, "n_group": 3, "topk_group": 1})


def test_a_latent_pool_moves_as_one_head(moe_dir) -> None:
    cfg = ModelConfig.from_folder(moe_dir("deepseek_v3"))
    pool = LatentPool(cfg, 4, 4, torch.device("cpu"), torch.float32)
    layout = KVLayout.for_pool("tiny", pool.tensors[0], 4, tensors=len(pool.tensors))
    assert (layout.kv_heads, layout.head_dim, layout.span_bytes) == (1, 40, 4 * 40 * 4)  # one "head": the latent
    assert layout.page_bytes == 3 * 4 * 40 * 4 == pool.page_bytes()  # K only: no V
    with pytest.raises(ValueError, match="2 pool tensors, the pool 1"):
        KVLayout.for_pool("tiny", pool.tensors[0], 4).check_pool(pool.tensors[0], None)
