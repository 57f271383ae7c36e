"""The bundled SmolLM2-135M (9 heads, 3 KV heads) split over 3 tensor-parallel ranks: offline
and behind `pdserve serve`, equal to one rank token for token; a dead rank takes the server down.
PD with tp 3 on one side and 1 on the other ((1, 3): one prefill rank feeds three decode ranks a
KV head each; (3, 1): three prefill ranks write one head each into one decode page) on tcp, shm
and nixl equals the unified tp-1 engine."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from pdserve import LLM, SamplingParams
from pdserve.disagg.config import DisaggConfig
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import Engine
from tests.e2e.test_bundled_engine import PROMPTS
from tests.integration.conftest import ServerProcess, pid_alive, tp_ranks
from tests.integration.test_pd_engines import run_pd, tokens

PARAMS = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True, logprobs=True)


@pytest.fixture(scope="module")
def reference(bundled_model_dir: Path) -> list:
    with LLM(str(bundled_model_dir), kv_cache_gb=0.25, chunk_budget=256) as llm:
        prompts = [llm.tokenizer.encode(p * (1 + 8 * (i % 4 == 0))) for i, p in enumerate(PROMPTS)]
        return [(p, o) for p, o in zip(prompts, llm.generate(prompts, PARAMS, use_tqdm=False))]


def test_tp3_equals_tp1_on_22_mixed_prompts(bundled_model_dir: Path, reference: list) -> None:
    with LLM(str(bundled_model_dir), kv_cache_gb=0.25, chunk_budget=256, tp_size=3) as llm:
        outs = llm.generate([p for p, _ in reference], PARAMS, use_tqdm=False)
        llm.engine.check_integrity()
    for (_, want), got in zip(reference, outs):
        assert got.output_ids == want.output_ids
        assert max(abs(a - b) for a, b in zip(got.logprobs or [], want.logprobs or [])) < 1e-4


@pytest.mark.parametrize("backend,prefill_tp,decode_tp", [
    ("tcp", 1, 3), ("tcp", 3, 1), ("shm", 1, 3), ("shm", 3, 1), ("nixl", 1, 3), ("nixl", 3, 1)])
def test_pd_with_tp3_on_one_side_equals_tp1(backend: str, prefill_tp: int, decode_tp: int,
                                            bundled_model_dir: Path, reference: list) -> None:
    def engine(mode: str, tp: int) -> Engine:
        return Engine.build(EngineConfig(model=str(bundled_model_dir), kv_cache_gb=0.25, chunk_budget=256, tp_size=tp),
                      DisaggConfig(mode=mode, backend=backend, bootstrap_port=0, heartbeat_interval=0.5))

    pre = engine("prefill", prefill_tp)  # one process holds one tp group: the other side has tp 1
    try:
        dec = engine("decode", decode_tp)
    except BaseException:
        pre.close()
        raise
    try:
        got = run_pd(pre, dec, [p for p, _ in reference], PARAMS, 7000, timeout=300)
        for i, (_, want) in enumerate(reference):
            assert [o.error for o in got[f"d{i}"] if o.error] == []
            assert tokens(got[f"d{i}"]) == want.output_ids, i
            lps = [x for o in got[f"d{i}"] for x in (o.logprobs or [])]
            assert max(abs(a - b) for a, b in zip(lps, want.logprobs or [])) < 1e-4
        for e in (pre, dec):
            e.check_integrity()
            stats = e.load().transfer
            assert stats is not None and (stats.success, stats.failed) == (len(reference), 0)
    finally:
        pre.close()
        dec.close()


def test_server_with_tp3_serves_and_a_dead_rank_takes_it_down(tmp_path: Path, bundled_model_dir: Path,
                                                             reference: list) -> None:
    server = ServerProcess(["--model", str(bundled_model_dir), "--tp-size", "3", "--kv-cache-gb", "0.25"],
                           tmp_path / "server.log")
    try:
        server.wait_healthy(timeout=240)
        prompt, want = reference[1]
        r = httpx.post(f"{server.url}/generate", json={
            "input_ids": prompt, "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}},
            timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["output_ids"] == want.output_ids
        ranks = tp_ranks(server)
        assert len(ranks) == 2, server.log_tail()
        os.kill(ranks[0], signal.SIGKILL)
        killed = time.monotonic()
        r = httpx.post(f"{server.url}/generate", json={
            "input_ids": prompt, "sampling_params": {"max_new_tokens": 4}}, timeout=120)
        assert r.status_code == 503, r.text
        answered = time.monotonic() - killed
        deadline = time.monotonic() + 90
        while server.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        print(f"rank killed: 503 after {answered:.1f} s, server exited {server.proc.returncode} "
              f"after {time.monotonic() - killed:.1f} s")
        assert server.proc.returncode not in (None, 0), server.log_tail()
        assert not pid_alive(ranks[1])
    finally:
        server.stop()
