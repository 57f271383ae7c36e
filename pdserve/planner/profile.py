"""The measured profile the planner plans with: prefill time vs prompt length, decode ITL vs concurrency and KV use.

A profile is one JSON file (msgspec), written by `pdserve profile` (measured on the machine
that will serve) and read by `pdserve planner`:

    {"model": "default", "device": "cpu", "kv_capacity_tokens": 9600, "max_concurrency": 32,
     "prefill": [{"prompt_tokens": 128, "seconds": 0.21}, {"prompt_tokens": 512, "seconds": 0.80}, ...],
     "decode":  [{"concurrency": 1, "kv_tokens": 300, "itl_s": 0.046}, {"concurrency": 8, ...}, ...]}

- `prefill`: one prompt alone on an idle worker, the time to its first token. `prefill_s(n)`
  interpolates linearly between the points and extends the end segments' slopes beyond them:

      seconds                         .  <- beyond the last point: the last segment's slope
        |                      ___.--'
        |              ___.---'
        |      __.---'          <- between points: a straight line
        |  .--'
        +--+------+-------------+------ prompt tokens
          p0     p1            p2

- `decode`: steady decoding with `concurrency` streams holding `kv_tokens` KV tokens in all,
  the mean time between two tokens of a stream. `itl_s(c, kv)` is the least-squares plane
  a + b*c + d*kv through the points: a decode step reads the weights once (a), pays per stream
  (b) and reads every stream's KV for attention (d), so a step's time is close to linear in
  both; it needs three points that do not lie on one line of (c, kv).
- `kv_capacity_tokens`, `max_concurrency`: one decode worker's KV pool and its running limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import msgspec


class PrefillPoint(msgspec.Struct, frozen=True):
    prompt_tokens: int
    seconds: float


class DecodePoint(msgspec.Struct, frozen=True):
    concurrency: int
    kv_tokens: int
    itl_s: float


@dataclass(frozen=True)
class DecodeModel:
    base_s: float  # a: a step's fixed cost (the weights read once)
    per_stream_s: float  # b
    per_kv_token_s: float  # d

    def itl_s(self, concurrency: float, kv_tokens: float) -> float:
        return max(1e-6, self.base_s + self.per_stream_s * concurrency + self.per_kv_token_s * kv_tokens)


class Profile(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    device: str = "cpu"
    kv_capacity_tokens: int
    max_concurrency: int
    prefill: list[PrefillPoint]
    decode: list[DecodePoint]

    def __post_init__(self) -> None:
        if len(self.prefill) < 2 or len({p.prompt_tokens for p in self.prefill}) != len(self.prefill):
            raise ValueError("profile: prefill needs two or more points of distinct prompt lengths")
        if any(p.seconds <= 0 or p.prompt_tokens <= 0 for p in self.prefill):
            raise ValueError("profile: prefill points need positive lengths and times")
        if any(d.itl_s <= 0 or d.concurrency <= 0 or d.kv_tokens < 0 for d in self.decode):
            raise ValueError("profile: decode points need positive concurrency and ITL")
        import numpy as np  # here, not at import: `pdserve --help` builds the planner's parser without it

        a = np.array([[1.0, d.concurrency, d.kv_tokens] for d in self.decode]).reshape(-1, 3)
        if np.linalg.matrix_rank(a) < 3:
            raise ValueError("profile: decode needs three points not on one line of (concurrency, kv_tokens)")
        if self.kv_capacity_tokens <= 0 or self.max_concurrency <= 0:
            raise ValueError("profile: kv_capacity_tokens and max_concurrency must be > 0")

    def prefill_s(self, prompt_tokens: float) -> float:
        """Prefill time of one prompt on an idle worker (piecewise linear, end slopes extended; >= 0)."""
        import numpy as np

        pts = sorted(self.prefill, key=lambda p: p.prompt_tokens)
        xs = [p.prompt_tokens for p in pts]
        ys = [p.seconds for p in pts]
        i = int(np.searchsorted(xs, prompt_tokens))
        lo = min(max(i - 1, 0), len(xs) - 2)
        slope = (ys[lo + 1] - ys[lo]) / (xs[lo + 1] - xs[lo])
        return max(0.0, ys[lo] + slope * (prompt_tokens - xs[lo]))

    def decode_model(self) -> DecodeModel:
        """The plane itl = a + b * concurrency + d * kv_tokens, least squares over the points."""
        import numpy as np

        a = np.array([[1.0, d.concurrency, d.kv_tokens] for d in self.decode])
        y = np.array([d.itl_s for d in self.decode])
        coef = np.linalg.lstsq(a, y, rcond=None)[0]
        return DecodeModel(float(coef[0]), float(coef[1]), float(coef[2]))

    def itl_s(self, concurrency: float, kv_tokens: float) -> float:
        return self.decode_model().itl_s(concurrency, kv_tokens)


_decoder = msgspec.json.Decoder(Profile)


def load_profile(path: str | Path) -> Profile:
    """ValueError (one line) for a file that is not a profile."""
    try:
        return _decoder.decode(Path(path).read_bytes())
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"profile {path}: {exc}") from None


def save_profile(profile: Profile, path: str | Path) -> None:
    Path(path).write_bytes(msgspec.json.format(msgspec.json.encode(profile)) + b"\n")
