"""`pdserve bench`: an asyncio serving benchmark for OpenAI-compatible servers.

Python API (imported lazily, so `import pdserve.bench` stays cheap)::

    from pdserve.bench import BenchConfig, run, print_table, write_json, plot, plot_compare
    result = run(BenchConfig(base_url="http://127.0.0.1:30000", num_prompts=64, max_concurrency=16))
    print(result.summary["itl_ms"]["p99"])
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BenchConfig": "runner", "BenchResult": "runner", "run": "runner", "run_benchmark": "runner",
    "build_requests": "runner", "BenchRequest": "datasets", "random_requests": "datasets",
    "shared_prefix_requests": "datasets", "sharegpt_requests": "datasets", "arrival_offsets": "arrivals",
    "RequestRecord": "metrics", "summarize": "metrics", "print_table": "report", "write_json": "report",
    "read_json": "report", "plot": "report", "plot_compare": "report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"pdserve.bench.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'pdserve.bench' has no attribute {name!r}")
