"""`pdserve launch`: one command, a whole cluster on this machine (router + model servers).

Lifecycle of `run_launch(args)`:
  1. plan: free local ports for every server (and each prefill's bootstrap port), the cores
     each server is pinned to and its torch thread count (`procs.plan_cpus`), a log
     folder (`--log-dir`, default a fresh temp folder) with one log per process;
     With `--discovery` (bare: a local etcd is started first, on free ports, its data in the log
     folder) every server registers in etcd and the router follows it instead of a fixed list;
     every PD server then gets a bootstrap port, so a decode can later switch to prefill;
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
     SIGTERM, a bounded wait, then SIGKILL of its process group, then the local etcd; exit 0.
With `--hicache-storage-backend` every server gets KV tiers over one shared store; for mooncake
launch runs the store itself (a mooncake_master and a store holder, started before the servers
and stopped after them: launch/kv_store.py says why).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from pdserve.disagg.backends import missing_extra
from pdserve.disagg.config import DECODE_RADIX_FLAG
from pdserve.flags.argtypes import OneLineParser
from pdserve.flags.table import add_flags
from pdserve.launch.config import LAUNCH_FLAGS, LOCAL_ETCD, LaunchConfig, config_from_args
from pdserve.launch.kv_store import check_store, kv_store
from pdserve.launch.procs import Child, plan_cpus, python_module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_launch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_tag", nargs="?", metavar="MODEL", help="the model, as --model")
    add_flags(p, LAUNCH_FLAGS, LaunchConfig())


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

    def __init__(self, args: argparse.Namespace | LaunchConfig, log_dir: Path) -> None:
        self.cfg = cfg = config_from_args(args) if isinstance(args, argparse.Namespace) else args
        self.log_dir = log_dir
        self.servers: list[Child] = []
        self.stores: list[Child] = []  # the KV tiers' shared store (launch/kv_store.py), started first
        store_flags: list[str] = []
        if cfg.hicache_storage_backend is not None:
            self.stores, store_flags = kv_store(cfg.hicache_storage_backend, cfg.hicache_storage_backend_extra_config,
                                                cfg.hicache_store_gb, log_dir)
        self.router: Child | None = None
        self.etcd: Child | None = None
        self.discovery = cfg.discovery
        if cfg.discovery == LOCAL_ETCD:
            self.etcd, self.discovery = local_etcd(log_dir)
        self.router_url = ""
        self.api_key = api_key = cfg.api_key
        roles = (["prefill"] * cfg.prefill + ["decode"] * cfg.decode) if cfg.mode == "pd" \
            else ["unified"] * cfg.workers
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        plans = plan_cpus(len(roles), cpus)
        counts: dict[str, int] = {}
        prefill_args: list[str] = []
        decode_args: list[str] = []
        wants_events = (cfg.policy == "cache_aware" or "--pd-local-prefill-threshold" in cfg.router_args) \
            and "--kv-events-config" not in cfg.server_args and "--disable-kv-events" not in cfg.router_args
        for role, cpu_set in zip(roles, plans):
            i = counts[role] = counts.get(role, -1) + 1
            port = free_port()
            tp = {"prefill": cfg.prefill_tp, "decode": cfg.decode_tp}.get(role, cfg.tp)
            threads = cfg.threads or max(1, len(cpu_set) // tp)  # per rank: the ranks share the cores
            cmd = python_module("pdserve.cli", "serve", "--model", cfg.model, "--host", "127.0.0.1", "--port",
                                str(port), "--threads", str(threads))
            if tp > 1:
                cmd += ["--tp-size", str(tp)]
            if role != "unified":
                cmd += ["--disaggregation-mode", role, "--disaggregation-transfer-backend", cfg.transfer_backend]
            if role == "prefill" or (role == "decode" and self.discovery):  # a decode may switch to prefill
                bport = free_port()
                cmd += ["--disaggregation-bootstrap-port", str(bport)]
            if role == "prefill":
                prefill_args += ["--prefill", f"http://127.0.0.1:{port}", str(bport)]
            elif role == "decode":
                decode_args += ["--decode", f"http://127.0.0.1:{port}"]
                if cfg.decode_radix_cache:
                    cmd.append(DECODE_RADIX_FLAG)
            else:
                decode_args.append(f"http://127.0.0.1:{port}")
            if api_key:
                cmd += ["--api-key", api_key]
            if cfg.served_model_name:
                cmd += ["--served-model-name", *cfg.served_model_name]
            if cfg.tool_call_parser:
                cmd += ["--tool-call-parser", cfg.tool_call_parser]
            if wants_events:
                cmd += ["--kv-events-config", "{}"]
            if self.discovery:
                cmd += ["--discovery", self.discovery]
            cmd += store_flags + shlex.split(cfg.server_args)
            self.servers.append(Child(f"{role}-{i}", cmd, log_dir / f"{role}-{i}.log",
                                      f"http://127.0.0.1:{port}/health",
                                      cpu_set if cfg.pin else None, threads))
        rport = cfg.port or free_port()
        self.router_url = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{rport}"
        rcmd = python_module("pdserve.router", "--host", cfg.host, "--port", str(rport), "--policy", cfg.policy,
                             "--health-check-interval-secs", "5")
        if self.discovery:
            rcmd += [*(["--pd-disaggregation"] if cfg.mode == "pd" else []), "--discovery", self.discovery]
        else:
            rcmd += (["--pd-disaggregation", *prefill_args, *decode_args] if cfg.mode == "pd"
                     else ["--worker-urls", *decode_args])
        if api_key:
            rcmd += ["--api-key", api_key]
        rcmd += shlex.split(cfg.router_args)
        self.router = Child("router", rcmd, log_dir / "router.log", f"{self.router_url}/readiness")

    @property
    def children(self) -> list[Child]:
        return [*self.stores, *([self.etcd] if self.etcd else []), *self.servers,
                *([self.router] if self.router else [])]

    def start(self, store_timeout: float = 60.0) -> None:
        """The store first (a server's store client needs its master at start-up), then the rest."""
        deadline = time.monotonic() + store_timeout
        for child in self.stores:
            child.start()
            while not child.healthy():
                if child.exited() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{child.name} did not start; last lines of {child.log_path}:\n"
                                       f"{child.log_tail()}")
                time.sleep(0.2)
        for child in self.children[len(self.stores):]:
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
        for child in reversed(self.stores):  # the store holder, then its master
            child.terminate()
            child.wait_or_kill(timeout)
        if self.etcd is not None:  # last: the servers deregister on their way out
            self.etcd.terminate()
            self.etcd.wait_or_kill(timeout)

    @property
    def model_name(self) -> str:
        """The name the servers answer to (what a request's `model` must say)."""
        from pdserve.model.bundled import served_name

        return self.cfg.served_model_name[0] if self.cfg.served_model_name else served_name(self.cfg.model)

    def banner(self) -> str:
        auth = f" -H 'Authorization: Bearer {self.api_key}'" if self.api_key else ""
        body = json.dumps({"model": self.model_name, "messages": [{"role": "user", "content":
                                                                  "What is the capital of France?"}],
                           "max_tokens": 32, "temperature": 0})
        lines = [f"pdserve is ready: {self.router_url}  ({len(self.servers)} servers, mode {self.cfg.mode})"]
        if self.discovery:
            lines.append(f"  discovery  {self.discovery}  (pdserve planner --router {self.router_url} ... acts on it)")
        for c in self.children:
            pin = f", cores {','.join(map(str, c.cpus))}" if c.cpus else ""
            lines.append(f"  {c.name:<10} pid {c.pid}{pin}  log {c.log_path}")
        lines += ["try:", f"  curl -s {self.router_url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
                          f"-d '{body}'", "Ctrl-C stops everything."]
        return "\n".join(lines)


def local_etcd(log_dir: Path) -> tuple[Child, str]:
    """An etcd of its own on free 127.0.0.1 ports, its data in the log folder; the `--discovery` URL."""
    binary = shutil.which("etcd") or "etcd"  # preflight said whether there is one
    client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    cmd = [binary, "--name", "pdserve-launch", "--data-dir", str(log_dir / "etcd-data"), "--listen-client-urls",
           client, "--advertise-client-urls", client, "--listen-peer-urls", peer, "--initial-advertise-peer-urls",
           peer, "--initial-cluster", f"pdserve-launch={peer}", "--log-level", "warn"]
    return Child("etcd", cmd, log_dir / "etcd.log", f"{client}/health"), f"etcd://{client.split('//')[1]}/pdserve"


class _Stop(Exception):
    pass


RESERVED = ("--host", "--port", "--model", "--model-path", "--api-key", "--tp-size", "--tensor-parallel-size", "-tp",
            "--served-model-name", "--tool-call-parser", DECODE_RADIX_FLAG)  # flags of serve/router launch sets itself
STORE_RESERVED = ("--hicache-storage-backend", "--hicache-storage-backend-extra-config")  # ... with a store


def preflight(args: argparse.Namespace) -> LaunchConfig:
    """Start-up checks before any process spawns; raises ValueError / OSError with one line."""
    from pdserve.flags.sockets import bind_socket
    from pdserve.model.bundled import check_model
    from pdserve.model.config import check_architecture

    cfg = config_from_args(args)  # its flag-combination rules: LaunchConfig.__post_init__
    check_architecture(check_model(cfg.model))  # here, not in each server it would start
    if cfg.mode == "pd" and (missing := missing_extra(cfg.transfer_backend)) is not None:
        raise ValueError(missing)
    if cfg.discovery == LOCAL_ETCD and shutil.which("etcd") is None:
        raise ValueError("--discovery without a URL starts a local etcd, and there is none: install etcd-server "
                         "(scripts/install_system_deps.sh) or give --discovery etcd://HOST:PORT")
    for flag, text in (("--server-args", cfg.server_args), ("--router-args", cfg.router_args)):
        taken = RESERVED + (STORE_RESERVED if cfg.hicache_storage_backend else ())
        reserved = set(taken) & {a.split("=")[0] for a in shlex.split(text)}
        if reserved:
            raise ValueError(f"{flag} may not set {', '.join(sorted(reserved))}: launch sets it (use its own flag)")
    if cfg.hicache_storage_backend is not None:
        check_store(cfg.hicache_storage_backend, cfg.hicache_storage_backend_extra_config)
    if cfg.port:
        bind_socket(cfg.host, cfg.port).close()
    return cfg


def run_launch(args: argparse.Namespace) -> int:
    try:
        cfg = preflight(args)
    except (ValueError, OSError) as exc:
        print(f"pdserve launch: error: {exc}", file=sys.stderr)
        return 2
    log_dir = cfg.log_dir or Path(tempfile.mkdtemp(prefix="pdserve-launch-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(cfg, log_dir)

    def on_signal(sig: int, frame: FrameType | None) -> None:
        raise _Stop(signal.Signals(sig).name)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        cluster.start()
        cluster.wait_ready(cfg.start_timeout_s)
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
            cluster.stop(cfg.stop_timeout_s)
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
        print(f"pdserve launch: stopped (logs in {log_dir})", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "launch":
        argv = argv[1:]
    parser = OneLineParser(prog="pdserve launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_launch_arguments(parser)
    return run_launch(parser.parse_args(argv))
