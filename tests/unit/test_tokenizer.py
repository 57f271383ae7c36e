"""Tokenizer wrapper, chat template, eos ids and the incremental detokenizer."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from pdserve.engine.stop_strings import cut_at_stop as truncate_at_stop
from pdserve.model.tokenizer import IncrementalDetokenizer, Tokenizer

MULTILINGUAL = [
    "Héllo wörld, ça va? Ünïcödé ñ",
    "你好，世界！今天天气很好。",
    "Emoji: 🤖🚀👍🏽 and 👨‍👩‍👧‍👦 family",
    "Ελληνικά и русский текст, עברית, العربية",
    "Math: ∀x∈ℝ, x² ≥ 0 → √x; code: `print('hi')`\n\tindented",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
]


@pytest.fixture(scope="module")
def tok(bundled_model_dir: Path) -> Tokenizer:
    return Tokenizer(bundled_model_dir)


def stream(tok: Tokenizer, ids: list[int], rng: random.Random, prompt: list[int] | None = None,
           skip_special_tokens: bool = True) -> tuple[str, list[str]]:
    """Feed ``ids`` in random chunks of 1-3; return the joined text and the deltas."""
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt, skip_special_tokens=skip_special_tokens)
    deltas: list[str] = []
    i = 0
    while i < len(ids):
        n = rng.randint(1, 3)
        deltas.append(detok.add(ids[i:i + n]))
        i += n
    deltas.append(detok.flush())
    assert detok.output_ids == ids
    assert detok.text == "".join(deltas)
    return "".join(deltas), deltas


def test_basic_properties(tok: Tokenizer) -> None:
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1  # <|im_start|>
    assert 2 in tok.eos_token_ids  # <|im_end|>
    assert isinstance(tok.eos_token_ids, frozenset)
    assert tok.decode([2], skip_special_tokens=False) == "<|im_end|>"
    assert tok.decode([2]) == ""


def test_encode_decode_roundtrip(tok: Tokenizer) -> None:
    for text in MULTILINGUAL[:-1]:
        ids = tok.encode(text)
        assert ids and all(isinstance(i, int) for i in ids)
        assert tok.decode(ids) == text
    # SmolLM2 adds no BOS: add_special_tokens changes nothing for plain text.
    assert tok.encode("Hello world") == tok.encode("Hello world", add_special_tokens=False)
    ids = tok.encode(MULTILINGUAL[-1])
    assert ids[0] == 1 and 2 in ids  # special tokens in text are recognised
    assert tok.decode(ids, skip_special_tokens=False) == MULTILINGUAL[-1]


def test_incremental_equals_full_decode_random_ids(tok: Tokenizer) -> None:
    rng = random.Random(1234)
    for _ in range(150):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))]
        for skip in (True, False):
            text, _ = stream(tok, ids, rng, skip_special_tokens=skip)
            assert text == tok.decode(ids, skip_special_tokens=skip), ids


def test_incremental_equals_full_decode_multibyte(tok: Tokenizer) -> None:
    rng = random.Random(99)
    for _ in range(40):
        pieces = rng.sample(MULTILINGUAL, k=rng.randint(1, len(MULTILINGUAL)))
        ids = tok.encode(" ".join(pieces))
        # Random ids in between mix valid multi-byte text with arbitrary byte tokens.
        if rng.random() < 0.5:
            pos = rng.randrange(len(ids) + 1)
            ids[pos:pos] = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 5))]
        prompt = tok.encode(rng.choice(MULTILINGUAL)) if rng.random() < 0.5 else None
        for skip in (True, False):
            text, _ = stream(tok, ids, rng, prompt=prompt, skip_special_tokens=skip)
            assert text == tok.decode(ids, skip_special_tokens=skip)


def test_valid_text_never_streams_replacement_chars(tok: Tokenizer) -> None:
    text = "🤖🚀👍🏽 你好 👨‍👩‍👧‍👦"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # emoji/CJK characters span several byte-level tokens
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add([i]) for i in ids]
    assert "" in deltas  # incomplete characters were held back
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == text


def test_flush_returns_incomplete_tail(tok: Tokenizer) -> None:
    ids = tok.encode("🤖")
    detok = IncrementalDetokenizer(tok)
    assert detok.add(ids[:-1]) == ""
    assert detok.flush() == tok.decode(ids[:-1])  # replacement chars, like a full decode
    assert detok.flush() == ""


def test_chat_template(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "What is 2+2?"}]
    ids = tok.apply_chat_template(messages)
    assert ids and ids[0] == 1  # starts with <|im_start|> (the template adds a system turn)
    text = tok.decode(ids, skip_special_tokens=False)
    assert text == tok.render_chat(messages)
    assert "What is 2+2?" in text
    assert text.endswith("<|im_start|>assistant\n")
    no_prompt = tok.decode(tok.apply_chat_template(messages, add_generation_prompt=False),
                           skip_special_tokens=False)
    assert not no_prompt.endswith("assistant\n")
    expected = tok.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ids == tok.encode(expected, add_special_tokens=False)


def test_no_chat_template_raises(bundled_model_dir: Path, tmp_path: Path) -> None:
    for name in ("tokenizer.json", "generation_config.json"):
        shutil.copy(bundled_model_dir / name, tmp_path / name)
    config = json.loads((bundled_model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer(tmp_path)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.eos_token_ids == frozenset({2})


def test_truncate_at_stop() -> None:
    assert truncate_at_stop("hello world. bye", ".") == "hello world"
    assert truncate_at_stop("hello", "xyz") == "hello"
    assert truncate_at_stop("hello", "") == "hello"
    assert truncate_at_stop("a STOP b STOP", "STOP") == "a "
