"""How many prefill and how many decode workers meet the SLOs for a given load (pure arithmetic).

Inputs: the load (request rate, mean prompt and output tokens), the profile, the SLOs, and the
correction factors (observed / modelled latency, planner.py). Output: a `Decision`.

Prefill (TTFT). A prefill worker runs one prompt after another; its service time is
s = profile.prefill_s(prompt) * prefill_correction. Requests arrive at random (Poisson) and
the service time is nearly fixed for a given length, so a worker is an M/D/1 queue, whose mean
time in system at utilisation rho is

    TTFT = s + rho * s / (2 * (1 - rho))     =>  TTFT <= slo  iff  rho <= 2k / (1 + 2k),  k = slo / s - 1

The rate spreads over n workers (rho = rate * s / n), so n = rate * s / rho_max. rho_max is
capped at RHO_CAP (a queue near saturation swings widely); when s alone exceeds the SLO
(k <= 0) no count meets it: the count that keeps rho at RHO_CAP is taken and the decision
says `ttft_unreachable`.

Decode (ITL). A decode worker with c streams, each holding prompt + output/2 tokens of KV on
average, has ITL(c) = profile.itl_s(c, c * (prompt + output / 2)) * decode_correction. The
largest c with ITL(c) <= slo, within max_concurrency and with every stream's full KV
(prompt + output) in the pool, is c*. By Little's law the cluster holds
rate * output * ITL(c*) streams at once, so n = rate * output * ITL(c*) / c*. No c meeting the
SLO (even c = 1): c* = 1 and `itl_unreachable`.

Counts: P = max(1, ceil(n_p)), D = max(1, ceil(n_d)). When P + D exceeds max_workers, or
with `fill` (a fixed fleet whose roles are switched: every worker is used), the max_workers
are split in proportion to the needs: P = clamp(round_half_up(max_workers * n_p / (n_p + n_d)), 1,
max_workers - 1), D = max_workers - P; the decision then says `capped` when the needs did not fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdserve.planner.profile import Profile

RHO_CAP = 0.9  # the highest utilisation planned for


@dataclass(frozen=True)
class Load:
    rate: float  # requests per second
    prompt_tokens: float  # mean input length
    output_tokens: float  # mean output length


@dataclass(frozen=True)
class Slo:
    ttft_s: float
    itl_s: float

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.itl_s <= 0:
            raise ValueError("SLOs must be > 0")


@dataclass(frozen=True)
class Decision:
    prefill: int
    decode: int
    prefill_need: float  # fractional workers the load needs (before rounding and capping)
    decode_need: float
    streams_per_decode: int  # c*: the concurrency one decode worker may hold within the ITL SLO
    notes: tuple[str, ...] = ()  # ttft_unreachable | itl_unreachable | capped | idle (planner.py)

    @property
    def total(self) -> int:
        return self.prefill + self.decode


def md1_ttft(rate_per_worker: float, service_s: float) -> float:
    """Mean time in an M/D/1 system (inf at or past saturation)."""
    rho = rate_per_worker * service_s
    return math.inf if rho >= 1 else service_s + rho * service_s / (2 * (1 - rho))


def prefill_need(load: Load, profile: Profile, slo: Slo, correction: float = 1.0) -> tuple[float, bool]:
    """(fractional prefill workers, whether the TTFT SLO can be met at all)."""
    s = profile.prefill_s(load.prompt_tokens) * correction
    k = slo.ttft_s / s - 1 if s > 0 else math.inf
    reachable = k > 0
    rho_max = min(RHO_CAP, 2 * k / (1 + 2 * k)) if reachable and k != math.inf else RHO_CAP
    return load.rate * s / rho_max, reachable


def streams_per_decode(load: Load, profile: Profile, slo: Slo, correction: float = 1.0) -> tuple[int, float, bool]:
    """(c*, ITL at c*, whether the ITL SLO can be met at all)."""
    model = profile.decode_model()
    mean_kv, full_kv = load.prompt_tokens + load.output_tokens / 2, load.prompt_tokens + load.output_tokens
    limit = max(1, min(profile.max_concurrency, int(profile.kv_capacity_tokens // max(full_kv, 1.0))))
    best, best_itl = 1, model.itl_s(1, mean_kv) * correction
    if best_itl > slo.itl_s:
        return best, best_itl, False
    for c in range(2, limit + 1):  # ITL grows with c (b, d >= 0 in any sane profile): stop at the first miss
        itl = model.itl_s(c, c * mean_kv) * correction
        if itl > slo.itl_s:
            break
        best, best_itl = c, itl
    return best, best_itl, True


def decide(load: Load, profile: Profile, slo: Slo, max_workers: int, prefill_correction: float = 1.0,
           decode_correction: float = 1.0, fill: bool = False) -> Decision:
    if max_workers < 2:
        raise ValueError("a PD cluster needs max_workers >= 2 (one prefill, one decode)")
    n_p, ttft_ok = prefill_need(load, profile, slo, prefill_correction)
    c, itl, itl_ok = streams_per_decode(load, profile, slo, decode_correction)
    n_d = load.rate * load.output_tokens * itl / c
    notes = [] if ttft_ok else ["ttft_unreachable"]
    notes += [] if itl_ok else ["itl_unreachable"]
    p, d = max(1, math.ceil(n_p - 1e-9)), max(1, math.ceil(n_d - 1e-9))
    if p + d > max_workers or fill:
        if p + d > max_workers:
            notes.append("capped")
        share = n_p / (n_p + n_d) if n_p + n_d > 0 else 0.5
        p = min(max(math.floor(max_workers * share + 0.5), 1), max_workers - 1)
        d = max_workers - p
    return Decision(p, d, n_p, n_d, c, tuple(notes))
