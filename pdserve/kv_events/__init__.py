"""KV-cache events: the wire format servers publish and routers consume (msgspec + stdlib only).

See `events.py` for the format and the page hash; both the engine (publisher) and the router
(subscriber, index) import this package, which imports neither of them.
"""

from pdserve.kv_events.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVBlock,
    KVEvent,
    KVEventBatch,
    KVEventsConfig,
    KVSnapshot,
    MEDIUM_DEVICE,
    MEDIUM_DISK,
    MEDIUM_EXTERNAL,
    MEDIUM_HOST,
    NO_PARENT,
    STORAGE_MEDIA,
    chain_hashes,
    decode_batch,
    encode_batch,
    page_hash,
    parse_kv_events_config,
    seq_frame,
    seq_of,
)

__all__ = ["AllBlocksCleared", "BlockRemoved", "BlockStored", "KVBlock", "KVEvent", "KVEventBatch",
           "KVEventsConfig", "KVSnapshot", "MEDIUM_DEVICE", "MEDIUM_DISK", "MEDIUM_EXTERNAL", "MEDIUM_HOST",
           "NO_PARENT", "STORAGE_MEDIA", "chain_hashes", "decode_batch", "encode_batch",
           "page_hash", "parse_kv_events_config", "seq_frame", "seq_of"]
