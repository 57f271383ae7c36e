"""Structured output in the engine (tiny random model: without the masks it would never write
valid JSON): constrained rows follow their grammar, free rows of the same batch are untouched,
compiled grammars are cached, an invalid one is refused with its field named."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from pdserve import LLM, SamplingParams
from pdserve.engine.sampling_params import GrammarSpec

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "level": {"type": "integer", "minimum": 0, "maximum": 9},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    "inner": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}},
    "required": ["name", "level", "tags", "inner"]}
PROMPTS = [[5, 17, 300 + i, 42] for i in range(6)]


def constrained(spec: GrammarSpec, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=kw.pop("max_new_tokens", 120), temperature=kw.pop("temperature", 0.0),
                          grammar=spec, **kw)


def test_json_schema_regex_choice_hold_greedy_and_sampled(tiny_llm: LLM) -> None:
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    params = [constrained(spec), constrained(spec, temperature=1.0, seed=3),
              constrained(GrammarSpec("regex", r"[a-c]{2}-\d{3}")), constrained(GrammarSpec("json_object")),
              constrained(GrammarSpec("ebnf", 'root ::= "red" | "green" | "blue"'), temperature=0.9, seed=1),
              constrained(spec, temperature=0.7, seed=11)]
    outs = tiny_llm.generate(PROMPTS, params, use_tqdm=False)
    for k in (0, 1, 5):
        assert outs[k].finish_reason == "stop", outs[k]
        jsonschema.validate(json.loads(outs[k].text), SCHEMA)
    assert re.fullmatch(r"[a-c]{2}-\d{3}", outs[2].text), outs[2].text
    assert outs[3].finish_reason == "length" or isinstance(json.loads(outs[3].text), dict), outs[3]
    assert outs[3].text.startswith("{")
    assert outs[4].text in ("red", "green", "blue")


def test_free_rows_of_a_constrained_batch_are_untouched(tiny_llm: LLM) -> None:
    free = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    alone = tiny_llm.generate(PROMPTS[:3], free, use_tqdm=False)
    mixed = tiny_llm.generate(PROMPTS[:3], [free, constrained(GrammarSpec("regex", r"\d+")), free], use_tqdm=False)
    assert [mixed[0].output_ids, mixed[2].output_ids] == [alone[0].output_ids, alone[2].output_ids]
    assert re.fullmatch(r"\d+", mixed[1].text)


def test_grammars_compile_once_and_failures_are_not_cached(tiny_llm: LLM) -> None:
    grammars = tiny_llm.engine.grammars
    spec = GrammarSpec("regex", r"x{2,5}")
    first = grammars.submit(spec)
    assert grammars.submit(GrammarSpec("regex", r"x{2,5}", param="guided_regex")) is first
    first.result(timeout=60)
    bad = GrammarSpec("regex", "(x", param="guided_regex")
    fut = grammars.submit(bad)
    with pytest.raises(Exception):
        fut.result(timeout=60)
    grammars.forget(bad)
    assert grammars.submit(bad) is not fut
    grammars.forget(bad)


def test_invalid_grammar_is_refused_naming_its_field(tiny_llm: LLM) -> None:
    out = tiny_llm.generate([PROMPTS[0]], constrained(GrammarSpec("regex", "[a-", param="guided_regex")),
                            use_tqdm=False)[0]
    assert out.finish_reason == "abort" and out.output_ids == []
