"""HF transformers greedy reference: token ids and log-softmax of each step (fp32, no EOS stop)."""

from __future__ import annotations

from pathlib import Path

import torch

_MODELS: dict[str, object] = {}


def hf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    key = str(folder)
    if key not in _MODELS:
        _MODELS[key] = AutoModelForCausalLM.from_pretrained(key, dtype=torch.float32).eval()
    return _MODELS[key]


@torch.inference_mode()
def hf_greedy_rows(folder: Path, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and each step's whole log-softmax row, one sequence at a time with HF's own
    KV cache."""
    model = hf_model(folder)
    out = model(torch.tensor([prompt]), use_cache=True)
    past, ids, rows = out.past_key_values, [], []
    logits = out.logits[0, -1]
    for _ in range(max_new_tokens):
        rows.append(torch.log_softmax(logits.float(), dim=-1))
        tok = int(torch.argmax(logits))
        ids.append(tok)
        out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
    return ids, rows


def hf_greedy(folder: Path, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-softmax (fp32, no EOS stop)."""
    ids, rows = hf_greedy_rows(folder, prompt, max_new_tokens)
    return ids, [float(row[tok]) for tok, row in zip(ids, rows)]
