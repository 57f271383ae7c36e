"""Typed wire messages between a prefill rank and a decode rank (msgspec; never pickled).

Two channels cross this process boundary:

1. Bootstrap HTTP (JSON bodies, msgspec.json), on the prefill host:
     prefill rank --PUT /route  RouteRegistration--> BootstrapServer
     decode       --GET /route?rank=N-------------> BootstrapServer --> RouteInfo
     decode       --GET /health-------------------> BootstrapServer --> Health
2. The transfer session (one TCP connection per decode rank x prefill rank, opened by decode),
   frames of `[u32 little-endian header length][msgpack header][payload bytes]`:
     decode  -> prefill : Hello (once), RoomInfo, AbortRoom, Ack
     prefill -> decode  : HelloAck (once), DataFrame (+ payload, tcp only), Done, RoomFailed

Session frames are tagged structs (a `type` field names the message); the HTTP bodies and
nested records are plain.

Per-room lifecycle on the session: RoomInfo (decode reserved pages; with a decode prefix cache only
those past its cached prefix, `decode_prefix_len`) -> zero or more DataFrames
(or one-sided writes: shm) -> Done (carries the MetadataRecord) -> Ack (decode has it all). Either
side may cut a room short: AbortRoom (decode asks) / RoomFailed (prefill tells: no write of this
room can land any more; also the answer to AbortRoom).
"""

from __future__ import annotations

import struct
from typing import Union

import msgspec
import torch


class LayoutMismatch(ValueError):
    """Prefill and decode disagree on the KV layout; the message names every differing field."""


class KVLayout(msgspec.Struct, frozen=True):
    """A pool of `tensors` tensors [num_layers, slots, kv_heads, head_dim]: K and V (2), or an
    MLA latent (1: K only, one "head" of the latent's width; every TP rank holds all of it, so
    tp/links.py takes each page from one rank)."""

    model: str
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32"
    page_size: int
    head_start: int = 0  # tensor parallelism: the pool holds global KV heads
    total_kv_heads: int = 0  # [head_start, head_start + kv_heads) of total_kv_heads (0: kv_heads)
    tensors: int = 2  # pool tensors: K and V, or 1 (a latent)

    @classmethod
    def for_pool(cls, model: str, k: torch.Tensor, page_size: int, head_start: int = 0,
                 total_kv_heads: int = 0, tensors: int = 2) -> KVLayout:
        """The layout of a pool tensor shaped [num_layers, num_pages*page_size, kv_heads, head_dim]."""
        if k.dim() != 4:
            raise ValueError(f"KV pool tensor must be 4-D [layers, slots, kv_heads, head_dim], got {tuple(k.shape)}")
        return cls(model=model, num_layers=k.shape[0], kv_heads=k.shape[2], head_dim=k.shape[3],
                   dtype=str(k.dtype).removeprefix("torch."), page_size=page_size, head_start=head_start,
                   total_kv_heads=total_kv_heads if total_kv_heads != k.shape[2] else 0, tensors=tensors)

    @property
    def all_kv_heads(self) -> int:
        """The model's KV heads (this pool may hold a slice of them)."""
        return self.total_kv_heads or self.kv_heads

    @property
    def head_bytes(self) -> int:
        """Bytes of one KV head of one slot: head_dim x itemsize."""
        return self.head_dim * torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def torch_dtype(self) -> torch.dtype:
        dt = getattr(torch, self.dtype, None)
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"unknown KV dtype {self.dtype!r}")
        return dt

    @property
    def span_bytes(self) -> int:
        """Bytes of one page of one layer of K (or V): page_size x kv_heads x head_dim x itemsize."""
        return self.page_size * self.kv_heads * self.head_dim * torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def page_bytes(self) -> int:
        """Bytes of one page over all layers and tensors (K and V, or the latent)."""
        return self.tensors * self.num_layers * self.span_bytes

    @property
    def model_page_bytes(self) -> int:
        """Bytes of one page over every KV head of the model (all tensor-parallel ranks together)."""
        return self.page_bytes * self.all_kv_heads // self.kv_heads

    def check_compatible(self, other: KVLayout, *, mine: str = "decode", theirs: str = "prefill") -> None:
        """Raise LayoutMismatch naming each differing field with both values. Which slice of the
        heads each side holds may differ (tensor parallelism: transfer/tp/links.py pairs the slices)."""
        diffs = [f"{name} ({mine}={getattr(self, name)!r}, {theirs}={getattr(other, name)!r})"
                 for name in ("model", "num_layers", "tensors", "all_kv_heads", "head_dim", "dtype", "page_size")
                 if getattr(self, name) != getattr(other, name)]
        if diffs:
            raise LayoutMismatch(f"KV layout mismatch between {mine} and {theirs}: " + "; ".join(diffs))

    def check_pool(self, k: torch.Tensor, v: torch.Tensor | None) -> None:
        """Raise ValueError unless k and v (None: a one-tensor pool) are pool tensors of this layout."""
        if (v is None) != (self.tensors == 1):
            raise ValueError(f"the layout has {self.tensors} pool tensors, the pool {1 if v is None else 2}")
        if v is None:
            v = k
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 4 or (t.shape[0], t.shape[2], t.shape[3]) != (self.num_layers, self.kv_heads, self.head_dim):
                raise ValueError(f"KV pool {name} has shape {tuple(t.shape)}, layout wants "
                                 f"[{self.num_layers}, slots, {self.kv_heads}, {self.head_dim}]")
            if t.dtype != self.torch_dtype:
                raise ValueError(f"KV pool {name} dtype {t.dtype} != layout dtype {self.dtype}")
            if t.shape[1] % self.page_size:
                raise ValueError(f"KV pool {name} has {t.shape[1]} slots, not a multiple of page_size {self.page_size}")
        if k.shape != v.shape:
            raise ValueError(f"KV pool k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")


class MetadataRecord(msgspec.Struct, frozen=True):
    """What decode needs to commit the first token without a forward pass."""

    room: int  # the guard: decode checks record.room == its room
    first_token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # [(token id, logprob)]
    cached_tokens: int = 0


# --- Bootstrap HTTP bodies (msgspec.json) ------------------------------------------------------


class RouteRegistration(msgspec.Struct, frozen=True):
    rank: int  # tensor-parallel rank within its dp rank
    endpoint: str
    layout: KVLayout
    dp_rank: int = 0  # data parallelism: rooms with bootstrap_room % dp_size == dp_rank live here
    dp_size: int = 1


class RouteInfo(msgspec.Struct, frozen=True):
    rank: int
    endpoint: str
    layout: KVLayout
    instance: str  # the bootstrap server's instance id; changes when the prefill restarts
    num_ranks: int  # tensor-parallel ranks of this dp rank
    dp_rank: int = 0
    dp_size: int = 1
    epoch: int = 1  # the prefill server's role epoch (DisaggConfig.epoch)


class Health(msgspec.Struct, frozen=True):
    status: str
    instance: str


class HttpError(msgspec.Struct, frozen=True):
    error: str


# --- Transfer session frames (msgspec.msgpack) --------------------------------------------------


class PeerIdentity(msgspec.Struct, frozen=True):
    instance: str  # random per manager
    host: str
    boot_id: str  # /proc/sys/kernel/random/boot_id: same machine iff equal (with host)
    pid: int
    start_time: int  # /proc/<pid>/stat field 22: tells a live process from a reused pid


class ShmRegion(msgspec.Struct, frozen=True):
    """Where the decode's KV pool lives in shared memory (the shm backend's Hello.region)."""

    path: str
    size: int
    k_offset: int
    v_offset: int  # -1: no V (a latent pool)
    num_slots: int  # decode's num_pages * page_size
    heads: int = 0  # KV heads per slot of decode's pool (0: as many as the prefill's)


class PoolRegion(msgspec.Struct, frozen=True):
    """Where the decode's KV pool lives in its process's memory, for one-sided engines (nixl,
    mooncake): K and V are each [num_layers, num_slots, heads, head_dim] contiguous, so layer l,
    slot s starts at base + (l * num_slots + s) * slot_bytes."""

    k_base: int
    v_base: int  # 0: no V (a latent pool, K only)
    num_slots: int  # decode's num_pages * page_size
    slot_bytes: int  # heads * head_dim * itemsize
    head_bytes: int = 0  # head_dim * itemsize (0: slot_bytes, one head)


class NixlRegion(msgspec.Struct, frozen=True):
    """The nixl backend's Hello.region: the decode agent's metadata and its registered pool."""

    agent_name: str
    agent_metadata: bytes  # nixl_agent.get_agent_metadata()
    pool: PoolRegion
    mem_type: str = "DRAM"  # DRAM | VRAM: what the prefill's remote descriptors must say
    device_id: int = 0  # the GPU of a VRAM pool


class MooncakeRegion(msgspec.Struct, frozen=True):
    """The mooncake backend's Hello.region: the decode engine's session id and its registered pool."""

    session_id: str  # "host:rpc_port" (P2PHANDSHAKE)
    pool: PoolRegion


class Hello(msgspec.Struct, frozen=True, tag=True):
    identity: PeerIdentity
    layout: KVLayout
    backend: str
    token: str | None = None
    region: bytes = b""  # backend-specific, e.g. an encoded ShmRegion


class HelloAck(msgspec.Struct, frozen=True, tag=True):
    identity: PeerIdentity
    error: str | None = None  # set: the session is refused and closed


class HeadSlice(msgspec.Struct, frozen=True):
    """KV heads [src_start, src_start + count) of the prefill rank's pool go to heads
    [dst_start, dst_start + count) of the decode rank's pool (local indices; transfer/tp/links.py)."""

    src_start: int
    dst_start: int
    count: int


class LinkSpec(msgspec.Struct, frozen=True):
    """One link of a decode rank's room (transfer/tp/links.py): where its heads come from."""

    endpoint: str  # the prefill rank's transfer endpoint
    heads: HeadSlice | None  # None: every head of both pools
    fanout: int  # decode ranks that prefill rank feeds in this room


class RoomInfo(msgspec.Struct, frozen=True, tag=True):
    """A decode rank's page list for a room. With a decode-side prefix cache the decode already
    holds the prompt's first `decode_prefix_len` tokens (a whole number of pages, SGLang's name):
    `dst_pages` are then only the pages past it, i.e. prompt page i goes to
    dst_pages[i - decode_prefix_len // page_size], and pages below it never move."""

    room: int
    dst_pages: list[int]
    decode_id: str  # the decode manager's instance id (logs, sanity)
    heads: HeadSlice | None = None  # None: every head, same layout on both sides
    fanout: int = 1  # decode ranks that take this room from this prefill rank (tensor parallelism)
    decode_prefix_len: int = 0  # prompt tokens the decode has cached (page-aligned); 0: none


class AbortRoom(msgspec.Struct, frozen=True, tag=True):
    room: int
    reason: str


class RoomFailed(msgspec.Struct, frozen=True, tag=True):
    room: int
    reason: str


class DataFrame(msgspec.Struct, frozen=True, tag=True):
    """Header of `nbytes` payload bytes: for layer in [layer_start, layer_end), for K then V, for
    each (dst_page, n_pages) run: the n_pages contiguous page spans of that layer."""

    room: int
    seq: int
    layer_start: int
    layer_end: int
    runs: list[tuple[int, int]]
    nbytes: int


class Done(msgspec.Struct, frozen=True, tag=True):
    room: int
    num_frames: int  # DataFrames of this room sent before Done (0 for one-sided backends)
    metadata: MetadataRecord


class Ack(msgspec.Struct, frozen=True, tag=True):
    room: int


SessionMsg = Union[Hello, HelloAck, RoomInfo, AbortRoom, RoomFailed, DataFrame, Done, Ack]

FRAME_PREFIX = struct.Struct("<I")
MAX_HEADER_BYTES = 64 << 20  # a RoomInfo with millions of pages still fits; garbage does not

session_encoder = msgspec.msgpack.Encoder()
session_decoder = msgspec.msgpack.Decoder(SessionMsg)
region_decoder = msgspec.msgpack.Decoder(ShmRegion)
mooncake_region_decoder = msgspec.msgpack.Decoder(MooncakeRegion)
