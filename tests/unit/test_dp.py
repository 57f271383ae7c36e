"""Data parallelism without processes: DP-attention slicing (only the MLP is sliced), the front's
placement rules, and how the ranks' loads merge. (Real processes: tests/integration/test_dp.py.)"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from pdserve.disagg.config import DisaggConfig
from pdserve.engine.config import EngineConfig
from pdserve.engine.messages import Bootstrap, GenerateReq, LoadInfo, TransferStats
from pdserve.engine.sampling_params import SamplingParams
from pdserve.model.config import ModelConfig
from pdserve.model.tp import TPShard
from pdserve.server.dp_client import DPEngineClient, merge_loads


def _cfg() -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=4)


def test_dp_attention_slices_only_the_mlp() -> None:
    cfg = _cfg()
    for r in range(2):
        s = TPShard(r, 2, dp_attention=True)
        local = s.local_config(cfg)
        assert (local.num_attention_heads, local.num_key_value_heads, local.intermediate_size) == (4, 2, 24)
        assert s.q_heads(cfg) == (0, 4) and s.kv_heads(cfg) == (0, 2) and s.vocab_range(cfg) == (0, 64)
        assert s.attn_size == 1 and s.attention() == TPShard()
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight",
                     "model.embed_tokens.weight", "lm_head.weight"):
            assert s.weight_slice(cfg, name) is None
        assert s.weight_slice(cfg, "model.layers.0.mlp.gate_proj.weight") == (0, 24 * r, 24 * (r + 1))
        assert s.weight_slice(cfg, "model.layers.0.mlp.down_proj.weight") == (1, 24 * r, 24 * (r + 1))
    with pytest.raises(ValueError, match="intermediate_size"):
        TPShard(0, 5, dp_attention=True).local_config(cfg)


def test_dp_flag_combinations() -> None:
    with pytest.raises(ValueError, match="--tp-size equal to --dp-size"):
        EngineConfig(tp_size=4, dp_size=2, enable_dp_attention=True).check_parallel()
    with pytest.raises(ValueError, match="--dp-size >= 2"):
        EngineConfig(enable_dp_attention=True).check_parallel()
    c = EngineConfig(tp_size=2, dp_size=2, enable_dp_attention=True)
    c.check_parallel()
    assert (c.attn_tp_size, c.num_processes) == (1, 2)
    assert EngineConfig(tp_size=3, dp_size=2).num_processes == 6


def _req(rid: str, **kw) -> GenerateReq:
    return GenerateReq(rid=rid, input_ids=[1, 2, 3], params=SamplingParams(max_new_tokens=1), **kw)


def test_placement_rules() -> None:
    rr = DPEngineClient(EngineConfig(dp_size=3))
    assert [rr.place(_req(f"r{i}")) for i in range(5)] == [0, 1, 2, 0, 1]
    assert rr.place(_req("x", data_parallel_rank=2)) == 2
    rr.ranks[1]._queues["lead"] = asyncio.Queue()  # the first copy of a prompt is in flight on rank 1
    assert rr.place(_req("lead-1", share_prompt_with="lead")) == 1

    sq = DPEngineClient(EngineConfig(dp_size=3, load_balance_method="shortest_queue"))
    sq.ranks[0]._queues.update({"a": asyncio.Queue(), "b": asyncio.Queue()})
    sq.ranks[2]._queues["c"] = asyncio.Queue()
    assert sq.place(_req("y")) == 1

    prefill = DPEngineClient(EngineConfig(dp_size=2), disagg=replace(DisaggConfig(), mode="prefill"))
    boot = Bootstrap(host="127.0.0.1", port=1, room=12345)
    # a PD prefill: the room decides (the decode fetches from room % dp), data_parallel_rank cannot move it
    assert prefill.place(_req("p", bootstrap=boot, data_parallel_rank=0)) == 1


def test_merge_loads() -> None:
    a = LoadInfo(num_running=2, num_waiting=1, num_pages=10, free_pages=4, cached_pages=1, page_size=16,
                 transfer=TransferStats(success=3, bytes=300), cache_queries=100, cache_hits=50, steps=7,
                 dp_rank=0)
    b = LoadInfo(num_running=1, num_waiting=0, num_pages=10, free_pages=9, cached_pages=0, page_size=16,
                 cache_queries=100, cache_hits=0, steps=5, idle_steps=2, dp_rank=1)
    m = merge_loads([a, b])
    assert (m.num_running, m.num_waiting, m.num_pages, m.free_pages, m.steps, m.idle_steps) == (3, 1, 20, 13, 12, 2)
    assert m.cache_hit_rate == 0.25 and m.transfer is not None and m.transfer.success == 3
