"""The live planner without processes: the router's metrics read back as observations, the actions a
decision turns into (planner/actions.py), and the loop acting through a connector only once a decision
held (planner/live.py), every interval logged with its inputs and exported."""

from __future__ import annotations

import io
import json

from prometheus_client import generate_latest

from pdserve.planner import Planner, PlannerConfig
from pdserve.planner.actions import Action, WorkerView, plan_actions
from pdserve.planner.connector import ActionResult
from pdserve.planner.live import LiveConfig, LivePlanner, PlannerMetrics
from pdserve.planner.scrape import Snapshot, observation, parse_metrics
from pdserve.router.config import RouterConfig, WorkerSpec
from pdserve.router.metrics import RouterMetrics
from pdserve.router.usage import Usage
from pdserve.router.workers import new_worker
from tests.unit.test_planner import PROFILE


def test_router_metrics_read_back_as_an_observation() -> None:
    m = RouterMetrics()
    workers = [new_worker(WorkerSpec(f"http://127.0.0.1:{9000 + i}", role), RouterConfig(pd=True))
               for i, role in enumerate(("prefill", "decode", "decode"))]
    workers[1].in_flight, workers[2].in_flight = 3, 2
    workers[0].healthy = workers[1].healthy = True  # the second decode is not healthy yet
    before = parse_metrics(m.render(workers, 0, 0).decode(), t=100.0)
    for prompt, out, ttft, itl in ((500, 20, 0.4, 0.05), (300, 40, 0.6, 0.07)):
        m.generation(Usage(prompt, out, ttft, itl))
    m.generation(Usage(100, 5))  # a whole answer: no TTFT, no ITL
    after = parse_metrics(m.render(workers, 0, 0).decode(), t=110.0)
    obs = observation(before, after)
    assert (obs.requests, obs.interval_s, obs.rate) == (3, 10.0, 0.3)
    assert (obs.prompt_tokens, obs.output_tokens) == (300.0, 65 / 3)
    assert obs.ttft_s == 0.5 and abs(obs.itl_s - 0.06) < 1e-12  # type: ignore[operator]
    assert (obs.prefill_workers, obs.decode_workers, obs.decode_streams) == (1, 1, 5.0)
    quiet = observation(after, parse_metrics(m.render(workers, 0, 0).decode(), t=120.0))
    assert quiet.requests == 0 and quiet.ttft_s is None and quiet.itl_s is None


def _w(url: str, role: str, in_flight: int = 0, owned: bool = False) -> WorkerView:
    return WorkerView(url, role, in_flight, owned)


def test_actions_switch_first_then_start_then_stop() -> None:
    fleet = [_w("p1", "prefill", 2), _w("d1", "decode", 5), _w("d2", "decode", 1)]
    assert plan_actions(fleet, {"prefill": 2, "decode": 1}, 3, {}) == [Action("switch", "prefill", "d2")]
    assert plan_actions(fleet, {"prefill": 1, "decode": 2}, 3, {}) == []  # met: nothing moves
    assert plan_actions(fleet, {"prefill": 0, "decode": 9}, 3, {}) == []  # never below one prefill; full
    two = [_w("p1", "prefill"), _w("d1", "decode")]
    assert plan_actions(two, {"prefill": 2, "decode": 2}, 4, {}, max_actions=3) == \
        [Action("start", "prefill"), Action("start", "decode")]
    assert plan_actions(two, {"prefill": 2, "decode": 2}, 4, {"prefill": 1}, max_actions=3) == \
        [Action("start", "decode")]  # one prefill already starting
    assert plan_actions(two, {"prefill": 2, "decode": 1}, 4, {}, can_start=False) == []
    big = [_w("p1", "prefill", 0), _w("p2", "prefill", 0, owned=True), _w("p3", "prefill", 3, owned=True),
           _w("d1", "decode")]
    assert plan_actions(big, {"prefill": 1, "decode": 1}, 4, {}, shrink=True, max_actions=5) == \
        [Action("stop", "prefill", "p2"), Action("stop", "prefill", "p3")]  # only its own, idlest first
    assert plan_actions(big, {"prefill": 1, "decode": 1}, 4, {}, shrink=False) == []  # a fixed fleet


class FakeConnector:
    def __init__(self, roles: dict[str, str]) -> None:
        self.roles = roles
        self.calls: list[tuple[str, str]] = []
        self.can_start = False

    def workers(self) -> list[WorkerView]:
        return [WorkerView(url, role) for url, role in sorted(self.roles.items())]

    def switch(self, url: str, role: str) -> ActionResult:
        self.calls.append((url, role))
        self.roles[url] = role
        return ActionResult(True, 0.4, {"role": role, "epoch": 2})

    def start(self, role: str) -> ActionResult:
        raise AssertionError("a fixed fleet starts nothing")

    def stop(self, url: str) -> ActionResult:
        raise AssertionError("a fixed fleet stops nothing")

    def starting(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


def _snap(t: float, gens: float, prompt: float, out: float, healthy: dict[str, int]) -> Snapshot:
    counters = {"generations_total": gens, "prompt_tokens_total": prompt, "output_tokens_total": out,
                "ttft_seconds_sum": 0.0, "ttft_seconds_count": 0.0, "itl_seconds_sum": 0.0, "itl_seconds_count": 0.0}
    return Snapshot(t, counters, {}, healthy)


def test_the_loop_acts_once_a_decision_held_and_logs_every_interval() -> None:
    """3 workers, starting 1P 2D. Decode-heavy load (1 req/s, 50 in / 200 out) holds 1P 2D; the mix turns
    prefill-heavy (500 in / 20 out: 2P 1D, tests/unit/test_planner.py's arithmetic): nothing moves on the
    first interval of it (stable 2), the idler decode switches on the second, and then nothing more."""
    conn = FakeConnector({"p1": "prefill", "d1": "decode", "d2": "decode"})
    log = io.StringIO()
    metrics = PlannerMetrics("pdserve")
    cfg = PlannerConfig(1000.0, 100.0, 3, interval_s=10.0, predictor="last", fill=True)
    live = LivePlanner(LiveConfig("http://router", 10.0, stable=2, cooldown_s=0.001), Planner(cfg, PROFILE), conn,
                       metrics, log)
    healthy = {"prefill": 1, "decode": 2}
    g = p = o = 0.0
    assert live.tick(_snap(0, g, p, o, healthy)) is None  # the baseline
    records = []
    for i, (prompt, out) in enumerate([(50, 200)] * 2 + [(500, 20)] * 3):
        g, p, o = g + 10, p + 10 * prompt, o + 10 * out
        records.append(live.tick(_snap(10.0 * (i + 1), g, p, o, healthy)))
    decisions = [(r["decision"]["prefill"], r["decision"]["decode"]) for r in records]  # type: ignore[index]
    assert decisions == [(1, 2), (1, 2), (2, 1), (2, 1), (2, 1)]
    assert [len(r["actions"]) for r in records] == [0, 0, 0, 1, 0]  # type: ignore[index]
    assert conn.calls == [("d1", "prefill")] and conn.roles["d1"] == "prefill"
    lines = [json.loads(x) for x in log.getvalue().splitlines()]
    assert len(lines) == 5 and lines[3]["actions"][0]["detail"]["epoch"] == 2
    assert lines[2]["observed"]["prompt_tokens"] == 500 and lines[2]["load"]["output_tokens"] == 20
    text = generate_latest(metrics.registry).decode()
    assert 'pdserve:planner_actions_total{kind="switch",outcome="ok"} 1.0' in text
    assert "pdserve:planner_prefill_target 2.0" in text and "pdserve:planner_steps_total 5.0" in text
