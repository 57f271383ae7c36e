"""What a KV page looks like in storage: its key (content + namespace) and its framed bytes.

A page is named by its chained page hash (pdserve/kv_events `page_hash`, the KV-events hash:
it names the whole token prefix up to and including the page) and a namespace that says how
its bytes were laid out, so any instance with the same model, dtype, page size, layout and
head slice reuses another's pages and never anyone else's:

    key   = "pdkv-" + blake2b(namespace text, 8 bytes).hex() + "-" + "%016x" % page_hash

A stored object is a header, the namespace text, then the page's bytes (K then V of every
layer for the page, in the host tier's layout [2, layers, page_size, heads, head_dim]):

    0      4    5    6      8           16          24          32         32+n
    | PDKV | v1 | 0  | n    | page hash | length    | checksum  | namespace | payload ... |
      magic        ns len   u64 LE      u64 LE      xxh3-64 of the payload, seeded with the hash

`open_page` accepts an object only if every field matches what the reader expects (namespace,
hash, length) and the checksum holds; anything else (missing, truncated, corrupt, written by
another layout) is a miss: the page is recomputed, never used.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import xxhash

MAGIC = b"PDKV"
VERSION = 1
_HEAD = struct.Struct("<4sBBHQQQ")  # magic, version, reserved, ns length, hash, length, checksum
HEADER_BYTES = _HEAD.size  # 32


class BadPage(ValueError):
    """A stored object that must not be used (the reason is the message)."""


@dataclass(frozen=True)
class Namespace:
    """Everything that must match for two instances to share a page's bytes."""

    model: str  # the model's name (folder or file name)
    dtype: str  # e.g. "float32"
    page_size: int
    layout: str  # e.g. "2x30x16x3x64" = (K,V) x layers x page_size x heads x head_dim
    head_start: int = 0  # this rank's KV head slice [head_start, head_start + layout's heads)
    num_heads: int = 0  # the model's KV heads in all (0: not sliced)

    def text(self) -> str:
        return (f"model={self.model};dtype={self.dtype};page={self.page_size};layout={self.layout};"
                f"heads={self.head_start}+/{self.num_heads}")

    @property
    def digest(self) -> str:
        return hashlib.blake2b(self.text().encode(), digest_size=8).hexdigest()

    def key(self, page_hash: int) -> str:
        return f"pdkv-{self.digest}-{page_hash:016x}"


def checksum(payload: bytes | memoryview, page_hash: int) -> int:
    return xxhash.xxh3_64_intdigest(payload, seed=page_hash)


def frame_page(ns: Namespace, page_hash: int, payload: bytes | memoryview) -> bytes:
    """Header + namespace + payload, as one object to store."""
    name = ns.text().encode()
    head = _HEAD.pack(MAGIC, VERSION, 0, len(name), page_hash, len(payload), checksum(payload, page_hash))
    return b"".join((head, name, payload))


def open_page(ns: Namespace, page_hash: int, data: bytes | memoryview | None, length: int) -> memoryview:
    """The payload of a stored object, checked against what the reader expects; raises BadPage."""
    if not data:
        raise BadPage("missing")
    view = memoryview(data)
    if len(view) < HEADER_BYTES:
        raise BadPage(f"truncated header ({len(view)} bytes)")
    magic, version, _, ns_len, h, n, sum_ = _HEAD.unpack_from(view)
    if magic != MAGIC or version != VERSION:
        raise BadPage("not a pdserve KV page")
    name = bytes(view[HEADER_BYTES:HEADER_BYTES + ns_len]).decode(errors="replace")
    if name != ns.text():
        raise BadPage(f"namespace {name!r} is not {ns.text()!r}")
    if h != page_hash:
        raise BadPage(f"page hash {h:016x} is not {page_hash:016x}")
    if n != length:
        raise BadPage(f"length {n} is not {length}")
    payload = view[HEADER_BYTES + ns_len:]
    if len(payload) != length:
        raise BadPage(f"truncated: {len(payload)} of {length} bytes")
    if checksum(payload, page_hash) != sum_:
        raise BadPage("checksum mismatch")
    return payload
