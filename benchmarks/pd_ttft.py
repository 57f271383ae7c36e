"""TTFT cost of PD vs unified at concurrency 1, real servers on the bundled model, one run.

    python benchmarks/pd_ttft.py [--backend tcp] [--prompts 8] [--prompt-len 256]

Three configurations, one after the other, each engine pinned to one core with one torch
thread so that only the protocol differs: (a) one unified server, (b) a prefill + decode pair
(prefill on core 0, decode on core 1) fed the same body with bootstrap fields, as a router
does. TTFT is measured on the client from the streamed response (decode's first token).
Also reported: the decode step time (mean inter-token gap), since the target is
"PD adds <= one decode step to TTFT".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(port: int, core: int, extra: list[str]) -> subprocess.Popen:
    cmd = ["taskset", "-c", str(core), sys.executable, "-m", "pdserve.cli", "serve", "--port", str(port),
           "--threads", "1", "--log-level", "warning", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def wait_healthy(port: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"server on {port} not healthy after {timeout}s")


def stream_ttft(url: str, body: dict[str, Any]) -> tuple[float, list[float]]:
    """(TTFT, gaps between later chunks) of one streamed /generate."""
    t0 = time.perf_counter()
    stamps: list[float] = []
    with httpx.stream("POST", url + "/generate", json={**body, "stream": True}, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                stamps.append(time.perf_counter())
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])]


def run(bodies: list[dict[str, Any]], decode_url: str, prefill: tuple[str, int] | None) -> dict[str, float]:
    ttfts, gaps = [], []
    for i, body in enumerate(bodies):
        side: threading.Thread | None = None
        if prefill is not None:
            body = {**body, "bootstrap_host": "127.0.0.1", "bootstrap_port": prefill[1],
                    "bootstrap_room": random.getrandbits(63)}
            side = threading.Thread(target=httpx.post, args=(prefill[0] + "/generate",),
                                    kwargs={"json": body, "timeout": 300})
            side.start()
        ttft, g = stream_ttft(decode_url, body)
        if side is not None:
            side.join()
        if i:  # the first request warms up
            ttfts.append(ttft)
            gaps.extend(g)
    return {"ttft_ms": statistics.median(ttfts) * 1e3, "step_ms": statistics.mean(gaps) * 1e3}


def measure(backend: str, n: int, prompt_len: int) -> dict[str, Any]:
    rng = random.Random(0)
    bodies = [{"input_ids": [rng.randrange(200, 40000) for _ in range(prompt_len)],
               "sampling_params": {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}}
              for _ in range(n + 1)]
    out: dict[str, Any] = {"backend": backend, "prompts": n, "prompt_len": prompt_len}
    port = free_port()
    proc = start(port, 0, [])
    try:
        wait_healthy(port)
        out["unified"] = run(bodies, f"http://127.0.0.1:{port}", None)
    finally:
        proc.kill()
        proc.wait()
    pp, dp, bp = free_port(), free_port(), free_port()
    pd = ["--disaggregation-transfer-backend", backend]
    procs = [start(pp, 0, ["--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(bp), *pd]),
             start(dp, 1, ["--disaggregation-mode", "decode", *pd])]
    try:
        wait_healthy(pp)
        wait_healthy(dp)
        out["pd"] = run(bodies, f"http://127.0.0.1:{dp}", (f"http://127.0.0.1:{pp}", bp))
    finally:
        for p in procs:
            p.kill()
            p.wait()
    added = out["pd"]["ttft_ms"] - out["unified"]["ttft_ms"]
    out["pd_added_ttft_ms"] = added
    out["added_in_decode_steps"] = added / out["unified"]["step_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="tcp")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    a = ap.parse_args()
    r = measure(a.backend, a.prompts, a.prompt_len)
    print(json.dumps(r, indent=1))
    print(f"PD ({a.backend}) adds {r['pd_added_ttft_ms']:.1f} ms to TTFT = "
          f"{r['added_in_decode_steps']:.2f} decode steps (target <= 1)")


if __name__ == "__main__":
    main()
