"""Issue 18: where one step of the bundled model spends its time (torch profiler).

    python benchmarks/profile_step.py [--batch 1] [--context 256] [--prefill 256] [--steps 20]

Runs the offline engine's ModelRunner directly (no scheduler, no sampling) on the bundled
model: a decode step of `--batch` rows at `--context` tokens each, and one prefill chunk of
`--prefill` tokens. Prints time per op class (GEMM, attention, KV gather/write, norm, rope,
elementwise, other), the share of the step outside any torch op (Python overhead), and the
GEMMs' achieved GFLOP/s against the machine's matmul rate measured in the same run.

Caveat, measured: at large decode batches (64 x 288) the profiled step allocates differently
and its index_select self time exceeds the unprofiled step's wall time; read the op shares of
small batches from here, and time large ones without the profiler.

Issue 29, `--ab` (no profiler): a decode step at each of `--ab-batches` (default 1 and 64) x
`--context` tokens for each variant, all in this one process and interleaved (A, B, C, A, ...):
    gather      fp32 weights, decode attention gathers the pages for SDPA (--attention-backend torch_native)
    kernel      fp32 weights, decode attention reads the pages in place (the C++ op, the default)
    fp16        --quantization fp16 weights, kernel attention (a second engine)
medians of `--rounds` rounds and their ratio to "gather". Check `uptime` first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from machine_limits import matmul_flops  # noqa: E402

from pdserve.engine.batch import Chunk, ScheduleBatch  # noqa: E402
from pdserve.engine.kv_cache import pages_needed  # noqa: E402
from pdserve.engine.llm import LLM  # noqa: E402
from pdserve.engine.request import Request  # noqa: E402
from pdserve.engine.sampling_params import SamplingParams  # noqa: E402

CLASSES = [  # (class, substrings of aten op names), first match wins
    ("gemm", ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::bmm", "mkldnn::_linear")),
    ("attention", ("scaled_dot_product", "_flash_attention", "aten::_scaled", "pdserve::paged_decode")),
    ("kv gather/write", ("index_select", "index_copy", "index_put")),
    ("norm", ("rms_norm", "aten::rsqrt", "aten::pow", "aten::mean")),
    ("elementwise", ("aten::add", "aten::mul", "aten::silu", "aten::cat", "aten::neg", "aten::sub")),
    ("copy/alloc", ("aten::copy_", "aten::empty", "aten::contiguous", "aten::clone", "aten::zeros")),
]


WEIGHT_OUT_FIRST = ("aten::linear", "mkldnn::_linear_pointwise")  # weight [out, in]
GEMMS = WEIGHT_OUT_FIRST + ("aten::addmm", "aten::mm")  # ops whose FLOPs are counted


def classify(name: str) -> str:
    for cls, keys in CLASSES:
        if any(k in name for k in keys):
            return cls
    return "other"


def make_batch(llm: LLM, rows: int, context: int, length: int) -> ScheduleBatch:
    """`rows` requests whose KV covers `context` tokens; each chunk runs `length` new tokens."""
    kv = llm.engine.kv
    chunks = []
    for i in range(rows):
        tokens = [1 + (i * 7 + j) % 4000 for j in range(context + length)]
        req = Request(f"p{i}", context + length, SamplingParams(max_tokens=1), tokens)
        req.pages = kv.allocator.alloc(pages_needed(context + length, kv.page_size))
        chunks.append(Chunk(req, context, length))
    return ScheduleBatch(chunks)


def profile_step(llm: LLM, batch: ScheduleBatch, steps: int) -> tuple[float, dict[str, float], float]:
    runner = llm.engine.runner
    for _ in range(3):
        runner.forward(batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        runner.forward(batch)
    wall = (time.perf_counter() - t0) / steps
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            runner.forward(batch)
    by_class: dict[str, float] = defaultdict(float)
    for avg in prof.key_averages():  # self time: each microsecond in exactly one op
        if avg.key.startswith(("aten::", "mkldnn::", "pdserve::")):
            by_class[classify(avg.key)] += avg.self_cpu_time_total / 1e3 / steps
    gemm_flops = 0.0
    for ev in prof.events():
        if ev.name in GEMMS and ev.input_shapes:
            if ev.cpu_parent is not None and ev.cpu_parent.name in ("aten::linear", "aten::matmul"):
                continue  # the addmm/mm under a linear: counted at the linear
            shapes = [s for s in ev.input_shapes if s]
            if len(shapes) >= 2 and len(shapes[0]) >= 2:
                m, k = shapes[0][-2], shapes[0][-1]
                n = shapes[1][0] if ev.name in WEIGHT_OUT_FIRST else shapes[1][-1]
                gemm_flops += 2 * m * k * n / steps
    if os.environ.get("PROFILE_TABLE"):
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return wall * 1e3, dict(by_class), gemm_flops


def report(title: str, wall_ms: float, by_class: dict[str, float], gemm_flops: float, peak: float) -> None:
    ops = sum(by_class.values())
    print(f"\n## {title}: {wall_ms:.1f} ms per step")
    print("| op class | ms | share of step |")
    print("|---|---|---|")
    for cls, ms in sorted(by_class.items(), key=lambda kv: -kv[1]):
        print(f"| {cls} | {ms:.1f} | {ms / wall_ms:.0%} |")
    print(f"| outside torch ops (Python; profiler overhead makes ops look longer) | "
          f"{max(wall_ms - ops, 0):.1f} | {max(wall_ms - ops, 0) / wall_ms:.0%} |")
    gemm_ms = by_class.get("gemm", 0.0)
    if gemm_ms:
        rate = gemm_flops / (gemm_ms / 1e3) / 1e9
        print(f"GEMM: {gemm_flops / 1e9:.2f} GFLOP per step at {rate:.1f} GFLOP/s = {rate / peak:.0%} of matmul")


def ab(args: argparse.Namespace) -> None:
    """Interleaved A/B of a decode step: gather vs kernel attention (fp32), and fp16 weights."""
    print(f"load average {os.getloadavg()[0]:.2f} before")
    kw = dict(enable_prefix_cache=False, kv_cache_gb=args.kv_cache_gb, threads=args.threads)
    with LLM(args.model, **kw) as llm, LLM(args.model, quantization="fp16", **kw) as q:
        runner = llm.engine.runner
        if not runner.in_place:
            sys.exit("the C++ kernel did not load (see the log): nothing to compare")

        def use(in_place: bool) -> None:
            runner.in_place = in_place

        variants = {"gather": (llm, lambda: use(False)), "kernel": (llm, lambda: use(True)),
                    "fp16": (q, lambda: None)}
        for rows in args.ab_batches:
            batches = {id(e): make_batch(e, rows, args.context, 1) for e in (llm, q)}
            times: dict[str, list[float]] = {name: [] for name in variants}
            for r in range(args.rounds + 1):
                for name, (engine, prepare) in variants.items():
                    prepare()
                    t0 = time.perf_counter()
                    engine.engine.runner.forward(batches[id(engine)])
                    if r:  # round 0 warms up
                        times[name].append((time.perf_counter() - t0) * 1e3)
            base = statistics.median(times["gather"])
            print(f"\n## decode step, batch {rows} at {args.context} tokens ({args.rounds} interleaved rounds)")
            print("| variant | median ms | vs gather |")
            print("|---|---|---|")
            for name, ts in times.items():
                print(f"| {name} | {statistics.median(ts):.1f} | {statistics.median(ts) / base:.2f}x |")
            for engine in (llm, q):
                engine.engine.kv.allocator.free([p for c in batches[id(engine)].chunks for p in c.req.pages])
        use(True)
    print(f"\nload average {os.getloadavg()[0]:.2f} after")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--model", default="default")
    ap.add_argument("--ab", action="store_true", help="issue 29's interleaved A/B of a decode step (no profiler)")
    ap.add_argument("--ab-batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--kv-cache-gb", type=float, default=1.5, help="--ab: each engine's KV pool")
    ap.add_argument("--threads", type=int, default=None, help="--ab: torch threads (default: every core)")
    args = ap.parse_args()
    if args.ab:
        ab(args)
        return
    torch.manual_seed(0)
    peak = matmul_flops()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, matmul {peak:.1f} GFLOP/s")
    with LLM(args.model, enable_prefix_cache=False) as llm:
        dec = make_batch(llm, args.batch, args.context, 1)
        report(f"decode, batch {args.batch} at {args.context} tokens", *profile_step(llm, dec, args.steps), peak)
        pre = make_batch(llm, 1, 0, args.prefill)
        report(f"prefill chunk of {args.prefill} tokens", *profile_step(llm, pre, max(args.steps // 4, 2)), peak)


if __name__ == "__main__":
    main()
