"""Prompt logprobs in PD: the prefill computed the prompt, the decode did not.

The router waits for the prefill's answer and merges its prompt logprobs into the decode's:
- `/generate` (`return_logprob`): each result's `meta_info.input_*` lists from the prefill are
  prepended to the decode's (which are empty);
- `/v1/completions` with `echo` + `logprobs`: the decode echoes the prompt with null logprobs
  (it has none); each null is filled from the prefill's choice with the same index, position
  by position (token 0 stays null: it has no context).
Works on whole JSON bodies (one result or a batch list) and on SSE streams, event by event
(`SSEMerger` re-frames chunks on blank lines, so an event split across TCP reads is merged
whole; per choice it keeps the position its next tokens start at).
"""

from __future__ import annotations

from typing import Any

import msgspec

_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder()
INPUT_KEYS = ("input_token_logprobs", "input_top_logprobs", "input_token_ids_logprobs")
CHOICE = "_choice_logprobs"  # a completions choice's logprobs block, concatenated over events
_FILLED = ("token_logprobs", "top_logprobs")


def wants_prompt_logprobs(body: dict[str, Any]) -> bool:
    if body.get("return_logprob") is True:
        return True
    return body.get("echo") is True and body.get("logprobs") is not None and "prompt" in body


def _sse_objects(body: bytes) -> list[Any]:
    out = []
    for line in body.split(b"\n"):
        line = line.strip()
        if line.startswith(b"data:"):
            data = line[5:].strip()
            if data and data != b"[DONE]":
                try:
                    out.append(_dec.decode(data))
                except msgspec.DecodeError:
                    pass
    return out


def _add_choices(obj: dict[str, Any], by_index: dict[int, dict[str, Any]]) -> None:
    for ch in obj.get("choices") or []:
        lp = ch.get("logprobs") if isinstance(ch, dict) else None
        if not isinstance(lp, dict):
            continue
        block = by_index.setdefault(int(ch.get("index", 0) or 0), {CHOICE: {k: [] for k in _FILLED}})[CHOICE]
        for key in _FILLED:
            block[key].extend(lp.get(key) or [None] * len(lp.get("tokens") or []))


def prefill_metas(body: bytes, content_type: str | None) -> list[dict[str, Any]]:
    """Per result index: the prefill's meta_info (/generate), or its choice's logprobs block
    (completions; key CHOICE), from a JSON body, a batch list, or SSE events."""
    try:
        if content_type and content_type.startswith("text/event-stream"):
            objs = _sse_objects(body)
        else:
            obj = _dec.decode(body)
            objs = obj if isinstance(obj, list) else [obj]
    except (msgspec.DecodeError, ValueError, TypeError):
        return []
    by_index: dict[int, dict[str, Any]] = {}
    for pos, o in enumerate(objs):
        if not isinstance(o, dict):
            continue
        if isinstance(o.get("choices"), list):
            _add_choices(o, by_index)
        elif isinstance(o.get("meta_info"), dict):  # SSE: the last event per index carries the final meta
            streamed = content_type and content_type.startswith("text/event-stream")
            by_index[int(o.get("index", 0) or 0) if streamed else pos] = o["meta_info"]
    return [by_index[k] for k in sorted(by_index)]


def merge_one(result: Any, meta: dict[str, Any]) -> None:
    if not isinstance(result, dict):
        return
    dmeta = result.get("meta_info")
    if not isinstance(dmeta, dict):
        return
    for key in INPUT_KEYS:
        pre = meta.get(key)
        if isinstance(pre, list) and pre:
            mine = dmeta.get(key)
            dmeta[key] = pre + (mine if isinstance(mine, list) else [])


def merge_choices(obj: dict[str, Any], metas: list[dict[str, Any]], cursor: dict[int, int]) -> None:
    """Fill the decode's null prompt logprobs from the prefill's block at the same positions."""
    for ch in obj.get("choices") or []:
        lp = ch.get("logprobs") if isinstance(ch, dict) else None
        idx = int(ch.get("index", 0) or 0) if isinstance(ch, dict) else 0
        if not isinstance(lp, dict) or not 0 <= idx < len(metas) or CHOICE not in metas[idx]:
            continue
        pre, start = metas[idx][CHOICE], cursor.get(idx, 0)
        for key in _FILLED:
            mine = lp.get(key)
            if not isinstance(mine, list):
                continue
            for k, value in enumerate(mine):
                if value is None and start + k < len(pre[key]):
                    mine[k] = pre[key][start + k]
        cursor[idx] = start + len(lp.get("tokens") or [])


def _merge(obj: Any, metas: list[dict[str, Any]], cursor: dict[int, int], position: int = 0) -> None:
    if not isinstance(obj, dict):
        return
    if isinstance(obj.get("choices"), list):
        merge_choices(obj, metas, cursor)
        return
    idx = int(obj.get("index", position) or 0)
    if 0 <= idx < len(metas):
        merge_one(obj, metas[idx])


def merge_body(body: bytes, metas: list[dict[str, Any]]) -> bytes:
    if not metas:
        return body
    try:
        obj = _dec.decode(body)
    except msgspec.DecodeError:
        return body
    if isinstance(obj, list):
        for result, meta in zip(obj, metas):
            merge_one(result, meta)
    elif isinstance(obj.get("choices") if isinstance(obj, dict) else None, list):
        merge_choices(obj, metas, {})
    else:
        merge_one(obj, metas[0])
    return _enc.encode(obj)


class SSEMerger:
    """Merges prefill metas into each `data:` event of a decode SSE stream."""

    def __init__(self, metas: list[dict[str, Any]]) -> None:
        self.metas = metas
        self.buf = b""
        self.cursor: dict[int, int] = {}

    def _event(self, event: bytes) -> bytes:
        lines = event.split(b"\n")
        for i, line in enumerate(lines):
            if line.startswith(b"data:"):
                data = line[5:].strip()
                if not data or data == b"[DONE]":
                    continue
                try:
                    obj = _dec.decode(data)
                except msgspec.DecodeError:
                    continue
                if isinstance(obj, dict):
                    _merge(obj, self.metas, self.cursor)
                    lines[i] = b"data: " + _enc.encode(obj)
        return b"\n".join(lines)

    def feed(self, chunk: bytes) -> bytes:
        if not self.metas:
            return chunk
        self.buf += chunk.replace(b"\r\n", b"\n")
        events = self.buf.split(b"\n\n")
        self.buf = events.pop()
        return b"".join(self._event(e) + b"\n\n" for e in events)

    def flush(self) -> bytes:
        rest, self.buf = self.buf, b""
        return self._event(rest) if rest else b""
