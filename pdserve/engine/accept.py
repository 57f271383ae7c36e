"""Accepting a token into a request: the one path every output token takes.

Where a token comes from:
    sampled by this engine's forward        Engine (after the sampler; the speculator's verify
                                             says which sampled rows are accepted)
    the first token of a PD decode          DecodeStage commits the prefill's metadata record
    a verified draft (speculative decoding) one call per accepted token, in order, until a
                                             draft is refused or the request finishes

    accept_token(r, token, logprob, top, stops)
        r.tokens += token, r.new_ids += token    streamed with the step's TokenOuts
        r.grammar.accept(token)                  a constrained request's matcher advances
        logprob / top entries kept               only those given (the request asked for them)
        stops.check(r)                           engine/stop.py decides whether it ends here
    returns r.finished: a caller stops accepting this request's tokens there.

What happens around the first token (prefix caching of the prompt, timing, a PD decode's skipped
random draw) differs between the callers and stays with them.
"""

from __future__ import annotations

from pdserve.engine.messages import TopLogprob
from pdserve.engine.request import Request
from pdserve.engine.stop import StopChecker


def accept_token(r: Request, token: int, logprob: float | None, top: list[TopLogprob] | None,
                 stops: StopChecker) -> bool:
    """Append one accepted token to `r` (see the module docstring); True if `r` finished."""
    r.tokens.append(token)
    r.new_ids.append(token)
    if r.grammar is not None:
        r.grammar.accept(token)
    if logprob is not None:
        r.new_logprobs.append(logprob)
    if top is not None:
        r.new_top.append(top)
    stops.check(r)
    return r.finished
