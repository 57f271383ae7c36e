"""The host tier: KV pages kept in host memory (pinned on CUDA), one contiguous slot per page.

    slots : [num_slots, 2, layers, page_size, kv_heads, head_dim]   (K then V of every layer)
            └ slot s is one contiguous buffer of `slot_bytes`: exactly a stored page's payload

A device page p (KVPool: k[layer][p*page_size : (p+1)*page_size]) is copied into a slot by
`copy_to_host` and back into (another) device page by `copy_to_device`: 2 x layers spans of
page_size * heads * head_dim elements each way. Slot ids come from `SlotAllocator`, which,
like the device allocator, checks double frees; the tier's invariant is

    free slots + slots held by cache nodes + slots held by copies in flight == num_slots

(`KVTiers.check` asserts it). Slot 0 is a real slot here (the device pool's page 0 is a pad
target; the host tier has no pads).
"""

from __future__ import annotations

import numpy as np
import torch


class SlotAllocator:
    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"the host KV tier needs at least 1 page, got {num_slots}")
        self.capacity = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # pop() yields 0, 1, 2, ...
        self._is_free = [True] * num_slots

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        """Up to `n` slots (fewer when fewer are free)."""
        out = [self._free.pop() for _ in range(min(n, len(self._free)))]
        for s in out:
            self._is_free[s] = False
        return out

    def free(self, slots: list[int]) -> None:
        for s in slots:
            if self._is_free[s]:
                raise AssertionError(f"double free of host slot {s}")
            self._is_free[s] = True
        self._free.extend(reversed(slots))


class HostPool:
    def __init__(self, num_slots: int, k: torch.Tensor, page_size: int) -> None:
        """A host tier shaped after the device pool's `k` ([layers, pages * page_size, heads, dim])."""
        layers, _, heads, dim = k.shape
        self.page_size = page_size
        self.slots = torch.zeros((num_slots, 2, layers, page_size, heads, dim), dtype=k.dtype,
                                 pin_memory=k.is_cuda)
        self.allocator = SlotAllocator(num_slots)
        self.slot_bytes = self.slots[0].numel() * self.slots.element_size()
        self._bytes = self.slots.view(num_slots, -1).view(torch.uint8)  # [slots, slot_bytes]

    @staticmethod
    def slots_for_bytes(k: torch.Tensor, page_size: int, nbytes: int) -> int:
        layers, _, heads, dim = k.shape
        return max(1, nbytes // (2 * layers * page_size * heads * dim * k.element_size()))

    @property
    def num_slots(self) -> int:
        return self.allocator.capacity

    def payload(self, slot: int) -> memoryview:
        """The slot's bytes (what storage holds for the page), without a copy."""
        return memoryview(self._bytes[slot].numpy()).cast("B")

    def fill(self, slot: int, payload: bytes | memoryview) -> None:
        """Write a stored page's payload into a slot."""
        self._bytes[slot].numpy()[:] = np.frombuffer(payload, dtype=np.uint8)

    def copy_to_host(self, k: torch.Tensor, v: torch.Tensor, pages: list[int], slots: list[int]) -> None:
        """Device pages -> host slots (on CUDA: on the current stream; the caller synchronizes)."""
        ps = self.page_size
        for p, s in zip(pages, slots):
            self.slots[s, 0].copy_(k[:, p * ps:(p + 1) * ps], non_blocking=k.is_cuda)
            self.slots[s, 1].copy_(v[:, p * ps:(p + 1) * ps], non_blocking=k.is_cuda)

    def copy_to_device(self, k: torch.Tensor, v: torch.Tensor, slots: list[int], pages: list[int]) -> None:
        """Host slots -> device pages (on CUDA: on the current stream; the caller synchronizes)."""
        ps = self.page_size
        for s, p in zip(slots, pages):
            k[:, p * ps:(p + 1) * ps].copy_(self.slots[s, 0], non_blocking=k.is_cuda)
            v[:, p * ps:(p + 1) * ps].copy_(self.slots[s, 1], non_blocking=k.is_cuda)
