"""Engine options behind the new flags: --tokenizer, --chat-template, the warm-up request, and
the stats the engine keeps (tiny model, in this process). The pool's size and dtype from the
device: test_device_defaults.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve import LLM, SamplingParams
from pdserve.engine.stats import EngineStats
from pdserve.model.tokenizer import Tokenizer

TEMPLATE = "{% for m in messages %}<<{{ m['role'] }}:{{ m['content'] }}>>{% endfor %}"


def test_chat_template_override(bundled_model_dir: Path) -> None:
    tok = Tokenizer(bundled_model_dir, TEMPLATE)
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == "<<user:hi>>"
    assert Tokenizer(bundled_model_dir).render_chat([{"role": "user", "content": "hi"}]) != "<<user:hi>>"


def test_tokenizer_folder_and_template_reach_the_engine(tiny_model_dir: Path, bundled_model_dir: Path) -> None:
    llm = LLM(str(tiny_model_dir), num_pages=64, page_size=4, threads=1, tokenizer=str(bundled_model_dir),
              chat_template=TEMPLATE)
    assert llm.engine.tokenizer_path == bundled_model_dir
    assert llm.tokenizer.render_chat([{"role": "user", "content": "x"}]) == "<<user:x>>"


def test_warm_up_leaves_nothing_behind(tiny_model_dir: Path) -> None:
    llm = LLM(str(tiny_model_dir), num_pages=64, page_size=4, threads=1)
    engine = llm.engine
    ref = llm.generate(["hello there"], SamplingParams(max_new_tokens=6, temperature=0), use_tqdm=False)[0]
    engine.kv.cache.reset()
    assert engine.warm_up() > 0
    load = engine.load()
    assert load.free_pages == load.num_pages and load.cached_pages == 0 and not engine.has_work()
    assert load.cache_queries == 0 and engine.stats.gen_tokens == 0  # its tokens are not counted
    again = llm.generate(["hello there"], SamplingParams(max_new_tokens=6, temperature=0), use_tqdm=False)[0]
    assert again.output_ids == ref.output_ids


def test_stats_window_and_line() -> None:
    now = [0.0]
    stats = EngineStats(2.0, clock=lambda: now[0])
    stats.on_forward(100, 0)
    stats.on_finish(100, 40)
    now[0] = 1.0
    assert stats.maybe_log(1, 0, 64, 640, 0) is None  # not due yet
    stats.on_forward(0, 10)
    for _ in range(4):  # four steps of 50 ms, 40 of them in forward+sample
        stats.on_forward_time(0.04)
        stats.on_busy(0.05)
    now[0] = 2.0
    line = stats.maybe_log(1, 2, 64, 640, 3)
    assert line is not None
    for part in ("running 1 reqs", "queued 2 reqs", "KV 10.0% (64/640 tokens)", "prompt 50.0 tok/s",
                 "gen 5.0 tok/s", "prefix cache hit 40.0%", "preemptions 3", "steps 4 of 50.0 ms",
                 "forward+sample 80.0% of busy"):
        assert part in line, (part, line)
    assert stats.gen_throughput == pytest.approx(5.0) and stats.cache_hit_rate == pytest.approx(0.4)
    now[0] = 4.5
    assert stats.maybe_log(0, 0, 0, 640, 3) is None  # an idle window logs nothing
    assert stats.gen_tokens == 10 and stats.prompt_tokens == 100  # cumulative counts stay


def test_dtype_choices_match_the_loader() -> None:
    from pdserve.engine.config import DTYPE_CHOICES
    from pdserve.model.loader import DTYPES

    assert set(DTYPE_CHOICES) == set(DTYPES) | {"auto"}  # auto: engine/memory.py picks one of them
