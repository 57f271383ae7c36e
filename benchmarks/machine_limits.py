"""The machine's own limits, measured: fp32 matmul FLOP/s and memory bandwidth.

Benchmarks quote engine speed as a share of these numbers, so they are measured on the same
machine in the same run rather than taken from a datasheet.

    python benchmarks/machine_limits.py [--threads N] [--json]

- `matmul_flops(threads)`: best GFLOP/s over a few large square fp32 `torch.mm` calls on
  `threads` intra-op threads (default: all cores this process may use).
- `memory_bandwidth()`: GB/s of a large fp32 tensor copy (`dst.copy_(src)`), counting bytes
  read plus bytes written (the STREAM "copy" convention), best of a few.
- `read_bandwidth()`: GB/s of a large reduction (bytes read only) — the pattern of a decode
  step that streams every weight once; printed for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _with_threads(threads: int | None):
    class _Ctx:
        def __enter__(self):
            self.prev = torch.get_num_threads()
            torch.set_num_threads(threads or _cores())

        def __exit__(self, *exc):
            torch.set_num_threads(self.prev)

    return _Ctx()


def matmul_flops(threads: int | None = None, n: int = 2048, reps: int = 5,
                 min_time: float = 0.25) -> float:
    """fp32 GFLOP/s of large square matmuls (2·n³ FLOP each), best of `reps` timed runs."""
    with _with_threads(threads), torch.inference_mode():
        a = torch.randn(n, n, dtype=torch.float32)
        b = torch.randn(n, n, dtype=torch.float32)
        c = torch.empty(n, n, dtype=torch.float32)
        torch.mm(a, b, out=c)  # warm-up (allocations, thread pool)
        best = 0.0
        for _ in range(reps):
            iters, t0 = 0, time.perf_counter()
            while True:
                torch.mm(a, b, out=c)
                iters += 1
                dt = time.perf_counter() - t0
                if dt >= min_time:
                    break
            best = max(best, 2.0 * n**3 * iters / dt / 1e9)
        return best


def memory_bandwidth(mib: int = 256, reps: int = 5, threads: int | None = None) -> float:
    """GB/s of copying a `mib` MiB fp32 tensor (read + write bytes), best of `reps`."""
    numel = mib * 2**20 // 4
    with _with_threads(threads), torch.inference_mode():
        src = torch.ones(numel, dtype=torch.float32)
        dst = torch.zeros(numel, dtype=torch.float32)
        dst.copy_(src)  # touch pages
        best = 0.0
        for _ in range(reps):
            t0 = time.perf_counter()
            dst.copy_(src)
            dt = time.perf_counter() - t0
            best = max(best, 2 * numel * 4 / dt / 1e9)
        return best


def read_bandwidth(mib: int = 256, reps: int = 5, threads: int | None = None) -> float:
    """GB/s of reading a `mib` MiB fp32 tensor once (a sum), best of `reps`."""
    numel = mib * 2**20 // 4
    with _with_threads(threads), torch.inference_mode():
        src = torch.ones(numel, dtype=torch.float32)
        src.sum()
        best = 0.0
        for _ in range(reps):
            t0 = time.perf_counter()
            src.sum()
            dt = time.perf_counter() - t0
            best = max(best, numel * 4 / dt / 1e9)
        return best


def measure(threads: int | None = None) -> dict:
    threads = threads or _cores()
    return {
        "threads": threads,
        "matmul_gflops": matmul_flops(threads),
        "matmul_gflops_1thread": matmul_flops(1) if threads > 1 else None,
        "copy_gbps": memory_bandwidth(threads=threads),
        "read_gbps": read_bandwidth(threads=threads),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="Measure fp32 matmul FLOP/s and memory bandwidth.")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args()
    m = measure(a.threads)
    if a.json:
        print(json.dumps(m))
        return
    print(f"fp32 matmul ({m['threads']} threads): {m['matmul_gflops']:.1f} GFLOP/s")
    if m["matmul_gflops_1thread"] is not None:
        print(f"fp32 matmul (1 thread):  {m['matmul_gflops_1thread']:.1f} GFLOP/s")
    print(f"memory copy bandwidth:    {m['copy_gbps']:.1f} GB/s (read + write)")
    print(f"memory read bandwidth:    {m['read_gbps']:.1f} GB/s (read only)")


if __name__ == "__main__":
    main()
