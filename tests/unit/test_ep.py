"""Expert parallelism (parallel/ep.py): an EP MoE layer over 2 and 3 gloo processes on 127.0.0.1
(one spawn of 3: EP 2 on a subgroup of ranks 0-1) equals the single-rank layer, ranks with zero
tokens included, and its load counters add up to the single-rank layer's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from pdserve.model.moe import SparseMoeBlock
from pdserve.model.moe_config import MoEConfig
from pdserve.parallel.ep import EPGroup, expert_bounds
from pdserve.parallel.group import host_store

ROOT = Path(__file__).resolve().parents[2]
HIDDEN = 32
TOKENS = ((5, 0, 9), (1, 7, 2), (0, 0, 4))  # per step, per rank: idle ranks join with zero rows


def moe_config(num_experts: int) -> MoEConfig:
    """DeepSeek-V3 routing (grouped, biased, sigmoid, scaled) with a shared expert."""
    return MoEConfig(num_experts, 3, 16, (0,), scoring="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
                     num_groups=4, topk_groups=2, group_score="top2_sum", correction_bias=True,
                     shared_intermediate_size=16)


CASES = ((2, 8), (3, 12), (3, 8))  # (ep size, experts): 8 over 3 ranks is uneven (2, 3, 3)


def run_case(rank: int, size: int, num_experts: int, group: object) -> dict:
    """Build the whole layer and this rank's EP layer from the same seed, run each step's tokens
    through both; what this rank found."""
    moe = moe_config(num_experts)
    torch.manual_seed(0)
    whole = SparseMoeBlock(HIDDEN, moe)
    with torch.no_grad():
        for p in whole.parameters():
            p.normal_(0.0, 0.3)
    ep_group = EPGroup(rank, size, group)  # type: ignore[arg-type]
    ep = SparseMoeBlock(HIDDEN, moe, ep_group)
    lo, hi = ep_group.local_range(num_experts)
    state = {k: v for k, v in whole.state_dict().items() if not k.startswith("experts.")}
    ep.load_state_dict({**state, "experts.gate_up_proj": whole.experts.gate_up_proj[lo:hi],
                        "experts.down_proj": whole.experts.down_proj[lo:hi]}, strict=False)
    err = 0.0
    with torch.no_grad():
        for step, counts in enumerate(TOKENS):
            counts = counts[:size]
            everyone = torch.randn(sum(counts), HIDDEN, generator=torch.Generator().manual_seed(step))
            start = sum(counts[:rank])
            ref = whole(everyone)[start:start + counts[rank]]
            got = ep(everyone[start:start + counts[rank]])
            assert got.shape == ref.shape
            err = max(err, float((got - ref).abs().max()) if got.numel() else 0.0)
        rows = torch.zeros(num_experts, dtype=torch.int64)
        rows[lo:hi] = ep.expert_rows
        return {"err": err, "experts": [lo, hi], "load": ep_group.global_load(ep.expert_load).tolist(),
                "rows": ep_group.global_load(rows).tolist(), "want": whole.expert_load.tolist()}


def rank_main(rank: int, world: int, port: int, out: str) -> None:
    """One process of the world: every case whose ep size covers it (ep 2 on ranks 0-1 of a
    subgroup); writes {case: findings} to `out` (JSON)."""
    import torch.distributed as dist

    from pdserve.parallel.group import interface_of, socket_interface

    torch.set_num_threads(1)
    with socket_interface(interface_of("127.0.0.1")):
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timedelta(seconds=60))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=60))
        groups = {size: dist.new_group(list(range(size))) for size in sorted({s for s, _ in CASES})}
    found = {f"{size}-{experts}": run_case(rank, size, experts, groups[size])
             for size, experts in CASES if rank < size}
    Path(out).write_text(json.dumps(found))
    dist.destroy_process_group()


def test_ep_layer_equals_the_single_rank_layer(tmp_path: Path) -> None:
    world = max(s for s, _ in CASES)
    store = host_store("127.0.0.1", 0, world)  # this process hosts the rendezvous only
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    outs = [tmp_path / f"rank{r}.json" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, "-c", f"from tests.unit.test_ep import rank_main; "
                               f"rank_main({r}, {world}, {store.port}, {str(outs[r])!r})"], cwd=ROOT, env=env)
             for r in range(world)]
    try:
        codes = [p.wait(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0] * world
    found = [json.loads(o.read_text()) for o in outs]
    for size, experts in CASES:
        results = [found[r][f"{size}-{experts}"] for r in range(size)]
        bounds = expert_bounds(experts, size)
        assert [r["experts"] for r in results] == [[a, b] for a, b in zip(bounds, bounds[1:])]
        for r in results:
            assert r["err"] < 1e-5
            assert r["load"] == r["want"]  # routed pairs, summed over the ranks
            assert r["rows"] == r["want"]  # rows the experts computed, where they live
        assert sum(results[0]["want"]) == 3 * sum(sum(t[:size]) for t in TOKENS)
    assert "2-8" not in found[2]


def test_placement_covers_every_expert_once() -> None:
    assert expert_bounds(8, 3) == [0, 2, 5, 8]
    assert [EPGroup(r, 3).local_range(12) for r in range(3)] == [(0, 4), (4, 8), (8, 12)]
    with pytest.raises(ValueError, match="larger than the model's 2 experts"):
        EPGroup(0, 3).local_range(2)
    with pytest.raises(ValueError, match="out of range"):
        EPGroup(3, 3)


def test_one_rank_dispatch_is_a_sort_by_expert() -> None:
    block = SparseMoeBlock(HIDDEN, moe_config(8))
    x, ids = torch.randn(6, HIDDEN), torch.tensor([[3, 1, 0], [3, 2, 1], [7, 3, 0], [0, 1, 2], [5, 6, 7], [4, 5, 6]])
    routed = block.comm.dispatch(x, ids, 8)
    assert routed.counts == torch.bincount(ids.flatten(), minlength=8).tolist()
    assert torch.equal(routed.combine(routed.rows), x.repeat_interleave(3, dim=0))  # identity experts: each pair's row
