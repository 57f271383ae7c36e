"""Operability of a real PD stack (prefill + decode `pdserve serve`, tcp transfer, pdserve's
router in front): start-up and stats logs, /metrics, and the shipped Grafana dashboard.

- each server logs one "ready" line with its URL, after its loading lines, and /health is
  already 200 when that line appears;
- under load the decode prints the stats line at the configured interval (1 s here), and
  `--log-requests` one line per request;
- every /metrics parses with prometheus-client's parser, and counters only increase across a load;
- every metric that deploy/grafana/pdserve.json queries is exposed by a server or the router;
- a real Prometheus (Debian's `prometheus`, installed by scripts/install_system_deps.sh) scrapes
  the servers and the router's `--prometheus-port` every second: after a short load every
  query of the dashboard returns data.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.router.config import HealthConfig, PolicyConfig, RouterConfig, WorkerSpec
from pdserve.router.server import EmbeddedRouter
from pdserve.flags.procs import kill_group
from tests.integration.conftest import ROOT, START_TIMEOUT_S, ServerProcess, free_port
from tests.integration.pd_cluster import PDPair

ARGS = ["--model", "default", "--threads", "1", "--max-model-len", "512", "--num-pages", "200", "--page-size", "16",
        "--chunk-budget", "64", "--seed", "0", "--log-stats-interval", "1", "--log-requests"]
READY = "pdserve is ready: http://127.0.0.1:"
STATS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*stats: running (\d+) reqs, queued (\d+) reqs", re.M)
DASHBOARD = ROOT / "deploy" / "grafana" / "pdserve.json"


@dataclass
class Stack:
    pair: PDPair
    router: EmbeddedRouter
    health_at_ready: dict[str, int]
    metrics_port: int  # the router's --prometheus-port (sglang-router's metrics listener)

    @property
    def urls(self) -> list[str]:
        return [self.pair.prefill.url, self.pair.decode.url, self.router.url]


def _wait_ready_line(server: ServerProcess) -> int:
    """Wait (bounded) for the ready line in the log; return /health's status right then."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log_tail()}")
        if READY in server.log_path.read_text(errors="replace"):
            return httpx.get(f"{server.url}/health", timeout=5).status_code
        time.sleep(0.05)
    raise TimeoutError(f"no ready line after {START_TIMEOUT_S:.0f} s:\n{server.log_tail()}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, bundled_model_dir: Path) -> Iterator[Stack]:
    pair = PDPair(tmp_path_factory.mktemp("observability"), "tcp", ARGS)
    router = None
    try:
        pair.launch_prefill()
        pair.launch_decode()
        health = {role: _wait_ready_line(pair.server(role)) for role in ("prefill", "decode")}
        pair.mark()
        metrics_port = free_port()
        cfg = RouterConfig(port=0, pd=True, workers=(WorkerSpec(pair.prefill.url, "prefill", pair.bootstrap_port),
                                                     WorkerSpec(pair.decode.url, "decode")),
                           policy=PolicyConfig("round_robin"), health=HealthConfig(interval_s=0.5, timeout_s=10.0),
                           prometheus_port=metrics_port)
        router = EmbeddedRouter(cfg).start()
        yield Stack(pair, router, health, metrics_port)
    finally:
        if router is not None:
            router.stop()
        pair.stop()


def _load(url: str, n: int, concurrency: int, max_tokens: int) -> None:
    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {"model": "default", "prompt": f"Request {i}: tell me about the number {i}.", "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True}
        r = await client.post(f"{url}/v1/completions", json=body)
        assert r.status_code == 200, r.text

    async def main() -> None:
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(timeout=120) as client:
            async def limited(i: int) -> None:
                async with sem:
                    await one(client, i)
            await asyncio.gather(*(limited(i) for i in range(n)))

    asyncio.run(main())


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], tuple[str, float]]:
    """(sample name, labels) -> (family type, value) of one /metrics, parsed by prometheus-client."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = (family.type, s.value)
    return out


def _exposed(url: str) -> set[str]:
    """Every series name a scrape declares: samples, and the names of declared families."""
    names: set[str] = set()
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        names.add(family.name)
        names.update({"counter": [family.name + "_total"],
                      "histogram": [family.name + s for s in ("_bucket", "_sum", "_count")]}.get(family.type, []))
        names.update(s.name for s in family.samples)
    return names


def test_ready_line_only_once_health_is_200(stack: Stack) -> None:
    assert stack.health_at_ready == {"prefill": 200, "decode": 200}
    for role in ("prefill", "decode"):
        log = stack.pair.server(role).log_path.read_text(errors="replace")
        assert log.count(READY) == 1, log
        ready_at = log.index(READY)
        for earlier in ("weights loaded in", "KV pool:", "warm-up request done", "engine loaded"):
            assert -1 < log.find(earlier) < ready_at, (earlier, log)
        assert "serving on" not in log


def test_stats_line_at_the_interval_and_counters_only_increase(stack: Stack) -> None:
    decode = stack.pair.decode
    before = {url: _scrape(url) for url in stack.urls}
    log_before = len(decode.log_path.read_text(errors="replace"))
    t0 = time.monotonic()
    _load(stack.router.url, n=6, concurrency=3, max_tokens=32)
    elapsed = time.monotonic() - t0
    time.sleep(1.5)  # the last busy window's line
    log = decode.log_path.read_text(errors="replace")[log_before:]
    stamps = [dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f") for m in STATS.finditer(log)]
    # one line per 1 s interval: never more often; late only by the step in progress (the box is shared)
    assert len(stamps) >= max(2, int(elapsed / 2)), (elapsed, log[-3000:])
    gaps = sorted((b - a).total_seconds() for a, b in zip(stamps, stamps[1:]))
    assert gaps[0] >= 0.9 and gaps[len(gaps) // 2] <= 1.5, gaps
    assert any(int(m.group(2)) > 0 for m in STATS.finditer(log))  # it saw the running batch
    assert len(re.findall(r"request \S+ finished \(length\): prompt \d+ tokens", log)) == 6

    grew = set()
    for url in stack.urls:
        after = _scrape(url)
        for key, (kind, value) in before[url].items():
            if kind in ("counter", "histogram") and key[0].endswith(("_total", "_count", "_sum", "_bucket")):
                assert key in after and after[key][1] >= value, (url, key, value, after.get(key))
        grew |= {key[0] for key, (kind, value) in after.items()  # labelled series appear with the first request
                 if kind in ("counter", "histogram") and value > before[url].get(key, (kind, 0.0))[1]}
    for name in ("sglang:generation_tokens_total", "sglang:prompt_tokens_total", "sglang:num_requests_total",
                 "sglang:kv_transfers_total", "sglang:kv_transfer_bytes_total", "sgl_router_requests_total",
                 "sglang:e2e_request_latency_seconds_count", "sglang:queue_time_seconds_count"):
        assert name in grew, name


def test_dashboard_queries_only_exposed_metrics(stack: Stack) -> None:
    _load(stack.router.url, n=2, concurrency=2, max_tokens=4)  # every labelled series has a child
    exposed = set().union(*(_exposed(url) for url in stack.urls))
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    names = {n for e in exprs for n in re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*:[a-zA-Z0-9_:]+|sgl_router_\w+", e)}
    assert len(names) > 30
    assert not names - exposed, sorted(names - exposed)
    # SGLang's own dashboard's metrics (sglang-dashboard.json) are all there too
    for name in ("sglang:e2e_request_latency_seconds_bucket", "sglang:time_to_first_token_seconds_sum",
                 "sglang:num_running_reqs", "sglang:gen_throughput", "sglang:cache_hit_rate", "sglang:num_queue_reqs"):
        assert name in exposed, name


def _prometheus_config(stack: Stack, port: int) -> str:
    servers = ", ".join(f"'{u.removeprefix('http://')}'" for u in stack.urls[:2])
    return (f"global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n"
            f"scrape_configs:\n"
            f"  - {{job_name: servers, static_configs: [{{targets: [{servers}]}}]}}\n"
            f"  - {{job_name: router, static_configs: [{{targets: ['127.0.0.1:{stack.metrics_port}']}}]}}\n"
            f"  - {{job_name: self, static_configs: [{{targets: ['127.0.0.1:{port}']}}]}}\n")


def _dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard query, Grafana's variables filled in."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    out += [("variable " + v["name"], re.sub(r"label_values\((\S+), \w+\)", r"\1", v["query"]["query"]))
            for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)
            and v["query"]["query"] != "label_values(instance)"]
    fill = {"$__rate_interval": "30s", "$model_name": ".*", "$instance": ".*"}
    for name, value in fill.items():
        out = [(title, q.replace(name, value)) for title, q in out]
    return out


def test_every_dashboard_query_has_data_in_a_real_prometheus(stack: Stack, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: scripts/install_system_deps.sh installs it (apt-get install prometheus)"
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(_prometheus_config(stack, port))
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        def targets_up() -> bool:
            try:
                active = httpx.get(f"{api}/targets", timeout=5).json()["data"]["activeTargets"]
            except (httpx.HTTPError, ValueError, KeyError):
                return False
            return len(active) == 4 and all(t["health"] == "up" for t in active)

        deadline = time.monotonic() + 120
        while not targets_up():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()
            time.sleep(0.5)
        _load(stack.router.url, n=4, concurrency=2, max_tokens=8)
        time.sleep(6)  # a few scrapes after the load: every rate() has two samples in its window
        queries = _dashboard_queries()
        assert len(queries) > 50
        empty = []
        for title, query in queries:
            r = httpx.get(f"{api}/query", params={"query": query}, timeout=30).json()
            assert r["status"] == "success", (title, query, r)
            if not r["data"]["result"]:
                empty.append(f"{title}: {query}")
        assert not empty, "\n".join(empty)
    finally:
        kill_group(proc)
        log.close()


def test_pools_back_after_the_load(stack: Stack) -> None:
    stack.pair.settled()
