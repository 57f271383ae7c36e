"""Many interleaved requests over a tiny device pool, a tinier host tier and file storage, with
copies really in flight on their threads while the tree changes: every page a request attaches
holds the bytes its tokens were computed into (a token's K/V encodes token and position), and
every tier's accounting holds after every operation, for every write and prefetch policy."""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

import pytest
import torch

from pdserve.engine.kv_tiers.manager import TieredKVManager
from pdserve.engine.kv_tiers.tiers import KVTiers, TierConfig, namespace_for
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams

L, H, D, PS, PAGES = 2, 1, 2, 2, 14


def kv_value(token: int, pos: int) -> float:
    return float(token * 1000 + pos)


class Sim:
    """A scheduler-shaped driver of one TieredKVManager; "computing" writes kv_value into K and V."""

    def __init__(self, tmp: Path, policy: str, prefetch: str, seed: int) -> None:
        self.k = torch.zeros(L, PAGES * PS, H, D)
        self.v = torch.zeros(L, PAGES * PS, H, D)
        cfg = TierConfig(host_pages=5, write_policy=policy, prefetch_policy=prefetch, prefetch_timeout_s=0.0,
                         storage_backend="file", storage_extra=json.dumps({"path": str(tmp)}))
        self.tiers = KVTiers(cfg, self.k, self.v, PS, namespace_for("sim", self.k, PS))
        self.kv = TieredKVManager(PAGES, PS, self.tiers)
        self.rng = random.Random(seed)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.hits = 0

    def new(self, i: int) -> None:
        stem = self.rng.choice([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9, 9], [7, 7, 7, 7], [8, 8], []])
        toks = stem + [self.rng.randrange(10, 16) for _ in range(self.rng.randint(1, 10))]
        self.waiting.append(Request(rid=f"r{i}", prompt_len=len(toks), params=SamplingParams(), tokens=toks))

    def check_bytes(self, r: Request, upto: int) -> None:
        for pos in range(upto):
            slot = r.pages[pos // PS] * PS + pos % PS
            want = kv_value(r.tokens[pos], pos)
            assert torch.all(self.k[:, slot] == want) and torch.all(self.v[:, slot] == -want), (r.rid, pos)

    def admit(self, r: Request) -> None:
        if not self.kv.prepare(r):
            return
        self.kv.attach_prefix(r)
        if not self.kv.ensure_pages(r, len(r.tokens)):
            self.kv.release(r, keep_in_cache=False)
            r.num_computed = 0
            return
        self.check_bytes(r, r.num_computed)  # what the tiers brought back is what was computed
        self.hits += r.num_computed
        self.waiting.remove(r)
        self.running.append(r)

    def compute(self, r: Request) -> None:
        n = min(r.todo, self.rng.randint(1, 5))
        for pos in range(r.num_computed, r.num_computed + n):
            slot = r.pages[pos // PS] * PS + pos % PS
            self.k[:, slot] = kv_value(r.tokens[pos], pos)
            self.v[:, slot] = -kv_value(r.tokens[pos], pos)
        r.num_computed += n
        self.kv.cache_prefix(r)
        if r.todo == 0:
            self.check_bytes(r, r.num_computed)
            self.running.remove(r)
            self.kv.release(r)

    def step(self) -> None:
        self.kv.poll()
        action = self.rng.random()
        if action < 0.35:
            if self.waiting:
                self.admit(self.rng.choice(self.waiting))
        elif action < 0.8:
            if self.running:
                self.compute(self.rng.choice(self.running))
        elif action < 0.82:
            if self.waiting:  # an abort while waiting (maybe with a copy in flight)
                r = self.rng.choice(self.waiting)
                self.waiting.remove(r)
                self.kv.release(r, keep_in_cache=False)
        elif action < 0.9:
            self.kv.flush()
        self.kv.check_integrity(self.running)


@pytest.mark.parametrize("policy,prefetch", [("write_through", "wait_complete"), ("write_through_selective", "timeout"),
                                             ("write_back", "best_effort"), ("write_back", "wait_complete")])
def test_interleaved_requests_keep_bytes_and_accounting(tmp_path: Path, policy: str, prefetch: str) -> None:
    sim = Sim(tmp_path, policy, prefetch, seed=zlib.crc32((policy + prefetch).encode()))
    for i in range(150):
        sim.new(i)
        for _ in range(10):
            sim.step()
    while sim.waiting or sim.running:
        for r in list(sim.waiting):
            sim.waiting.remove(r)
            sim.kv.release(r, keep_in_cache=False)
        for r in list(sim.running):
            sim.running.remove(r)
            sim.kv.release(r)
    sim.kv.flush()
    sim.kv.check_integrity([])
    c = sim.tiers.counters
    assert sim.hits > 0 and c.demoted > 0 and c.loaded > 0 and c.host_evicted > 0, c
    assert sim.kv.cache.reset() and sim.kv.cache.num_pages == 0 and sim.tiers.host.allocator.num_free == 5
    sim.kv.close()
