"""Speculative decoding under PD and tensor parallelism, and on a real server.

PD: a prefill Engine and a decode Engine in this process move real KV (tcp, shm); the decode
speculates from the prefill's first token on and equals a unified engine without speculation.
With a draft model the decode prefills the draft itself (engine/spec/draft.py): a draft that is
the target accepts every draft only if that prefill gave it the prompt's KV. TP 3 (real rank
processes) with speculation equals TP 1 without. The server reports accepted drafts in usage and
meta_info, and speculation's counters on /metrics."""

from __future__ import annotations

import random
from pathlib import Path

import httpx
import pytest

from pdserve import LLM, SamplingParams
from pdserve.disagg.config import DisaggConfig
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import Engine
from pdserve.engine.messages import GenerateReq
from pdserve.engine.spec.adaptive import StepCost
from pdserve.engine.spec.build import probe_costs
from pdserve.engine.spec.config import SpecConfig
from tests.integration.conftest import ServerProcess, wait_idle
from tests.integration.test_pd_engines import run_pd, run_until_done, tokens
from tests.tiny_model import build_tiny_model

PARAMS = SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True, logprobs=True)


def loop_model(root: Path, tokenizer: Path, vocab: int = 64, **kw) -> Path:
    return build_tiny_model(root, tokenizer, vocab_size=vocab, seed=1, attn_out_scale=0.02, **kw)


@pytest.fixture(scope="module")
def loop_dir(tmp_path_factory: pytest.TempPathFactory, bundled_model_dir: Path) -> Path:
    return loop_model(tmp_path_factory.mktemp("loop"), bundled_model_dir)


def prompts(n: int, vocab: int = 64, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(3, 40))] for _ in range(n)]


def cfg(folder: Path, spec: SpecConfig | None = None, **kw) -> EngineConfig:
    base = dict(model=str(folder), num_pages=200, page_size=4, chunk_budget=48, threads=1)
    return EngineConfig(**{**base, **kw}, speculative=spec or SpecConfig())


@pytest.mark.parametrize(("backend", "algorithm"), [("tcp", "NGRAM"), ("shm", "SUFFIX"), ("tcp", "STANDALONE")])
def test_pd_with_speculation_on_the_decode_equals_unified(backend: str, algorithm: str, loop_dir: Path) -> None:
    ps = prompts(8)
    unified = Engine.build(cfg(loop_dir))
    for i, p in enumerate(ps):
        unified.add_request(GenerateReq(f"u{i}", p, PARAMS))
    ref = run_until_done([unified], {f"u{i}" for i in range(len(ps))})
    draft = str(loop_dir) if algorithm == "STANDALONE" else None  # the target itself: it must agree always
    spec = SpecConfig(algorithm=algorithm, draft_model_path=draft, adaptive=False)
    base = DisaggConfig(backend=backend, bootstrap_port=0, heartbeat_interval=0.5)
    pre = Engine.build(cfg(loop_dir, spec), DisaggConfig(**{**base.__dict__, "mode": "prefill"}))
    dec = Engine.build(cfg(loop_dir, spec, num_pages=150), DisaggConfig(**{**base.__dict__, "mode": "decode"}))
    try:
        assert pre.speculator.stats is None  # a prefill hands off after the first token: nothing to speculate
        got = run_pd(pre, dec, ps, PARAMS, 3000)
        for i in range(len(ps)):
            assert tokens(got[f"d{i}"]) == tokens(ref[f"u{i}"])
            lp = [x for o in got[f"d{i}"] for x in (o.logprobs or [])]
            ref_lp = [x for o in ref[f"u{i}"] for x in (o.logprobs or [])]
            assert max(abs(a - b) for a, b in zip(lp, ref_lp)) < 1e-4
        s = dec.speculator.stats
        assert s is not None and s.accepted_tokens > 0
        if algorithm == "STANDALONE":
            assert s.accepted_tokens == s.draft_tokens  # the decode's own draft prefill gave it the prompt
        pre.check_integrity()
        dec.check_integrity()
    finally:
        pre.close()
        dec.close()


def test_tp3_with_speculation_equals_tp1(tmp_path: Path, bundled_model_dir: Path) -> None:
    """The plan carries the drafts: ranks 1 and 2 verify what rank 0 proposed."""
    folder = loop_model(tmp_path / "tp3", bundled_model_dir, vocab=66, heads=6, kv_heads=3, hidden=96,
                        intermediate=192)
    ps = prompts(6, vocab=66, seed=1)
    kw = dict(num_pages=128, page_size=4, chunk_budget=48, threads=1)
    with LLM(str(folder), **kw) as plain:
        ref = plain.generate(ps, PARAMS, use_tqdm=False)
    spec = SpecConfig(algorithm="STANDALONE", draft_model_path=str(folder), adaptive=False)  # the draft: rank 0's
    with LLM(str(folder), tp_size=3, speculative=spec, **kw) as llm:
        got = llm.generate(ps, PARAMS, use_tqdm=False)
        assert [o.output_ids for o in got] == [o.output_ids for o in ref]
        assert max(abs(a - b) for o, r in zip(got, ref) for a, b in zip(o.logprobs, r.logprobs)) < 1e-4
        assert llm.engine.speculator.stats.accepted_tokens > 0
        cost = StepCost()
        probe_costs(llm.engine.runner, llm.engine.kv, cost, 2)  # start-up probes: published plans too
        assert cost.known()
        assert [o.output_ids for o in llm.generate(ps, PARAMS, use_tqdm=False)] == [o.output_ids for o in ref]
        llm.engine.check_integrity()


def test_server_reports_accepted_drafts_and_spec_metrics(tmp_path: Path, loop_dir: Path) -> None:
    server = ServerProcess(["--model", str(loop_dir), "--num-pages", "200", "--page-size", "4",
                            "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}',
                            "--disable-speculative-adaptive", "--skip-server-warmup"], tmp_path / "server.log")
    try:
        server.wait_healthy()
        p = prompts(1, seed=2)[0]
        body = {"prompt": p, "max_tokens": 30, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
        accepted = r["usage"]["completion_tokens_details"]["accepted_prediction_tokens"]
        assert 0 < accepted < r["usage"]["completion_tokens"] == 30
        with LLM(str(loop_dir), num_pages=200, page_size=4) as plain:
            assert r["choices"][0]["text"] == plain.generate([p], SamplingParams(
                max_new_tokens=30, temperature=0.0, ignore_eos=True), use_tqdm=False)[0].text
        native = httpx.post(f"{server.url}/generate", json={"input_ids": p, "sampling_params": {
            "max_new_tokens": 30, "temperature": 0, "ignore_eos": True}}, timeout=60).json()
        assert native["meta_info"]["spec_verify_ct"] > 0 and native["meta_info"]["spec_accepted_tokens"] == accepted
        wait_idle(server.url)
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        lines = [ln for ln in text.splitlines() if ln.startswith("sglang:spec_decode_num_accepted_tokens_total{")]
        assert len(lines) == 1 and 'proposer="ngram"' in lines[0]
        assert float(lines[0].rsplit(" ", 1)[1]) == 2 * accepted  # both requests' accepted drafts
        for name in ("sglang:spec_accept_length", "sglang:spec_accept_rate", "sglang:spec_verify_calls_total",
                     "sglang:spec_decode_num_draft_tokens_total", "sglang:spec_accept_length_histogram_bucket"):
            assert name in text, name
    finally:
        server.stop()
