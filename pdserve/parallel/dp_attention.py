"""The DP-attention group: D attention ranks sharing one tensor-parallel MLP (SGLang's
--enable-dp-attention with tp == dp).

Each rank is a whole engine (its own scheduler, KV pool, attention over all heads, LM head and
sampler, for its own requests); only the MLP is sliced over the ranks (model/tp.py draws the
rows). So every rank must run every layer's MLP collectives in every step, whether it has
tokens or not:

    every loop iteration, on every rank, exactly one round:
      view = group.sync(my_tokens, my_busy, my_mode)   one all_gather of 3 int64 per rank
      view.max_tokens == 0     nobody forwards this round
      my_tokens > 0            my forward; per layer mlp_in (all_gather, padded to
                               view.max_tokens) and mlp_out (reduce_scatter, my rows back)
      my_tokens == 0 < max     an idle forward: the same collectives with zero rows
      view.any_busy            whether to go round again at once (else nap on the inbox until
                               a message: the front wakes every rank when it places a request)

A rank whose forward waits here is waiting for the slowest rank's step: with one rank in a
long prefill chunk, the others' decode steps take as long as that chunk (the imbalance that PD
removes: a decode server's ranks only decode).

Rendezvous: a torch FileStore in the HTTP front's private temp dir (the ranks are processes of
one machine, each talking to the same front); two groups over the same ranks, gloo for the
per-step sync (CPU tensors, long timeout: an idle server syncs on a slow beat) and the compute
group (NCCL on CUDA, gloo on CPU) with a short timeout so a dead rank fails the step. Nothing
is pickled: the sync is an int64 tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pdserve.parallel.ep import EPGroup
from pdserve.parallel.group import COMPUTE_TIMEOUT, interface_of, socket_interface

SYNC_TIMEOUT = timedelta(minutes=10)  # a rank waiting for the others' next round

MODE_IDLE, MODE_DECODE, MODE_EXTEND = 0, 1, 2  # what a rank's forward holds this round


@dataclass(frozen=True)
class RoundView:
    """Every rank's (tokens, busy, mode) of one round, in rank order."""

    tokens: tuple[int, ...]
    busy: tuple[bool, ...]
    modes: tuple[int, ...]

    @property
    def max_tokens(self) -> int:
        return max(self.tokens)

    @property
    def any_busy(self) -> bool:
        return any(self.busy)


class DPAttentionGroup:
    """Implements model/tp.py's Collectives for DP attention, plus the per-step round."""

    def __init__(self, rank: int, size: int, compute: dist.ProcessGroup, sync: dist.ProcessGroup,
                 device: torch.device) -> None:
        self.rank, self.size, self.device = rank, size, device
        self._compute, self._sync = compute, sync
        self._mine = 0  # this round's token counts (mine, the largest): the MLP pads to the largest
        self._max = 0

    @classmethod
    def join(cls, rank: int, size: int, store_path: str, device: torch.device) -> DPAttentionGroup:
        with socket_interface(interface_of("127.0.0.1")):  # one machine: loopback only
            store = dist.FileStore(store_path, size)
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=COMPUTE_TIMEOUT)
            sync = dist.new_group(list(range(size)), timeout=SYNC_TIMEOUT, backend="gloo")
        return cls(rank, size, dist.group.WORLD, sync, device)

    # ---- the per-step round ----------------------------------------------------------------
    def sync(self, tokens: int, busy: bool, mode: int) -> RoundView:
        mine = torch.tensor([tokens, int(busy), mode], dtype=torch.int64)
        every = torch.empty(3 * self.size, dtype=torch.int64)
        dist.all_gather_into_tensor(every, mine, group=self._sync)
        rows = every.view(self.size, 3).tolist()
        view = RoundView(tuple(r[0] for r in rows), tuple(bool(r[1]) for r in rows), tuple(r[2] for r in rows))
        self._mine, self._max = tokens, view.max_tokens
        return view

    # ---- model collectives -------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self._compute)
        return x

    def gather_vocab(self, x: torch.Tensor) -> torch.Tensor | None:
        return x  # the LM head is whole on every rank

    def mlp_in(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[0] == self._mine, "the MLP's rows differ from this round's token count"
        padded = x if self._mine == self._max else torch.cat(
            (x, x.new_zeros(self._max - self._mine, x.shape[1])))
        out = x.new_empty(self.size * self._max, x.shape[1])
        dist.all_gather_into_tensor(out, padded.contiguous(), group=self._compute)
        return out

    def mlp_out(self, y: torch.Tensor) -> torch.Tensor:
        out = y.new_empty(self._max, y.shape[1])
        dist.reduce_scatter_tensor(out, y.contiguous(), group=self._compute)
        return out[: self._mine]

    def own_rows(self, rows: torch.Tensor) -> torch.Tensor:
        start = self.rank * self._max
        return rows[start:start + self._mine]

    def experts(self) -> EPGroup:
        """The expert-parallel group of a mixture's sparse layers: these ranks (SGLang's DP attention
        with --ep-size == --dp-size), on the compute group."""
        return EPGroup(self.rank, self.size, self._compute)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
