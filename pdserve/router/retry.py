"""Which upstream outcomes are retried, and how long to wait before the next try.

Retried (on a newly chosen worker or pair, only before the client saw a byte): 408, 429, any
5xx, and connection-level failures. Backoff: `initial * multiplier**n`, capped at `max`, with
+/- `jitter` of randomness so retries from many requests do not synchronise.
"""

from __future__ import annotations

import random

from pdserve.router.config import RetryConfig

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def retryable_status(status: int) -> bool:
    return status in RETRY_STATUSES or status >= 500


def breaker_failure(status: int) -> bool:
    """Does this answer count against the worker's circuit? (busy/timeouts do not)."""
    return status >= 500


def backoff_s(cfg: RetryConfig, retry_index: int, rng: random.Random = random._inst) -> float:  # type: ignore[attr-defined]
    base = min(cfg.initial_backoff_s * cfg.multiplier ** retry_index, cfg.max_backoff_s)
    if cfg.jitter:
        base *= 1.0 + rng.uniform(-cfg.jitter, cfg.jitter)
    return max(0.0, base)
