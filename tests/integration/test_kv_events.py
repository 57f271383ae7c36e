"""KV events end to end (issue 15): real PD servers on the tiny model publishing events, an
in-process router keeping the exact index and deciding per request (conditional PD).

One module, one prefill + decode pair and two unified servers (small pools: 96 pages of 4
tokens, so churn evicts on both sides), shared by four tests:
  - a regular cache_aware router over the two unified servers routes a prompt to the one that
    cached it behind the router's back (known only from its events);
  - multi-turn chats (2 conversations x 4 turns, shared system prompt) through the router with
    cache_aware + conditional PD equal a unified server's greedy answers, turn by turn;
  - conditional decisions follow `--pd-local-prefill-threshold` exactly (uncached = T goes to
    the decode alone, T + 1 is prefilled remotely), also when the decode's cache grows between
    turns and after it is flushed;
  - after churn with evictions on both sides the router's index equals each server's cache
    (`/kv_events/snapshot` is the debug dump), events published while the router was down are
    recovered by the new router's resync, and a restarted decode (new port, seq from 1) is
    followed again.
Every test ends with both PD pools back at their start marks.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pdserve.kv_events import chain_hashes
from pdserve.router.config import HealthConfig, PolicyConfig, RouterConfig, WorkerSpec
from pdserve.router.server import EmbeddedRouter
from tests.integration.conftest import ServerProcess
from tests.integration.pd_cluster import PDPair, get_load, wait_for

PAGE = 4
THRESHOLD = 12
MAX_NEW = 4


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[tuple[PDPair, ServerProcess]]:
    tmp = tmp_path_factory.mktemp("kv-events")
    args = ["--model", str(tiny_model_dir), "--threads", "1", "--num-pages", "96", "--page-size", str(PAGE),
            "--chunk-budget", "32", "--max-model-len", "360", "--seed", "0", "--kv-events-config", "{}"]
    pair = PDPair(tmp, "tcp", args)
    unified = [ServerProcess(args, tmp / f"unified-{i}.log") for i in range(2)]
    try:
        pair.start()
        for u in unified:
            u.wait_healthy()
        yield pair, unified
    except BaseException:
        print(pair.logs(), *(u.log_tail(40) for u in unified))
        raise
    finally:
        for u in unified:
            u.stop(timeout=15)
        pair.stop()


def start_router(pair: PDPair, threshold: int | None = THRESHOLD) -> EmbeddedRouter:
    cfg = RouterConfig(port=0, pd=True, policy=PolicyConfig("cache_aware"), pd_local_prefill_threshold=threshold,
                       workers=(WorkerSpec(pair.prefill.url, "prefill", pair.bootstrap_port),  # type: ignore[union-attr]
                                WorkerSpec(pair.decode.url, "decode")),  # type: ignore[union-attr]
                       health=HealthConfig(interval_s=0.3, timeout_s=5.0))
    router = EmbeddedRouter(cfg).start()
    wait_for(lambda: all(index_matches(router, url) for url in pair.urls), 20, "the router's index to sync")
    return router


def snapshot(url: str) -> dict[str, Any]:
    r = httpx.get(url + "/kv_events/snapshot", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def index_matches(router: EmbeddedRouter, url: str) -> bool:
    snap = snapshot(url)
    idx = httpx.get(router.url + "/kv_index", timeout=10).json().get(url)
    return (idx is not None and idx["synced"] and idx["seq"] == snap["seq"]
            and set(idx["block_hashes"]) == {b[0] for b in snap["blocks"]})


def decisions(router: EmbeddedRouter) -> dict[str, float]:
    text = httpx.get(router.url + "/metrics", timeout=10).text
    return {m[1]: float(m[2]) for m in re.finditer(r'router_pd_decisions_total\{decision="(\w+)"\} ([\d.]+)', text)}


def fresh(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(300, 40000) for _ in range(n)]


def generate(url: str, ids: list[int]) -> list[int]:
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}}
    r = httpx.post(url + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["output_ids"]


def settled(pair: PDPair) -> None:
    pair.settled()


def test_cache_aware_routes_by_the_exact_index(servers: tuple[PDPair, list[ServerProcess]]) -> None:
    """Two unified workers behind a regular cache_aware router: a prompt cached on one of them
    behind the router's back (its text tree never saw it) is routed there, from the events."""
    _, unified = servers
    rng = random.Random(3)
    cfg = RouterConfig(port=0, policy=PolicyConfig("cache_aware"), workers=tuple(WorkerSpec(u.url) for u in unified),
                       health=HealthConfig(interval_s=0.3, timeout_s=5.0))
    with EmbeddedRouter(cfg) as router:
        for target in (unified[1], unified[0], unified[1]):
            prompt = fresh(rng, 40)
            generate(target.url, prompt)  # straight to the worker
            wait_for(lambda: index_matches(router, target.url), 20, "the index to see the worker's new pages")
            body = {"input_ids": prompt + fresh(rng, 6), "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
            r = httpx.post(router.url + "/generate", json=body, timeout=60)
            assert r.status_code == 200 and r.json()["meta_info"]["cached_tokens"] == 40, r.text
    for u in unified:
        assert get_load(u.url)["used_pages"] == 0


def test_multi_turn_chat_through_router_equals_unified(servers: tuple[PDPair, list[ServerProcess]]) -> None:
    pair, (unified, _) = servers
    system = {"role": "system", "content": "You are a terse assistant. " + " ".join(f"rule {i}." for i in range(12))}
    questions = [["Name a colour.", "And another?", "Which is darker?", "Why?"],
                 ["Count to three.", "Now backwards.", "Add one.", "Thanks."]]
    router = start_router(pair, threshold=24)
    try:
        for conv in questions:
            via_router: list[dict[str, str]] = [system]
            via_unified: list[dict[str, str]] = [system]
            for q in conv:
                answers = []
                for url, msgs in ((router.url, via_router), (unified.url, via_unified)):
                    msgs.append({"role": "user", "content": q})
                    body = {"messages": msgs, "max_tokens": 6, "temperature": 0}
                    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
                    assert r.status_code == 200, r.text
                    answers.append(r.json()["choices"][0]["message"]["content"])
                    msgs.append({"role": "assistant", "content": answers[-1]})
                assert answers[0] == answers[1], (q, answers)
        seen = decisions(router)
        print("multi-turn decisions:", seen)
        assert seen.get("remote", 0) >= 1 and seen.get("local_threshold", 0) >= 1, seen
    finally:
        router.stop()
    settled(pair)


def _uncached(ids: list[int], snap: dict[str, Any]) -> int:
    held = {b[0] for b in snap["blocks"]}
    hit = 0
    for h in chain_hashes(ids, PAGE):
        if h not in held:
            break
        hit += 1
    return len(ids) - hit * PAGE


def _craft(base: list[int], uncached: int, decode_url: str, rng: random.Random) -> list[int]:
    """`base` + fresh tokens such that exactly `uncached` tokens are not in the decode's cache."""
    tail = fresh(rng, 200)
    snap = snapshot(decode_url)
    for k in range(1, len(tail)):
        if _uncached(base + tail[:k], snap) == uncached:
            return base + tail[:k]
    raise AssertionError(f"cannot make {uncached} uncached tokens on top of {len(base)}")


def test_conditional_decisions_follow_the_threshold_exactly(servers: tuple[PDPair, list[ServerProcess]]) -> None:
    pair, _ = servers
    rng = random.Random(7)
    decode = pair.decode.url  # type: ignore[union-attr]
    assert httpx.post(decode + "/flush_cache", timeout=10).status_code == 200
    router = start_router(pair)
    try:
        def expect(ids: list[int], decision: str) -> list[int]:
            wait_for(lambda: index_matches(router, decode), 10, "the decode's index to catch up")
            before = decisions(router).get(decision, 0)
            out = generate(router.url, ids)
            assert decisions(router).get(decision, 0) == before + 1, (len(ids), decision, decisions(router))
            return out

        first = fresh(rng, THRESHOLD)
        out = expect(first, "local_threshold")  # nothing cached: T uncached tokens
        expect(fresh(rng, THRESHOLD + 1), "remote")  # one over
        # the decode prefilled `first` itself: the next turn's cached part is on the decode
        turn2 = _craft(first + out, THRESHOLD, decode, rng)
        assert len(turn2) > THRESHOLD + PAGE
        out2 = expect(turn2, "local_threshold")
        turn3_over = _craft(turn2 + out2, THRESHOLD + 1, decode, rng)
        expect(turn3_over, "remote")
        turn3 = _craft(turn2 + out2, THRESHOLD, decode, rng)
        expect(turn3, "local_threshold")
        # the decode's cache is flushed between turns: the same prompt is now all uncached
        assert httpx.post(decode + "/flush_cache", timeout=10).status_code == 200
        expect(turn3, "remote")
    finally:
        router.stop()
    settled(pair)


def test_index_equals_caches_after_churn_and_resyncs_after_restart(servers: tuple[PDPair, list[ServerProcess]]) -> None:
    pair, _ = servers
    rng = random.Random(11)
    router = start_router(pair)
    shared = fresh(rng, 40)
    try:
        first = shared + fresh(rng, 30)
        generate(router.url, first)
        for _ in range(10):  # 70-130 tokens each, 96 pages of 4 in each pool: evictions on both sides
            generate(router.url, (shared if rng.random() < 0.5 else []) + fresh(rng, rng.randrange(70, 130)))
        held = {url: {b[0] for b in snapshot(url)["blocks"]} for url in pair.urls}
        gone = chain_hashes(first, PAGE)[-1]
        assert all(gone not in h for h in held.values()), "no eviction happened on one side"
        for url in pair.urls:
            wait_for(lambda: index_matches(router, url), 10, f"the router's index of {url} to equal its cache")
    finally:
        router.stop()
    # events while no router listens: they are lost to it, the next router resyncs from snapshots
    seqs = {url: snapshot(url)["seq"] for url in pair.urls}
    for _ in range(3):
        res = pair.request("/generate", {"input_ids": fresh(rng, 60),
                                         "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0}})
        assert res.prefill.ok and res.decode.ok, (res.prefill.describe(), res.decode.describe())
    assert all(snapshot(url)["seq"] > seqs[url] for url in pair.urls)
    t0 = time.monotonic()
    router = start_router(pair)
    print(f"new router synced in {time.monotonic() - t0:.2f} s")
    try:
        ids = shared + fresh(rng, 20)
        # the router's cost per request for ids (router/prompt_ids.py): one /tokenize on a kept-alive connection
        chat = {"messages": [{"role": "system", "content": " ".join(["lantern river"] * 120)},
                             {"role": "user", "content": "a short question?"}]}
        with httpx.Client(timeout=10) as client:
            first = client.post(pair.decode.url + "/tokenize", json=chat)  # type: ignore[union-attr]
            assert first.status_code == 200, first.text
            n_tok = first.json()["count"]
            t1 = time.perf_counter()
            for _ in range(10):
                assert client.post(pair.decode.url + "/tokenize", json=chat).status_code == 200  # type: ignore[union-attr]
        print(f"/tokenize of a {n_tok}-token chat: {100 * (time.perf_counter() - t1):.1f} ms per call")
        generate(router.url, ids)
        for url in pair.urls:
            wait_for(lambda: index_matches(router, url), 10, f"the index of {url} after more traffic")
        # a decode restart: its seq begins again on a new port; the router notices the silence,
        # re-reads /server_info, resubscribes and resyncs
        old = httpx.get(pair.decode.url + "/server_info").json()["kv_events_endpoint"]  # type: ignore[union-attr]
        port = pair.decode.port  # type: ignore[union-attr]
        pair.kill_decode()
        pair.launch_decode(port=port).wait_healthy()
        pair.mark("decode")
        assert httpx.get(pair.decode.url + "/server_info").json()["kv_events_endpoint"] != old  # type: ignore[union-attr]
        wait_for(lambda: all(w["healthy"] and w["circuit"] != "open"
                             for w in httpx.get(router.url + "/workers").json()["workers"]), 20,
                 "the router to take the restarted decode back")
        generate(router.url, shared + fresh(rng, 30))
        wait_for(lambda: index_matches(router, pair.decode.url), 30, "the index of the restarted decode")  # type: ignore[union-attr]
    finally:
        router.stop()
    assert get_load(pair.decode.url)["integrity_errors"] == 0  # type: ignore[union-attr]
    settled(pair)
