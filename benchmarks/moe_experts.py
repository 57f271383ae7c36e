"""Grouped expert compute on CPU: which way to run an MoE layer's expert GEMMs (model/moe.py).

    python benchmarks/moe_experts.py [--threads N] [--reps R]

The rows of T tokens x top-k slots, sorted by expert, through gate_up and down of every expert
that has rows, three ways, timed in interleaved rounds (best of R, one-off: the machine is
shared, compare only within one run):

- `loop F.linear`: one F.linear pair per active expert on slices of the stacked weights
- `loop prepacked`: the same with each expert's weights prepacked for oneDNN (model/linear.py)
- `_grouped_mm`: torch._grouped_mm over the stacked weights, one call per projection
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def _case(experts: int, k: int, hidden: int, inter: int, tokens: int, reps: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.05
    down = torch.randn(experts, hidden, inter, generator=gen) * 0.05
    packed = [(torch.ops.mkldnn._reorder_linear_weight(gate_up[e], None),
               torch.ops.mkldnn._reorder_linear_weight(down[e], None)) for e in range(experts)]
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)]).flatten()
    order = ids.argsort(stable=True)
    rows = torch.randn(tokens, hidden, generator=gen).index_select(0, order // k)
    counts = torch.bincount(ids, minlength=experts).tolist()
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)

    def loop(project) -> torch.Tensor:
        out, start = torch.empty(rows.shape[0], hidden), 0
        for e, n in enumerate(counts):
            if n:
                gate, up = project(rows[start:start + n], e, 0).split(inter, -1)
                out[start:start + n] = project(F.silu(gate) * up, e, 1)
                start += n
        return out

    def grouped() -> torch.Tensor:
        gate, up = torch._grouped_mm(rows, gate_up.transpose(1, 2), offs=offs).split(inter, -1)
        return torch._grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offs)

    ways = {
        "loop F.linear": lambda: loop(lambda a, e, j: F.linear(a, gate_up[e] if j == 0 else down[e])),
        "loop prepacked": lambda: loop(lambda a, e, j: torch.ops.mkldnn._linear_pointwise(
            a, packed[e][j], None, "none", [], "")),
        "_grouped_mm": grouped,
    }
    ref = ways["loop F.linear"]()
    best = {name: float("inf") for name in ways}
    for name, fn in ways.items():
        torch.testing.assert_close(fn(), ref, rtol=1e-3, atol=1e-3)
    for _ in range(reps):  # interleaved: a burst of load hits every way alike
        for name, fn in ways.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: v * 1e3 for name, v in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for experts, k, hidden, inter in ((16, 4, 1024, 512), (64, 6, 512, 256)):
        print(f"experts {experts}, top-{k}, hidden {hidden}, expert intermediate {inter}, "
              f"{args.threads} threads (ms, best of {args.reps})")
        print(f"  {'tokens':>6}  " + "  ".join(f"{n:>14}" for n in ("loop F.linear", "loop prepacked", "_grouped_mm")))
        for tokens in (1, 4, 16, 64, 256):
            res = _case(experts, k, hidden, inter, tokens, args.reps)
            print(f"  {tokens:>6}  " + "  ".join(f"{v:>14.2f}" for v in res.values()))


if __name__ == "__main__":
    main()
