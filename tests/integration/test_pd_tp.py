"""PD with tensor parallelism on either side, of equal or different sizes (heterogeneous TP):
greedy output equals the unified tp-1 engine token for token, logprobs within 1e-4, on every
backend; pools back at their marks afterwards.

Engine level (prefill and decode Engines in this process; their other ranks are processes):
(2, 1) and (1, 2) on tcp, shm and nixl, (2, 1) on mooncake. Server level (each server its own
process tree; one process can hold one tp group): (2, 2) on tcp, shm and nixl. The tiny model has
2 KV heads, so (1, 2) splits each page's heads over the decode ranks and (2, 1) merges two
prefill ranks' heads into one decode pool. The bytes each rank receives are checked exactly in
test_transfer_tp_links.py; the bundled model's (1, 3) / (3, 1) in tests/e2e/test_tp_bundled.py.

Faults: kill -9 one follower rank of a tp-2 server while a long prompt's KV is moving. A dead
decode rank: the decode's request ends with a clean error, the prefill's pool returns to idle,
the decode server exits non-zero and a router in front ejects it. A dead prefill rank: the
decode's request ends with a clean error (policy error) and its reserved pages return.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from pdserve.disagg.config import DisaggConfig
from pdserve.engine.engine import Engine
from pdserve.engine.messages import GenerateReq, TokenOut
from pdserve.router.config import HealthConfig, PolicyConfig, RouterConfig, WorkerSpec
from pdserve.router.server import EmbeddedRouter
from tests.integration.conftest import tp_ranks
from tests.integration.pd_cluster import PDPair, clean_error, get_load, healthy, wait_for, wait_settled
from tests.integration.test_pd_server_faults import _in_background
from tests.integration.test_pd_engines import PARAMS, engine_cfg, prompts, run_pd, run_until_done, tokens

PROMPTS = prompts(6, seed=21)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> dict[int, list[TokenOut]]:
    unified = Engine.build(engine_cfg(tiny_model_dir))
    try:
        for i, p in enumerate(PROMPTS):
            unified.add_request(GenerateReq(f"u{i}", p, PARAMS))
        outs = run_until_done([unified], {f"u{i}" for i in range(len(PROMPTS))})
    finally:
        unified.close()
    return {i: outs[f"u{i}"] for i in range(len(PROMPTS))}


def logprobs(outs: list[TokenOut]) -> list[float]:
    return [x for o in outs for x in (o.logprobs or [])]


def free_plus_cached(e: Engine) -> int:
    load = e.load()
    return load.free_pages + load.cached_pages


@pytest.mark.parametrize("backend,prefill_tp,decode_tp", [
    ("tcp", 2, 1), ("tcp", 1, 2), ("shm", 2, 1), ("shm", 1, 2), ("nixl", 2, 1), ("nixl", 1, 2), ("mooncake", 2, 1)])
def test_engine_pd_with_tp_equals_unified(backend: str, prefill_tp: int, decode_tp: int, tiny_model_dir: Path,
                                          reference: dict[int, list[TokenOut]]) -> None:
    base = DisaggConfig(backend=backend, bootstrap_port=0, heartbeat_interval=0.5)
    pre = Engine.build(engine_cfg(tiny_model_dir, tp_size=prefill_tp), DisaggConfig(**{**base.__dict__, "mode": "prefill"}))
    try:
        dec = Engine.build(engine_cfg(tiny_model_dir, tp_size=decode_tp, num_pages=150),
                     DisaggConfig(**{**base.__dict__, "mode": "decode"}))
    except BaseException:
        pre.close()
        raise
    try:
        marks = [free_plus_cached(e) for e in (pre, dec)]
        got = run_pd(pre, dec, PROMPTS, PARAMS, 5000, timeout=120)
        for i, ref in reference.items():
            assert [o.error for o in got[f"d{i}"] if o.error] == []
            assert tokens(got[f"d{i}"]) == tokens(ref), i
            assert max(abs(a - b) for a, b in zip(logprobs(got[f"d{i}"]), logprobs(ref))) < 1e-4
        for e in (pre, dec):
            e.check_integrity()
            stats = e.load().transfer
            assert stats is not None and (stats.success, stats.failed) == (len(PROMPTS), 0)
        assert [free_plus_cached(e) for e in (pre, dec)] == marks
    finally:
        pre.close()
        dec.close()


@pytest.mark.parametrize("backend", ["tcp", "shm", "nixl"])
def test_servers_with_tp_2_on_both_sides_equal_unified(backend: str, tmp_path: Path, tiny_model_dir: Path,
                                                       reference: dict[int, list[TokenOut]]) -> None:
    args = ["--model", str(tiny_model_dir), "--threads", "1", "--num-pages", "200", "--page-size", "4",
            "--chunk-budget", "24", "--tp-size", "2"]
    pair = PDPair(tmp_path, backend, args)
    try:
        pair.start()
        body: dict[str, Any] = {"sampling_params": {"max_new_tokens": PARAMS.max_new_tokens, "temperature": 0,
                                                    "ignore_eos": True}}
        results = pair.many([("/generate", {**body, "input_ids": p}, False) for p in PROMPTS], concurrency=3)
        for i, res in enumerate(results):
            assert res.prefill.ok and res.decode.ok, (res.prefill.describe(), res.decode.describe())
            assert res.decode.json["output_ids"] == tokens(reference[i]), i
        pair.settled()
    except BaseException:
        print(pair.logs())
        raise
    finally:
        pair.stop()


FAULT_ENV = {"PDSERVE_DISAGGREGATION_HEARTBEAT_INTERVAL": "1.0", "PDSERVE_DISAGGREGATION_HEARTBEAT_MAX_FAILURE": "2",
             "PDSERVE_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "5"}
LONG_PROMPT = [random.Random(5).randrange(300, 40000) for _ in range(1000)]  # ~250 chunks of 4: a wide window


@pytest.mark.parametrize("side", ["decode", "prefill"])
def test_kill_one_rank_mid_transfer(side: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    args = ["--model", str(tiny_model_dir), "--threads", "1", "--num-pages", "400", "--page-size", "4",
            "--chunk-budget", "4", "--max-model-len", "1024"]
    pair = PDPair(tmp_path, "tcp", args, prefill_env=FAULT_ENV, decode_env=FAULT_ENV)
    tp = {"prefill": ["--tp-size", "2"] if side == "prefill" else [],
          # a dead prefill rank: the decode answers an error (its default policy would recompute)
          "decode": ["--tp-size", "2"] if side == "decode" else ["--disaggregation-failure-policy", "error"]}
    try:
        pair.launch_prefill(tp["prefill"])
        pair.launch_decode(tp["decode"])
        pair.wait_healthy()
        pair.mark()
        victim = pair.server(side)
        ranks = tp_ranks(victim)
        assert len(ranks) == 1, victim.log_tail()
        cfg = RouterConfig(port=0, pd=True, policy=PolicyConfig("round_robin"),
                           workers=(WorkerSpec(pair.prefill.url, "prefill", pair.bootstrap_port),
                                    WorkerSpec(pair.decode.url, "decode")),
                           health=HealthConfig(interval_s=0.3, timeout_s=2.0, failure_threshold=2))
        with EmbeddedRouter(cfg) as router:
            wait_for(lambda: all(w["healthy"] for w in httpx.get(router.url + "/workers").json()["workers"]),
                     10, "the router to see both workers healthy")
            body = {"input_ids": LONG_PROMPT, "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
            fut = _in_background(lambda: pair.send_both(pair.pd_body(body), timeout=60))
            wait_for(lambda: get_load(pair.decode.url)["used_pages"] > 0, 30, "decode to reserve pages")
            assert get_load(pair.prefill.url)["num_running_reqs"] == 1, "the prefill finished before the fault"
            os.kill(ranks[0], signal.SIGKILL)
            killed = time.monotonic()
            res = fut.result(60)
            took = time.monotonic() - killed
            print(f"{side} rank killed: prefill {res.prefill.status} decode {res.decode.status} after {took:.1f} s")
            if side == "decode":  # its answer is a clean error, or its connection broke as it exited
                assert res.decode.status is None or clean_error(res.decode), res.decode.describe()
                assert clean_error(res.prefill), res.prefill.describe()  # its room failed with it
            else:
                assert clean_error(res.decode) and res.decode.status == 503, res.decode.describe()
                assert took < 1.0 * 2 + 6, took  # heartbeat 1 s x 2 misses at worst
            survivor = pair.server("prefill" if side == "decode" else "decode")
            assert healthy(survivor.url)
            wait_settled(survivor.url, pair.marks["prefill" if side == "decode" else "decode"])
            wait_for(lambda: victim.proc.poll() is not None, 60, f"the {side} server to exit")
            assert victim.proc.returncode != 0, pair.logs()
            wait_for(lambda: not httpx.get(f"{router.url}/workers/{victim.url}").json()["healthy"], 10,
                     f"the router to eject the {side}")
    except BaseException:
        print(pair.logs())
        raise
    finally:
        pair.stop()
