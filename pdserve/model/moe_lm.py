"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3 (with MLA).

The dense family's shell (model/llama.py: embedding, pre-norm residual layers, LM head,
prepacking, fused-weight loading) with two layer parts swapped per config:

    attention  Llama/Qwen attention (GQA, q/k/v fused)  or  MLA (model/mla.py) when cfg.mla
    MLP        SparseMoeBlock (model/moe.py) in cfg.moe.sparse_layers, a dense MLP elsewhere

Checkpoint names load by HF name; three layouts are renamed on the way in (`hf_name`):

    Mixtral     block_sparse_moe.*  -> mlp.*;  experts.E.w1 / w3 / w2 -> gate_proj / up_proj / down_proj
    Qwen2-MoE   mlp.shared_expert.* -> mlp.shared_experts.*  (DeepSeek's name)
    DeepSeek-V3 model.layers.{>= num_hidden_layers}.* (the multi-token-prediction layer) is skipped

Per-expert tensors `mlp.experts.E.{gate,up,down}_proj.weight` fill the stacked
`mlp.experts.gate_up_proj` [E, 2I, H] / `down_proj` [E, H, I] rows of expert E (an EP rank
holds experts [first, first + count) and skips the others). Router weights stay fp32.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from pdserve.model.config import ModelConfig
from pdserve.model.llama import MLP, DecoderLayer, LlamaForCausalLM
from pdserve.model.mla import MLAttention, deinterleave_rope
from pdserve.model.moe import Experts, ExpertComm, LocalExperts, Router, SparseMoeBlock
from pdserve.model.tp import Collectives, NoCollectives, TPShard

_RENAMES = ((".block_sparse_moe.", ".mlp."), (".w1.", ".gate_proj."), (".w3.", ".up_proj."), (".w2.", ".down_proj."),
            (".shared_expert.", ".shared_experts."))
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class MoEForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: ModelConfig, max_positions: int, tp: TPShard = TPShard(),
                 comm: Collectives = NoCollectives(), experts: ExpertComm | None = None) -> None:
        if tp.expert_parallel and experts is None:
            raise ValueError("an expert-parallel shard needs the experts' placement (parallel/ep.py)")
        self.expert_comm: ExpertComm = experts or LocalExperts()  # read by make_layer (in super().__init__)
        super().__init__(cfg, max_positions, tp, comm)

    def make_layer(self, cfg: ModelConfig, layer: int, attn_comm: Collectives, mlp_comm: Collectives) -> nn.Module:
        attn = MLAttention(cfg, layer, attn_comm) if cfg.mla is not None else None
        moe = cfg.moe
        if moe is not None and layer in moe.sparse_layers:
            # DP attention with EP: each rank's own tokens go to the experts all-to-all, nothing to reduce
            own = self.tp.dp_attention and self.tp.expert_parallel
            mlp: nn.Module = SparseMoeBlock(cfg.hidden_size, moe, self.expert_comm,
                                            NoCollectives() if own else mlp_comm)
        else:
            mlp = MLP(cfg.hidden_size, cfg.intermediate_size, mlp_comm)
        return DecoderLayer(cfg, layer, attn_comm, mlp_comm, self_attn=attn, mlp=mlp)

    def moe_blocks(self) -> list[SparseMoeBlock]:
        return [m for m in self.modules() if isinstance(m, SparseMoeBlock)]

    def expert_load(self) -> torch.Tensor:
        """[sparse layers, experts] (token, slot) pairs routed to each expert since start."""
        return torch.stack([b.expert_load for b in self.moe_blocks()])

    # ---- weights ---------------------------------------------------------------------------
    def keep_fp32(self) -> None:
        for m in self.modules():
            if isinstance(m, Router):
                m.float()

    def after_load(self) -> None:
        for m in self.modules():
            if isinstance(m, MLAttention):
                m.absorb()
            elif isinstance(m, SparseMoeBlock):
                m.expert_load.zero_()  # buffers: to_empty() left them uninitialised
                m.expert_rows.zero_()

    def hf_name(self, name: str) -> str | None:
        layer = _LAYER.match(name)
        if layer is not None and int(layer.group(1)) >= self.config.num_hidden_layers:
            return None
        for old, new in _RENAMES:
            name = name.replace(old, new)
        return super().hf_name(name)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((name, deinterleave_rope(name, t, self.config)) for name, t in weights)

    def load_piece(self, name: str, tensor: torch.Tensor, params: dict[str, nn.Parameter]) -> str | None:
        expert = _EXPERT.match(name)
        if expert is None:
            return super().load_piece(name, tensor, params)
        prefix, index, which = expert.group(1), int(expert.group(2)), expert.group(3)
        module = self.get_submodule(prefix)
        assert isinstance(module, Experts)
        local = index - module.first
        if not 0 <= local < module.count:
            return "other rank"  # an EP rank holds only its experts
        if which == "down_proj":
            module.down_proj.data[local].copy_(tensor)
            return f"{prefix}.down_proj#{local}"
        shard = 0 if which == "gate_proj" else 1
        module.gate_up_proj.data[local, shard * module.inter:(shard + 1) * module.inter].copy_(tensor)
        return f"{prefix}.gate_up_proj#{2 * local + shard}"

    def pieces(self, name: str) -> int:
        if ".experts." in name:
            count = self.get_submodule(name.rsplit(".", 1)[0]).count
            return 2 * count if name.endswith("gate_up_proj") else count
        return super().pieces(name)
