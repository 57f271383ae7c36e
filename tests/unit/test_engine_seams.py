"""The engine runs the parts its builder gives it, and the seams features plug into are called where
the step says: the speculator around the forward, the KV tier under the prefix cache, accept_token
for every output token; the engine loop's rounds decide its naps (tiny model, in this process)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from pdserve.engine.accept import accept_token
from pdserve.engine.batch import Row, ScheduleBatch
from pdserve.engine.build import build_parts
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import Engine
from pdserve.engine.messages import GenerateReq, TopLogprob
from pdserve.engine.prefix_cache import Node, NoTier
from pdserve.engine.process import DPAttentionRound, SoloRound, Wait
from pdserve.engine.request import Request
from pdserve.engine.sampler import SampleResult, SampleRow
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.speculate import Accept, NoSpeculation
from pdserve.engine.stop import StopChecker
from pdserve.model.tokenizer import Tokenizer
from pdserve.parallel.dp_attention import RoundView


class CountingSpeculator(NoSpeculation):
    def __init__(self) -> None:
        self.proposed = 0  # forwards
        self.verified = 0  # sampled rows

    def propose(self, batch: ScheduleBatch) -> ScheduleBatch:
        self.proposed += 1
        return batch

    def verify(self, rows: list[Row], logits: torch.Tensor, sample_rows: list[SampleRow], result: SampleResult,
               accept: Accept) -> None:
        self.verified += len(rows)
        super().verify(rows, logits, sample_rows, result, accept)


class RecordingTier(NoTier):
    def __init__(self) -> None:
        self.promoted = 0  # matches offered
        self.demoted = 0  # pages evicted

    def promote(self, tokens: list[int], pages: list[int], node: Node) -> tuple[list[int], Node]:
        self.promoted += 1
        return pages, node

    def demote(self, nodes: list[Node]) -> None:
        self.demoted += len(nodes)


def _run(engine: Engine, prompts: list[list[int]], n: int) -> dict[str, list[int]]:
    params = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(GenerateReq(f"r{i}", p, params))
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_work():
        for o in engine.step():
            out[o.rid].extend(o.token_ids)
    engine.check_integrity()
    return out


def test_engine_runs_the_parts_it_is_given(tiny_model_dir: Path) -> None:
    cfg = EngineConfig(model=str(tiny_model_dir), num_pages=24, page_size=4, chunk_budget=64, threads=1)
    prompts = [[(7 * i + j) % 500 + 3 for j in range(20 + i)] for i in range(3)]
    ref = _run(Engine.build(cfg), prompts, 6)
    parts = build_parts(cfg)
    spec, tier = CountingSpeculator(), RecordingTier()
    parts.kv.cache.tier = tier
    engine = Engine(dataclasses.replace(parts, speculator=spec))
    assert _run(engine, prompts, 6) == ref  # the default seams are plain decoding
    assert spec.proposed == engine.stats.steps > 0  # once per forward
    assert spec.verified == sum(len(v) for v in ref.values())  # every sampled row, each a token
    assert tier.promoted >= len(prompts)  # every admission's prefix match
    _run(engine, [[(11 * j) % 400 + 5 for j in range(60)]], 4)  # 23 usable pages: the cache must give some up
    assert tier.demoted > 0


def test_accept_token_is_the_one_path(bundled_model_dir: Path) -> None:
    stops = StopChecker(Tokenizer(bundled_model_dir), frozenset({2}), max_model_len=100)
    r = Request("a", 2, SamplingParams(max_new_tokens=3, stop_token_ids=(9,)), tokens=[5, 6])
    assert not accept_token(r, 7, -0.5, [TopLogprob(7, -0.5)], stops)
    assert not accept_token(r, 8, None, None, stops)  # what is not given is not kept
    assert (r.output_ids, r.new_ids, r.new_logprobs, r.new_top) == ([7, 8], [7, 8], [-0.5], [[TopLogprob(7, -0.5)]])
    assert accept_token(r, 9, None, None, stops) and (r.finish_reason, r.matched_stop) == ("stop", 9)


class _Transfers:
    def __init__(self, waiting: bool) -> None:
        self.waiting = waiting

    def is_waiting_on_transfers(self) -> bool:
        return self.waiting


class _Rank:
    def __init__(self, tokens: tuple[int, ...], busy: tuple[bool, ...]) -> None:
        self.view = RoundView(tokens, busy, (0,) * len(tokens))
        self.idle_rounds = 0

    def finish_round(self, busy: bool) -> RoundView:
        self.idle_rounds += 1
        return self.view


def test_rounds_decide_the_naps() -> None:
    solo = SoloRound(_Transfers(False))  # type: ignore[arg-type]
    assert solo.wait(busy=False, stalled=True) is Wait.SLEEP  # idle: sleep on the inbox, watch the parent
    assert solo.wait(busy=True, stalled=False) is Wait.GO
    assert solo.wait(busy=True, stalled=True) is Wait.NAP  # no progress: don't spin
    assert SoloRound(_Transfers(True)).wait(busy=True, stalled=False) is Wait.NAP  # only KV moving  # type: ignore[arg-type]
    rank = _Rank((0, 0), (False, False))
    dp = DPAttentionRound(rank)  # type: ignore[arg-type]
    dp.idle()
    assert rank.idle_rounds == 1  # an idle iteration is still one round with the others
    assert dp.wait(busy=False, stalled=True) is Wait.SLEEP  # no rank busy: all sleep
    rank.view = RoundView((0, 5), (False, True), (0, 0))
    assert dp.wait(busy=False, stalled=True) is Wait.GO  # another rank forwards: go round again
    rank.view = RoundView((0, 0), (False, True), (0, 0))
    assert dp.wait(busy=False, stalled=True) is Wait.NAP  # busy but nobody forwards: KV in transit
    assert dp.wait(busy=True, stalled=False) is Wait.GO
