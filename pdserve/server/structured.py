"""Structured-output fields of a request → one `GrammarSpec`, or a 400 naming the field.

Where a constraint can come from (at most one per request):
    OpenAI   response_format {"type": "json_object"} | {"type": "json_schema",
             "json_schema": {"name", "schema", "strict"}}                  (chat, completions)
    vLLM     guided_json (schema object or text), guided_regex, guided_choice (list of
             strings), guided_grammar (EBNF)                                (chat, completions)
    SGLang   sampling_params.json_schema (text), .regex, .ebnf              (/generate)
    tools    tool_choice "required" / named (server/tools.py builds their schema)
The front checks each with xgrammar's parser (no vocabulary needed: microseconds, in a
thread of its own, which also takes xgrammar's slow first import off the event loop), so an
invalid schema or regex is a 400 before the engine sees it; the engine compiles the spec
against its vocabulary in its grammar thread (engine/grammar.py).
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pdserve.engine.sampling_params import GrammarSpec
from pdserve.server.errors import bad_request

_CHECK_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdserve-grammar-check")


def _check(spec: GrammarSpec) -> str | None:
    """xgrammar's complaint about `spec`, or None when it parses."""
    import xgrammar as xgr

    from pdserve.engine.grammar import grammar_error

    try:
        if spec.kind == "json_schema":
            xgr.Grammar.from_json_schema(spec.source, any_whitespace=False, strict_mode=spec.strict)
        elif spec.kind == "regex":
            xgr.Grammar.from_regex(spec.source)
        elif spec.kind == "ebnf":
            xgr.Grammar.from_ebnf(spec.source)
    except Exception as exc:
        return grammar_error(exc)
    return None


async def checked(spec: GrammarSpec | None) -> GrammarSpec | None:
    """`spec` once xgrammar's parser accepts it; a 400 naming its field otherwise."""
    if spec is None or spec.kind == "json_object":
        return spec
    error = await asyncio.get_running_loop().run_in_executor(_CHECK_POOL, _check, spec)
    if error is not None:
        raise bad_request(f"{spec.param}: invalid {spec.kind.replace('_', ' ')}: {error}", param=spec.param)
    return spec


def schema_text(value: Any, param: str) -> str:
    """A JSON schema given as an object or as JSON text, as canonical JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise bad_request(f"{param}: invalid json schema: not JSON: {exc}", param=param) from None
    if not isinstance(value, dict):
        raise bad_request(f"{param}: invalid json schema: it must be a JSON object", param=param)
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def choice_grammar(choices: Any, param: str = "guided_choice") -> GrammarSpec:
    """EBNF that matches exactly one of `choices` (non-empty strings)."""
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise bad_request(f"{param} must be a non-empty list of non-empty strings", param=param)
    alts = " | ".join(json.dumps(c, ensure_ascii=True) for c in dict.fromkeys(choices))
    return GrammarSpec("ebnf", f"root ::= {alts}", param=param)


def _one(found: list[GrammarSpec]) -> GrammarSpec | None:
    if len(found) > 1:
        names = " and ".join(s.param for s in found)
        raise bad_request(f"give one structured-output constraint, not {names}", param=found[1].param)
    return found[0] if found else None


def openai_grammar(body: Any) -> GrammarSpec | None:
    """The constraint of an OpenAI body (response_format, vLLM's guided_*), unchecked."""
    found = []
    rf = getattr(body, "response_format", None)
    if rf is not None and rf.type != "text":
        if rf.type == "json_object":
            found.append(GrammarSpec("json_object", param="response_format"))
        elif rf.type == "json_schema":
            js = rf.json_schema
            if js is None or js.schema_ is None:
                raise bad_request("response_format json_schema needs json_schema.schema", param="response_format")
            found.append(GrammarSpec("json_schema", schema_text(js.schema_, "response_format.json_schema"),
                                     strict=bool(js.strict), param="response_format.json_schema"))
        else:
            raise bad_request(f"response_format type {rf.type!r} is not supported (text, json_object, "
                              "json_schema are)", param="response_format")
    if body.guided_json is not None:
        found.append(GrammarSpec("json_schema", schema_text(body.guided_json, "guided_json"), param="guided_json"))
    if body.guided_regex is not None:
        found.append(GrammarSpec("regex", body.guided_regex, param="guided_regex"))
    if body.guided_choice is not None:
        found.append(choice_grammar(body.guided_choice))
    if body.guided_grammar is not None:
        found.append(GrammarSpec("ebnf", body.guided_grammar, param="guided_grammar"))
    return _one(found)


def native_grammar(sp: Any) -> GrammarSpec | None:
    """The constraint of SGLang's sampling_params (json_schema, regex, ebnf), unchecked."""
    found = []
    if sp.json_schema is not None:
        found.append(GrammarSpec("json_schema", schema_text(sp.json_schema, "sampling_params.json_schema"),
                                 param="sampling_params.json_schema"))
    if sp.regex is not None:
        found.append(GrammarSpec("regex", sp.regex, param="sampling_params.regex"))
    if sp.ebnf is not None:
        found.append(GrammarSpec("ebnf", sp.ebnf, param="sampling_params.ebnf"))
    return _one(found)
