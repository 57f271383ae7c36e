"""One DP-attention rank's side of the per-step round (the group is parallel/dp_attention.py).

Lifecycle, on every rank, every iteration of its engine loop (engine/process.py):

    this rank has work:  Engine.step()
                           the forward, if the scheduler built a batch: the runner calls
                           before_forward(plan) first (the round: my tokens, busy, mode), then
                           the model's per-layer MLP collectives pad to the largest rank's rows
                           finish_round(busy): nothing more if a forward ran; else a round with
                           0 tokens, and an idle forward if another rank forwards
    no work:             finish_round(False) alone (the loop's DPAttentionRound.idle): the same
                           round, the same idle forward
    then                 view.any_busy: go round again; else sleep on the inbox (all idle;
                           DPAttentionRound.wait)

So each iteration is exactly one round on every rank, whatever each rank's scheduler decided.
Each round is counted in the engine's stats (engine/stats.py): forwards with their step time,
idle forwards as idle steps, so /get_load and /metrics show per rank how long its steps take
and how often it only served the others' collectives.
"""

from __future__ import annotations

import time

import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.messages import StepPlan
from pdserve.engine.stats import EngineStats
from pdserve.model.llama import LlamaForCausalLM
from pdserve.parallel.dp_attention import MODE_DECODE, MODE_EXTEND, MODE_IDLE, DPAttentionGroup, RoundView


def dp_device(config: EngineConfig, device: torch.device) -> torch.device:
    """A dp rank's device: on CUDA without an explicit index, GPU dp_rank x (its tp ranks), so
    that each rank (and a replica's tp ranks after it) gets its own GPUs."""
    par = config.parallel
    if device.type != "cuda" or device.index is not None or par.dp_size == 1:
        return device
    device = torch.device("cuda", par.dp_rank * par.attn_tp_size % max(torch.cuda.device_count(), 1))
    torch.cuda.set_device(device)
    return device


def join_dp_attention(config: EngineConfig, device: torch.device) -> DPAttentionGroup | None:
    """This engine's DP-attention group (None without --enable-dp-attention)."""
    par = config.parallel
    if not par.enable_dp_attention:
        return None
    if par.dp_store is None:
        raise ValueError("DP attention needs the front's rendezvous path (ParallelConfig.dp_store)")
    return DPAttentionGroup.join(par.dp_rank, par.dp_size, par.dp_store, device)


class DPAttentionRank:
    def __init__(self, group: DPAttentionGroup, model: LlamaForCausalLM, stats: EngineStats) -> None:
        self.group = group
        self.model = model
        self.stats = stats
        param = next(model.parameters())
        self._dtype, self._device = param.dtype, param.device
        self._forwarded = False
        self.view = RoundView((0,) * group.size, (False,) * group.size, (MODE_IDLE,) * group.size)

    @property
    def rank(self) -> int:
        return self.group.rank

    def before_forward(self, plan: StepPlan) -> None:
        """The runner's hook before this rank's forward: the round, with this forward's tokens."""
        extend = any(length > 1 for _, _, length in plan.spans)
        self.view = self.group.sync(len(plan.input_ids), True, MODE_EXTEND if extend else MODE_DECODE)
        self._forwarded = True

    def finish_round(self, busy: bool) -> RoundView:
        """End this iteration's round: if no forward ran, sync with 0 tokens and, when another
        rank forwards, join its collectives with an idle forward."""
        if self._forwarded:
            self._forwarded = False
            return self.view
        t0 = time.perf_counter()
        self.view = self.group.sync(0, busy, MODE_IDLE)
        if self.view.max_tokens > 0:
            with torch.inference_mode():
                self.model.idle_forward(self._dtype, self._device)
            self.stats.on_idle_step(time.perf_counter() - t0)
        return self.view

    def close(self) -> None:
        self.group.close()
