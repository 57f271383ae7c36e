"""Expert parallelism: the routed experts divided over EP ranks; each rank's (token, slot)
pairs travel to the ranks holding their experts and the experts' outputs come back, with
torch.distributed all-to-all. Implements model/moe.py's ExpertComm (passed in, like the other
collectives: the model knows no process group).

Placement: rank r of n holds experts [r*E//n, (r+1)*E//n) (contiguous; n need not divide E).

Two ways to reach the experts, by what the ranks hold:

  EPGroup   DP attention: each rank has its own tokens; pairs travel all-to-all (below)
  EPShare   TP attention: every rank has every token (the attention's all-reduce made them
            equal), so no pair needs to travel: each rank computes the pairs of its own experts
            and leaves zeros for the others'; the layer's all-reduce (model/moe.py, mlp_out) sums
            the ranks' partial outputs, as SGLang's EP MoE does with ep_size == tp_size

Lifecycle of one sparse layer on every rank (a rank with no tokens joins with zero rows):

  dispatch  this rank's T*k pairs, sorted by expert (stable): grouped by destination rank
            1. per-expert pair counts [E], split by the ranks' expert blocks
               ── all_to_all_single ──▶ recv [n sources, E_r local experts]
            2. the pairs' rows [T*k, H], split by destination ── all_to_all_single ──▶
               recv rows, source-major (source 0's rows for e_lo.., then source 1's ..)
            3. one permutation makes them expert-major for the grouped GEMMs
  combine   the outputs, un-permuted to source-major ── all_to_all_single (splits reversed) ──▶
            back in this rank's sorted order, un-sorted to (token, slot) order; the routing
            weights never travel (the model applies them at home)

Example: E = 4, n = 2 (rank 0 holds e0 e1, rank 1 e2 e3), k = 1

    rank 0 pairs sorted  [e0 e2 e3]   counts [1 0 | 1 1]  sends 1 row to 0, 2 rows to 1
    rank 1 pairs sorted  [e1 e1 e3]   counts [0 2 | 0 1]  sends 2 rows to 0, 1 row to 1
    rank 0 receives      [r0:e0 | r1:e1 r1:e1]           expert-major: e0 x1, e1 x2
    rank 1 receives      [r0:e2 r0:e3 | r1:e3]           expert-major: [r0:e2 | r0:e3 r1:e3]

gloo in torch 2.13 runs all_to_all_single with uneven split sizes (what this uses); its list
form, all_to_all, refuses tensors of different sizes ("invalid tensor size"), so it is not used.
Nothing is pickled: counts travel as an int64 tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def expert_bounds(num_experts: int, size: int) -> list[int]:
    """[b_0 = 0, b_1, ..., b_n = E]: rank r holds experts [b_r, b_{r+1})."""
    return [r * num_experts // size for r in range(size + 1)]


class EPDispatch:
    """One layer's dispatched rows (model/moe.py's Dispatched) and the way back."""

    def __init__(self, group: EPGroup, x: torch.Tensor, ids: torch.Tensor, num_experts: int) -> None:
        self.group = group
        n, bounds = group.size, expert_bounds(num_experts, group.size)
        lo, hi = bounds[group.rank], bounds[group.rank + 1]
        flat = ids.flatten()
        self.order = torch.argsort(flat, stable=True)
        per_expert = torch.bincount(flat, minlength=num_experts)
        recv = torch.empty(n * (hi - lo), dtype=torch.int64, device=x.device)
        group.all_to_all(recv, per_expert, [hi - lo] * n, [b - a for a, b in zip(bounds, bounds[1:])])
        self.recv_counts = recv.view(n, hi - lo)  # [source, local expert]
        self.send_splits = [int(per_expert[a:b].sum()) for a, b in zip(bounds, bounds[1:])]
        self.recv_splits = self.recv_counts.sum(1).tolist()
        rows = x.index_select(0, self.order // ids.shape[1])
        got = rows.new_empty(sum(self.recv_splits), x.shape[1])
        group.all_to_all(got, rows, self.recv_splits, self.send_splits)
        expert_of_row = torch.arange(hi - lo, device=x.device).repeat(n).repeat_interleave(self.recv_counts.flatten())
        self.perm = torch.argsort(expert_of_row, stable=True)  # source-major -> expert-major
        self.rows = got.index_select(0, self.perm)
        self.counts: list[int] = self.recv_counts.sum(0).tolist()

    def combine(self, out: torch.Tensor) -> torch.Tensor:
        source_major = torch.empty_like(out)
        source_major[self.perm] = out
        back = out.new_empty(sum(self.send_splits), out.shape[1])
        self.group.all_to_all(back, source_major, self.send_splits, self.recv_splits)
        pairs = torch.empty_like(back)
        pairs[self.order] = back
        return pairs


class EPGroup:
    """model/moe.py's ExpertComm over a torch.distributed group whose ranks are the EP ranks
    (under DP attention: the attention ranks, as in SGLang's large-scale deployments)."""

    def __init__(self, rank: int, size: int, group: dist.ProcessGroup | None = None) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"ep rank {rank} out of range for ep size {size}")
        self.rank, self.size, self.group = rank, size, group

    def local_range(self, num_experts: int) -> tuple[int, int]:
        if num_experts < self.size:
            raise ValueError(f"ep size {self.size} is larger than the model's {num_experts} experts")
        bounds = expert_bounds(num_experts, self.size)
        return bounds[self.rank], bounds[self.rank + 1]

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, num_experts: int) -> EPDispatch:
        return EPDispatch(self, x, ids, num_experts)

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> None:
        dist.all_to_all_single(out, inp.contiguous(), out_splits, in_splits, group=self.group)

    def global_load(self, load: torch.Tensor) -> torch.Tensor:
        """Per-expert counts of this rank's tokens (a layer's expert_load) -> summed over the ranks."""
        total = load.clone()
        dist.all_reduce(total, group=self.group)
        return total


class LocalPairs:
    """EPShare's dispatch: the (token, slot) pairs whose expert this rank holds, grouped by expert;
    combine puts their outputs back and zeros for the other ranks' pairs."""

    def __init__(self, x: torch.Tensor, ids: torch.Tensor, lo: int, hi: int) -> None:
        flat = ids.flatten()
        mine = ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)
        order = torch.argsort(flat[mine], stable=True)
        self.pairs = mine[order]  # pair indices, expert-major
        self.total = flat.numel()
        self.rows = x.index_select(0, self.pairs // ids.shape[1])
        self.counts: list[int] = torch.bincount(flat[self.pairs] - lo, minlength=hi - lo).tolist()

    def combine(self, out: torch.Tensor) -> torch.Tensor:
        back = out.new_zeros(self.total, out.shape[1])
        back[self.pairs] = out
        return back


class EPShare:
    """model/moe.py's ExpertComm for EP ranks that hold the same tokens (TP attention)."""

    def __init__(self, rank: int, size: int) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"ep rank {rank} out of range for ep size {size}")
        self.rank, self.size = rank, size

    def local_range(self, num_experts: int) -> tuple[int, int]:
        return EPGroup(self.rank, self.size).local_range(num_experts)

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, num_experts: int) -> LocalPairs:
        return LocalPairs(x, ids, *self.local_range(num_experts))
