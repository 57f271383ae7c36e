"""`pdserve planner` and `pdserve profile`: their frozen configs, flag tables and entry points.

    pdserve profile --url http://127.0.0.1:30000 --out profile.json        (a unified worker, idle)
    pdserve planner --router http://127.0.0.1:8000 --profile profile.json \\
        --ttft-slo-ms 2000 --itl-slo-ms 150 --max-workers 3 --fill --discovery etcd://127.0.0.1:2379

`planner` runs live.LivePlanner until SIGINT/SIGTERM (or --duration-s), then closes its
connector (a local one stops the workers it started). Neither imports torch.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pdserve.flags.argtypes import metrics_prefix, non_negative_float, port_number, positive_float, positive_int
from pdserve.flags.table import Flag, add_flags, flag_values, with_values
from pdserve.planner.profiler import ProfileSpec

CONNECTORS = ("local",)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


@dataclass(frozen=True)
class PlannerRun:
    router: str = "http://127.0.0.1:8000"
    profile: Path = Path("profile.json")
    ttft_slo_ms: float = 2000.0
    itl_slo_ms: float = 150.0
    max_workers: int = 3
    interval_s: float = 10.0
    predictor: str = "trend"
    window: int = 6
    fill: bool = False  # a fixed fleet: switch roles only, never start or stop workers
    stable: int = 2
    cooldown_s: float = 0.0
    max_actions: int = 1
    connector: str = "local"
    discovery: str | None = None  # where started workers register (the router's --discovery)
    serve_args: str = ""  # flags for every worker the local connector starts (model, engine)
    log_dir: Path | None = None
    decision_log: Path | None = None
    metrics_port: int | None = None
    metrics_prefix: str = "pdserve"
    router_metrics_prefix: str = "sgl"
    api_key: str | None = None
    duration_s: float = 0.0  # 0: until stopped
    log_level: str = "info"


PLANNER_FLAGS: tuple[Flag, ...] = (
    Flag(("--router",), "router", str, "the router whose /metrics and /workers the planner reads"),
    Flag(("--profile",), "profile", Path, "the profile `pdserve profile` wrote"),
    Flag(("--ttft-slo-ms",), "ttft_slo_ms", positive_float, "time-to-first-token objective"),
    Flag(("--itl-slo-ms",), "itl_slo_ms", positive_float, "inter-token latency objective"),
    Flag(("--max-workers",), "max_workers", positive_int, "prefill + decode workers at most"),
    Flag(("--interval-s",), "interval_s", positive_float, "seconds between two plans"),
    Flag(("--predictor",), "predictor", str, "next-interval load: last value, moving average or linear trend",
         ("last", "average", "trend")),
    Flag(("--window",), "window", positive_int, "intervals the predictor looks back"),
    Flag(("--fill",), "fill", None, "a fixed fleet of --max-workers: every worker keeps a role, only switches"),
    Flag(("--stable",), "stable", positive_int, "intervals a decision must hold before it is acted on"),
    Flag(("--cooldown-s",), "cooldown_s", non_negative_float, "seconds after an action before the next",
         shown="one interval"),
    Flag(("--max-actions",), "max_actions", positive_int, "actions per interval"),
    Flag(("--connector",), "connector", str, "how it acts (planner/connector.py documents the interface)",
         CONNECTORS),
    Flag(("--discovery",), "discovery", str, "the etcd the router follows: workers the planner starts register "
         "there (without it the local connector only switches and stops)", metavar="etcd://HOST:PORT[/PREFIX]",
         shown="none"),
    Flag(("--serve-args",), "serve_args", str, "flags for every worker it starts, one string (model, engine)",
         shown="none"),
    Flag(("--log-dir",), "log_dir", Path, "logs of the workers it starts", shown="none"),
    Flag(("--decision-log",), "decision_log", Path, "one JSON line per interval: inputs, decision, actions",
         shown="none"),
    Flag(("--metrics-port",), "metrics_port", port_number, "serve the planner's own /metrics here",
         shown="off"),
    Flag(("--metrics-prefix",), "metrics_prefix", metrics_prefix, "its metrics are PREFIX:planner_*"),
    Flag(("--router-metrics-prefix",), "router_metrics_prefix", metrics_prefix, "the router's --metrics-prefix"),
    Flag(("--api-key",), "api_key", str, "sent to the router and the workers", shown="none"),
    Flag(("--duration-s",), "duration_s", non_negative_float, "stop after this long; 0: run until stopped"),
    Flag(("--log-level",), "log_level", str, "", ("debug", "info", "warning", "error")),
)


@dataclass(frozen=True)
class ProfileRun(ProfileSpec):
    """`pdserve profile`'s flags: what to measure (ProfileSpec's defaults) and where it goes."""

    url: str = "http://127.0.0.1:30000"
    out: Path = Path("profile.json")


PROFILE_FLAGS: tuple[Flag, ...] = (
    Flag(("--url",), "url", str, "a running unified worker (pdserve serve, idle), started as the workers will be"),
    Flag(("--out",), "out", Path, "where the profile goes"),
    Flag(("--prompt-lens",), "prompt_lens", _ints, "prefill points: prompt lengths, comma-separated",
         shown="32,128,512,1024"),
    Flag(("--concurrency",), "concurrency", _ints, "decode points: streams at once, comma-separated", shown="1,4,8"),
    Flag(("--decode-prompt-lens",), "decode_prompt_lens", _ints, "decode points: prompt lengths, comma-separated",
         shown="64,512"),
    Flag(("--output-tokens",), "output_tokens", positive_int, "decode points: tokens per stream"),
    Flag(("--repeats",), "repeats", positive_int, "prefill points: runs per length (the median is kept)"),
    Flag(("--api-key",), "api_key", str, "sent to the worker", shown="none"),
)


def add_planner_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("planner", help="SLA planner: switch, start and stop workers as the load moves",
                              description="Read the router's metrics every interval, predict the load, decide the "
                                          "prefill and decode counts that meet the SLOs, and act through a connector.")
    add_flags(p, PLANNER_FLAGS, PlannerRun())
    p.set_defaults(func=run_planner)
    return p


def add_profile_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("profile", help="measure prefill time and decode ITL of a worker for the planner",
                              description="Measure prefill time vs prompt length and decode ITL vs concurrency and "
                                          "KV use on a running unified worker; write the planner's profile.")
    add_flags(p, PROFILE_FLAGS, ProfileRun())
    p.set_defaults(func=run_profile)
    return p


def run_profile(args: argparse.Namespace) -> int:
    from pdserve.planner.profile import save_profile
    from pdserve.planner.profiler import measure

    run: ProfileRun = with_values(ProfileRun(), flag_values(args, PROFILE_FLAGS, ProfileRun()))
    try:
        profile = measure(replace(run, url=run.url.rstrip("/")))
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"pdserve profile: {exc}", file=sys.stderr)
        return 1
    save_profile(profile, run.out)
    print(f"profile written to {run.out}")
    return 0


def run_planner(args: argparse.Namespace) -> int:
    from pdserve.planner.connector import LocalConnector
    from pdserve.planner.live import LiveConfig, LivePlanner, PlannerMetrics, open_log
    from pdserve.planner.planner import Planner, PlannerConfig
    from pdserve.planner.profile import load_profile

    run: PlannerRun = with_values(PlannerRun(), flag_values(args, PLANNER_FLAGS, PlannerRun()))
    logging.basicConfig(level=run.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        profile = load_profile(run.profile)
        cfg = PlannerConfig(run.ttft_slo_ms, run.itl_slo_ms, run.max_workers, run.interval_s, run.predictor,
                            run.window, run.fill)
        cfg.slo  # noqa: B018 (checks the SLOs)
    except (OSError, ValueError) as exc:
        print(f"pdserve planner: error: {exc}", file=sys.stderr)
        return 2
    if run.log_dir is not None:
        run.log_dir.mkdir(parents=True, exist_ok=True)
    connector = LocalConnector(run.router, run.api_key, run.discovery, shlex.split(run.serve_args), run.log_dir)
    metrics = PlannerMetrics(run.metrics_prefix)
    if run.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(run.metrics_port, "127.0.0.1", registry=metrics.registry)
    log = open_log(run.decision_log)
    live = LivePlanner(LiveConfig(run.router.rstrip("/"), run.interval_s, run.stable, run.cooldown_s,
                                  run.max_actions, run.router_metrics_prefix, run.api_key),
                       Planner(cfg, profile), connector, metrics, log)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: live.stop())
    if run.duration_s:
        threading.Timer(run.duration_s, live.stop).start()
    try:
        live.run()
    finally:
        connector.close()
        if log is not None:
            log.close()
    return 0
