"""Router overhead: pdserve's router vs sglang-router (Rust) in front of the same fast mock workers.

One run starts fast mock workers (`tests/mock_worker.py --fast`: a framework-free responder),
pdserve's router and `sglang_router.launch_router` over the same workers (round_robin), and
drives each target — the workers directly, pdserve, sglang — with the same closed-loop load
(C keep-alive connections, one request in flight each, for D seconds) from a separate load
process. Targets are measured in rotating order for R rounds; medians are reported.
Printed per scenario: requests/s, p50/p99 latency, added p50/p99 over direct (same round),
router CPU per request (from /proc: independent of other load on the machine), and the
pdserve/sglang ratios. Scenarios: `regular` (2 unified workers) and `pd` (1 prefill +
1 decode; the direct baseline is the decode alone), each at the given worker latencies.

  python benchmarks/router_overhead.py [--concurrency 64] [--duration 5] [--rounds 3]
        [--latency-ms 0 20] [--modes regular pd] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BODY = b'{"model":"mock","prompt":"The quick brown fox jumps over the lazy dog","max_tokens":4}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- load generator (runs in its own process) ---------------------------------------------------
class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.fut: asyncio.Future[int] | None = None
        self.closed = False

    def connection_made(self, transport: Any) -> None:
        self.t = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.fut is not None and not self.fut.done():
            self.fut.set_result(-1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or self.fut is None:
            return
        head = self.buf[:end].lower()
        status = int(head[9:12])
        body = self.buf[end + 4:]
        i = head.find(b"content-length:")
        if i >= 0:
            j = head.find(b"\r\n", i)
            n = int(head[i + 15:j if j > 0 else None])
            if len(body) < n:
                return
            self.buf = body[n:]
        elif b"chunked" in head:
            k = body.find(b"\r\n0\r\n\r\n")
            if k < 0 and not body.startswith(b"0\r\n\r\n"):
                return
            self.buf = b""
        fut, self.fut = self.fut, None
        fut.set_result(status)


async def _load(hosts: list[tuple[str, int]], path: str, concurrency: int, duration: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    lat: list[float] = []
    errors = 0

    async def client(k: int) -> None:
        nonlocal errors
        host, port = hosts[k % len(hosts)]
        req = (f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
               f"content-length: {len(BODY)}\r\n\r\n").encode() + BODY
        conn: _Conn | None = None
        while loop.time() < end:
            if conn is None or conn.closed:
                _, conn = await loop.create_connection(_Conn, host, port)
            conn.fut = loop.create_future()
            t = time.perf_counter()
            conn.t.write(req)
            status = await conn.fut
            if status == 200:
                lat.append(time.perf_counter() - t)
            else:
                errors += 1
        if conn is not None:
            conn.t.close()

    end = loop.time() + 0.5  # warm-up: open connections, fill pools
    await asyncio.gather(*(client(k) for k in range(concurrency)))
    lat.clear()
    errors = 0
    t0 = time.perf_counter()
    end = loop.time() + duration
    await asyncio.gather(*(client(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - t0
    lat.sort()
    n = len(lat)
    return {"requests": n, "errors": errors, "rps": n / elapsed,
            "p50_ms": 1e3 * lat[n // 2] if n else float("nan"),
            "p99_ms": 1e3 * lat[min(n - 1, int(n * 0.99))] if n else float("nan")}


def run_load(urls: list[str], path: str, concurrency: int, duration: float, pid: int | None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--_load", json.dumps([urls, path, concurrency, duration])]
    c0 = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr[-2000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if pid:
        res["cpu_us_per_req"] = 1e6 * (cpu_seconds(pid) - c0) / max(1, res["requests"])
    return res


# -- processes -----------------------------------------------------------------------------------
class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: list[str]) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        self.procs.clear()


def wait_serving(url: str, path: str, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.post(url + path, content=BODY, headers={"content-type": "application/json"}, timeout=5)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise TimeoutError(f"{url} not serving after {timeout} s: {last}")


def scenario(mode: str, latency_ms: float, args: argparse.Namespace, procs: Procs) -> dict[str, Any]:
    roles = ["unified", "unified"] if mode == "regular" else ["prefill", "decode"]
    ports = [free_port() for _ in roles]
    bport = free_port()
    for role, port in zip(roles, ports):
        cmd = [sys.executable, "-m", "tests.mock_worker", "--fast", "--port", str(port), "--role", role,
               "--latency-ms", str(latency_ms)]
        procs.start(cmd + (["--bootstrap-port", str(bport)] if role == "prefill" else []))
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    pd_port, sg_port = free_port(), free_port()
    if mode == "regular":
        pd_args = ["--worker-urls", *urls]
        sg_args = ["--worker-urls", *urls]
    else:
        pd_args = ["--pd-disaggregation", "--prefill", urls[0], str(bport), "--decode", urls[1]]
        sg_args = ["--pd-disaggregation", "--prefill", urls[0], str(bport), "--decode", urls[1]]
    pdr = procs.start([sys.executable, "-m", "pdserve.router", "--host", "127.0.0.1", "--port", str(pd_port),
                       "--policy", "round_robin", "--log-level", "warning", *pd_args])
    sgr = procs.start([sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port",
                       str(sg_port), "--policy", "round_robin", "--log-level", "warn",
                       "--worker-startup-check-interval", "1", "--prometheus-host", "127.0.0.1",
                       "--prometheus-port", str(free_port()), *sg_args])
    path = "/v1/completions"
    direct = urls if mode == "regular" else urls[1:]
    for u in direct:
        wait_serving(u, path)
    wait_serving(f"http://127.0.0.1:{pd_port}", path)
    wait_serving(f"http://127.0.0.1:{sg_port}", path)
    targets = {"direct": (direct, None), "pdserve": ([f"http://127.0.0.1:{pd_port}"], pdr.pid),
               "sglang": ([f"http://127.0.0.1:{sg_port}"], sgr.pid)}
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in targets}
    names = list(targets)
    for r in range(args.rounds):
        order = names[r % 3:] + names[:r % 3]
        for name in order:
            t_urls, pid = targets[name]
            results[name].append(run_load(t_urls, path, args.concurrency, args.duration, pid))
    for round_i in range(args.rounds):  # added latency against the same round's direct run
        for name in ("pdserve", "sglang"):
            res, base = results[name][round_i], results["direct"][round_i]
            res["added_p50_ms"] = res["p50_ms"] - base["p50_ms"]
            res["added_p99_ms"] = res["p99_ms"] - base["p99_ms"]
    summary: dict[str, Any] = {"mode": mode, "latency_ms": latency_ms}
    for name, rows in results.items():
        summary[name] = {k: statistics.median(row[k] for row in rows) for k in rows[0] if k != "requests"}
        summary[name]["errors"] = sum(row["errors"] for row in rows)
    procs.stop_all()
    return summary


def report(s: dict[str, Any]) -> str:
    lines = [f"\n== {s['mode']} mode, mock latency {s['latency_ms']:g} ms ==",
             f"{'target':<9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8} "
             f"{'CPU us/req':>10} {'errors':>6}"]
    for name in ("direct", "pdserve", "sglang"):
        r = s[name]
        lines.append(f"{name:<9} {r['rps']:>8.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
                     f"{r.get('added_p50_ms', 0):>8.2f} {r.get('added_p99_ms', 0):>8.2f} "
                     f"{r.get('cpu_us_per_req', float('nan')):>10.0f} {r['errors']:>6}")
    p, g = s["pdserve"], s["sglang"]
    lines.append(f"pdserve/sglang: {p['rps'] / g['rps']:.2f}x req/s, CPU per request "
                 f"{p['cpu_us_per_req'] / g['cpu_us_per_req']:.2f}x, added p50 {p['added_p50_ms']:+.2f} ms "
                 f"vs {g['added_p50_ms']:+.2f} ms (targets: >= 1.0x req/s, <= 1 ms added p50)")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--_load":
        import uvloop

        urls, path, conc, dur = json.loads(sys.argv[2])
        hosts = [(u.split("//")[1].rsplit(":", 1)[0], int(u.rsplit(":", 1)[1])) for u in urls]
        print(json.dumps(uvloop.run(_load(hosts, path, conc, dur))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 20.0], help="mock worker latency")
    ap.add_argument("--modes", nargs="+", choices=["regular", "pd"], default=["regular", "pd"])
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    try:
        import sglang_router  # noqa: F401
    except ImportError:
        print("sglang-router is not installed: pip install sglang-router", file=sys.stderr)
        return 2
    procs = Procs()
    summaries = []
    try:
        for mode in args.modes:
            for latency in args.latency_ms:
                s = scenario(mode, latency, args, procs)
                summaries.append(s)
                print(report(s), flush=True)
    finally:
        procs.stop_all()
    if args.json:
        args.json.write_text(json.dumps(summaries, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
