"""`pdserve launch`: one command, a whole cluster on this machine (router + model servers).

Lifecycle of `run_launch(args)`:
  1. plan: free local ports for every server (and each prefill's bootstrap port), the cores
     each server is pinned to and its torch thread count (`procs.plan_cpus`), a log
     folder (`--log-dir`, default a fresh temp folder) with one log per process;
  2. start the model servers (`pdserve serve`, bundled model unless `--model`): `--prefill N`
     prefill + `--decode M` decode servers in PD mode, or `--workers K` unified servers with
     `--mode unified`; then the router (`pdserve router`) over them, which health-checks them
     itself. When the router uses KV events (policy cache_aware, or
     `--pd-local-prefill-threshold` in `--router-args`) every server publishes them
     (`--kv-events-config '{}'`, 127.0.0.1 on a free port) unless `--server-args` sets it;
  3. wait (bounded by `--start-timeout`) until every server answers /health and the router's
     /readiness is 200, with a progress bar; a process that exits early stops everything and
     its log tail is shown;
  4. print the URL, an example `curl` and where the logs are, then supervise: if a child
     dies, everything stops (exit 1);
  5. Ctrl-C or SIGTERM: stop the router first (it drains), then the servers, each with
     SIGTERM, a bounded wait, then SIGKILL of its process group; exit 0.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from pdserve.contract import API_KEY_ENV, DEFAULT_ROUTER_PORT, resolve_api_key
from pdserve.launch.argtypes import port_number, positive_float, positive_int
from pdserve.launch.procs import Child, plan_cpus, python_module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_launch_arguments(p: argparse.ArgumentParser) -> None:
    from pdserve.disagg.backends import BACKENDS
    from pdserve.router.config import POLICIES

    p.add_argument("--mode", choices=["pd", "unified"], default="pd",
                   help="pd: prefill + decode servers behind the router; unified: plain load balancing (default pd)")
    p.add_argument("--prefill", type=positive_int, default=1, help="prefill servers in pd mode (default 1)")
    p.add_argument("--decode", type=positive_int, default=1, help="decode servers in pd mode (default 1)")
    p.add_argument("--workers", type=positive_int, default=1, help="unified servers in unified mode (default 1)")
    p.add_argument("--prefill-tp", type=positive_int, default=1,
                   help="tensor-parallel ranks of each prefill server (default 1)")
    p.add_argument("--decode-tp", type=positive_int, default=1,
                   help="tensor-parallel ranks of each decode server; may differ from --prefill-tp (default 1)")
    p.add_argument("--tp", "--tp-size", dest="tp", type=positive_int, default=1,
                   help="tensor-parallel ranks of each unified server (default 1)")
    p.add_argument("--model", "--model-path", dest="model", default="default",
                   help="model for every server (default: 'default', the bundled SmolLM2-135M)")
    p.add_argument("--host", default="127.0.0.1", help="router bind address (default 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=DEFAULT_ROUTER_PORT,
                   help=f"router port; 0: a free one (default {DEFAULT_ROUTER_PORT})")
    p.add_argument("--policy", choices=POLICIES, default="cache_aware", help="router policy (default cache_aware)")
    p.add_argument("--transfer-backend", "--disaggregation-transfer-backend", dest="transfer_backend",
                   choices=list(BACKENDS), default="tcp", help="PD KV transfer backend (default tcp)")
    p.add_argument("--disaggregation-decode-enable-radix-cache", dest="decode_radix_cache", action="store_true",
                   help="pd mode: decode servers keep a prefix cache; only KV past its hit moves (default off)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads per server (default: the cores it is pinned to)")
    p.add_argument("--no-pin", action="store_true", help="do not pin servers to cores")
    p.add_argument("--api-key", default=None,
                   help=f"key for the router and the servers (default: ${API_KEY_ENV}, else none)")
    p.add_argument("--log-dir", type=Path, default=None, help="folder for the logs (default: a new temp folder)")
    p.add_argument("--start-timeout", type=positive_float, default=600.0,
                   help="seconds to wait for everything to be ready (default 600)")
    p.add_argument("--stop-timeout", type=positive_float, default=30.0,
                   help="seconds each process gets to stop (default 30)")
    p.add_argument("--server-args", default="", help="extra flags for every `pdserve serve`, one string (default none)")
    p.add_argument("--router-args", default="", help="extra flags for `pdserve router`, one string (default none)")


def add_launch_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `launch` sub-command to `subparsers` (from `ArgumentParser.add_subparsers()`)."""
    p = subparsers.add_parser("launch", help="start a router and its model servers on this machine",
                              description="Start a router plus prefill/decode (or unified) servers, "
                                          "wait until ready, stop all on Ctrl-C.")
    add_launch_arguments(p)
    p.set_defaults(func=run_launch)
    return p


class Cluster:
    """The children of one launch, in start order (servers first, router last)."""

    def __init__(self, args: argparse.Namespace, log_dir: Path) -> None:
        self.args = args
        self.log_dir = log_dir
        self.servers: list[Child] = []
        self.router: Child | None = None
        self.router_url = ""
        self.api_key = api_key = resolve_api_key(args.api_key)
        roles = (["prefill"] * args.prefill + ["decode"] * args.decode) if args.mode == "pd" \
            else ["unified"] * args.workers
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        plans = plan_cpus(len(roles), cpus)
        counts: dict[str, int] = {}
        prefill_args: list[str] = []
        decode_args: list[str] = []
        wants_events = (args.policy == "cache_aware" or "--pd-local-prefill-threshold" in args.router_args) \
            and "--kv-events-config" not in args.server_args and "--disable-kv-events" not in args.router_args
        for role, cpu_set in zip(roles, plans):
            i = counts[role] = counts.get(role, -1) + 1
            port = free_port()
            tp = {"prefill": args.prefill_tp, "decode": args.decode_tp}.get(role, args.tp)
            threads = args.threads or max(1, len(cpu_set) // tp)  # per rank: the ranks share the cores
            cmd = python_module("pdserve.cli", "serve", "--model", args.model, "--host", "127.0.0.1", "--port",
                                str(port), "--threads", str(threads))
            if tp > 1:
                cmd += ["--tp-size", str(tp)]
            if role != "unified":
                cmd += ["--disaggregation-mode", role, "--disaggregation-transfer-backend", args.transfer_backend]
            if role == "prefill":
                bport = free_port()
                cmd += ["--disaggregation-bootstrap-port", str(bport)]
                prefill_args += ["--prefill", f"http://127.0.0.1:{port}", str(bport)]
            elif role == "decode":
                decode_args += ["--decode", f"http://127.0.0.1:{port}"]
                if args.decode_radix_cache:
                    cmd.append("--disaggregation-decode-enable-radix-cache")
            else:
                decode_args.append(f"http://127.0.0.1:{port}")
            if api_key:
                cmd += ["--api-key", api_key]
            if wants_events:
                cmd += ["--kv-events-config", "{}"]
            cmd += shlex.split(args.server_args)
            self.servers.append(Child(f"{role}-{i}", cmd, log_dir / f"{role}-{i}.log",
                                      f"http://127.0.0.1:{port}/health",
                                      None if args.no_pin else cpu_set, threads))
        rport = args.port or free_port()
        self.router_url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{rport}"
        rcmd = python_module("pdserve.router", "--host", args.host, "--port", str(rport), "--policy", args.policy,
                             "--health-check-interval-secs", "5")
        rcmd += (["--pd-disaggregation", *prefill_args, *decode_args] if args.mode == "pd"
                 else ["--worker-urls", *decode_args])
        if api_key:
            rcmd += ["--api-key", api_key]
        rcmd += shlex.split(args.router_args)
        self.router = Child("router", rcmd, log_dir / "router.log", f"{self.router_url}/readiness")

    @property
    def children(self) -> list[Child]:
        return [*self.servers, *([self.router] if self.router else [])]

    def start(self) -> None:
        for child in self.children:
            child.start()

    def wait_ready(self, timeout: float) -> None:
        from tqdm import tqdm

        deadline = time.monotonic() + timeout
        pending = list(self.children)
        with tqdm(total=len(pending), desc="starting", unit="proc", file=sys.stderr, dynamic_ncols=True) as bar:
            while pending:
                for child in list(pending):
                    code = child.exited()
                    if code is not None:
                        raise RuntimeError(f"{child.name} exited with {code} while starting; last lines of "
                                           f"{child.log_path}:\n{child.log_tail()}")
                    if child.healthy():
                        pending.remove(child)
                        bar.update(1)
                        bar.set_postfix_str(f"{child.name} ready")
                if not pending:
                    break
                if time.monotonic() > deadline:
                    names = ", ".join(c.name for c in pending)
                    raise TimeoutError(f"not ready after {timeout:.0f} s: {names} (logs in {self.log_dir})")
                desc = f"waiting for {pending[0].name}"
                if bar.desc != desc:
                    bar.set_description(desc)
                time.sleep(0.5)

    def dead_child(self) -> Child | None:
        return next((c for c in self.children if c.exited() is not None), None)

    def stop(self, timeout: float) -> None:
        if self.router is not None:  # the router first: it stops taking requests and drains
            self.router.terminate()
            self.router.wait_or_kill(timeout)
        for child in self.servers:
            child.terminate()
        for child in self.servers:
            child.wait_or_kill(timeout)

    def banner(self) -> str:
        auth = f" -H 'Authorization: Bearer {self.api_key}'" if self.api_key else ""
        body = '{"model": "default", "messages": [{"role": "user", "content": "What is the capital of France?"}], ' \
               '"max_tokens": 32, "temperature": 0}'
        lines = [f"pdserve is ready: {self.router_url}  ({len(self.servers)} servers, mode {self.args.mode})"]
        for c in self.children:
            pin = f", cores {','.join(map(str, c.cpus))}" if c.cpus else ""
            lines.append(f"  {c.name:<10} pid {c.pid}{pin}  log {c.log_path}")
        lines += ["try:", f"  curl -s {self.router_url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
                          f"-d '{body}'", "Ctrl-C stops everything."]
        return "\n".join(lines)


class _Stop(Exception):
    pass


def preflight(args: argparse.Namespace) -> None:
    """Start-up checks before any process spawns; raises ValueError / OSError with one line."""
    from pdserve.launch.sockets import bind_socket
    from pdserve.model.bundled import check_model

    check_model(args.model)
    for flag in ("--server-args", "--router-args"):
        extra = shlex.split(getattr(args, flag[2:].replace("-", "_")))
        reserved = {"--host", "--port", "--model", "--model-path", "--api-key", "--tp-size", "--tensor-parallel-size",
                    "--disaggregation-decode-enable-radix-cache"} & {a.split("=")[0] for a in extra}
        if reserved:
            raise ValueError(f"{flag} may not set {', '.join(sorted(reserved))}: launch sets it (use its own flag)")
    if args.decode_radix_cache and args.mode != "pd":
        raise ValueError("--disaggregation-decode-enable-radix-cache is for --mode pd (its decode servers)")
    if args.port:
        bind_socket(args.host, args.port).close()


def run_launch(args: argparse.Namespace) -> int:
    try:
        preflight(args)
    except (ValueError, OSError) as exc:
        print(f"pdserve launch: error: {exc}", file=sys.stderr)
        return 2
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="pdserve-launch-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(args, log_dir)

    def on_signal(sig: int, frame: FrameType | None) -> None:
        raise _Stop(signal.Signals(sig).name)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        cluster.start()
        cluster.wait_ready(args.start_timeout)
        print(cluster.banner(), flush=True)
        while True:
            time.sleep(0.5)
            dead = cluster.dead_child()
            if dead is not None:
                print(f"pdserve launch: {dead.name} exited with {dead.exited()}; stopping everything. "
                      f"Last lines of {dead.log_path}:\n{dead.log_tail()}", file=sys.stderr)
                code = 1
                break
    except _Stop as exc:
        print(f"\npdserve launch: {exc}: stopping...", file=sys.stderr, flush=True)
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"pdserve launch: {exc}", file=sys.stderr)
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean stop short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            cluster.stop(args.stop_timeout)
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
        print(f"pdserve launch: stopped (logs in {log_dir})", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "launch":
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="pdserve launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_launch_arguments(parser)
    return run_launch(parser.parse_args(argv))
