"""Token sampler: turns one step's logits into next tokens (plus optional logprobs).

The engine calls `Sampler.sample(logits, rows)` once per step with a [B, V] float32 logits
tensor and one `SampleRow` per sequence. Semantics follow vLLM / HF transformers:

1. logprobs (for rows that ask) are `log_softmax` of the RAW logits, before any processing;
2. `suppress_ids` are set to -inf (EOS / stop ids while below `min_new_tokens`), then each
   row's `logit_bias` is added (OpenAI's logit_bias: -100 bans, +100 forces);
3. repetition penalty over prompt + output tokens (logit > 0 -> divide, else multiply);
4. frequency / presence penalties over output tokens (OpenAI: -f * count, -p * [count > 0]);
5. greedy rows (temperature == 0 or top_k == 1) take the argmax;
6. other rows: divide by temperature, then top-k, top-p (nucleus), min-p, then draw a token
   with the exponential race `argmax(probs / Exp(1))`; a row's own `torch.Generator` (seeded
   per request) makes its draw depend only on the seed and its logits, not on the batch.

The all-greedy, no-penalty, no-logprob batch is a single `argmax` (the hot path). Everything
else is vectorised across the batch: per-row Python work is limited to collecting parameters
and token ids. `process_logits` exposes the processed logits for tests and debugging.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np
import torch

from pdserve.engine.messages import TopLogprob
from pdserve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pdserve.engine.request import Request

__all__ = ["SampleRow", "SampleResult", "Sampler", "apply_penalties", "process_logits", "score_prompt",
           "skip_draw"]

# Nucleus boundary tolerance: a prefix whose mass is within this of top_p counts as reaching it,
# so e.g. probs [0.5, 0.3, ...] with top_p 0.8 keeps exactly two tokens despite float rounding.
_TOP_P_EPS = 1e-6
# Temperatures below this are clamped (still effectively greedy) so logits / T cannot overflow.
_MIN_TEMPERATURE = 1e-5


@dataclass
class SampleRow:
    """What the engine gives per sequence that samples this step."""

    params: SamplingParams
    generator: torch.Generator | None  # seeded per request when params.seed is set, else None
    prompt_ids: list[int]
    output_ids: list[int]  # tokens generated so far
    suppress_ids: tuple[int, ...] = ()  # ids to ban this step (EOS/stop ids below min_new_tokens)


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None  # per row logprob of the chosen token (None when no row asked)
    top_logprobs: list[list[TopLogprob]] | None

    def logprob_entries(self, i: int, params: SamplingParams) -> tuple[float | None, list[TopLogprob] | None]:
        """Row `i`'s logprob and top entries for a request that asked for them; else (None, None)."""
        if self.logprobs is None or not _wants_logprobs(params):
            return None, None
        return self.logprobs[i], self.top_logprobs[i] if self.top_logprobs is not None else None


def _is_greedy(p: SamplingParams) -> bool:
    return p.temperature == 0.0 or p.top_k == 1


def _wants_logprobs(p: SamplingParams) -> bool:
    return p.logprobs or p.top_logprobs > 0


def _needs_processing(r: SampleRow) -> bool:
    p = r.params
    return (
        bool(r.suppress_ids)
        or bool(p.logit_bias)
        or p.repetition_penalty != 1.0
        or p.frequency_penalty != 0.0
        or p.presence_penalty != 0.0
    )


def _flat_ids(id_lists: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten per-row id lists into (local row index, token id) long tensors on `device`."""
    lens = [len(ids) for ids in id_lists]
    # np.fromiter is ~6x faster than torch.tensor(list) for long prompts
    flat_np = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int64, count=sum(lens))
    flat = torch.from_numpy(flat_np)
    local = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens, dtype=torch.long))
    return local.to(device, non_blocking=True), flat.to(device, non_blocking=True)


def _row_param(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """A per-row parameter as a [n, 1] column on `like`'s device and dtype."""
    return torch.tensor(values, dtype=like.dtype).to(like.device, non_blocking=True).unsqueeze(1)


def apply_penalties(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Steps 2-4 IN PLACE on `logits` [B, V]: suppress ids, logit bias, repetition, frequency
    and presence."""
    device, vocab = logits.device, logits.shape[1]
    neg_inf = float("-inf")

    sup = [(i, r.suppress_ids) for i, r in enumerate(rows) if r.suppress_ids]
    if sup:
        row_idx = [i for i, ids in sup for _ in ids]
        tok_idx = [t for _, ids in sup for t in ids]
        logits[torch.tensor(row_idx, device=device), torch.tensor(tok_idx, device=device)] = neg_inf

    biased = [(i, r.params.logit_bias) for i, r in enumerate(rows) if r.params.logit_bias]
    if biased:
        pairs = [(i, t, b) for i, bias in biased for t, b in bias.items() if t < vocab]
        if pairs:
            rows_t = torch.tensor([i for i, _, _ in pairs], device=device)
            toks_t = torch.tensor([t for _, t, _ in pairs], device=device)
            logits[rows_t, toks_t] += torch.tensor([b for _, _, b in pairs], dtype=logits.dtype, device=device)

    # Both penalties touch only the (row, token) pairs that occur: O(tokens), not O(rows x V).
    # Duplicate pairs write the same value (computed from the pre-penalty logit), so the
    # scattered writes are deterministic.
    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if rep:
        local, tok = _flat_ids([rows[i].prompt_ids + rows[i].output_ids for i in rep], device)
        brow = torch.tensor(rep, device=device)[local]
        pen = _row_param([rows[i].params.repetition_penalty for i in rep], logits).squeeze(1)[local]
        vals = logits[brow, tok]
        logits[brow, tok] = torch.where(vals > 0, vals / pen, vals * pen)

    fp = [
        i
        for i, r in enumerate(rows)
        if r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0
    ]
    if fp:
        local, tok = _flat_ids([rows[i].output_ids for i in fp], device)
        counts = torch.zeros(len(fp), vocab, dtype=logits.dtype, device=device)
        counts.index_put_((local, tok), torch.ones_like(tok, dtype=logits.dtype), accumulate=True)
        cnt = counts[local, tok]  # exact: integer-valued float sums
        freq = _row_param([rows[i].params.frequency_penalty for i in fp], logits).squeeze(1)[local]
        pres = _row_param([rows[i].params.presence_penalty for i in fp], logits).squeeze(1)[local]
        brow = torch.tensor(fp, device=device)[local]
        logits[brow, tok] = logits[brow, tok] - freq * cnt - pres
    return logits


def _truncate(
    logits: torch.Tensor, params: list[SamplingParams]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Temperature, then top-k / top-p / min-p for sampled rows [n, V].

    Returns (candidate logits [n, C] with dropped ones at -inf, their vocab ids [n, C]); ids is
    None when no truncation applies and the candidates are the whole vocab in order.
    """
    temps = [max(p.temperature, _MIN_TEMPERATURE) for p in params]
    if any(t != 1.0 for t in temps):
        logits = logits / _row_param(temps, logits)
    vocab = logits.shape[1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    need_k = any(k < vocab for k in top_k)
    need_p = any(p.top_p < 1.0 for p in params)
    need_min_p = any(p.min_p > 0.0 for p in params)
    if not (need_k or need_p or need_min_p):
        return logits, None

    if all(k < vocab for k in top_k):
        # Every row has a top-k: only the max(k) best can survive, so a partial sort suffices.
        cand, cand_idx = logits.topk(max(top_k), dim=-1, sorted=True)
    else:
        cand, cand_idx = logits.sort(dim=-1, descending=True)
    mask = torch.zeros_like(cand, dtype=torch.bool)
    if need_k:
        pos = torch.arange(cand.shape[1], device=logits.device).unsqueeze(0)
        k = torch.tensor(top_k, dtype=torch.long).to(logits.device, non_blocking=True)
        mask |= pos >= k.unsqueeze(1)  # exactly k kept, ties broken by sort order
        cand = cand.masked_fill(mask, float("-inf"))
    if need_p or need_min_p:
        probs = cand.softmax(dim=-1)
        if need_p:
            top_p = _row_param([p.top_p for p in params], probs)
            mass_before = probs.cumsum(dim=-1) - probs  # exclusive prefix mass
            p_mask = (mass_before >= top_p - _TOP_P_EPS) & (top_p < 1.0)
            p_mask[:, 0] = False  # always keep the most likely token
            mask |= p_mask
        if need_min_p:
            # min-p is relative to the max prob, which top-k/top-p renormalisation leaves unchanged
            min_p = _row_param([p.min_p for p in params], probs)
            mask |= probs < min_p * probs[:, :1]
    return cand.masked_fill(mask, float("-inf")), cand_idx


def _draw(
    cand: torch.Tensor,
    cand_idx: torch.Tensor | None,
    generators: list[torch.Generator | None],
    vocab: int,
) -> torch.Tensor:
    """One vocab id per row from candidate logits via the race argmax(probs / Exp(1)).

    A seeded row always draws a full-vocab Exp(1) vector from its generator and reads it at
    its candidates, so its token depends on seed + logits + params only, not on the batch.
    """
    probs = cand.softmax(dim=-1)
    q = torch.empty_like(probs)
    if any(g is None for g in generators):
        q.exponential_()  # global RNG, one batched draw (seeded rows are overwritten below)
    for i, g in enumerate(generators):
        if g is not None:
            qv = torch.empty(vocab, dtype=q.dtype, device=q.device).exponential_(generator=g)
            q[i] = qv if cand_idx is None else qv[cand_idx[i]]
    q.clamp_min_(torch.finfo(q.dtype).tiny)  # exponential_ may return 0: avoid 0/0 = nan
    choice = (probs / q).argmax(dim=-1)
    return choice if cand_idx is None else cand_idx.gather(1, choice.unsqueeze(1)).squeeze(1)


def score_prompt(req: "Request", positions: range, logits: torch.Tensor) -> None:
    """Prompt scoring: the logprob (raw logits, as for sampled tokens) of prompt token p + 1 for
    each position p (row) in `positions`, and its top alternatives when the request wants them."""
    assert req.prompt_lp is not None
    lp = logits.float().log_softmax(dim=-1)
    targets = torch.tensor(req.tokens[positions.start + 1: positions.stop + 1], device=lp.device)
    chosen = lp.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
    for k, p in enumerate(positions):
        req.prompt_lp[p + 1] = chosen[k]
    top_k = req.params.top_logprobs
    if req.prompt_top is not None and top_k > 0:
        vals, ids = lp.topk(min(top_k, lp.shape[1]), dim=-1)
        for k, (v_row, i_row) in enumerate(zip(vals.tolist(), ids.tolist())):
            req.prompt_top[positions[k] + 1] = [TopLogprob(t, v) for t, v in zip(i_row, v_row)]


def skip_draw(params: SamplingParams, generator: torch.Generator | None, vocab: int) -> None:
    """Advance a seeded request's generator past one token's draw, exactly as `_draw` consumes
    it (greedy rows draw nothing). A PD decode calls it for the first token, which the prefill
    sampled: its later tokens then use the same random numbers as a unified engine's."""
    if generator is not None and not _is_greedy(params):
        torch.empty(vocab, dtype=torch.float32, device=generator.device).exponential_(generator=generator)


def _scatter_full(cand: torch.Tensor, cand_idx: torch.Tensor | None, vocab: int) -> torch.Tensor:
    if cand_idx is None:
        return cand
    out = torch.full((cand.shape[0], vocab), float("-inf"), dtype=cand.dtype, device=cand.device)
    return out.scatter_(1, cand_idx, cand)


def process_logits(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """The logits the sampler picks from, as a new tensor (the input is not modified).

    Penalties and suppress ids apply to every row; sampled (non-greedy) rows are then divided by
    temperature and masked (-inf) by top-k / top-p / min-p. A greedy row's token is the argmax
    of its processed row; a sampled row's distribution is the softmax of its processed row.
    """
    x = logits.float().clone()
    if any(_needs_processing(r) for r in rows):
        apply_penalties(x, rows)
    sampled = [i for i, r in enumerate(rows) if not _is_greedy(r.params)]
    if sampled:
        idx = torch.tensor(sampled, device=x.device)
        cand, cand_idx = _truncate(x[idx], [rows[i].params for i in sampled])
        x[idx] = _scatter_full(cand, cand_idx, x.shape[1])
    return x


class Sampler:
    """Stateless per-step sampler; per-request RNG state lives in each row's generator."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)

    def sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> SampleResult:
        """Pick one token per row from `logits` [B, V] (B == len(rows)).

        Columns past `vocab_size` (padded lm_head) are ignored. Generators must live on the
        logits' device.
        """
        if logits.shape[0] != len(rows):
            raise ValueError(f"logits has {logits.shape[0]} rows but {len(rows)} sample rows")
        if logits.shape[1] > self.vocab_size:
            logits = logits[:, : self.vocab_size]
        if not rows:
            return SampleResult([], None, None)

        # Hot path: all greedy, nothing to process, no logprobs -> a single argmax.
        for r in rows:
            p = r.params
            if not _is_greedy(p) or _wants_logprobs(p) or _needs_processing(r):
                break
        else:
            return SampleResult(logits.argmax(dim=-1).tolist(), None, None)

        logits = logits.float()
        device = logits.device
        lp_rows = [i for i, r in enumerate(rows) if _wants_logprobs(r.params)]
        raw_lp: torch.Tensor | None = None
        if lp_rows:  # from the raw logits, before anything below touches them
            all_lp = len(lp_rows) == len(rows)
            raw = logits if all_lp else logits[torch.tensor(lp_rows, device=device)]
            raw_lp = raw.log_softmax(dim=-1)

        if any(_needs_processing(r) for r in rows):
            logits = apply_penalties(logits.clone(), rows)

        sampled = [i for i, r in enumerate(rows) if not _is_greedy(r.params)]
        if len(sampled) == len(rows):
            cand, cand_idx = _truncate(logits, [r.params for r in rows])
            tokens = _draw(cand, cand_idx, [r.generator for r in rows], logits.shape[1])
        else:
            tokens = logits.argmax(dim=-1)
            if sampled:
                idx = torch.tensor(sampled, device=device)
                cand, cand_idx = _truncate(logits[idx], [rows[i].params for i in sampled])
                gens = [rows[i].generator for i in sampled]
                tokens[idx] = _draw(cand, cand_idx, gens, logits.shape[1])

        if raw_lp is None:
            return SampleResult(tokens.tolist(), None, None)
        lp_idx = None if len(lp_rows) == len(rows) else torch.tensor(lp_rows, device=device)
        chosen_t = (tokens if lp_idx is None else tokens[lp_idx]).unsqueeze(1)
        chosen_lp = raw_lp.gather(1, chosen_t).squeeze(1)
        k_max = min(max(rows[i].params.top_logprobs for i in lp_rows), raw_lp.shape[1])
        top_v, top_i = raw_lp.topk(k_max, dim=-1) if k_max > 0 else (None, None)  # descending

        token_ids: list[int] = tokens.tolist()
        chosen = chosen_lp.tolist()
        logprobs = [0.0] * len(rows)
        for j, i in enumerate(lp_rows):
            logprobs[i] = chosen[j]
        top: list[list[TopLogprob]] = [[] for _ in rows]
        if top_v is not None and top_i is not None:
            vals_l, ids_l = top_v.tolist(), top_i.tolist()
            for j, i in enumerate(lp_rows):
                k = rows[i].params.top_logprobs
                top[i] = [TopLogprob(t, v) for t, v in zip(ids_l[j][:k], vals_l[j][:k])]
        return SampleResult(token_ids, logprobs, top)
