"""Reading tool calls out of generated text, incrementally: one `ToolStream` per choice.

`feed(text)` takes each new piece of output text and returns events; `finish()` the rest.
Events are `Content(text)` (plain assistant text) and `Call(name, arguments)` (a whole call,
arguments as JSON text); a named tool choice streams `Call(name, "")` then `Arguments(text)`
pieces. A non-streamed response feeds the whole text once, so both shapes come from one path.

    stream       reads                                           used for tool_choice
    ContentOnly  everything is content                            none (or no tools)
    Hermes       content <tool_call>{"name", "arguments"}</tool_call> ...   auto, --tool-call-parser hermes
    Llama3Json   {"name", "parameters"|"arguments"}; ... (all or nothing)  auto, --tool-call-parser llama3_json
    RequiredJson [{"name", "parameters"}, ...] (the grammar forces it)      required
    NamedArgs    the arguments object itself (the grammar forces it)        named
A block a parser cannot read as a call is given back as content, never dropped. SGLang's parser
names (qwen25, llama3) name the same parsers; with no --tool-call-parser, `family_parser` picks
one from the model's chat template and architecture.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True)
class Arguments:
    text: str  # the next piece of the current call's arguments


Event = Content | Call | Arguments


class ToolStream(Protocol):
    def feed(self, text: str) -> list[Event]: ...
    def finish(self) -> list[Event]: ...


def _call(obj: Any, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> Call | None:
    """A call from a decoded {"name": ..., "arguments"/"parameters": {...}} object, else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):  # some models send the arguments as JSON text already
        return Call(obj["name"], args)
    return Call(obj["name"], json.dumps(args, ensure_ascii=False))


def _held(text: str, marker: str) -> int:
    """How many trailing characters of `text` could begin `marker` (held back while streaming)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class ContentOnly:
    def feed(self, text: str) -> list[Event]:
        return [Content(text)] if text else []

    def finish(self) -> list[Event]:
        return []


class Hermes:
    """Hermes / Qwen: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks."""

    START, END = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        self.buf = ""
        self.in_call = False

    def feed(self, text: str) -> list[Event]:
        self.buf += text
        events: list[Event] = []
        while True:
            if not self.in_call:
                at = self.buf.find(self.START)
                if at < 0:
                    keep = _held(self.buf, self.START)
                    out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                    if out:
                        events.append(Content(out))
                    return events
                if at > 0:
                    events.append(Content(self.buf[:at]))
                self.buf, self.in_call = self.buf[at + len(self.START):], True
            else:
                at = self.buf.find(self.END)
                if at < 0:
                    return events
                events.append(self._block(self.buf[:at]))
                self.buf, self.in_call = self.buf[at + len(self.END):], False

    def _block(self, body: str) -> Event:
        try:
            call = _call(json.loads(body))
        except ValueError:
            call = None
        return call or Content(self.START + body + self.END)

    def finish(self) -> list[Event]:
        rest, self.buf = self.buf, ""
        if not self.in_call:
            return [Content(rest)] if rest else []
        self.in_call = False  # the model stopped inside a block: a complete object still counts
        event = self._block(rest)
        return [Content(self.START + rest)] if isinstance(event, Content) else [event]


class Llama3Json:
    """Llama 3 JSON tool calls: the whole output is `{"name", "parameters"}` objects joined by
    `;` (after an optional `<|python_tag|>`); any other output is content."""

    TAG = "<|python_tag|>"

    def __init__(self) -> None:
        self.buf = ""
        self.mode: str | None = None  # None: undecided (only whitespace so far), "call", "content"

    def feed(self, text: str) -> list[Event]:
        if self.mode == "content":
            return [Content(text)] if text else []
        self.buf += text
        head = self.buf.lstrip()
        if not head or (self.TAG.startswith(head) and len(head) < len(self.TAG)):
            return []
        self.mode = "call" if head.startswith(("{", self.TAG)) else "content"
        if self.mode == "content":
            out, self.buf = self.buf, ""
            return [Content(out)]
        return []

    def finish(self) -> list[Event]:
        text, self.buf = self.buf, ""
        if self.mode != "call":
            return [Content(text)] if text else []
        body = text.strip()
        if body.startswith(self.TAG):
            body = body[len(self.TAG):]
        calls, decoder, pos = [], json.JSONDecoder(), 0
        try:
            while pos < len(body):
                obj, end = decoder.raw_decode(body, pos)
                call = _call(obj)
                if call is None:
                    raise ValueError("not a call")
                calls.append(call)
                pos = end
                while pos < len(body) and body[pos] in " \t\r\n;":
                    pos += 1
        except ValueError:
            return [Content(text)]
        return list(calls)


class RequiredJson:
    """`[{"name": ..., "parameters": {...}}, ...]`: each element is a call once it closes."""

    def __init__(self) -> None:
        self.buf = ""
        self.depth = 0
        self.in_str = self.esc = False
        self.start = -1  # where the current element began in buf
        self.pos = 0

    def feed(self, text: str) -> list[Event]:
        self.buf += text
        events: list[Event] = []
        while self.pos < len(self.buf):
            ch = self.buf[self.pos]
            if self.in_str:
                self.esc, self.in_str = (False, True) if self.esc else (ch == "\\", ch != '"')
            elif ch == '"':
                self.in_str = True
            elif ch in "[{":
                self.depth += 1
                if self.depth == 2:
                    self.start = self.pos
            elif ch in "]}":
                self.depth -= 1
                if self.depth == 1 and self.start >= 0:
                    try:
                        call = _call(json.loads(self.buf[self.start:self.pos + 1]), ("parameters", "arguments"))
                    except ValueError:
                        call = None
                    events.append(call or Content(self.buf[self.start:self.pos + 1]))
                    self.start = -1
            self.pos += 1
        return events

    def finish(self) -> list[Event]:
        if self.start >= 0:  # cut off inside an element (max_tokens): show what came
            return [Content(self.buf[self.start:])]
        return []


class NamedArgs:
    """tool_choice names the function: the output is its arguments, streamed as they come."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = False

    def feed(self, text: str) -> list[Event]:
        events: list[Event] = []
        if not self.started:
            self.started = True
            events.append(Call(self.name, ""))
        if text:
            events.append(Arguments(text))
        return events

    def finish(self) -> list[Event]:
        return [] if self.started else [Call(self.name, "")]


PARSERS = {"hermes": Hermes, "qwen25": Hermes, "llama3_json": Llama3Json, "llama3": Llama3Json}  # SGLang's names too


def family_parser(architecture: str, chat_template: str | None) -> str:
    """The parser for a model's own tool-call format when --tool-call-parser is not given: what its
    chat template writes (`<tool_call>`: hermes; Llama 3's headers or python tag: llama3_json;
    ChatML, Hermes' base), else its family (Qwen: hermes; Llama: llama3_json), else hermes."""
    template = chat_template or ""
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "<|start_header_id|>" in template:
        return "llama3_json"
    if "<|im_start|>" in template or architecture.startswith("Qwen"):
        return "hermes"
    return "llama3_json" if architecture.startswith("Llama") and template else "hermes"
