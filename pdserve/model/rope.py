"""Rotary position embeddings (HF "rotate_half" layout) with default, linear, llama3 and YaRN
scaling. YaRN (DeepSeek's long-context RoPE) also scales cos/sin by its attention factor and,
through `mscale_all_dim`, the softmax scale (`softmax_scale`), as HF and DeepSeek do."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pdserve.model.config import ModelConfig


def _kind(cfg: ModelConfig) -> str:
    scaling = cfg.rope_scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default")) or "default"


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def attention_factor(cfg: ModelConfig) -> float:
    """The factor YaRN scales cos/sin by (1.0 for every other kind)."""
    if _kind(cfg) != "yarn":
        return 1.0
    s = cfg.rope_scaling or {}
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    factor = float(s["factor"])
    if s.get("mscale") and s.get("mscale_all_dim"):
        return yarn_mscale(factor, float(s["mscale"])) / yarn_mscale(factor, float(s["mscale_all_dim"]))
    return yarn_mscale(factor)


def softmax_scale(cfg: ModelConfig, head_dim: int) -> float:
    """1/sqrt(head_dim), times DeepSeek's mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = head_dim ** -0.5
    s = cfg.rope_scaling or {}
    if _kind(cfg) == "yarn" and s.get("mscale_all_dim"):
        scale *= yarn_mscale(float(s["factor"]), float(s["mscale_all_dim"])) ** 2
    return scale


def _yarn(inv: torch.Tensor, cfg: ModelConfig, dim: int) -> torch.Tensor:
    """Blend interpolated (inv / factor) and extrapolated (inv) frequencies over a linear ramp
    between the dims that turn beta_fast and beta_slow times in the original context."""
    s = cfg.rope_scaling or {}
    factor, length = float(s["factor"]), float(s["original_max_position_embeddings"])
    fast, slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)

    def dim_of(rotations: float) -> float:
        return dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low, high = dim_of(fast), dim_of(slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
    return inv / factor * ramp + inv * (1 - ramp)


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.rotary_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = _kind(cfg)
    if kind == "yarn":
        inv = _yarn(inv, cfg, dim)
    elif kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv = torch.where(medium, smoothed, scaled)
    elif kind not in ("default", None):
        raise ValueError(f"unsupported rope scaling {kind!r}")
    return inv


@dataclass(frozen=True)
class Rotation:
    """cos/sin of one forward's positions, gathered once and applied in every layer.

    With x = [x1 | x2] (halves of D): out = [x1*cos - x2*sin | x2*cos + x1*sin],
    i.e. HF's `x*cos + rotate_half(x)*sin` without materialising rotate_half.
    """

    cos: torch.Tensor  # [T, 1, D/2]
    sin: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x: [T, H, D] (q and k heads stacked together)."""
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * self.cos - x2 * self.sin, x2 * self.cos + x1 * self.sin), dim=-1)


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin tables indexed by absolute position."""

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        inv = inv_frequencies(cfg)
        pos = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(pos, inv)  # [P, D/2]: the two halves of HF's table are equal
        scale = attention_factor(cfg)
        self.register_buffer("cos", freqs.cos() * scale, persistent=False)
        self.register_buffer("sin", freqs.sin() * scale, persistent=False)

    def forward(self, positions: torch.Tensor) -> Rotation:
        """The rotation at `positions`: [T] (one gather per forward, not per layer)."""
        return Rotation(self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1))
