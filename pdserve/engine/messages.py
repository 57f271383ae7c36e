"""Typed messages at the engine boundary (offline API and the engine process's ZMQ socket).

Every message carries the request id. They are msgspec Structs, encoded with msgpack on
sockets; nothing here is ever pickled.
"""

from __future__ import annotations

import msgspec

from pdserve.disagg import DisaggConfig
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_events import KVSnapshot


class Bootstrap(msgspec.Struct, frozen=True):
    """Where a PD request's KV comes from / goes to (the fields SGLang's router injects)."""

    host: str
    port: int
    room: int
    epoch: int | None = None  # the prefill's role epoch the router knew (None: any); the decode's route
    # lookup names it, and a prefill at another epoch refuses it (409: disagg's StaleEpoch)


class GenerateReq(msgspec.Struct, frozen=True, tag=True):
    rid: str
    input_ids: list[int]
    params: SamplingParams
    return_prompt_logprobs: bool = False  # score the prompt: TokenOut.prompt_logprobs (with params.top_logprobs)
    prompt_logprobs_from: int = 0  # first prompt position reported (SGLang's logprob_start_len); 0's is None
    bootstrap: Bootstrap | None = None  # set: a PD request (prefill or decode side)
    share_prompt_with: str | None = None  # rid of a live request with the same prompt (n > 1):
    # this one is admitted once that one's prompt is computed and reuses its pages
    data_parallel_rank: int | None = None  # the front's placement over dp ranks (SGLang's field)
    output_ids: list[int] = []  # already generated (a migrated stream): counted as output, not re-sent
    priority: int = 0  # --enable-priority-scheduling: lower first (vLLM's and SGLang's field)
    deadline: float | None = None  # wall clock (s) by which the first token is due: dropped (503) if
    # its prefill cannot begin in time (the front sets it from the body's TTFT deadline)


class AbortReq(msgspec.Struct, frozen=True, tag=True):
    rid: str


class TopLogprob(msgspec.Struct, frozen=True, array_like=True):
    token_id: int
    logprob: float


class TokenOut(msgspec.Struct, tag=True):
    """Incremental output for one request: the tokens produced since the last TokenOut.

    `finish_reason` is None while running, else "stop" (EOS, stop token or stop string),
    "length" (max_new_tokens or context end) or "abort"; `matched_stop` is the stop token id
    or stop string that ended it; `error` is set when the engine failed the request.
    """

    rid: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[TopLogprob]] | None = None
    finish_reason: str | None = None
    matched_stop: int | str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    error_status: int = 400  # HTTP status for `error`: 400 bad input, 503 a failed PD transfer
    error_code: str | None = None  # OpenAI error code for `error` (e.g. "deadline_exceeded")
    # set on the finishing TokenOut: arrival -> first forward -> first token -> finish (seconds)
    queue_time_s: float = 0.0
    prefill_time_s: float = 0.0
    decode_time_s: float = 0.0
    # prompt scoring (once, in the first TokenOut after the prompt ran): logprob of prompt token i
    # given the tokens before it, for i from GenerateReq.prompt_logprobs_from (None for token 0)
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[TopLogprob]] | None = None
    # speculative decoding, cumulative: this request's verify forwards and its accepted drafts
    spec_verify_ct: int = 0
    spec_accepted_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class TransferStats(msgspec.Struct):
    """Cumulative KV transfers of a PD server (either side), counted when a room is terminal."""

    success: int = 0
    failed: int = 0
    bytes: int = 0  # KV bytes of successful rooms
    latency_sum_s: float = 0.0  # successful rooms: sender created / receiver init -> Success
    recomputed: int = 0  # decode: failed rooms whose prompt the decode ran itself (policy recompute)

    def record(self, ok: bool, num_bytes: int, seconds: float) -> None:
        if ok:
            self.success += 1
            self.bytes += num_bytes
            self.latency_sum_s += seconds
        else:
            self.failed += 1


class SpecStats(msgspec.Struct):
    """Speculative decoding of one engine, cumulative (/metrics: SGLang's spec_* names, vLLM's
    spec_decode_* where SGLang has none)."""

    proposer: str  # ngram | suffix | draft_model
    num_draft_tokens: int  # k: the most drafts a request gets in one step
    verify_calls: int = 0  # chunks verified with at least one draft (vLLM's num_drafts)
    draft_tokens: int = 0  # drafts verified
    accepted_tokens: int = 0  # of those, accepted
    accept_lengths: list[int] = []  # [n - 1]: verifies that gave n tokens (accepted drafts + the target's own)
    skipped: int = 0  # decode chunks with a proposal that the adaptive rule ran without it

    @staticmethod
    def total(stats: list[SpecStats]) -> SpecStats | None:
        """Several engines' (dp ranks') counts summed; None if none speculates."""
        if not stats:
            return None
        width = max(len(s.accept_lengths) for s in stats)
        return SpecStats(stats[0].proposer, max(s.num_draft_tokens for s in stats),
                         sum(s.verify_calls for s in stats), sum(s.draft_tokens for s in stats),
                         sum(s.accepted_tokens for s in stats),
                         [sum(s.accept_lengths[i] for s in stats if i < len(s.accept_lengths)) for i in range(width)],
                         sum(s.skipped for s in stats))


class StepSample(msgspec.Struct, frozen=True, array_like=True):
    """One engine step: wall-clock start (s since the epoch), seconds, tokens forwarded, and
    whether it was a DP-attention idle forward (this rank had no tokens)."""

    start: float
    seconds: float
    tokens: int
    idle: bool


class TierLoad(msgspec.Struct, frozen=True):
    """KV tiers below the device pool (engine/kv_tiers): use of each tier and what moved (cumulative)."""

    host_pages: int  # host-tier slots
    host_used: int  # held by cache nodes or copies in flight
    page_bytes: int  # bytes of one page in the host tier and in storage (payload)
    storage_backend: str | None = None  # None: no storage tier
    storage_up: bool = True
    hit_tokens: dict[str, int] = {}  # admitted prompt tokens found in each tier: device, host, storage
    host_pages_read: int = 0  # host -> device (loads)
    host_pages_written: int = 0  # device -> host (write-through backups and demotions)
    storage_pages_read: int = 0
    storage_bytes_read: int = 0
    storage_pages_written: int = 0
    storage_bytes_written: int = 0
    storage_write_failures: int = 0  # refused (full) or skipped while down
    storage_misses: int = 0
    storage_bad_pages: int = 0  # corrupt, truncated, another layout's: misses too
    storage_outages: int = 0  # times the store went away
    loads: int = 0  # host -> device load batches finished
    load_seconds: float = 0.0
    prefetches: int = 0  # storage lookups + fetches finished
    prefetch_seconds: float = 0.0


class ExpertLoad(msgspec.Struct, frozen=True):
    """A mixture-of-experts engine's routed (token, expert) pairs since start, of its own tokens:
    per sparse layer and expert, and per expert-parallel rank (the pairs its experts received).
    Summed over DP-attention ranks it is the server's load; an EPLB-style rebalance reads it."""

    layers: list[list[int]]  # [sparse layer][expert]
    ep_ranks: list[int]  # [ep rank]: pairs routed to the experts it holds (one entry without EP)

    @property
    def experts(self) -> list[int]:
        """Per expert, over every sparse layer."""
        return [sum(col) for col in zip(*self.layers)]

    def __add__(self, other: ExpertLoad) -> ExpertLoad:
        return ExpertLoad([[a + b for a, b in zip(x, y)] for x, y in zip(self.layers, other.layers)],
                          [a + b for a, b in zip(self.ep_ranks, other.ep_ranks)])


class LoadInfo(msgspec.Struct, frozen=True):
    num_running: int
    num_waiting: int
    num_pages: int
    free_pages: int
    cached_pages: int
    page_size: int
    transfer: TransferStats | None = None  # PD servers only
    evictable_pages: int = 0  # cached pages no request holds: free for the taking (SGLang's evictable size)
    # engine/stats.py: the last stats window's rates, and cumulative counts
    gen_throughput: float = 0.0  # tokens/s
    prompt_throughput: float = 0.0  # prompt tokens computed/s
    cache_hit_rate: float = 0.0  # prefix-cache hits / prompt tokens of finished requests
    num_preemptions: int = 0
    prompt_tokens_computed: int = 0
    cache_queries: int = 0  # prompt tokens of finished requests
    cache_hits: int = 0  # of those, from the prefix cache
    dp_rank: int = 0  # which data-parallel rank this engine is
    pid: int = 0  # its engine process
    steps: int = 0  # forwards run (cumulative)
    step_seconds: float = 0.0  # their total time (a DP-attention rank's includes waiting for the others)
    idle_steps: int = 0  # DP attention: forwards run with no tokens of its own (the others' collectives)
    step_trace: list[StepSample] | None = None  # the last steps, when asked (GetLoadReq.step_trace)
    tiers: TierLoad | None = None  # --enable-hierarchical-cache only
    spec: SpecStats | None = None  # speculative decoding (None: off)
    experts: ExpertLoad | None = None  # a mixture-of-experts model's routing counts

    @property
    def kv_usage(self) -> float:
        """SGLang's token usage: pages neither free nor evictable (cached pages no request holds
        are free for the taking), over the pool."""
        return (self.num_pages - self.free_pages - self.evictable_pages) / max(self.num_pages, 1)


# --- Engine-process channel (pdserve/engine/process.py <-> pdserve/server/engine_client.py).
# The front PUSHes `EngineInMsg` values and PULLs `EngineOutMsg` values; control requests carry a
# `cid` that the engine echoes in its answer so the front can match it to a waiting future.


class GetLoadReq(msgspec.Struct, frozen=True, tag=True):
    cid: int
    step_trace: bool = False  # also send the last steps (LoadInfo.step_trace)


class FlushCacheReq(msgspec.Struct, frozen=True, tag=True):
    cid: int


class KVSnapshotReq(msgspec.Struct, frozen=True, tag=True):
    """Every cached page and the KV-event seq it is current at (`--kv-events-config` only)."""

    cid: int


class HiCacheStorageReq(msgspec.Struct, frozen=True, tag=True):
    """Attach (`backend` set) or detach (None) the KV tiers' storage backend at run time (SGLang's
    /hicache/storage-backend); refused unless the engine is idle."""

    cid: int
    backend: str | None
    extra: str | None = None  # the backend's JSON config


class SwitchStageReq(msgspec.Struct, frozen=True, tag=True):
    """A live role switch (server/elastic.py): rebuild the PD stage for `disagg` (its mode and epoch)
    on the same weights and KV pool. The front sends it only once the engine is idle (drained)."""

    cid: int
    disagg: DisaggConfig


class ShutdownReq(msgspec.Struct, frozen=True, tag=True):
    """Ask the engine process to stop: it aborts what it runs and exits."""


class WakeReq(msgspec.Struct, frozen=True, tag=True):
    """DP attention: another rank got a request; come round now (no answer)."""


class EngineReady(msgspec.Struct, frozen=True, tag=True):
    """First message of the engine process once its model is loaded."""

    pid: int
    model_path: str
    vocab_size: int
    max_model_len: int
    page_size: int
    num_pages: int
    max_running: int
    device: str = "cpu"
    tokenizer_path: str = ""  # the folder the tokenizer came from ("" = model_path)
    model_config: dict[str, int | float | str | bool | None] = {}
    kv_events_endpoint: str | None = None  # where KV events are PUBlished (None: off)


class EngineFailed(msgspec.Struct, frozen=True, tag=True):
    """The engine process failed (start-up or a step) and is exiting."""

    message: str


class LoadBrief(msgspec.Struct, frozen=True, array_like=True):
    """The engine's load as the front's admission control reads it, sent with every TokenOutBatch:
    KV pages held by requests (neither free nor evictable cache), the running requests past their
    prompt (decode rows of every step) and the measured step time (engine/stats.py's StepModel)."""

    num_pages: int
    held_pages: int
    decode_rows: int
    chunk_budget: int
    step_s: float  # a step's fixed seconds ...
    token_s: float  # ... plus these per token it forwards


class TokenOutBatch(msgspec.Struct, tag=True):
    """All TokenOuts of one engine step (plus immediate add_request errors) and the load after it."""

    outs: list[TokenOut]
    load: LoadBrief | None = None


class LoadResp(msgspec.Struct, frozen=True, tag=True):
    cid: int
    load: LoadInfo
    integrity_errors: int = 0  # how many idle check_integrity() calls failed so far


class FlushCacheResp(msgspec.Struct, frozen=True, tag=True):
    cid: int
    ok: bool


class KVSnapshotResp(msgspec.Struct, frozen=True, tag=True):
    cid: int
    snapshot: KVSnapshot | None  # None: KV events are off


class HiCacheStorageResp(msgspec.Struct, frozen=True, tag=True):
    cid: int
    error: str | None = None  # why it was refused (not idle, no tiers, a bad config)


class SwitchStageResp(msgspec.Struct, frozen=True, tag=True):
    cid: int
    error: str | None = None  # None: the engine serves in the new mode
    seconds: float = 0.0  # the stage's close and build


EngineInMsg = GenerateReq | AbortReq | GetLoadReq | FlushCacheReq | KVSnapshotReq | ShutdownReq | WakeReq | \
    SwitchStageReq | HiCacheStorageReq
EngineOutMsg = EngineReady | EngineFailed | TokenOutBatch | LoadResp | FlushCacheResp | KVSnapshotResp | \
    SwitchStageResp | HiCacheStorageResp


# ---- rank 0 -> the other tensor-parallel ranks (engine/tp_worker.py), once per step -------
class StepPlan(msgspec.Struct, frozen=True, tag=True, array_like=True):
    """One forward, as the runner lays it out (see engine/runner.py)."""

    input_ids: list[int]
    positions: list[int]
    spans: list[tuple[list[int], int, int]]  # per chunk: (its pages, first position, length)
    sample_rows: list[int]
    score_spans: list[tuple[int, int]] = []  # flat rows [a, b) whose logits score prompt tokens


class StopRanks(msgspec.Struct, frozen=True, tag=True, array_like=True):
    pass


RankMsg = StepPlan | StopRanks
