"""What the engine counts as it runs, and its periodic stats line (like SGLang's and vLLM's).

Lifecycle: the Engine owns one `EngineStats`; each `step()` reports the forward it ran
(`on_forward`: prompt tokens computed, tokens generated) and each finished request its prefix
cache use (`on_finish`). The engine process calls `maybe_log(load)` after steps and while idle:
every `interval_s` seconds, if the engine did anything in that window, it logs one line:

  stats: running 3 reqs, queued 1 reqs, KV 24.1% (2464/10224 tokens), prompt 250.3 tok/s,
         gen 31.5 tok/s, prefix cache hit 40.0%, preemptions 0, steps 118 of 84.2 ms,
         forward+sample 97.1% of busy

"busy" is the engine loop's time in iterations that had work (draining the inbox, the step,
sending outputs); what is not forward+sample there is the loop's and the scheduler's
per-step overhead (issue 18: it must stay small at concurrency 16).

The window's rates also go into `LoadInfo` (gauges for /metrics), the cumulative counts into
counters; nothing here is reset except the window. Every forward also feeds `StepModel`, the
measured step time (a + b x tokens) that admission control and deadline checks predict with.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.engine.messages import ExpertLoad, StepSample
from pdserve.model.llama import LlamaForCausalLM
from pdserve.model.moe_lm import MoEForCausalLM
from pdserve.parallel.ep import expert_bounds

log = logging.getLogger("pdserve.engine.stats")

TRACE_STEPS = 8192  # the last steps' (start, seconds, tokens, idle), for /get_load?step_trace=1


@dataclass
class Window:
    """Counts since the last stats line."""

    start: float
    prompt_tokens: int = 0  # prompt tokens computed (prefill chunks, recomputation included)
    gen_tokens: int = 0
    cache_queries: int = 0  # prompt tokens of requests that finished
    cache_hits: int = 0  # of those, served from the prefix cache
    steps: int = 0  # forwards run
    forward_s: float = 0.0  # in the model's forward and sampling
    busy_s: float = 0.0  # in engine-loop iterations that had work

    @property
    def active(self) -> bool:
        return bool(self.prompt_tokens or self.gen_tokens or self.cache_queries)


class StepModel:
    """Seconds of one forward as `a + b * tokens`, a least-squares line over recent steps (each
    sum decays by `1 - alpha` per step, so it follows the machine's current speed). Before any
    step: 0 (nothing measured, nothing refused)."""

    def __init__(self, alpha: float = 0.05) -> None:
        self.alpha = alpha
        self.w = self.sx = self.sy = self.sxx = self.sxy = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        k = 1.0 - self.alpha
        self.w, self.sx, self.sy = self.w * k + 1.0, self.sx * k + tokens, self.sy * k + seconds
        self.sxx, self.sxy = self.sxx * k + tokens * tokens, self.sxy * k + tokens * seconds

    def line(self) -> tuple[float, float]:
        """(a, b): fixed seconds per step, seconds per token (both >= 0)."""
        if self.w <= 0.0 or self.sx <= 0.0:
            return 0.0, 0.0
        mx, my = self.sx / self.w, self.sy / self.w
        var = self.sxx / self.w - mx * mx
        b = (self.sxy / self.w - mx * my) / var if var > 1e-6 * max(mx * mx, 1.0) else 0.0
        a = my - b * mx
        if b <= 0.0 or a < 0.0:  # too little spread (or noise): proportional through the mean
            return (0.0, my / mx) if b > 0.0 else (my, 0.0)
        return a, b


def prefill_seconds(tokens: int, budget: int, decode_rows: int, a: float, b: float) -> float:
    """Predicted seconds to compute `tokens` prompt tokens queued ahead in chunks of `budget`
    per step, each step also carrying `decode_rows` decode tokens (StepModel's line a + b x n)."""
    if tokens <= 0:
        return 0.0
    per_step = max(1, budget - decode_rows)
    full, rest = divmod(tokens, per_step)
    return full * (a + b * (per_step + decode_rows)) + (a + b * (rest + decode_rows) if rest else 0.0)


class EngineStats:
    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.window = Window(clock())
        self.last_window = self.window
        # cumulative, for Prometheus counters
        self.prompt_tokens = 0
        self.gen_tokens = 0
        self.cache_queries = 0
        self.cache_hits = 0
        # the last closed window's rates, for gauges
        self.gen_throughput = 0.0
        self.prompt_throughput = 0.0
        self.cache_hit_rate = 0.0
        # every step (forward) and, under DP attention, idle forward (the others' collectives only)
        self.steps = 0
        self.step_seconds = 0.0
        self.idle_steps = 0
        self.trace: deque[StepSample] = deque(maxlen=TRACE_STEPS)
        self.step_model = StepModel()

    def on_forward(self, prompt_tokens: int, gen_tokens: int) -> None:
        self.window.prompt_tokens += prompt_tokens
        self.window.gen_tokens += gen_tokens
        self.prompt_tokens += prompt_tokens
        self.gen_tokens += gen_tokens

    def on_forward_time(self, seconds: float, tokens: int = 0) -> None:
        self.window.steps += 1
        self.window.forward_s += seconds
        self.steps += 1
        self.step_seconds += seconds
        self.trace.append(StepSample(time.time() - seconds, seconds, tokens, False))
        self.step_model.add(tokens, seconds)

    def on_idle_step(self, seconds: float) -> None:
        """DP attention: a step in which this rank only joined the other ranks' collectives."""
        self.idle_steps += 1
        self.trace.append(StepSample(time.time() - seconds, seconds, 0, True))

    def on_busy(self, seconds: float) -> None:
        self.window.busy_s += seconds

    def on_finish(self, prompt_len: int, cached_tokens: int) -> None:
        self.window.cache_queries += prompt_len
        self.window.cache_hits += cached_tokens
        self.cache_queries += prompt_len
        self.cache_hits += cached_tokens

    def reset(self) -> None:
        """Forget everything (after the warm-up request)."""
        self.__init__(self.interval_s, self.clock)  # type: ignore[misc]

    def close_window(self) -> float:
        """End the current window: its rates become the gauges; returns its length (s)."""
        now = self.clock()
        w = self.window
        seconds = max(now - w.start, 1e-9)
        self.prompt_throughput = w.prompt_tokens / seconds
        self.gen_throughput = w.gen_tokens / seconds
        if w.cache_queries:
            self.cache_hit_rate = w.cache_hits / w.cache_queries
        self.last_window = w
        self.window = Window(now)
        return seconds

    def maybe_log(self, running: int, queued: int, used_tokens: int, total_tokens: int,
                  preemptions: int) -> str | None:
        """Log (and return) the stats line when `interval_s` has passed and the window saw work,
        or requests are still running or queued; else None. With `interval_s` 0 nothing is
        logged, but the gauges still move every 10 s."""
        if self.clock() - self.window.start < (self.interval_s if self.interval_s > 0 else 10.0):
            return None
        busy = self.window.active or running or queued
        self.close_window()
        if not busy or self.interval_s <= 0:
            return None
        usage = used_tokens / max(total_tokens, 1)
        w = self.last_window
        line = (f"stats: running {running} reqs, queued {queued} reqs, KV {usage:.1%} "
                f"({used_tokens}/{total_tokens} tokens), prompt {self.prompt_throughput:.1f} tok/s, "
                f"gen {self.gen_throughput:.1f} tok/s, prefix cache hit {self.cache_hit_rate:.1%}, "
                f"preemptions {preemptions}, steps {w.steps} of {w.busy_s / max(w.steps, 1) * 1e3:.1f} ms, "
                f"forward+sample {w.forward_s / max(w.busy_s, 1e-9):.1%} of busy")
        log.info("%s", line)
        return line


def expert_load(model: LlamaForCausalLM, ep_ranks: int) -> ExpertLoad | None:
    """The routing counts of a mixture's sparse layers (None for a dense model): this engine's
    tokens' pairs per layer and expert (model/moe.py counts them as it routes), and per EP rank
    (placement: parallel/ep.py)."""
    if not isinstance(model, MoEForCausalLM) or not model.moe_blocks():
        return None
    layers = model.expert_load().tolist()
    bounds = expert_bounds(len(layers[0]), ep_ranks)
    per_expert = [sum(col) for col in zip(*layers)]
    return ExpertLoad(layers, [sum(per_expert[a:b]) for a, b in zip(bounds, bounds[1:])])
