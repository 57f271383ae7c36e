"""Tokenizer wrapper, chat template and streaming detokenizer.

:class:`Tokenizer` wraps the transformers fast tokenizer saved in a Hugging Face model folder
(see :func:`pdserve.model.bundled.resolve_model`). The chat template comes from the model or
from the operator (``--chat-template``); none is ever hand-written here.

:class:`IncrementalDetokenizer` turns a growing list of token ids into text deltas with vLLM's
prefix_offset / read_offset algorithm: each step decodes only a short window of recent ids,
emits the text past the already-emitted part of the window, and holds back text that ends in
an incomplete UTF-8 sequence (decoded as U+FFFD) until the next tokens complete it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

# vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET: prompt tokens kept as decoding context.
_PROMPT_CONTEXT = 5
_REPLACEMENT = "\ufffd"


def _as_id_set(value: Any) -> set[int]:
    """An int, a list of ints or None as a set of ints."""
    if value is None:
        return set()
    if isinstance(value, (list, tuple, set, frozenset)):
        return {int(v) for v in value}
    return {int(value)}


class Tokenizer:
    """A transformers fast tokenizer loaded from an HF model folder.

    ``decode`` uses the Rust tokenizer directly without transformers' clean-up of spaces
    before punctuation, so full and incremental decoding give the same text.
    """

    def __init__(self, model_dir: str | os.PathLike[str], chat_template: str | None = None) -> None:
        from transformers import AutoTokenizer

        self.model_dir = Path(model_dir)
        hf = AutoTokenizer.from_pretrained(str(self.model_dir))
        if not getattr(hf, "is_fast", False) or getattr(hf, "backend_tokenizer", None) is None:
            raise ValueError(f"{self.model_dir} has no fast tokenizer (tokenizer.json is needed)")
        if chat_template is not None:  # --chat-template: replaces the tokenizer's own
            hf.chat_template = chat_template
        self.hf = hf
        self._backend = hf.backend_tokenizer
        self.bos_token_id: int | None = hf.bos_token_id
        self.vocab_size: int = len(hf)
        self.all_special_ids: frozenset[int] = frozenset(int(i) for i in hf.all_special_ids)
        eos = _as_id_set(hf.eos_token_id)
        generation_config = self.model_dir / "generation_config.json"
        if generation_config.is_file():
            eos |= _as_id_set(json.loads(generation_config.read_text(encoding="utf-8")).get("eos_token_id"))
        self.eos_token_ids: frozenset[int] = frozenset(eos)

    @property
    def chat_template(self) -> str | None:
        """The model's chat template (Jinja source), or None when it has none."""
        template = getattr(self.hf, "chat_template", None)
        return template or None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds BOS/EOS where the model does."""
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped unless ``skip_special_tokens`` is False."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **template_kwargs: Any) -> str:
        """The prompt text the model's chat template makes of ``messages``."""
        if self.chat_template is None:
            raise ValueError(f"the model at {self.model_dir} has no chat template; "
                             "send a plain completion prompt instead of chat messages")
        text = self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs
        )
        if not isinstance(text, str):
            raise ValueError("the chat template did not render to text")
        return text

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **template_kwargs: Any) -> list[int]:
        """Token ids of the chat prompt (the template already holds any special tokens)."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **template_kwargs)
        return self.encode(text, add_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_dir)!r}, vocab_size={self.vocab_size})"


class IncrementalDetokenizer:
    """Streams text for generated token ids, one batch of ids at a time.

    ``prompt_ids`` (optional) give the decoder the last few prompt tokens as context, so the
    first generated token gets its leading space right on SentencePiece-style tokenizers;
    prompt text itself is never emitted. ``"".join(add(...) for ...) + flush()`` equals
    ``tokenizer.decode(generated_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None,
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = [int(i) for i in (prompt_ids or [])][-_PROMPT_CONTEXT:]
        self.ids: list[int] = context
        self._num_context = len(context)
        self.prefix_offset = 0
        self.read_offset = len(context)
        self._text_parts: list[str] = []

    @property
    def output_ids(self) -> list[int]:
        """The generated ids seen so far (without the prompt context)."""
        return self.ids[self._num_context:]

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._text_parts)

    def _window_delta(self) -> tuple[str, str]:
        """(text of ids[prefix_offset:read_offset], text of ids[prefix_offset:])."""
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        new_text = decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        return prefix_text, new_text

    def add(self, token_ids: Iterable[int]) -> str:
        """Append ``token_ids`` and return the newly stable text (may be empty)."""
        added = [int(i) for i in token_ids]
        if not added:
            return ""
        self.ids.extend(added)
        prefix_text, new_text = self._window_delta()
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            # Nothing visible yet, or an incomplete UTF-8 sequence: wait for more tokens.
            return ""
        delta = new_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self._text_parts.append(delta)
        return delta

    def flush(self) -> str:
        """Return any held-back text (incomplete characters decode as U+FFFD) and reset offsets."""
        if self.read_offset >= len(self.ids):
            return ""
        prefix_text, new_text = self._window_delta()
        delta = new_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        if delta:
            self._text_parts.append(delta)
        return delta

