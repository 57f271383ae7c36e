"""`pdserve planner`'s loop: every interval read the router, plan, act through a connector, log and export.

    ┌─ every interval_s ───────────────────────────────────────────────────────────────┐
    │ snapshot of the router's /metrics ──observation(prev, now)──▶ Planner.step       │
    │   (rate, prompt/output tokens, TTFT, ITL, workers)           (correct, predict,  │
    │                                                               decide: P and D)   │
    │ decision held `stable` intervals and no action in the last cooldown_s?           │
    │   yes: plan_actions(connector.workers(), decision) ──▶ connector.switch/start/stop│
    │ one JSON line per interval (inputs, prediction, corrections, decision, actions,   │
    │ their results) to the decision log and the logger; gauges and counters updated    │
    └───────────────────────────────────────────────────────────────────────────────────┘

An interval in which no request finished leaves the corrections and the length predictors as
they were (planner.py) and still predicts the rate; with no load predicted nothing moves (any
split serves nothing). The stability rule keeps a one-interval blip
from moving workers; the cooldown lets a switched worker serve (and the metrics show it) before
the next move. Metrics (`<prefix>:planner_*`, on --metrics-port): the targets and needs, the
predicted load, the corrections, the observed TTFT/ITL, the serving workers by role, actions by
kind and outcome, and each action's seconds.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pdserve.planner.actions import ROLES, Action, plan_actions
from pdserve.planner.connector import ActionResult, Connector
from pdserve.planner.planner import Planner, PlanStep
from pdserve.planner.scrape import Snapshot, observation, scrape

logger = logging.getLogger("pdserve.planner")


@dataclass(frozen=True)
class LiveConfig:
    router_url: str
    interval_s: float = 10.0
    stable: int = 2  # intervals a decision must hold before it is acted on
    cooldown_s: float = 0.0  # after an action, the next waits this long (0: one interval)
    max_actions: int = 1  # per interval
    router_prefix: str = "sgl"  # the router's --metrics-prefix
    api_key: str | None = None


class PlannerMetrics:
    def __init__(self, prefix: str = "pdserve") -> None:
        P = f"{prefix}:planner_"
        r = self.registry = CollectorRegistry(auto_describe=True)
        g = {n: Gauge(P + n, h, registry=r) for n, h in (
            ("prefill_target", "Prefill workers decided"), ("decode_target", "Decode workers decided"),
            ("prefill_need", "Fractional prefill workers the predicted load needs"),
            ("decode_need", "Fractional decode workers the predicted load needs"),
            ("predicted_rate", "Predicted requests per second"),
            ("predicted_prompt_tokens", "Predicted mean prompt tokens"),
            ("predicted_output_tokens", "Predicted mean output tokens"),
            ("prefill_correction", "Observed / modelled TTFT"), ("decode_correction", "Observed / modelled ITL"),
            ("observed_ttft_seconds", "Mean TTFT of the last interval"),
            ("observed_itl_seconds", "Mean ITL of the last interval"))}
        self.gauges = g
        self.workers = Gauge(P + "workers", "Serving workers by role", ["role"], registry=r)
        self.actions = Counter(P + "actions_total", "Actions taken, by kind and outcome", ["kind", "outcome"],
                               registry=r)
        self.action_seconds = Histogram(P + "action_seconds", "Seconds an action took (a switch: drain + swap + "
                                        "register)", ["kind"], buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
                                        registry=r)
        self.steps = Counter(P + "steps_total", "Intervals planned", registry=r)

    def plan(self, step: PlanStep, workers: dict[str, int]) -> None:
        d, g = step.decision, self.gauges
        for name, value in (("prefill_target", d.prefill), ("decode_target", d.decode),
                            ("prefill_need", d.prefill_need), ("decode_need", d.decode_need),
                            ("predicted_rate", step.load.rate), ("predicted_prompt_tokens", step.load.prompt_tokens),
                            ("predicted_output_tokens", step.load.output_tokens),
                            ("prefill_correction", step.prefill_correction),
                            ("decode_correction", step.decode_correction)):
            g[name].set(value)
        if step.observed.ttft_s is not None:
            g["observed_ttft_seconds"].set(step.observed.ttft_s)
        if step.observed.itl_s is not None:
            g["observed_itl_seconds"].set(step.observed.itl_s)
        for role in ROLES:
            self.workers.labels(role).set(workers.get(role, 0))
        self.steps.inc()

    def acted(self, action: Action, result: ActionResult) -> None:
        self.actions.labels(action.kind, "ok" if result.ok else "failed").inc()
        self.action_seconds.labels(action.kind).observe(result.seconds)


class LivePlanner:
    def __init__(self, cfg: LiveConfig, planner: Planner, connector: Connector, metrics: PlannerMetrics,
                 log: IO[str] | None = None) -> None:
        self.cfg = cfg
        self.planner = planner
        self.connector = connector
        self.metrics = metrics
        self.log = log
        self.records: list[dict[str, Any]] = []  # every interval's line, also kept here (tests, benchmarks)
        self._stop = threading.Event()
        self._last: Snapshot | None = None
        self._held: tuple[int, int] | None = None
        self._held_for = 0
        self._last_action = float("-inf")

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.tick()
            except OSError as exc:  # the router or a worker unreachable: try again next interval
                logger.warning("planner: %s", exc)
            self._stop.wait(max(0.0, self.cfg.interval_s - (time.monotonic() - t0)))

    def tick(self, snap: Snapshot | None = None) -> dict[str, Any] | None:
        """One interval (the first only takes the baseline snapshot); returns its record. `snap`: the
        router's metrics now (default: read them)."""
        snap = snap or scrape(self.cfg.router_url, self.cfg.router_prefix, self.cfg.api_key)
        before, self._last = self._last, snap
        if before is None:
            return None
        step = self.planner.step(observation(before, snap))
        want = {"prefill": step.decision.prefill, "decode": step.decision.decode}
        key = (want["prefill"], want["decode"])
        self._held_for = self._held_for + 1 if key == self._held else 1
        self._held = key
        workers = self.connector.workers()
        serving = {r: sum(1 for w in workers if w.role == r) for r in ROLES}
        self.metrics.plan(step, serving)
        acted: list[dict[str, Any]] = []
        cooldown = self.cfg.cooldown_s or self.cfg.interval_s * 0.99
        if self._held_for >= self.cfg.stable and time.monotonic() - self._last_action >= cooldown and \
                step.load.rate > 0:
            actions = plan_actions(workers, want, self.planner.cfg.max_workers, self.connector.starting(),
                                   getattr(self.connector, "can_start", True), not self.planner.cfg.fill,
                                   self.cfg.max_actions)
            for action in actions:
                acted.append(self._act(action))
            if actions:
                self._last_action = time.monotonic()
        record = {"t": time.time(), "observed": _plain(step.observed), "load": _plain(step.load),
                  "corrections": {"prefill": step.prefill_correction, "decode": step.decode_correction},
                  "decision": _plain(step.decision), "held_for": self._held_for, "workers": serving, "actions": acted}
        self.records.append(record)
        if self.log is not None:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()
        return record

    def _act(self, action: Action) -> dict[str, Any]:
        logger.info("planner: %s", action.describe())
        if action.kind == "switch" and action.url:
            result = self.connector.switch(action.url, action.role)
        elif action.kind == "start":
            result = self.connector.start(action.role)
        else:
            result = self.connector.stop(action.url or "")
        self.metrics.acted(action, result)
        if not result.ok:
            logger.warning("planner: %s failed: %s", action.describe(), result.detail)
        return {"kind": action.kind, "role": action.role, "url": action.url, "ok": result.ok,
                "seconds": round(result.seconds, 4), "detail": result.detail}


def _plain(obj: Any) -> Any:
    """A dataclass or msgspec struct as JSON-able values."""
    if hasattr(obj, "__struct_fields__"):
        return {f: getattr(obj, f) for f in obj.__struct_fields__}
    return asdict(obj)


def open_log(path: Path | None) -> IO[str] | None:
    return open(path, "a", encoding="utf-8") if path is not None else None
