"""When speculation pays: per request and step, how many drafts each decode request gets.

The rule (`AdaptivePolicy.choose`) maximises the step's expected tokens per second:

    tokens(k) = B + sum_r A_r(k_r)          B sampled rows (one token each without drafts);
                                            A_r(k) = alpha_r + alpha_r^2 + ... + alpha_r^k, the
                                            expected accepted drafts when each is accepted with
                                            probability alpha_r given the ones before it
    time(k)   = T(N + sum_r k_r) + D(k)     T(n): a forward of n tokens (StepCost, measured);
                                            D: the draft model's forwards (0 for n-gram / suffix)

Drafts are added one at a time, each to the request whose next draft is likeliest accepted
(alpha_r^(k_r+1): the marginal gains fall), while tokens/time rises. At batch 1 on this CPU a
forward reads all the weights whatever its size, T(5) ~ 1.1 x T(1), so a few drafts pay from
alpha ~ 0.1; with many requests the forward is compute-bound, T(N + K) grows with every draft,
and only well-accepted drafts survive: large batches turn speculation off by themselves
(and above `disable_by_batch_size` decode requests nothing is proposed at all).

alpha_r: accepted and refused drafts of r, both decayed by DECAY per step, plus PRIOR_WEIGHT
pseudo-drafts at the proposer's acceptance so far; a request that stops speculating drifts back
to that prior, so it is tried again now and then (while the prior itself stays honest).

T(n) (`StepCost`): seconds per forward by token count in geometric buckets; start-up probes
(engine/spec/speculator.py: B decode rows, and B verify chunks of k + 1 rows, B = 1, 4, 16,
32) seed it, every forward refines it (EWMA); between buckets it is interpolated linearly.
"""

from __future__ import annotations

import bisect
import heapq

from pdserve.engine.request import Request

DECAY = 0.9  # per verify or idle step: old evidence about a request fades
PRIOR_WEIGHT = 2.0  # pseudo-drafts at the proposer's global rate
EWMA = 0.2  # weight of a new timing in its bucket
GAIN_MARGIN = 1.02  # a draft must raise tokens/s by 2%: timing noise should not switch it on


def _bucket(n: int) -> int:
    """Geometric buckets: 1 2 3 4 6 8 12 16 24 32 48 64 ... (n rounded down to one of them)."""
    if n <= 4:
        return max(n, 1)
    p = 1 << (n.bit_length() - 1)
    return p + p // 2 if n >= p + p // 2 else p


class StepCost:
    """Measured seconds of a forward of n tokens (module docstring)."""

    def __init__(self) -> None:
        self._points: dict[int, float] = {}

    def observe(self, n: int, seconds: float) -> None:
        b = _bucket(n)
        old = self._points.get(b)
        self._points[b] = seconds if old is None else (1 - EWMA) * old + EWMA * seconds

    def known(self) -> bool:
        return bool(self._points)

    def estimate(self, n: int) -> float:
        """Seconds for n tokens: linear between measured buckets, proportional past the last."""
        if not self._points:
            return 0.0
        xs = sorted(self._points)
        ys = [self._points[x] for x in xs]
        if n <= xs[0]:
            return ys[0]
        if n >= xs[-1]:
            return ys[-1] * n / xs[-1] if n > xs[-1] else ys[-1]
        i = bisect.bisect_left(xs, n)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (n - x0) / (x1 - x0)


class AdaptivePolicy:
    """Drafts per request and step (module docstring). `enabled` False: every proposal in full."""

    def __init__(self, cost: StepCost, draft_cost: StepCost | None = None, enabled: bool = True) -> None:
        self.cost, self.draft_cost, self.enabled = cost, draft_cost, enabled
        self._evidence: dict[Request, tuple[float, float]] = {}  # decayed (accepted, refused) drafts
        self.global_rate = 0.5  # the proposer's acceptance so far (set by the speculator)

    def alpha(self, req: Request) -> float:
        acc, ref = self._evidence.get(req, (0.0, 0.0))
        return (acc + PRIOR_WEIGHT * self.global_rate) / (acc + ref + PRIOR_WEIGHT)

    def observe(self, req: Request, drafts: int, accepted: int) -> None:
        acc, ref = self._evidence.get(req, (0.0, 0.0))
        refused = 1 if accepted < drafts else 0  # the drafts after the first refused one say nothing
        self._evidence[req] = (DECAY * acc + accepted, DECAY * ref + refused)

    def idle(self, req: Request) -> None:
        """A step in which `req` did not speculate: its evidence fades toward the prior."""
        if req in self._evidence:
            acc, ref = self._evidence[req]
            self._evidence[req] = (DECAY * acc, DECAY * ref)

    def release(self, req: Request) -> None:
        self._evidence.pop(req, None)

    def choose(self, rows: int, tokens: int, reqs: list[Request], limits: list[int]) -> list[int]:
        """Drafts per request (each <= its limit) for a forward of `tokens` tokens with `rows`
        sampled rows; without the adaptive rule (or before any timing) the limits themselves."""
        if not self.enabled or not self.cost.known():
            return list(limits)
        ks = [0] * len(reqs)
        alphas = [self.alpha(r) for r in reqs]
        heap = [(-a, i) for i, (a, lim) in enumerate(zip(alphas, limits)) if lim > 0 and a > 0]
        heapq.heapify(heap)
        gain, extra, levels = float(rows), 0, 0
        time = self._time(tokens, 0, 0, 0)
        while heap:
            neg, i = heapq.heappop(heap)
            new_levels = max(levels, ks[i] + 1)
            new_time = self._time(tokens, extra + 1, new_levels, sum(1 for k in ks if k) + (ks[i] == 0))
            if (gain - neg) * time <= gain * new_time * GAIN_MARGIN:
                break  # the likeliest next draft does not pay: none after it does either
            gain, extra, levels, time = gain - neg, extra + 1, new_levels, new_time
            ks[i] += 1
            if ks[i] < limits[i]:
                heapq.heappush(heap, (neg * alphas[i], i))
        return ks

    def _time(self, tokens: int, drafts: int, levels: int, speculating: int) -> float:
        t = self.cost.estimate(tokens + drafts)
        if self.draft_cost is not None and levels:
            t += levels * self.draft_cost.estimate(speculating)
        return t
