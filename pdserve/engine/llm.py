"""Offline API: `LLM(model).generate(prompts, params)` drives an in-process Engine to completion;
`LLM.chat(messages, params)` renders conversations with the model's chat template first."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields
from typing import Any

from tqdm import tqdm

from pdserve.engine.config import LAYOUT_FIELDS, EngineConfig
from pdserve.engine.engine import Engine
from pdserve.engine.messages import GenerateReq, TopLogprob
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.stop_strings import cut_at_stop


@dataclass
class RequestOutput:
    rid: str
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str | None
    matched_stop: int | str | None
    cached_tokens: int
    logprobs: list[float] | None
    top_logprobs: list[list[TopLogprob]] | None


OFFLINE_CHUNK_BUDGET = 2048  # offline favours throughput: fewer, larger GEMMs (a server keeps
                             # EngineConfig's 512 so prefill chunks stall running decodes less)


class LLM:
    _ids = itertools.count()

    def __init__(self, model: str = "default", **engine_kwargs) -> None:
        known = {f.name for f in fields(EngineConfig)} | set(LAYOUT_FIELDS)  # tp_size=2 etc. fold into `parallel`
        unknown = set(engine_kwargs) - known
        if unknown:
            raise TypeError(f"unknown engine options {sorted(unknown)}; known: {sorted(known)}")
        engine_kwargs.setdefault("chunk_budget", OFFLINE_CHUNK_BUDGET)
        self.engine = Engine.build(EngineConfig(model=model, **engine_kwargs))
        self.tokenizer = self.engine.tokenizer

    def close(self) -> None:
        """Stop the engine's other tensor-parallel ranks and PD machinery (idempotent)."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(ids)
        if len(plist) != len(ids):
            raise ValueError(f"{len(plist)} sampling params for {len(ids)} prompts")
        rids = [f"offline-{next(self._ids)}" for _ in ids]
        for rid, p_ids, p in zip(rids, ids, plist):
            self.engine.validate(GenerateReq(rid, p_ids, p))
        for rid, p_ids, p in zip(rids, ids, plist):
            self.engine.add_request(GenerateReq(rid, p_ids, p))
        results = {rid: RequestOutput(rid, p_ids, [], "", None, None, 0, None, None)
                   for rid, p_ids in zip(rids, ids)}
        bar = tqdm(total=len(rids), desc="generate", disable=not use_tqdm, unit="req")
        pending = set(rids)
        while pending:
            for out in self.engine.step():
                res = results[out.rid]
                res.output_ids.extend(out.token_ids)
                if out.logprobs is not None:
                    res.logprobs = (res.logprobs or []) + out.logprobs
                if out.top_logprobs is not None:
                    res.top_logprobs = (res.top_logprobs or []) + out.top_logprobs
                if out.finished:
                    res.finish_reason, res.matched_stop = out.finish_reason, out.matched_stop
                    res.cached_tokens = out.cached_tokens
                    pending.discard(out.rid)
                    bar.update(1)
        bar.close()
        for rid, p in zip(rids, plist):
            res = results[rid]
            res.text = self.tokenizer.decode(res.output_ids, skip_special_tokens=p.skip_special_tokens)
            if isinstance(res.matched_stop, str) and not p.include_stop_str_in_output:
                res.text = cut_at_stop(res.text, res.matched_stop)
        return [results[rid] for rid in rids]

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """vLLM's `LLM.chat`: one conversation (a list of {"role", "content"} messages) or a
        list of them, each rendered with the model's chat template, then `generate`."""
        if not messages:
            raise ValueError("messages must not be empty")
        convs = [messages] if isinstance(messages[0], dict) else messages
        kwargs = dict(chat_template_kwargs or {})
        if continue_final_message:
            kwargs["continue_final_message"] = True
        ids = [self.tokenizer.apply_chat_template(list(c), add_generation_prompt=add_generation_prompt
                                                  and not continue_final_message, **kwargs)
               for c in convs]  # type: ignore[arg-type]
        return self.generate(ids, params, use_tqdm=use_tqdm)
