"""The mixture-of-experts MLP: router (fp32), grouped expert compute, shared experts, and the
dispatch seam expert parallelism plugs into (parallel/ep.py; like attention, passed in).

One sparse layer over T tokens with top-k routing:

    x [T, H] ── mlp_in (DP attention with TP-MoE: every rank's rows; else x itself)
      ── router (fp32 logits) ──▶ ids [T, k], weights [T, k]
      │
      ├─ dispatch(x, ids) ──▶ rows [N, H] grouped by expert, counts per local expert
      │     one rank: the T*k (token, slot) pairs sorted by expert, N = T*k
      │     EP:       the pairs whose expert another rank holds go there (all-to-all), N = what
      │               this rank's experts receive
      ├─ experts: gate_up and down as grouped GEMMs over the experts' row groups (no token loop)
      ├─ combine(out) ──▶ [T*k, H] back in (token, slot) order (EP: the reverse all-to-all)
      ├─ y = sum over k of weights x that, + shared expert(s) (Qwen2-MoE: x sigmoid gate)
      └─ mlp_out(y): under TP the ranks' partial sums (sliced experts, or each rank's own
            experts' pairs: parallel/ep.py's EPShare) are all-reduced (DP attention with TP-MoE:
            reduce-scattered back to their ranks); EP all-to-all needs none (model/tp.py)

Expert weights are stacked as HF's in-memory layout: gate_up_proj [E, 2I, H], down_proj
[E, H, I] (loaded from the checkpoint's per-expert gate/up/down). Which way to run the expert
GEMMs on CPU was measured with benchmarks/moe_experts.py on this 2-core AVX2 machine (shared:
load ~3 during the run; one-off, best of 15 interleaved rounds), 16 experts, top-4, H 1024,
I 512, one thread, in ms:

    tokens                     1      4     16     64    256
    per-expert F.linear      2.1    6.2   12.0   19.0   43.7   (a loop over experts with rows)
    per-expert prepacked     2.5    6.1   10.5   14.7   36.6   (oneDNN-packed weights, model/linear.py)
    torch._grouped_mm        2.1    6.1   11.4   18.4   42.7   (one call per projection)

(64 experts, top-6, H 512, I 256: the same order.) The prepacked loop is 10-25% faster from 16
tokens but the slowest at 1 token, and with two threads its 1-token time was 3x to 70x the
others' in every run (oneDNN's small-M kernel under contention), which is a decode step. So
the experts run as torch._grouped_mm (it runs on CPU in torch 2.13): as fast as the loop, one
call with no Python loop at all (the loop makes up to E calls per layer: 256 for DeepSeek-V3),
nothing to repack; the per-expert F.linear loop stays where _grouped_mm does not run.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.model.linear import Linear
from pdserve.model.llama import MLP
from pdserve.model.moe_config import MoEConfig
from pdserve.model.tp import Collectives, NoCollectives


class Dispatched(Protocol):
    """The rows this rank's experts compute, and the way back to their tokens."""

    rows: torch.Tensor  # [N, H], grouped by local expert
    counts: list[int]  # rows per local expert, in expert order

    def combine(self, out: torch.Tensor) -> torch.Tensor:
        """The experts' outputs [N, H] (rows' order) -> [T*k, H] in (token, slot) order."""
        ...


class ExpertComm(Protocol):
    """Where experts live: all here (LocalExperts), or spread over EP ranks (parallel/ep.py)."""

    def local_range(self, num_experts: int) -> tuple[int, int]:
        """[first, stop) of the global experts this rank holds."""
        ...

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, num_experts: int) -> Dispatched:
        """x [T, H], ids [T, k] global expert ids -> the rows of this rank's experts."""
        ...


class SortedRows:
    """One rank: the (token, slot) pairs sorted by expert; combine inverts the sort."""

    def __init__(self, x: torch.Tensor, ids: torch.Tensor, num_experts: int) -> None:
        flat = ids.flatten()
        self.order = torch.argsort(flat, stable=True)
        self.rows = x.index_select(0, self.order // ids.shape[1])
        self.counts = torch.bincount(flat, minlength=num_experts).tolist()

    def combine(self, out: torch.Tensor) -> torch.Tensor:
        back = torch.empty_like(out)
        back[self.order] = out
        return back


class LocalExperts:
    def local_range(self, num_experts: int) -> tuple[int, int]:
        return 0, num_experts

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, num_experts: int) -> Dispatched:
        return SortedRows(x, ids, num_experts)


class Router(nn.Module):
    """Top-k expert choice per token; logits and scores in fp32 (the weights stay fp32 too:
    the loader keeps them so, `keep_fp32`)."""

    def __init__(self, hidden: int, moe: MoEConfig) -> None:
        super().__init__()
        self.moe = moe
        self.weight = nn.Parameter(torch.empty(moe.num_experts, hidden, dtype=torch.float32))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(moe.num_experts)) if moe.correction_bias else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (expert ids [T, k] int64, weights [T, k] fp32)."""
        m = self.moe
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(-1) if m.scoring == "softmax" else logits.sigmoid()
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias.float()
        if m.group_score != "none" and m.topk_groups < m.num_groups:
            grouped = choice.view(-1, m.num_groups, m.num_experts // m.num_groups)
            rank = grouped.max(-1).values if m.group_score == "max" else grouped.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(rank, dtype=torch.bool)
            keep.scatter_(1, rank.topk(m.topk_groups, dim=-1, sorted=False).indices, True)
            # V2 masks the others to 0 (softmax scores are > 0), V3 to -inf (its biased scores may be < 0)
            fill = 0.0 if m.group_score == "max" else float("-inf")
            choice = choice.masked_fill(~keep.repeat_interleave(m.num_experts // m.num_groups, dim=1), fill)
        ids = choice.topk(m.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
        if m.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + (1e-20 if m.scoring == "sigmoid" else 0.0))
        if m.routed_scaling_factor != 1.0:
            weights = weights * m.routed_scaling_factor
        return ids, weights


GROUPED_MM = hasattr(torch, "_grouped_mm")  # CPU: see the measurements in the module docstring


class Experts(nn.Module):
    """The routed experts [first, first + count) of num_experts, stacked."""

    def __init__(self, hidden: int, inter: int, first: int, count: int) -> None:
        super().__init__()
        self.first, self.count, self.inter = first, count, inter
        self.gate_up_proj = nn.Parameter(torch.empty(count, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(count, hidden, inter))

    def forward(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """rows [N, H] grouped by local expert, counts[e] of them for expert e -> [N, H]."""
        if rows.shape[0] == 0:
            return rows.new_empty(0, self.down_proj.shape[1])
        if GROUPED_MM and rows.device.type == "cpu":
            offs = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32)
            gate, up = torch._grouped_mm(rows, self.gate_up_proj.transpose(1, 2), offs=offs).split(self.inter, -1)
            return torch._grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=offs)
        out = rows.new_empty(rows.shape[0], self.down_proj.shape[1])
        start = 0
        for e, n in enumerate(counts):  # one GEMM pair per expert that has rows
            if n:
                gate, up = F.linear(rows[start:start + n], self.gate_up_proj[e]).split(self.inter, -1)
                out[start:start + n] = F.linear(F.silu(gate) * up, self.down_proj[e])
                start += n
        return out


class SparseMoeBlock(nn.Module):
    """Router + routed experts (this rank's, under EP) + shared expert(s). Two load counters:
    `expert_load` [E], the (token, slot) pairs of this rank's own tokens sent to each expert
    (summed over DP-attention ranks: the global load; under TP every rank sees every token, so
    any one rank's is), and `expert_rows` [local experts], the rows this rank's experts computed
    (the same figure for its experts, seen from where the work happens)."""

    def __init__(self, hidden: int, moe: MoEConfig, comm: ExpertComm | None = None,
                 mlp_comm: Collectives = NoCollectives()) -> None:
        super().__init__()
        self.moe = moe
        self.comm: ExpertComm = comm or LocalExperts()
        self.mlp_comm = mlp_comm
        first, stop = self.comm.local_range(moe.num_experts)
        self.gate = Router(hidden, moe)
        self.experts = Experts(hidden, moe.intermediate_size, first, stop - first)
        # HF: DeepSeek's `shared_experts`; Qwen2-MoE's `shared_expert` is renamed to it at load
        self.shared_experts = MLP(hidden, moe.shared_intermediate_size) if moe.shared_intermediate_size else None
        self.shared_expert_gate = Linear(hidden, 1, bias=False) if moe.shared_gate else None
        self.register_buffer("expert_load", torch.zeros(moe.num_experts, dtype=torch.int64), persistent=False)
        self.register_buffer("expert_rows", torch.zeros(stop - first, dtype=torch.int64), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp_comm.mlp_in(x)
        ids, weights = self.gate(x)
        self.expert_load += torch.bincount(self.mlp_comm.own_rows(ids).flatten(), minlength=self.moe.num_experts)
        routed = self.comm.dispatch(x, ids, self.moe.num_experts)
        self.expert_rows += torch.tensor(routed.counts, dtype=torch.int64, device=self.expert_rows.device)
        pairs = routed.combine(self.experts(routed.rows, routed.counts))  # [T*k, H]
        y = (pairs.view(*ids.shape, x.shape[1]) * weights.unsqueeze(-1).to(pairs.dtype)).sum(1)
        if self.shared_experts is not None:
            shared = self.shared_experts(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        return self.mlp_comm.mlp_out(y)
