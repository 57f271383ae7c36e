"""PD: put the prefill's input (prompt) logprobs in front of the decode's, when asked.

The prefill computed the prompt; the decode did not, so a `/generate` with
`return_logprob: true` gets its `meta_info.input_*` lists from the prefill's answer,
prepended to whatever the decode sent. Works on whole JSON bodies (one result or a batch
list) and on SSE streams, event by event (`SSEMerger` re-frames chunks on blank lines, so an
event split across TCP reads is merged whole).
"""

from __future__ import annotations

from typing import Any

import msgspec

INPUT_KEYS = ("input_token_logprobs", "input_top_logprobs", "input_token_ids_logprobs")
_dec = msgspec.json.Decoder()
_enc = msgspec.json.Encoder()


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


def prefill_metas(body: bytes, content_type: str | None) -> list[dict[str, Any]]:
    """meta_info of each result in the prefill's answer (JSON, batch list, or SSE events)."""
    try:
        if content_type and content_type.startswith("text/event-stream"):
            objs = _sse_objects(body)
            by_index: dict[int, dict[str, Any]] = {}
            for o in objs:  # the last event per index carries the final meta_info
                if isinstance(o, dict) and isinstance(o.get("meta_info"), dict):
                    by_index[int(o.get("index", 0) or 0)] = o["meta_info"]
            return [by_index[k] for k in sorted(by_index)]
        obj = _dec.decode(body)
    except (msgspec.DecodeError, ValueError, TypeError):
        return []
    items = obj if isinstance(obj, list) else [obj]
    return [i["meta_info"] for i in items if isinstance(i, dict) and isinstance(i.get("meta_info"), dict)]


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
    else:
        merge_one(obj, metas[0])
    return _enc.encode(obj)


class SSEMerger:
    """Merges prefill metas into each `data:` event of a decode SSE stream."""

    def __init__(self, metas: list[dict[str, Any]]) -> None:
        self.metas = metas
        self.buf = b""

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
                    idx = int(obj.get("index", 0) or 0)
                    if 0 <= idx < len(self.metas):
                        merge_one(obj, self.metas[idx])
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
