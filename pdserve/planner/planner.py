"""The planner's loop body: one metric observation in, one decision (with its inputs) out.

Lifecycle of `Planner` (the live `pdserve planner` calls `step` every interval with what the
router's /metrics said over it; `replay` does the same over a recorded series):

    step(obs):
      1. corrections: observed latency / what the model says for the load just seen with the
         workers that served it (prefill: the M/D/1 TTFT of decide.py; decode: the profile's
         ITL at the streams each decode held). Each factor moves halfway (alpha) to the new
         ratio and stays within [0.25, 4]; an interval with nothing finished leaves it;
      2. prediction: the rate, mean prompt and output lengths of the next interval
         (predictor.py; lengths only learn from intervals that finished requests);
      3. decision: decide.decide() on the predicted load with the corrected profile; with no load
         predicted (rate 0) the last decision holds, noted "idle" (any split serves nothing);
      4. the step (inputs and decision) is kept in `history` and logged as one line.

The series format (`load_series`) is JSON lines of `Observation`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from pdserve.planner.decide import Decision, Load, Slo, decide, md1_ttft
from pdserve.planner.predictor import Predictor
from pdserve.planner.profile import Profile

logger = logging.getLogger("pdserve.planner")


class Observation(msgspec.Struct, frozen=True, kw_only=True):
    """One interval of the router's metrics."""
    t: float  # end of the interval, seconds on any clock
    interval_s: float
    requests: int  # requests finished in the interval
    prompt_tokens: float = 0.0  # their mean prompt length
    output_tokens: float = 0.0  # their mean output length
    ttft_s: float | None = None  # their mean TTFT (None: nothing finished)
    itl_s: float | None = None  # their mean inter-token latency
    prefill_workers: int = 1  # serving during the interval
    decode_workers: int = 1
    decode_streams: float = 0.0  # mean streams in flight over all decode workers (0: unknown)

    @property
    def rate(self) -> float:
        return self.requests / self.interval_s if self.interval_s > 0 else 0.0


@dataclass(frozen=True)
class PlannerConfig:
    ttft_slo_ms: float
    itl_slo_ms: float
    max_workers: int
    interval_s: float = 10.0
    predictor: str = "trend"  # last | average | trend (predictor.py)
    window: int = 6  # intervals the predictor looks back
    fill: bool = False  # a fixed fleet: every worker gets a role (role switches), else the fewest that fit
    correction_alpha: float = 0.5

    @property
    def slo(self) -> Slo:
        return Slo(self.ttft_slo_ms / 1000, self.itl_slo_ms / 1000)


class Correction:
    """observed / modelled latency, smoothed: value += alpha * (ratio - value), within [LOW, HIGH]."""
    LOW, HIGH = 0.25, 4.0

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.value = 1.0

    def update(self, observed: float | None, modelled: float) -> None:
        if observed is None or observed <= 0 or not 0 < modelled < float("inf"):
            return
        ratio = min(max(observed / modelled, self.LOW), self.HIGH)
        self.value += self.alpha * (ratio - self.value)


@dataclass(frozen=True)
class PlanStep:
    t: float
    observed: Observation
    load: Load  # predicted for the next interval
    prefill_correction: float
    decode_correction: float
    decision: Decision


@dataclass
class Planner:
    cfg: PlannerConfig
    profile: Profile
    history: list[PlanStep] = field(default_factory=list)

    def __post_init__(self) -> None:
        make = lambda: Predictor(self.cfg.predictor, self.cfg.window)  # noqa: E731
        self.rate, self.prompt, self.output = make(), make(), make()
        self.prefill_correction = Correction(self.cfg.correction_alpha)
        self.decode_correction = Correction(self.cfg.correction_alpha)

    def _correct(self, obs: Observation) -> None:
        if obs.requests <= 0:
            return
        if obs.prefill_workers > 0:
            service = self.profile.prefill_s(obs.prompt_tokens)
            self.prefill_correction.update(obs.ttft_s, md1_ttft(obs.rate / obs.prefill_workers, service))
        if obs.decode_workers > 0 and obs.itl_s is not None:
            streams = obs.decode_streams or obs.rate * obs.output_tokens * obs.itl_s  # Little's law when unknown
            c = max(1.0, streams / obs.decode_workers)
            kv = c * (obs.prompt_tokens + obs.output_tokens / 2)
            self.decode_correction.update(obs.itl_s, self.profile.itl_s(c, kv))

    def step(self, obs: Observation) -> PlanStep:
        self._correct(obs)
        self.rate.observe(obs.rate)
        if obs.requests > 0:
            self.prompt.observe(obs.prompt_tokens)
            self.output.observe(obs.output_tokens)
        load = Load(self.rate.predict(), self.prompt.predict(), self.output.predict())
        if load.rate <= 0 and self.history:
            last = self.history[-1].decision
            decision = dataclasses.replace(last, notes=tuple(n for n in last.notes if n != "idle") + ("idle",))
        else:
            decision = decide(load, self.profile, self.cfg.slo, self.cfg.max_workers, self.prefill_correction.value,
                              self.decode_correction.value, self.cfg.fill)
        step = PlanStep(obs.t, obs, load, self.prefill_correction.value, self.decode_correction.value, decision)
        self.history.append(step)
        logger.info("plan t=%.1f: %dP %dD (need %.2f / %.2f, %d streams per decode%s) for %.2f req/s of %.0f "
                    "in / %.0f out; corrections prefill %.2f decode %.2f", obs.t, decision.prefill,
                    decision.decode, decision.prefill_need, decision.decode_need, decision.streams_per_decode,
                    "".join(f", {n}" for n in decision.notes), load.rate, load.prompt_tokens, load.output_tokens,
                    step.prefill_correction, step.decode_correction)
        return step


def load_series(path: str | Path) -> list[Observation]:
    dec = msgspec.json.Decoder(Observation)
    return [dec.decode(line) for line in Path(path).read_bytes().splitlines() if line.strip()]


def replay(planner: Planner, series: Iterable[Observation]) -> list[PlanStep]:
    return [planner.step(obs) for obs in series]
