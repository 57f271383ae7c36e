"""Issue 26: does the SLA planner pay? Static 2P1D, static 1P2D and the planner (starting 1P2D) on one shifting trace.

    python benchmarks/elastic.py --quick          # a few minutes of trace per system; checks it all runs
    python benchmarks/elastic.py                  # the full trace (run it on a quiet machine)
    python benchmarks/elastic.py --report-only    # report and plots again from --out/results.json

One seeded trace whose mix shifts, three phases played back to back as Poisson arrivals
(`pdserve bench`'s runner): prefill-heavy (long prompts, short replies), decode-heavy (short
prompts, long replies), prefill-heavy again. Each system is a 3-worker cluster started by
`pdserve launch --discovery <etcd> --policy round_robin --threads 1 --no-pin` on the bundled
model (one thread per worker, unpinned, so the OS spreads them over the cores and a worker's
role decides what its core does; the same etcd, one prefix per system):

  static-2P1D   two prefills, one decode, never changed
  static-1P2D   one prefill, two decodes, never changed
  planner       starts 1P2D; `pdserve planner --fill --max-workers 3` switches roles live
                (the local connector: POST /switch_role), from a profile measured first on this
                machine (`pdserve profile` against one unified worker) or given with --profile

Reported (report.md, results.json, timeline.png): per phase and system TTFT and ITL p50/p99,
completed and failed requests, requests within both SLOs and goodput (within-SLO requests per
second of trace); the whole trace's goodput and the planner's ratio to the better static split
(target >= 1.15x); every planner interval and action on a timeline with each system's TTFTs;
each switch's time (drain + swap + re-register; target <= 5 s) and the failed requests around
it (target 0); and discovery's costs, measured on the planner's cluster after its trace: time
from a new decode's first healthy answer to the first request the router sends it, and from its
kill -9 to its removal from the router (lease TTL 2 s).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pdserve.bench.datasets import BenchRequest, random_requests  # noqa: E402
from pdserve.bench.runner import BenchConfig, BenchResult, load_tokenizer, run  # noqa: E402
from pdserve.flags.procs import kill_group  # noqa: E402

SYSTEMS = {"static-2P1D": (2, 1, False), "static-1P2D": (1, 2, False), "planner": (1, 2, True)}
PY = sys.executable
_OPEN = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0) -> Any:
    with _OPEN.open(url, timeout=timeout) as r:
        return json.loads(r.read())


def wait_for(pred: Any, timeout: float, what: str, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except OSError:
            pass
        time.sleep(every)
    raise TimeoutError(what)


class Etcd:
    def __init__(self, logs: Path) -> None:
        binary = shutil.which("etcd")
        if binary is None:
            raise SystemExit("etcd is not installed: scripts/install_system_deps.sh (Debian: etcd-server)")
        self.data = Path(tempfile.mkdtemp(prefix="elastic-etcd-"))
        client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
        self.client = client
        self.proc = subprocess.Popen([binary, "--name", "bench", "--data-dir", str(self.data), "--listen-client-urls",
                                      client, "--advertise-client-urls", client, "--listen-peer-urls", peer,
                                      "--initial-advertise-peer-urls", peer, "--initial-cluster", f"bench={peer}",
                                      "--log-level", "warn"], stdout=open(logs / "etcd.log", "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: get_json(client + "/health")["health"] == "true", 30, "etcd healthy")

    def url(self, prefix: str) -> str:
        return f"etcd://{self.client.split('//')[1]}/{prefix}"

    def stop(self) -> None:
        kill_group(self.proc)
        shutil.rmtree(self.data, ignore_errors=True)


def trace(args: argparse.Namespace, tok: Any) -> list[tuple[str, list[BenchRequest], float]]:
    """(phase, requests, rate): prefill-heavy, decode-heavy, prefill-heavy (seeded, ±10% lengths)."""
    p_in, p_out, d_in, d_out = args.prefill_heavy[0], args.prefill_heavy[1], args.decode_heavy[0], args.decode_heavy[1]
    n = args.phase_requests
    return [("prefill-heavy", random_requests(tok, n, p_in, p_out, 0.1, seed=args.seed), args.rates[0]),
            ("decode-heavy", random_requests(tok, n, d_in, d_out, 0.1, seed=args.seed + 1), args.rates[1]),
            ("prefill-heavy-2", random_requests(tok, n, p_in, p_out, 0.1, seed=args.seed + 2), args.rates[2])]


def launch(name: str, prefill: int, decode: int, discovery: str, args: argparse.Namespace) -> tuple[Any, str]:
    port = free_port()
    log_dir = args.out / f"logs-{name}"
    cmd = [PY, "-m", "pdserve.cli", "launch", "--prefill", str(prefill), "--decode", str(decode), "--port", str(port),
           "--policy", "round_robin", "--discovery", discovery, "--log-dir", str(log_dir), "--threads", "1",
           "--no-pin", "--server-args",
           args.server_args, "--router-args", "--health-check-interval-secs 2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: proc.poll() is None and get_json(url + "/readiness")["status"] == "ready", 900,
                 f"{name} ready (logs in {log_dir})", 1.0)
        wait_for(lambda: sum(w["healthy"] for w in get_json(url + "/workers")["workers"]) == prefill + decode, 120,
                 f"{name}: every worker routable")
    except BaseException:
        stop(proc)
        raise
    return proc, url


def stop(proc: Any) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            pass
    kill_group(proc)


def profile(args: argparse.Namespace) -> Path:
    """A profile of one unified worker of this machine, measured with `pdserve profile`."""
    if args.profile is not None:
        return args.profile
    path = args.out / "profile.json"
    port = free_port()
    server = subprocess.Popen([PY, "-m", "pdserve.cli", "serve", "--port", str(port), "--threads", "1",
                               *args.server_args.split()],
                              cwd=ROOT, stdout=open(args.logs / "profile-server.log", "wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: urllib.request.urlopen(url + "/health", timeout=2).status == 200, 600, "profile server", 1.0)
        quick = ["--prompt-lens", "32,256,768", "--concurrency", "1,4", "--decode-prompt-lens", "32,256",
                 "--output-tokens", "16", "--repeats", "1"] if args.quick else []
        subprocess.run([PY, "-m", "pdserve.cli", "profile", "--url", url, "--out", str(path), *quick], cwd=ROOT,
                       check=True)
    finally:
        stop(server)
    return path


def start_planner(url: str, prof: Path, discovery: str, args: argparse.Namespace) -> Any:
    cmd = [PY, "-m", "pdserve.cli", "planner", "--router", url, "--profile", str(prof), "--ttft-slo-ms",
           str(args.slo_ttft_ms), "--itl-slo-ms", str(args.slo_tpot_ms), "--max-workers", "3", "--fill",
           "--interval-s", str(args.interval_s), "--stable", "1", "--predictor", "last", "--discovery", discovery,
           "--decision-log", str(args.logs / "decisions.jsonl")]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(args.logs / "planner.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def phase_row(system: str, phase: str, res: BenchResult) -> dict[str, Any]:
    s = res.summary
    return {"system": system, "phase": phase, "completed": s["completed"], "failed": s["failed"],
            "ttft_p50": s["ttft_ms"]["median"], "ttft_p99": s["ttft_ms"]["p99"], "itl_p50": s["itl_ms"]["median"],
            "itl_p99": s["itl_ms"]["p99"], "good": s["good_requests"], "duration_s": res.duration_s,
            "goodput": s["goodput"], "started_at": res.started_at,
            "requests": [[res.started_at + r.start, r.ttft, r.success] for r in res.records]}


def discovery_costs(url: str, discovery: str, args: argparse.Namespace) -> dict[str, float]:
    """A new decode (TTL 2 s) joins the planner's cluster: healthy -> first routed request; kill -9 -> removed."""
    port = free_port()
    worker = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([PY, "-m", "pdserve.cli", "serve", "--port", str(port), "--disaggregation-mode", "decode",
                             "--discovery", discovery, "--discovery-ttl", "2", "--threads", "1",
                             *args.server_args.split()], cwd=ROOT,
                            stdout=open(args.logs / "discovery-worker.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    stop_load = threading.Event()

    def light_load() -> None:
        body = json.dumps({"model": "default", "prompt": "Hello", "max_tokens": 2, "temperature": 0}).encode()
        while not stop_load.is_set():
            req = urllib.request.Request(url + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            try:
                _OPEN.open(req, timeout=120).read()
            except OSError:
                pass

    loaders = [threading.Thread(target=light_load, daemon=True) for _ in range(2)]
    for t in loaders:
        t.start()

    def processed() -> int:
        return sum(w["processed"] for w in get_json(url + "/workers")["workers"] if w["url"] == worker)

    try:
        wait_for(lambda: urllib.request.urlopen(worker + "/health", timeout=1).status == 200, 600, "new decode", 0.05)
        t_healthy = time.monotonic()
        wait_for(lambda: processed() > 0, 120, "the new decode's first routed request", 0.05)
        joined = time.monotonic() - t_healthy
        kill_group(proc)
        t_kill = time.monotonic()
        wait_for(lambda: all(w["url"] != worker for w in get_json(url + "/workers")["workers"]), 30,
                 "the killed decode out of the router", 0.05)
        removed = time.monotonic() - t_kill
    finally:
        stop_load.set()
        kill_group(proc)
    return {"healthy_to_first_request_s": joined, "kill_to_removed_s": removed, "lease_ttl_s": 2}


def run_system(name: str, etcd: Etcd, phases: list[tuple[str, list[BenchRequest], float]], prof: Path | None,
               args: argparse.Namespace) -> dict[str, Any]:
    prefill, decode, planned = SYSTEMS[name]
    discovery = etcd.url(f"bench-{name}")
    print(f"== {name}: starting {prefill}P{decode}D", flush=True)
    proc, url = launch(name, prefill, decode, discovery, args)
    if planned:
        (args.logs / "decisions.jsonl").unlink(missing_ok=True)
    planner = start_planner(url, prof, discovery, args) if planned and prof is not None else None
    rows, out = [], {"system": name}
    try:
        for i, (phase, reqs, rate) in enumerate(phases):
            cfg = BenchConfig(base_url=url, tokenizer="default", num_prompts=len(reqs), request_rate=rate,
                              seed=args.seed + i, warmup=2 if i == 0 else 0, slo_ttft_ms=args.slo_ttft_ms,
                              slo_tpot_ms=args.slo_tpot_ms, timeout_s=1200.0, disable_tqdm=True)
            print(f"-- {name} / {phase}: {len(reqs)} requests at {rate:g} req/s", flush=True)
            rows.append(phase_row(name, phase, run(cfg, reqs)))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "requests"}), flush=True)
        if planned:
            out["discovery"] = discovery_costs(url, discovery, args)
            print(json.dumps(out["discovery"]), flush=True)
    finally:
        if planner is not None:
            planner.send_signal(signal.SIGTERM)
            try:
                planner.wait(60)
            except subprocess.TimeoutExpired:
                kill_group(planner)
        stop(proc)
    out["phases"] = rows
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short trace and a quick profile: checks it all runs")
    ap.add_argument("--phase-requests", type=int, default=None, help="requests per phase (default 60, quick 8)")
    ap.add_argument("--prefill-heavy", type=int, nargs=2, default=None, metavar=("IN", "OUT"),
                    help="prefill-heavy lengths (default 768 8, quick 384 4)")
    ap.add_argument("--decode-heavy", type=int, nargs=2, default=None, metavar=("IN", "OUT"),
                    help="decode-heavy lengths (default 32 160, quick 16 48)")
    ap.add_argument("--rates", type=float, nargs=3, default=None, help="req/s per phase (default 0.25 0.4 0.25)")
    ap.add_argument("--slo-ttft-ms", type=float, default=10000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=300.0)
    ap.add_argument("--interval-s", type=float, default=None, help="planner interval (default 15, quick 6)")
    ap.add_argument("--profile", type=Path, default=None, help="a profile to use instead of measuring one")
    ap.add_argument("--server-args", default="--max-model-len 2048 --num-pages 600 --page-size 16 --chunk-budget 256",
                    help="flags of every worker (one torch thread each, unpinned: the OS spreads the 3 workers "
                         "over the cores, so a role switch moves compute where the load is)")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "elastic")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    q = args.quick
    args.phase_requests = args.phase_requests or (8 if q else 60)
    args.prefill_heavy = args.prefill_heavy or ([384, 4] if q else [768, 8])
    args.decode_heavy = args.decode_heavy or ([16, 48] if q else [32, 160])
    args.rates = args.rates or [0.25, 0.4, 0.25]
    args.interval_s = args.interval_s or (6.0 if q else 15.0)
    args.out.mkdir(parents=True, exist_ok=True)
    args.logs = args.out / "logs-run"  # etcd, profile server, planner (its decisions.jsonl), discovery worker
    args.logs.mkdir(exist_ok=True)
    from _elastic_report import write_report

    if args.report_only:
        results = json.loads((args.out / "results.json").read_text())
        print(write_report(results, args.out))
        return 0
    tok = load_tokenizer("default")
    phases = trace(args, tok)
    prof = profile(args) if "planner" in args.systems else None
    etcd = Etcd(args.logs)
    systems = []
    try:
        for name in args.systems:
            systems.append(run_system(name, etcd, phases, prof, args))
    finally:
        etcd.stop()
    decisions = [json.loads(x) for x in (args.logs / "decisions.jsonl").read_text().splitlines()] \
        if (args.logs / "decisions.jsonl").exists() else []
    results = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "logs"},
               "systems": systems, "decisions": decisions}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(write_report(results, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
