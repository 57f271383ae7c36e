"""Request arrival times: a gamma renewal process (Poisson when burstiness = 1), as vLLM's bench.

Inter-arrival gaps are gamma-distributed with shape ``burstiness`` and mean ``1/request_rate``
(scale = 1 / (rate * burstiness)); their squared coefficient of variation is 1/burstiness, so
burstiness < 1 is burstier than Poisson and > 1 is more even. The first request arrives at
t = 0 and request i at the sum of the first i gaps; an infinite rate sends everything at once.
"""

from __future__ import annotations

import math

import numpy as np


def arrival_offsets(n: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds from the benchmark start at which each of ``n`` requests is sent (non-decreasing)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 (inf = all at once), got {request_rate}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"burstiness must be a positive number, got {burstiness}")
    if n == 0:
        return []
    if math.isinf(request_rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n - 1)
    return [0.0] + [float(t) for t in np.cumsum(gaps)]
