"""KV tiers below the device pool (DESIGN.md §10): a host tier and a storage tier behind the radix cache.

    codec.py         a page's content key (chained page hash + namespace) and framed, checked bytes
    storage.py       the storage interface, `PageStore` (codec + outage breaker)
    file_store.py    `file` backend: a directory, atomic writes, LRU under a size cap
    mooncake_store.py `mooncake` backend: Mooncake Store client against a mooncake_master
    host_pool.py     the host tier: slots in host memory (pinned on CUDA) and their allocator
    worker.py        a copy thread (device <-> host copies; storage I/O on a second one)
    tiers.py         `TierConfig`, `KVTiers`: memory, copies and storage of the tiers; policies; backends by name
    radix.py         `TieredPrefixCache`: the radix tree as the index of every tier (match, evict)
    moves.py         `TierMoves`: loads and fetches started, finished copies applied to the tree
    manager.py       `TieredKVManager`: a waiting request's prefix loaded back before it runs
Off by default: without tiers the engine uses engine/prefix_cache.py and engine/kv_manager.py as is.
"""
