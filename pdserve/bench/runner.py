"""Run a serving benchmark: resolve model and tokenizer, build the workload, send it, summarize.

:func:`run_benchmark` (async) and :func:`run` (sync) take a :class:`BenchConfig` and optionally
a ready list of :class:`~pdserve.bench.datasets.BenchRequest`. The run:

1. model: ``cfg.model``, else the first id of ``GET /v1/models``;
2. tokenizer (only when the workload is built here): ``cfg.tokenizer`` (``"default"`` = the
   bundled model, a folder or a ``.gguf`` via :func:`pdserve.model.bundled.resolve_model`, else a
   transformers name), or else the model card's ``root`` (pdserve and vLLM report the served
   folder there) or its id;
3. ``cfg.warmup`` short text requests, one after another, not counted;
4. the requests at gamma/Poisson arrival times (``request_rate``, ``burstiness``), at most
   ``max_concurrency`` in flight; duration = first arrival → last completion.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from pdserve.bench.arrivals import arrival_offsets
from pdserve.bench.client import CHAT, COMPLETIONS, BenchClient, ClientOptions, list_models
from pdserve.bench.datasets import (
    BenchRequest,
    TokenizerLike,
    groups_for,
    random_requests,
    shared_prefix_requests,
    sharegpt_requests,
)
from pdserve.bench.metrics import RequestRecord, summarize

DATASETS = ("random", "shared-prefix", "sharegpt")
WARMUP_PROMPT = "Warm-up request {i}: write one sentence about the sea."


@dataclass(frozen=True)
class BenchConfig:
    """Everything that defines one benchmark run (see ``pdserve bench --help``)."""

    base_url: str
    model: str | None = None
    endpoint: str = COMPLETIONS
    dataset: str = "random"
    dataset_path: str | None = None
    num_prompts: int = 100
    input_len: int = 256
    output_len: int = 64
    range_ratio: float = 0.0
    prefix_len: int = 0
    system_prompt_len: int = 256
    question_len: int = 32
    num_groups: int = 4
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    warmup: int = 2
    seed: int = 0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    slo_e2el_ms: float | None = None
    tokenizer: str | None = None
    api_key: str | None = None
    timeout_s: float = 600.0
    disable_tqdm: bool = False
    temperature: float = 0.0
    ignore_eos: bool = True
    as_text: bool = False
    sharegpt_output_len: int | None = None

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.dataset == "sharegpt" and not self.dataset_path:
            raise ValueError("the sharegpt dataset needs dataset_path (--dataset-path)")
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.warmup < 0 or self.timeout_s <= 0:
            raise ValueError("warmup must be >= 0 and timeout_s > 0")
        if not self.request_rate > 0 or not self.burstiness > 0:
            raise ValueError("request_rate and burstiness must be > 0")

    @property
    def is_chat(self) -> bool:
        return self.endpoint.rstrip("/").endswith("chat/completions")


@dataclass
class BenchResult:
    """One run: its config (model/tokenizer resolved), summary, per-request records, timing."""

    config: BenchConfig
    summary: dict[str, Any]
    records: list[RequestRecord]
    duration_s: float
    started_at: float  # time.time() at the first arrival


def load_tokenizer(name: str, allow_hub: bool = True) -> TokenizerLike:
    """A tokenizer for ``name``: "default", an HF folder, a .gguf file, or (``allow_hub``) a
    transformers name from its cache or the Hugging Face hub."""
    from pdserve.model.bundled import resolve_model
    from pdserve.model.tokenizer import Tokenizer

    try:
        return Tokenizer(resolve_model(name, progress=False))
    except FileNotFoundError:
        if not allow_hub:
            raise ValueError(f"{name!r} is not a local model folder or .gguf file") from None
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(name)  # type: ignore[no-any-return]
        except Exception as exc:
            raise ValueError(f"no tokenizer found for {name!r} ({type(exc).__name__}); "
                             "pass --tokenizer with a model folder, a .gguf or 'default'") from None


def tokenizer_candidates(cfg: BenchConfig, card: dict[str, Any] | None) -> list[str]:
    """Names to try for the tokenizer, in order."""
    if cfg.tokenizer:
        return [cfg.tokenizer]
    names = [str(card[k]) for k in ("root", "id") if card and card.get(k)]
    if cfg.model:
        names.append(cfg.model)
    return list(dict.fromkeys(names))


def resolve_tokenizer(cfg: BenchConfig, card: dict[str, Any] | None) -> tuple[TokenizerLike, str]:
    """(tokenizer, the name it came from) for ``cfg``; ValueError naming what was tried."""
    tried = tokenizer_candidates(cfg, card)
    for name in tried:
        try:
            return load_tokenizer(name, allow_hub=bool(cfg.tokenizer)), name
        except (ValueError, OSError):
            if cfg.tokenizer:
                raise
    raise ValueError(f"could not load a tokenizer from {tried or 'nothing'}; pass --tokenizer "
                     "(a model folder, a .gguf file or 'default')")


def build_requests(cfg: BenchConfig, tok: TokenizerLike) -> list[BenchRequest]:
    """The workload ``cfg`` describes (text prompts when the endpoint is chat or ``as_text``)."""
    as_text = cfg.as_text or cfg.is_chat
    if cfg.dataset == "random":
        return random_requests(tok, cfg.num_prompts, cfg.input_len, cfg.output_len, cfg.range_ratio,
                               cfg.seed, cfg.prefix_len, as_text=as_text)
    if cfg.dataset == "shared-prefix":
        reqs = shared_prefix_requests(tok, cfg.num_groups, groups_for(cfg.num_prompts, cfg.num_groups),
                                      cfg.system_prompt_len, cfg.question_len, cfg.output_len, cfg.seed,
                                      as_text=as_text)
        return reqs[:cfg.num_prompts]
    assert cfg.dataset_path is not None
    return sharegpt_requests(cfg.dataset_path, tok, cfg.num_prompts, cfg.seed, cfg.sharegpt_output_len)


def warmup_requests(cfg: BenchConfig) -> list[BenchRequest]:
    """Short text requests sent before the run (unrelated to the workload: no prefix reuse)."""
    n_out = max(1, min(cfg.output_len, 16))
    return [BenchRequest(WARMUP_PROMPT.format(i=i), 0, n_out) for i in range(cfg.warmup)]


async def _model_card(cfg: BenchConfig) -> dict[str, Any] | None:
    try:
        cards = await list_models(cfg.base_url, cfg.api_key, timeout_s=min(cfg.timeout_s, 60.0))
    except Exception:
        if cfg.model is None:
            raise
        return None
    if cfg.model is None:
        return cards[0]
    return next((c for c in cards if c.get("id") == cfg.model), None)


async def _send_all(client: BenchClient, cfg: BenchConfig, requests: list[BenchRequest]
                    ) -> tuple[list[RequestRecord], float, float]:
    offsets = arrival_offsets(len(requests), cfg.request_rate, cfg.burstiness, cfg.seed)
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    bar = tqdm(total=len(requests), disable=cfg.disable_tqdm, desc="bench", unit="req")
    started_at = time.time()
    origin = time.perf_counter()

    async def one(offset: float, req: BenchRequest) -> RequestRecord:
        delay = origin + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if sem is None:
            rec = await client.send(req, origin)
        else:
            async with sem:
                rec = await client.send(req, origin)
        bar.update(1)
        return rec

    try:
        records = await asyncio.gather(*(one(o, r) for o, r in zip(offsets, requests)))
    finally:
        bar.close()
    return list(records), time.perf_counter() - origin, started_at


async def run_benchmark(cfg: BenchConfig, requests: list[BenchRequest] | None = None) -> BenchResult:
    """Run the benchmark ``cfg`` describes (or send ``requests`` instead of building them)."""
    card = await _model_card(cfg)
    model = (cfg.model or str(card["id"])) if card else cfg.model
    if not model:
        raise ValueError(f"{cfg.base_url}/v1/models gave no model id; pass --model")
    tokenizer = cfg.tokenizer
    if requests is None:
        tok, tokenizer = resolve_tokenizer(cfg, card)
        requests = await asyncio.to_thread(build_requests, cfg, tok)
    if not requests:
        raise ValueError("no requests to send")
    cfg = dataclasses.replace(cfg, model=model, tokenizer=tokenizer)
    opts = ClientOptions(base_url=cfg.base_url, model=model, endpoint=cfg.endpoint, api_key=cfg.api_key,
                         timeout_s=cfg.timeout_s, temperature=cfg.temperature, ignore_eos=cfg.ignore_eos)
    async with BenchClient(opts) as client:
        for req in warmup_requests(cfg):
            rec = await client.send(req)
            if not rec.success:
                print(f"pdserve bench: warm-up request failed: {rec.error}", file=sys.stderr)
        records, duration_s, started_at = await _send_all(client, cfg, requests)
    summary = summarize(records, duration_s, cfg.slo_ttft_ms, cfg.slo_tpot_ms, cfg.slo_e2el_ms)
    return BenchResult(config=cfg, summary=summary, records=records, duration_s=duration_s, started_at=started_at)


def run(cfg: BenchConfig, requests: list[BenchRequest] | None = None) -> BenchResult:
    """Synchronous :func:`run_benchmark` (starts its own event loop)."""
    return asyncio.run(run_benchmark(cfg, requests))


__all__ = ["BenchConfig", "BenchResult", "CHAT", "COMPLETIONS", "DATASETS", "build_requests", "load_tokenizer",
           "resolve_tokenizer", "run", "run_benchmark", "warmup_requests"]
