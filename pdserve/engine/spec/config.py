"""Speculative decoding's knobs: one frozen config nested in EngineConfig, its flag table with
SGLang's and vLLM's spellings, and vLLM's `--speculative-config JSON` folded into it.

    --speculative-algorithm NGRAM|SUFFIX|STANDALONE   (vLLM's method names ngram, suffix,
                                                        draft_model are the same three)
    --speculative-num-draft-tokens K                    drafts per request and step (vLLM's
                                                        num_speculative_tokens); a verify is K+1 rows
    --speculative-draft-model-path PATH                 STANDALONE: the draft (same tokenizer)
    --speculative-config '{"method": "ngram", "num_speculative_tokens": 4, ...}'   vLLM's keys

`resolved()` gives the config with the JSON folded in (a key the JSON and a flag both set must
agree); `check()` raises ValueError with one sentence. No torch here: `--help` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from pdserve.flags.argtypes import fraction, positive_float, positive_int
from pdserve.flags.table import Flag

ALGORITHMS = {"NGRAM": "ngram", "SUFFIX": "suffix", "STANDALONE": "draft_model"}  # SGLang -> vLLM (= proposer)
_ALIASES = {**{k: k for k in ALGORITHMS}, **{v.upper(): k for k, v in ALGORITHMS.items()}, "DRAFT": "STANDALONE",
            "PROMPT_LOOKUP": "NGRAM"}


def algorithm(text: str) -> str:
    """argparse type: SGLang's or vLLM's name of a proposer, as SGLang's (NGRAM, SUFFIX, STANDALONE)."""
    name = _ALIASES.get(text.strip().upper())
    if name is None:
        raise ValueError(f"unknown speculative algorithm {text!r} (NGRAM, SUFFIX, STANDALONE; vLLM's ngram, "
                         "suffix, draft_model)")
    return name


@dataclass(frozen=True)
class SpecConfig:
    algorithm: str | None = None  # NGRAM | SUFFIX | STANDALONE; None: no speculation
    num_draft_tokens: int = 4  # k: the most drafts one request gets in one step
    draft_model_path: str | None = None  # STANDALONE: HF folder of the draft (same tokenizer)
    ngram_min: int = 1  # NGRAM: shortest context suffix looked up in the prompt + output
    ngram_max: int = 4  # NGRAM: longest
    suffix_max_depth: int = 24  # SUFFIX: longest context suffix matched
    suffix_max_cached_requests: int = 1000  # SUFFIX: finished requests' outputs kept for lookups
    suffix_max_spec_factor: float = 1.0  # SUFFIX: drafts <= factor x match length
    suffix_min_token_prob: float = 0.1  # SUFFIX: stop a draft where its estimated probability falls below
    adaptive: bool = True  # speculate per request and step only while it pays (engine/spec/adaptive.py)
    disable_by_batch_size: int = 32  # never speculate with more decode requests in the batch than this
    config_json: str | None = None  # vLLM's --speculative-config (resolved() folds it in)

    @property
    def enabled(self) -> bool:
        return self.resolved().algorithm is not None

    @property
    def proposer(self) -> str:
        """vLLM's method name of the algorithm (the proposer label on /metrics)."""
        return ALGORITHMS[self.resolved().algorithm or "NGRAM"]

    def resolved(self) -> SpecConfig:
        """This config with --speculative-config's keys folded in (ValueError on a bad one)."""
        if not self.config_json:
            return self
        try:
            given = json.loads(self.config_json)
        except json.JSONDecodeError as e:
            raise ValueError(f"--speculative-config is not JSON: {e}") from None
        if not isinstance(given, dict):
            raise ValueError("--speculative-config must be a JSON object")
        values: dict[str, Any] = {}
        for key, value in given.items():
            field = _JSON_KEYS.get(key)
            if field is None:
                raise ValueError(f"--speculative-config: key {key!r} is not supported (supported: "
                                 f"{', '.join(sorted(_JSON_KEYS))})")
            values[field] = algorithm(str(value)) if field == "algorithm" else value
        defaults = SpecConfig()
        for field, value in values.items():
            mine = getattr(self, field)
            if mine != getattr(defaults, field) and mine != value:
                raise ValueError(f"--speculative-config sets {field} to {value!r} but a flag set it to {mine!r}")
        return dataclasses.replace(self, config_json=None, **values)

    def check(self) -> None:
        """Raise ValueError (one sentence) for knobs that cannot work together."""
        c = self.resolved()
        for name in ("num_draft_tokens", "ngram_min", "ngram_max", "suffix_max_depth", "suffix_max_cached_requests",
                     "disable_by_batch_size"):
            if not isinstance(getattr(c, name), int) or getattr(c, name) < 1:
                raise ValueError(f"speculative {name} must be a positive integer, got {getattr(c, name)!r}")
        if c.algorithm is None:
            return
        if c.ngram_min > c.ngram_max:
            raise ValueError(f"--speculative-ngram-min-match-window-size {c.ngram_min} is over the max "
                             f"{c.ngram_max}")
        if (c.algorithm == "STANDALONE") != (c.draft_model_path is not None):
            raise ValueError("--speculative-draft-model-path goes with --speculative-algorithm STANDALONE "
                             "(draft_model), and only with it")


_JSON_KEYS = {  # vLLM's speculative_config keys -> SpecConfig fields
    "method": "algorithm", "num_speculative_tokens": "num_draft_tokens", "model": "draft_model_path",
    "prompt_lookup_min": "ngram_min", "prompt_lookup_max": "ngram_max",
    "suffix_decoding_max_tree_depth": "suffix_max_depth",
    "suffix_decoding_max_cached_requests": "suffix_max_cached_requests",
    "suffix_decoding_max_spec_factor": "suffix_max_spec_factor",
    "suffix_decoding_min_token_prob": "suffix_min_token_prob",
    "disable_by_batch_size": "disable_by_batch_size", "adaptive": "adaptive",
}

SPEC_FLAGS: tuple[Flag, ...] = (
    Flag(("--speculative-algorithm", "--speculative-method"), "speculative.algorithm", algorithm,
         "speculative decoding's proposer: NGRAM (prompt lookup), SUFFIX (suffix decoding over the request and "
         "recent outputs), STANDALONE (a draft model); vLLM's ngram, suffix, draft_model (default: off)",
         metavar="ALGO"),
    Flag(("--speculative-num-draft-tokens", "--num-speculative-tokens"), "speculative.num_draft_tokens",
         positive_int, "most draft tokens per request and step (a verify computes k + 1 rows)"),
    Flag(("--speculative-draft-model-path", "--speculative-model"), "speculative.draft_model_path", str,
         "STANDALONE: the draft model's HF folder (the same tokenizer as the target)", metavar="PATH"),
    Flag(("--speculative-config",), "speculative.config_json", str,
         "vLLM's speculative config as JSON (method, num_speculative_tokens, model, prompt_lookup_min/max, "
         "suffix_decoding_*, disable_by_batch_size)", metavar="JSON"),
    Flag(("--speculative-ngram-min-match-window-size", "--prompt-lookup-min"), "speculative.ngram_min",
         positive_int, "NGRAM: shortest context suffix looked up"),
    Flag(("--speculative-ngram-max-match-window-size", "--prompt-lookup-max"), "speculative.ngram_max",
         positive_int, "NGRAM: longest context suffix looked up"),
    Flag(("--speculative-suffix-max-depth",), "speculative.suffix_max_depth", positive_int,
         "SUFFIX: longest context suffix matched"),
    Flag(("--speculative-suffix-max-cached-requests",), "speculative.suffix_max_cached_requests", positive_int,
         "SUFFIX: finished requests whose outputs are kept for lookups"),
    Flag(("--speculative-suffix-max-spec-factor",), "speculative.suffix_max_spec_factor", positive_float,
         "SUFFIX: at most this many drafts per matched token"),
    Flag(("--speculative-suffix-min-token-prob",), "speculative.suffix_min_token_prob", fraction,
         "SUFFIX: a draft stops where its estimated probability falls below this"),
    Flag(("--speculative-disable-by-batch-size",), "speculative.disable_by_batch_size", positive_int,
         "no speculation while the batch has more decode requests than this"),
    Flag(("--disable-speculative-adaptive",), "speculative.adaptive", None,
         "speculate on every decode step with a proposal, whether or not it pays", const=False),
)
