"""The in-process workers of offline_throughput.py: pdserve's `LLM.generate` and HF `generate`.

Each runs in its own process (`offline_throughput.py --_worker NAME`), warms up, times every
workload of the spec and prints one `RESULT_JSON {...}` line for the orchestrator.
"""

from __future__ import annotations

import json
import sys
import time

HF_BATCH = 16  # HF runs static batches of this size, left-padded
RESULT_PREFIX = "RESULT_JSON "

def _emit(result: dict, out: str | None) -> None:
    line = json.dumps(result)
    if out:
        with open(out, "w") as f:
            f.write(line)
    print(RESULT_PREFIX + line, flush=True)


def worker_hf(spec: dict, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0
    pad = model.config.pad_token_id
    if pad is None:
        eos = model.config.eos_token_id
        pad = eos[0] if isinstance(eos, list) else (eos if eos is not None else 0)

    @torch.inference_mode()
    def run(prompts: list[list[int]], max_new: list[int]) -> tuple[float, list[list[int]]]:
        outs: list[list[int]] = []
        t = time.perf_counter()
        for b in range(0, len(prompts), HF_BATCH):
            bp, bm = prompts[b:b + HF_BATCH], max_new[b:b + HF_BATCH]
            width, mn = max(len(p) for p in bp), max(bm)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in bp], dtype=torch.long)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in bp],
                                dtype=torch.long)
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=mn,
                                 min_new_tokens=mn, do_sample=False, num_beams=1,
                                 pad_token_id=pad, temperature=None, top_p=None, top_k=None)
            new = gen[:, width:].tolist()
            outs.extend(row[:m] for row, m in zip(new, bm))
        return time.perf_counter() - t, outs

    return _run_all("hf", spec, run, load_s, {"transformers": _ver("transformers"),
                                              "threads": threads})


def worker_pdserve(spec: dict, threads: int, extra_kwargs: dict) -> dict:
    import torch

    torch.set_num_threads(threads)
    from pdserve import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], threads=threads, **extra_kwargs)
    load_s = time.perf_counter() - t0

    def run(prompts: list[list[int]], max_new: list[int]) -> tuple[float, list[list[int]]]:
        params = [SamplingParams(max_new_tokens=m, temperature=0.0, ignore_eos=True)
                  for m in max_new]
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t
        return dt, [list(o.output_ids) for o in outs]

    res = _run_all("pdserve", spec, run, load_s, {"threads": threads, "kwargs": extra_kwargs})
    close = getattr(llm, "shutdown", None) or getattr(llm, "close", None)
    if callable(close):
        close()
    return res


def _ver(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _run_all(system: str, spec: dict, run, load_s: float, info: dict) -> dict:
    warm = spec["warmup_prompt"]
    run(warm, [4] * len(warm))
    result = {"system": system, "load_s": load_s, "info": info, "workloads": {},
              "decode_probe": None}
    for w in spec["workloads"]:
        print(f"[{system}] workload {w['name']}: {len(w['prompts'])} prompts", file=sys.stderr,
              flush=True)
        dt, outs = run(w["prompts"], w["max_new"])
        result["workloads"][w["name"]] = {
            "elapsed_s": dt, "prompt_tokens": sum(len(p) for p in w["prompts"]),
            "output_tokens": sum(len(o) for o in outs), "outputs": outs}
        print(f"[{system}] {w['name']}: {dt:.1f} s", file=sys.stderr, flush=True)
    p = spec.get("decode_probe")
    if p:
        t1, _ = run([p["prompt"]], [p["n1"]])
        t2, _ = run([p["prompt2"]], [p["n2"]])
        result["decode_probe"] = {"t1_s": t1, "t2_s": t2, "n1": p["n1"], "n2": p["n2"],
                                  "s_per_token": (t2 - t1) / (p["n2"] - p["n1"])}
    return result
