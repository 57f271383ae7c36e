"""KV events: page-level "stored"/"removed" messages of a server's prefix cache, and the page hash.

Lifecycle of the stream (publisher: engine/kv_publisher.py in the engine process; subscriber:
router/kv_index.py):
  1. the engine's radix cache reports every page it adopts (insert), drops (eviction) and the
     whole-cache flush; the engine process gathers them and, after each engine step or control
     message, PUBlishes one `KVEventBatch` as a 3-frame ZMQ message
     `[topic, seq (8 bytes, big-endian), msgpack(batch)]` — vLLM's publisher framing, which
     Dynamo consumes. `seq` starts at 1 and grows by one per batch; a server that sent nothing
     for a second re-sends an empty batch with the current seq (a heartbeat), so a subscriber
     that missed the last batch learns it within a second, and silence means trouble;
  2. a subscriber takes `GET /kv_events/snapshot` (every stored block, the seq it is current
     at and its time), then applies batches with seq > snapshot seq; a batch whose seq skips
     one means lost events (PUB drops when nobody listens or a queue is full), and a batch with
     an older seq but a newer `ts` than the last one applied means the server restarted (its
     seq began again at 1): either way, take a new snapshot (resync).

Message shapes (vLLM's `KVEventBatch`, tagged msgspec Structs encoded with msgpack, array-like):
    KVEventBatch[ts: float, events: [BlockStored | BlockRemoved | AllBlocksCleared], dp_rank]
    BlockStored[block_hashes, parent_block_hash | None, token_ids, block_size, lora_id=None, medium=None]
        a chain of new pages under `parent_block_hash` (None: at the root); `token_ids` holds
        len(block_hashes) * block_size tokens, page after page
    BlockRemoved[block_hashes, medium=None]      pages dropped (evicted leaves)
    AllBlocksCleared[]              the whole cache was flushed

The tier (vLLM's and SGLang's `medium`; KV tiers, engine/kv_tiers): a page is stored in and
removed from each tier of a server on its own. BlockStored's medium None is the device pool
("GPU" in SGLang's names, whatever the device); MEDIUM_HOST is the host tier; MEDIUM_DISK
(file) and MEDIUM_EXTERNAL (Mooncake Store) say the page is in the shared storage the server
advertises (`/server_info` `hicache_storage`), where any server of that store can fetch it.
BlockRemoved's medium names the tier the page left while the server still holds it in another;
None means it left every tier of the server (the only case without tiers). Nothing says when
shared storage evicts a page: a subscriber ages what it learnt of a store.

Page hash (identical in every process, never Python's salted `hash`): for page i of a token
sequence, `h_i = page_hash(h_{i-1}, tokens[i*P:(i+1)*P])` with `h_{-1} = NO_PARENT (0)`, where
    page_hash(parent, ids) = int.from_bytes(blake2b(pack("<Q", parent) + pack("<%dI", *ids),
                                                     digest_size=8).digest(), "little")
an unsigned 64-bit integer (e.g. page_hash(0, [1, 2, 3, 4]) == 0x09222804E3E39BA2). A hash names the whole prefix up to its page, so a server's cache
(a radix tree of pages) is exactly the set of its page hashes, and a prompt's cached prefix on a
server is the longest run of its leading chain hashes that the server holds.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Union

import msgspec

NO_PARENT = 0
SEQ_BYTES = 8
MEDIUM_DEVICE = "GPU"  # SGLang's L1 name for the device pool (sent as None in BlockStored)
MEDIUM_HOST = "CPU_PINNED"
MEDIUM_DISK = "DISK"
MEDIUM_EXTERNAL = "EXTERNAL"
STORAGE_MEDIA = (MEDIUM_DISK, MEDIUM_EXTERNAL)
DEFAULT_TOPIC = "kv-events"


def page_hash(parent: int, token_ids: "list[int] | tuple[int, ...]") -> int:
    data = struct.pack(f"<Q{len(token_ids)}I", parent, *token_ids)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def chain_hashes(token_ids: list[int], page_size: int, parent: int = NO_PARENT) -> list[int]:
    """Hashes of the full pages of `token_ids`, each chained over the one before."""
    out: list[int] = []
    for i in range(len(token_ids) // page_size):
        parent = page_hash(parent, token_ids[i * page_size:(i + 1) * page_size])
        out.append(parent)
    return out


class BlockStored(msgspec.Struct, array_like=True, omit_defaults=True, tag=True):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None  # None: the device pool (see the module docstring)


class BlockRemoved(msgspec.Struct, array_like=True, omit_defaults=True, tag=True):
    block_hashes: list[int]
    medium: str | None = None  # None: left every tier of the server


class AllBlocksCleared(msgspec.Struct, array_like=True, omit_defaults=True, tag=True):
    pass


KVEvent = Union[BlockStored, BlockRemoved, AllBlocksCleared]


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True):
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


class KVBlock(msgspec.Struct, array_like=True):
    """One cached page in a snapshot: its hash, its parent's (NO_PARENT at the root), its tokens."""

    block_hash: int
    parent_block_hash: int
    token_ids: list[int]
    medium: str | None = None  # None: the device pool; a page in several tiers is listed once per tier


class KVSnapshot(msgspec.Struct):
    """`GET /kv_events/snapshot`: every cached page, current as of batch `seq` (0: none sent yet),
    taken at `ts` (the publisher's clock, like a batch's `ts`)."""

    seq: int
    block_size: int
    blocks: list[KVBlock]
    ts: float = 0.0


_batch_encoder = msgspec.msgpack.Encoder()
_batch_decoder = msgspec.msgpack.Decoder(KVEventBatch)


def encode_batch(batch: KVEventBatch) -> bytes:
    return _batch_encoder.encode(batch)


def decode_batch(data: bytes | memoryview) -> KVEventBatch:
    return _batch_decoder.decode(data)


def seq_frame(seq: int) -> bytes:
    return seq.to_bytes(SEQ_BYTES, "big")


def seq_of(frame: bytes | memoryview) -> int:
    return int.from_bytes(frame, "big")


@dataclass(frozen=True)
class KVEventsConfig:
    """`--kv-events-config` JSON (SGLang's/vLLM's flag): publishing is on when the flag is given.
    `endpoint` is where the PUB socket binds; port `*` picks a free one (advertised in /server_info)."""

    publisher: str = "zmq"
    endpoint: str = "tcp://127.0.0.1:*"
    topic: str = DEFAULT_TOPIC


def parse_kv_events_config(text: str | None) -> KVEventsConfig | None:
    """None when off; raises ValueError (one sentence) for a config that cannot work."""
    if text is None:
        return None
    try:
        raw = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"--kv-events-config is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError("--kv-events-config must be a JSON object")
    if raw.get("enable_kv_cache_events") is False:
        return None
    known = {"publisher", "endpoint", "topic"}
    kwargs = {k: v for k, v in raw.items() if k in known}
    if any(not isinstance(v, str) for v in kwargs.values()):
        raise ValueError("--kv-events-config: publisher, endpoint and topic are strings")
    cfg = KVEventsConfig(**kwargs)
    if cfg.publisher != "zmq":
        raise ValueError(f"--kv-events-config: publisher {cfg.publisher!r} is not supported (only 'zmq')")
    if not cfg.endpoint.startswith(("tcp://", "ipc://")):
        raise ValueError("--kv-events-config: endpoint must be tcp://HOST:PORT or ipc://PATH")
    return cfg
