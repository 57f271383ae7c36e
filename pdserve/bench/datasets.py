"""Benchmark workloads: random, shared-prefix and ShareGPT requests with exact token lengths.

Every builder takes a tokenizer (:class:`pdserve.model.tokenizer.Tokenizer`, a transformers
tokenizer, or anything with ``encode(text)`` / ``decode(ids)``) and returns
:class:`BenchRequest` items whose ``prompt_len`` is the number of prompt tokens the server will
see:

- prompts sent as **token ids** (the default for ``random`` and ``shared-prefix``) are exact by
  construction: the server takes the ids as they are (``/v1/completions`` accepts ``list[int]``);
- prompts sent as **text** (``as_text=True``, needed for ``/v1/chat/completions``) are made by
  decoding random ids, re-encoding the text and fixing the ids up (cut the surplus, append new
  random ids) until decode→encode is stable at the target length; ``prompt_len`` is then
  ``len(tok.encode(text))`` measured with the tokenizer's default special tokens, which is how
  the server tokenizes text. It equals the target unless the fix-up did not converge (rare);
- ShareGPT prompts are text; ``prompt_len`` is measured the same way.

Random ids are drawn uniformly from the vocabulary minus special and added tokens.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

# vLLM's ShareGPT filter (benchmarks/datasets.py: is_valid_sequence).
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT_LEN = 1024
SHAREGPT_MAX_TOTAL_LEN = 2048
_FIXUP_ROUNDS = 16


class TokenizerLike(Protocol):
    """What the builders need from a tokenizer."""

    def encode(self, text: str, *args: Any, **kwargs: Any) -> list[int]: ...

    def decode(self, ids: Sequence[int], *args: Any, **kwargs: Any) -> str: ...


@dataclass(frozen=True)
class BenchRequest:
    """One benchmark request: the prompt (token ids or text) and its lengths in tokens."""

    prompt: str | list[int]
    prompt_len: int
    output_len: int
    group: int | None = None


def encode(tok: TokenizerLike, text: str, special: bool = True) -> list[int]:
    """``tok.encode(text)``; ``special=False`` asks for no BOS/EOS where the tokenizer allows."""
    if special:
        return list(tok.encode(text))
    try:
        return list(tok.encode(text, add_special_tokens=False))
    except TypeError:
        return list(tok.encode(text))


def num_special_added(tok: TokenizerLike) -> int:
    """How many tokens ``tok.encode`` adds to any text by itself (e.g. 1 for a Llama BOS)."""
    return max(0, len(encode(tok, "a")) - len(encode(tok, "a", special=False)))


def _vocab_size(tok: Any) -> int:
    for attr in ("vocab_size", "n_vocab"):
        value = getattr(tok, attr, None)
        if isinstance(value, int) and value > 0:
            hf = getattr(tok, "hf", None)
            return max(value, len(hf)) if hf is not None else value
    try:
        return len(tok)
    except TypeError:
        raise ValueError(f"cannot tell the vocabulary size of {tok!r} (no vocab_size)") from None


def _special_ids(tok: Any) -> set[int]:
    """Special and added token ids (never sampled: they decode to nothing or to markup)."""
    out: set[int] = set()
    for holder in (tok, getattr(tok, "hf", None)):
        if holder is None:
            continue
        out |= {int(i) for i in (getattr(holder, "all_special_ids", None) or [])}
        added = getattr(holder, "added_tokens_decoder", None)
        if isinstance(added, dict):
            out |= {int(i) for i in added}
    return out


def sampleable_ids(tok: TokenizerLike) -> np.ndarray:
    """Token ids that random prompts are drawn from: the vocabulary minus special/added ids."""
    size = _vocab_size(tok)
    special = np.fromiter(_special_ids(tok), dtype=np.int64)
    ids = np.setdiff1d(np.arange(size, dtype=np.int64), special)
    if ids.size == 0:
        raise ValueError("the tokenizer has no ordinary tokens to sample")
    return ids


def _draw(rng: np.random.Generator, pool: np.ndarray, n: int) -> list[int]:
    return [int(i) for i in rng.choice(pool, size=n)] if n > 0 else []


def exact_text(tok: TokenizerLike, ids: list[int], target: int, rng: np.random.Generator,
               pool: np.ndarray) -> tuple[str, int]:
    """Text close to ``ids`` that encodes (with special tokens) to ``target`` tokens.

    Returns (text, measured length); the length differs from ``target`` only if the fix-up
    did not converge in a few rounds.
    """
    body = max(0, target - num_special_added(tok))
    ids = list(ids[:body]) + _draw(rng, pool, body - len(ids))
    text = tok.decode(ids)
    for _ in range(_FIXUP_ROUNDS):
        again = encode(tok, text, special=False)
        if len(again) == body:
            break
        ids = again[:body] if len(again) > body else again + _draw(rng, pool, body - len(again))
        text = tok.decode(ids)
    return text, len(encode(tok, text))


def _lengths(rng: np.random.Generator, n: int, mean: int, ratio: float, minimum: int) -> list[int]:
    """``n`` lengths uniform in [mean*(1-ratio), mean*(1+ratio)] (integers, at least ``minimum``)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {ratio}")
    low, high = max(minimum, int(mean * (1 - ratio))), max(minimum, int(mean * (1 + ratio)))
    if low == high:
        return [low] * n
    return [int(v) for v in rng.integers(low, high + 1, size=n)]


def random_requests(tok: TokenizerLike, num: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                    seed: int = 0, prefix_len: int = 0, as_text: bool = False) -> list[BenchRequest]:
    """``num`` requests of random tokens (vLLM's ``random`` dataset).

    Input lengths are uniform in [input_len*(1-r), input_len*(1+r)] (exactly ``input_len`` when
    r = 0), output lengths likewise; a shared random prefix of ``prefix_len`` tokens comes before
    every prompt (``prompt_len = prefix_len + input length``). Prompts are token ids (exact) or,
    with ``as_text``, text fixed up to the same length (see the module docstring).
    """
    if num < 0 or input_len < 0 or output_len < 1 or prefix_len < 0:
        raise ValueError("num, input_len and prefix_len must be >= 0 and output_len >= 1")
    rng = np.random.default_rng(seed)
    pool = sampleable_ids(tok)
    prefix = _draw(rng, pool, prefix_len)
    in_lens = _lengths(rng, num, input_len, range_ratio, 1 if prefix_len == 0 else 0)
    out_lens = _lengths(rng, num, output_len, range_ratio, 1)
    out: list[BenchRequest] = []
    for n_in, n_out in zip(in_lens, out_lens):
        ids = prefix + _draw(rng, pool, n_in)
        if as_text:
            text, measured = exact_text(tok, ids, len(ids), rng, pool)
            out.append(BenchRequest(text, measured, n_out))
        else:
            out.append(BenchRequest(ids, len(ids), n_out))
    return out


def shared_prefix_requests(tok: TokenizerLike, num_groups: int, prompts_per_group: int, system_prompt_len: int,
                           question_len: int, output_len: int, seed: int = 0, as_text: bool = False,
                           shuffle: bool = True) -> list[BenchRequest]:
    """Groups of prompts sharing a long random system prompt (SGLang's generated-shared-prefix).

    Prompt = the group's ``system_prompt_len`` ids + ``question_len`` fresh random ids; ``group``
    is the group index. ``shuffle`` interleaves the groups (seeded), so a router must find the
    group's cache rather than see a group's prompts back to back. With ``as_text`` the system
    prompt and question are fixed-up texts joined; the join may merge a token at the boundary,
    so ``prompt_len`` is measured.
    """
    if num_groups < 1 or prompts_per_group < 1 or system_prompt_len < 0 or question_len < 0 or output_len < 1:
        raise ValueError("need num_groups, prompts_per_group, output_len >= 1 and lengths >= 0")
    if system_prompt_len + question_len < 1:
        raise ValueError("system_prompt_len + question_len must be at least 1")
    rng = np.random.default_rng(seed)
    pool = sampleable_ids(tok)
    out: list[BenchRequest] = []
    for g in range(num_groups):
        system = _draw(rng, pool, system_prompt_len)
        system_text = exact_text(tok, system, system_prompt_len, rng, pool)[0] if as_text else ""
        for _ in range(prompts_per_group):
            question = _draw(rng, pool, question_len)
            if as_text:
                q_text = exact_text(tok, question, question_len, rng, pool)[0] if question_len else ""
                text = system_text + q_text
                out.append(BenchRequest(text, len(encode(tok, text)), output_len, g))
            else:
                ids = system + question
                out.append(BenchRequest(ids, len(ids), output_len, g))
    if shuffle:
        order = rng.permutation(len(out))
        out = [out[int(i)] for i in order]
    return out


def _first_pair(conversations: Any) -> tuple[str, str] | None:
    """The first human turn and the gpt turn right after it, else None."""
    if not isinstance(conversations, list):
        return None
    for i, turn in enumerate(conversations[:-1]):
        nxt = conversations[i + 1]
        if isinstance(turn, dict) and isinstance(nxt, dict) and turn.get("from") == "human" \
                and nxt.get("from") == "gpt" and isinstance(turn.get("value"), str) \
                and isinstance(nxt.get("value"), str):
            return turn["value"], nxt["value"]
    return None


def sharegpt_requests(path: str | os.PathLike[str], tok: TokenizerLike, num: int, seed: int = 0,
                      fixed_output_len: int | None = None) -> list[BenchRequest]:
    """Up to ``num`` prompts from a ShareGPT JSON file (vLLM's sampling and filter).

    The file is a list of ``{"conversations": [{"from": "human", "value": ...},
    {"from": "gpt", "value": ...}, ...]}``; the first human turn is the prompt (text) and the
    output length is the token count of the gpt answer after it, or ``fixed_output_len``.
    Entries are shuffled (seeded), then pairs with prompt < 4 or output < 4 tokens, prompt > 1024
    or prompt + output > 2048 tokens are skipped, as vLLM does.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversations")
    pairs = [p for p in (_first_pair(e.get("conversations") if isinstance(e, dict) else None) for e in data) if p]
    rng = np.random.default_rng(seed)
    out: list[BenchRequest] = []
    for i in rng.permutation(len(pairs)):
        prompt, answer = pairs[int(i)]
        prompt_len = len(encode(tok, prompt))
        output_len = fixed_output_len if fixed_output_len is not None else len(encode(tok, answer, special=False))
        too_short = prompt_len < SHAREGPT_MIN_LEN or (fixed_output_len is None and output_len < SHAREGPT_MIN_LEN)
        too_long = prompt_len > SHAREGPT_MAX_PROMPT_LEN or prompt_len + output_len > SHAREGPT_MAX_TOTAL_LEN
        if too_short or too_long:
            continue
        out.append(BenchRequest(prompt, prompt_len, output_len))
        if len(out) == num:
            break
    if not out:
        raise ValueError(f"{path}: no usable ShareGPT pairs (all filtered out)")
    return out


def groups_for(num_prompts: int, num_groups: int) -> int:
    """Prompts per group so that ``num_groups`` groups hold at least ``num_prompts`` prompts."""
    return max(1, math.ceil(num_prompts / max(1, num_groups)))
