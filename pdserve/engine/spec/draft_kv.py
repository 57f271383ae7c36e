"""Which tokens the draft model's KV holds, page by page: the draft's pool shares the target's
page numbering (a request's page table serves both models, as SGLang's draft worker shares the
target's token slots), but the draft computes only when it proposes, so its KV lags the
target's, holds draft tokens the target refused, and stays behind in pages the radix cache or
another request takes over. The ledger records what the draft really wrote in each page:

    page p -> (context hash, [t0, t1, ...])   the draft's KV of slots 0, 1, ... of p holds
                                               tokens t0, t1, ... computed after a prefix whose
                                               chained page hash (pdserve.kv_events) is `context`

    valid(req, limit): walk req's pages; page i counts while its entry's context is the hash of
    req.tokens[:i * page_size] and its tokens agree with req.tokens there, slot by slot:

        req.tokens   [ a b c d | e f g h | i j x ]          page_size 4
        ledger       [ a b c d | e f g h | i j y z ]         ^ the draft wrote y z (refused drafts)
                       ok        ok        2 slots agree  -> valid = 10: recompute from x

Only the draft writes its pool, so an entry stays true until the draft writes that page again:
a prefix-cache hit on pages the draft computed for an earlier request is a draft hit too; a
page another request's target filled (or a PD transfer wrote) is recomputed by the draft.
"""

from __future__ import annotations

from pdserve.engine.request import Request
from pdserve.kv_events import NO_PARENT, page_hash


class DraftLedger:
    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._pages: dict[int, tuple[int, list[int]]] = {}
        self._chains: dict[Request, list[int]] = {}  # context hash of each page start of req.tokens

    def _chain(self, req: Request, pages: int) -> list[int]:
        """Context hashes of req.tokens' page starts 0 .. pages-1 (full pages only; cached:
        tokens only grow, and full pages never change)."""
        chain = self._chains.setdefault(req, [NO_PARENT])
        ps, toks = self.page_size, req.tokens
        while len(chain) < pages and len(chain) * ps <= len(toks):
            i = len(chain) - 1
            chain.append(page_hash(chain[i], toks[i * ps:(i + 1) * ps]))
        return chain

    def valid(self, req: Request, limit: int) -> int:
        """Leading tokens of req.tokens[:limit] whose KV the draft holds in req's pages."""
        ps, n = self.page_size, 0
        chain = self._chain(req, -(-limit // ps))
        for i, page in enumerate(req.pages[: -(-limit // ps)]):
            entry = self._pages.get(page)
            if entry is None or i >= len(chain) or entry[0] != chain[i]:
                break
            lo = i * ps
            want, have = req.tokens[lo:min(lo + ps, limit)], entry[1]
            m = 0
            while m < len(want) and m < len(have) and want[m] == have[m]:
                m += 1
            n = lo + m
            if m < ps:
                break
        return n

    def wrote(self, req: Request, drafts: list[int], start: int, end: int) -> None:
        """The draft wrote positions [start, end) of req.tokens + drafts into req's pages;
        [0, start) was valid before (what `valid` said)."""
        ps, seq = self.page_size, req.tokens + drafts
        chain = self._chain(req, -(-end // ps))
        for i in range(start // ps, -(-end // ps)):
            lo = i * ps
            while i >= len(chain):  # a page start past the request's own full pages: drafts in its context
                j = len(chain) - 1
                chain = chain + [page_hash(chain[j], seq[j * ps:(j + 1) * ps])]
            self._pages[req.pages[i]] = (chain[i], seq[lo:min(lo + ps, end)])

    def release(self, req: Request) -> None:
        self._chains.pop(req, None)
