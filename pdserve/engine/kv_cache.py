"""The paged KV pools and their free-page allocator.

Two kinds of pool, chosen by the model (`new_pool`):

    KVPool      K and V per KV head (every model but MLA)
                k[layer], v[layer] : [num_pages * page_size, kv_heads, head_dim]
    LatentPool  one latent row per token (MLA, model/mla.py): [c_kv normed | k_pe roped]
                kv[layer]          : [num_pages * page_size, 1, kv_lora_rank + qk_rope_head_dim]
                (one "head" for every query head: KV bytes per token = the latent's size)

    either:    └ page p holds slots p*page_size .. p*page_size + page_size - 1

A token at position `pos` of a request lives in slot
`pages[pos // page_size] * page_size + pos % page_size`, where `pages` is the request's
page table. A page is contiguous per layer, so a transfer engine can move it as
`num_layers * len(tensors)` spans of `page_size * heads * head_dim * itemsize` bytes.
"""

from __future__ import annotations

import torch

from pdserve.model.config import ModelConfig


class OutOfPages(RuntimeError):
    pass


class PageAllocator:
    """A free list of page ids. Page 0 is never handed out (a harmless pad target)."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError(f"KV pool needs at least 2 pages, got {num_pages}")
        self.num_pages = num_pages
        self._free: list[int] = list(range(num_pages - 1, 0, -1))  # pop() yields 1, 2, 3, ...
        self._is_free = [True] * num_pages
        self._is_free[0] = False

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        return self.num_pages - 1

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"need {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._is_free[p] = False
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if self._is_free[p] or p == 0:
                raise AssertionError(f"double free of page {p}")
            self._is_free[p] = True
        self._free.extend(reversed(pages))


class KVPool:
    """Per-layer K/V tensors in pages, on the model's device and dtype."""

    def __init__(self, cfg: ModelConfig, num_pages: int, page_size: int, device: torch.device,
                 dtype: torch.dtype, tensors: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.page_size = page_size
        self.num_pages = num_pages
        self.num_layers = cfg.num_hidden_layers
        shape = self.shape(cfg, num_pages, page_size)
        if tensors is None:  # (a shm decode server passes tensors that live in shared memory)
            tensors = torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        self.k, self.v = tensors
        assert tuple(self.k.shape) == shape and tuple(self.v.shape) == shape

    @staticmethod
    def shape(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple[int, int, int, int]:
        return (cfg.num_hidden_layers, num_pages * page_size, cfg.num_key_value_heads, cfg.head_dim)

    @staticmethod
    def pages_for_budget(cfg: ModelConfig, page_size: int, gigabytes: float, itemsize: int) -> int:
        """Pages of either kind of pool (the model's) that fit `gigabytes`."""
        per_page = cfg.kv_elements_per_token * itemsize * page_size
        return max(2, int(gigabytes * (1 << 30)) // per_page)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The pool's memory, as a transfer engine registers it."""
        return self.k, self.v

    def page_bytes(self) -> int:
        """Bytes of one page across all layers, K and V."""
        return 2 * self.num_layers * self.k[0, : self.page_size].numel() * self.k.element_size()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)


class LatentPool:
    """MLA's pool: per layer one [c_kv | k_pe] row per token, shared by every query head."""

    def __init__(self, cfg: ModelConfig, num_pages: int, page_size: int, device: torch.device,
                 dtype: torch.dtype, tensors: tuple[torch.Tensor, ...] | None = None) -> None:
        assert cfg.mla is not None
        self.page_size = page_size
        self.num_pages = num_pages
        self.num_layers = cfg.num_hidden_layers
        shape = self.shape(cfg, num_pages, page_size)
        self.kv = tensors[0] if tensors is not None else torch.zeros(shape, device=device, dtype=dtype)
        assert tuple(self.kv.shape) == shape

    @staticmethod
    def shape(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple[int, int, int, int]:
        assert cfg.mla is not None
        return (cfg.num_hidden_layers, num_pages * page_size, 1, cfg.mla.latent_dim)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.kv,)

    def page_bytes(self) -> int:
        """Bytes of one page across all layers."""
        return self.num_layers * self.kv[0, : self.page_size].numel() * self.kv.element_size()

    def write(self, layer: int, slots: torch.Tensor, latent: torch.Tensor) -> None:
        self.kv[layer].view(self.kv.shape[1], -1).index_copy_(0, slots, latent)


Pool = KVPool | LatentPool


def pool_shape(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple[tuple[int, int, int, int], int]:
    """(the shape of each of the model's pool tensors, how many: K and V, or one latent)."""
    if cfg.mla is None:
        return KVPool.shape(cfg, num_pages, page_size), 2
    return LatentPool.shape(cfg, num_pages, page_size), 1


def new_pool(cfg: ModelConfig, num_pages: int, page_size: int, device: torch.device, dtype: torch.dtype,
             tensors: tuple[torch.Tensor, ...] | None = None) -> Pool:
    """The model's kind of pool (`tensors`: its memory allocated elsewhere, pool_shape's: shm)."""
    if cfg.mla is None:
        return KVPool(cfg, num_pages, page_size, device, dtype, None if tensors is None else (tensors[0], tensors[1]))
    return LatentPool(cfg, num_pages, page_size, device, dtype, tensors)


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)
