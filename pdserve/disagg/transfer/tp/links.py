"""Which prefill rank sends which KV heads to which decode rank when the two sides run tensor
parallelism of different sizes (heterogeneous TP), and how a head slice of a page is laid out.

Lifecycle: the decode computes the links once per room from the prefill ranks' routes (each
says which global heads its pool holds) and its own ranks' head ranges; each decode rank sends
one RoomInfo per link it receives, carrying the link's HeadSlice and the source's fanout (how
many decode ranks it feeds, so the prefill rank knows when every page list has arrived).

Every decode head comes from exactly one prefill rank; replicated heads (kv_heads < tp) are
taken round-robin over the ranks holding them. A prefill rank whose heads no decode rank needs
still gets a link of count 0 (it sends only Done), so every rank of both sides is in the room.

An MLA latent pool is one "head" (KVLayout.tensors 1) that every TP rank holds whole: each
decode rank takes every page from ONE prefill rank (round-robin), the others send none:

    prefill tp 2, decode tp 1:  p0->d0 (0, 0, 1)   p1->d0 count 0 (Done only)
    prefill tp 1, decode tp 2:  p0->d0, p0->d1     (each decode rank's pool needs every latent)
    prefill tp 2, decode tp 2:  p0->d0, p1->d1

Example: 4 KV heads, prefill tp 2, decode tp 4, then prefill tp 4, decode tp 1:

    global head         0     1     2     3            0     1     2     3
    prefill ranks     [ p0  | p0  | p1  | p1  ]      [ p0  | p1  | p2  | p3  ]
    decode ranks      [ d0  | d1  | d2  | d3  ]      [ d0  | d0  | d0  | d0  ]
    links   p0->d0 (src 0, dst 0, 1)  p0->d1 (1, 0, 1)    p0->d0 (0, 0, 1)  p1->d0 (0, 1, 1)
            p1->d2 (0, 0, 1)  p1->d3 (1, 0, 1)            p2->d0 (0, 2, 1)  p3->d0 (0, 3, 1)
    fanout  p0: 2, p1: 2                                  each: 1

A head slice of one page, one layer, K (V alike). A slot holds every head of the pool's rank;
the slice of one slot is ONE contiguous range, a page of slices is page_size strided ranges:

    src pool slot s:  | h0 | h1 | h2 | h3 |         src_start=2, count=2
                                ^^^^^^^^^
    dst pool slot s': | h0 | h1 |                   dst_start=0
                      ^^^^^^^^^
    slice bytes per slot = count * head_dim * itemsize;  offset = slot * slot_bytes + start * head_bytes
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.disagg.messages import HeadSlice, KVLayout, LinkSpec

HeadRange = tuple[int, int]  # (first global head, count) a rank's pool holds


@dataclass(frozen=True)
class Link:
    src_rank: int
    dst_rank: int
    heads: HeadSlice


def head_range(layout: KVLayout) -> HeadRange:
    return layout.head_start, layout.kv_heads


def plan_links(prefill: list[HeadRange], decode: list[HeadRange], total_heads: int) -> list[Link]:
    """The links of one room; raises ValueError when the ranks do not cover the heads."""
    holders: dict[int, list[int]] = {h: [] for h in range(total_heads)}
    for p, (start, n) in enumerate(prefill):
        for h in range(start, start + n):
            if h not in holders:
                raise ValueError(f"prefill rank {p} claims KV head {h} of {total_heads}")
            holders[h].append(p)
    missing = [h for h, ps in holders.items() if not ps]
    if missing:
        raise ValueError(f"no prefill rank holds KV heads {missing}")
    links: list[Link] = []
    for d, (start, n) in enumerate(decode):
        for h in range(start, start + n):
            if h not in holders:
                raise ValueError(f"decode rank {d} holds KV head {h}, the prefill has {total_heads}")
            p = holders[h][d % len(holders[h])]
            src, dst = h - prefill[p][0], h - start
            last = links[-1] if links else None
            if (last is not None and last.src_rank == p and last.dst_rank == d
                    and last.heads.src_start + last.heads.count == src
                    and last.heads.dst_start + last.heads.count == dst):
                links[-1] = Link(p, d, HeadSlice(last.heads.src_start, last.heads.dst_start, last.heads.count + 1))
            else:
                links.append(Link(p, d, HeadSlice(src, dst, 1)))
    fed = {link.src_rank for link in links}
    for p in range(len(prefill)):
        if p not in fed:  # nothing of its pool is needed: it only confirms the room
            links.append(Link(p, p % len(decode), HeadSlice(0, 0, 0)))
    return links


def decode_links(sources: list[tuple[str, HeadRange]], decode: list[HeadRange], total_heads: int) -> list[list[LinkSpec]]:
    """Per decode rank, its links from the prefill ranks (`sources`: endpoint and heads of each)."""
    links = plan_links([h for _, h in sources], decode, total_heads)
    out: list[list[LinkSpec]] = [[] for _ in decode]
    for link in links:
        endpoint, (_, src_heads) = sources[link.src_rank]
        whole = full_slice(link.heads, src_heads, decode[link.dst_rank][1])
        out[link.dst_rank].append(LinkSpec(endpoint, None if whole else link.heads, fanout(links, link.src_rank)))
    return out


def fanout(links: list[Link], src_rank: int) -> int:
    return sum(1 for link in links if link.src_rank == src_rank)


def full_slice(heads: HeadSlice | None, src_heads: int, dst_heads: int) -> bool:
    """True when the slice is every head of both pools (page spans stay contiguous)."""
    return heads is None or (heads.src_start == 0 and heads.dst_start == 0
                             and heads.count == src_heads == dst_heads)


def check_slice(heads: HeadSlice, src_heads: int, dst_heads: int) -> None:
    if heads.count < 0 or heads.src_start < 0 or heads.dst_start < 0 \
            or heads.src_start + heads.count > src_heads or heads.dst_start + heads.count > dst_heads:
        raise ValueError(f"head slice {heads} does not fit pools of {src_heads} (prefill) and "
                         f"{dst_heads} (decode) KV heads")
