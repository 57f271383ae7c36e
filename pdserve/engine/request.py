"""A request as token counters, not phases.

    tokens:   [ p0 p1 ... pN-1 | o0 o1 ... oM-1 ]   prompt then sampled output
               <---- num_computed ---->             KV present in the pool
                                      <-- todo -->  computed by the next forward(s)

Prefill, chunked prefill, prefix-cache hits (num_computed starts > 0), decode (todo == 1),
preemption (num_computed reset to 0, recompute) and "prebuilt from a transfer" are all just
values of these counters. A forward that reaches the end of `tokens` samples one more token.
`take_output()` hands what is new since the last call to the stream (a TokenOut); with a
finish reason it is the last one and carries the request's queue / prefill / decode times.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from pdserve.engine.grammar import GrammarState
from pdserve.engine.messages import TokenOut, TopLogprob
from pdserve.engine.pd.state import Transfer
from pdserve.engine.prefix_cache import Node
from pdserve.engine.sampling_params import SamplingParams


@dataclass(eq=False)
class Request:
    rid: str
    prompt_len: int
    params: SamplingParams
    tokens: list[int]
    arrival: int = 0  # admission order, for FCFS and preemption victims
    num_computed: int = 0
    cached_tokens: int = 0  # prefix-cache hit at first admission (reported)
    pages: list[int] = field(default_factory=list)  # page table
    tree_pages: int = 0  # pages[:tree_pages] belong to the prefix cache
    tree_node: Node | None = None  # deepest locked cache node
    generator: torch.Generator | None = None
    # incremental output not yet reported
    new_ids: list[int] = field(default_factory=list)
    new_logprobs: list[float] = field(default_factory=list)
    new_top: list[list[TopLogprob]] = field(default_factory=list)
    finish_reason: str | None = None
    matched_stop: int | str | None = None
    admitted: bool = False
    grammar: GrammarState | None = None  # structured output: its matcher, once compiled
    transfer: Transfer | None = None  # PD state (engine/pd stages) while KV moves to / from a peer
    # monotonic times for the queue / prefill / decode histograms (None until it happens)
    t_arrival: float = 0.0
    t_admitted: float | None = None  # first scheduled into a forward
    t_first_token: float | None = None
    # prompt scoring: prompt_lp[i] = logprob of prompt token i given tokens < i, for i >= prompt_lp_from
    # (None elsewhere and until computed); None = not asked. Reported once, with the first output.
    prompt_lp: list[float | None] | None = None
    prompt_top: list[list[TopLogprob]] | None = None
    prompt_lp_from: int = 1
    leader: "Request | None" = None  # same prompt, arrived first (n > 1): wait for its pages, then share them
    spec_verify_ct: int = 0  # speculative decoding: forwards that verified drafts of this request
    spec_accepted: int = 0  # drafts accepted (they are output tokens too; usage reports them)
    priority: int = 0  # lower first, under priority scheduling (engine/scheduler.py)
    deadline: float | None = None  # wall clock by which the first token is due (GenerateReq.deadline)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def todo(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def remaining_new(self) -> int:
        return max(self.params.max_new_tokens - self.num_output, 0)

    @property
    def prefix_limit(self) -> int:
        """Tokens a prefix-cache hit may cover: prompt rows still to score must be computed."""
        if self.prompt_lp is None or self.num_output > 0:
            return len(self.tokens) - 1
        return max(self.prompt_lp_from - 1, 0)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def take_output(self, finish_reason: str | None = None) -> TokenOut:
        """The tokens (and logprobs) produced since the last call, as one TokenOut; with
        `finish_reason`, the request's last one."""
        p = self.params
        out = TokenOut(
            rid=self.rid, token_ids=self.new_ids,
            logprobs=self.new_logprobs if p.logprobs or p.top_logprobs > 0 else None,
            top_logprobs=self.new_top if p.top_logprobs > 0 else None,
            finish_reason=finish_reason, matched_stop=self.matched_stop if finish_reason else None,
            prompt_tokens=self.prompt_len, completion_tokens=self.num_output, cached_tokens=self.cached_tokens,
            spec_verify_ct=self.spec_verify_ct, spec_accepted_tokens=self.spec_accepted)
        self.new_ids, self.new_logprobs, self.new_top = [], [], []
        if self.prompt_lp is not None and (self.num_computed >= self.prompt_len or finish_reason is not None):
            out.prompt_logprobs = self.prompt_lp[self.prompt_lp_from:]  # once: the prompt ran (or never will)
            out.prompt_top_logprobs = self.prompt_top[self.prompt_lp_from:] if self.prompt_top is not None else None
            self.prompt_lp = self.prompt_top = None
        if finish_reason is not None:
            now = time.monotonic()
            admitted = self.t_admitted if self.t_admitted is not None else now
            first = self.t_first_token if self.t_first_token is not None else now
            out.queue_time_s = max(0.0, admitted - self.t_arrival)
            out.prefill_time_s = max(0.0, first - admitted)
            out.decode_time_s = max(0.0, now - first)
        return out
