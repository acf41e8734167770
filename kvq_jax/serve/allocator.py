"""Host-side page allocator with a prefix cache.

Every page of the pool is in exactly one of three states, and the counts always add up
to ``num_pages``:

* free: on the free list;
* used: held by one or more requests (``refcount >= 1``);
* cached: held by no request but registered in the prefix cache under the hash of the
  token prefix it ends; it keeps its quantized KV for a later request with the same
  prefix and is evicted, least recently used first, when `alloc` finds the free list
  short.

A request's pages are returned with `release` (finished or cancelled alike): each page's
refcount drops by one; at zero a registered page becomes cached, any other page free.

Prefix keys: page ``p`` of a sequence (body stream slots ``[p * page_size, (p + 1) *
page_size)``) is keyed by a chained hash of all tokens up to the last one it holds:
``key_p = blake2b(key_{p-1} || tokens of page p)``, with the first ``sinks`` tokens
folded into ``key_0``. Equal keys mean equal token prefixes (up to hash collisions of
a 128-bit digest).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


def prefix_keys(tokens: Sequence[int], page_size: int, num_pages: int, sinks: int = 0,
                salt: bytes = b"") -> list[bytes]:
    """Keys of the first ``num_pages`` full pages of a token sequence.

    Args:
      tokens: the token ids (at least ``sinks + num_pages * page_size`` of them).
      page_size: tokens per page.
      num_pages: pages to key.
      sinks: leading tokens held outside the pages (bf16 sinks), hashed into every key.
      salt: bytes mixed into every key (e.g. the cache spec and model), so that
        different caches never share a key.

    Returns:
      ``num_pages`` 16-byte keys; key p identifies tokens ``[0, sinks + (p + 1) * page_size)``.
    """
    toks = np.asarray(tokens, np.int64)
    need = sinks + num_pages * page_size
    if toks.ndim != 1 or toks.shape[0] < need:
        raise ValueError(f"tokens: expected at least {need} ids, got shape {toks.shape}")
    prev = hashlib.blake2b(salt + toks[:sinks].tobytes(), digest_size=16).digest()
    keys = []
    for p in range(num_pages):
        chunk = toks[sinks + p * page_size: sinks + (p + 1) * page_size]
        prev = hashlib.blake2b(prev + chunk.tobytes(), digest_size=16).digest()
        keys.append(prev)
    return keys


class OutOfPages(Exception):
    """`PageAllocator.alloc` could not find enough free or evictable pages."""


class PageAllocator:
    """Pages ``0 .. num_pages - 1`` of a pool: free list, refcounts, prefix cache with LRU eviction.

    Args:
      num_pages: pages in the pool.

    Attributes:
      num_pages: total pages; ``num_free + num_used + num_cached == num_pages`` always.
      evictions: pages evicted from the prefix cache so far.
    """

    def __init__(self, num_pages: int):
        if not isinstance(num_pages, (int, np.integer)) or num_pages <= 0:
            raise ValueError(f"num_pages: expected a positive int, got {num_pages!r}")
        self.num_pages = int(num_pages)
        self._free = list(range(self.num_pages - 1, -1, -1))  # pop() hands out low pages first
        self._ref = np.zeros(self.num_pages, np.int64)
        self._key_of: dict[int, bytes] = {}  # registered page -> key
        self._page_of: dict[bytes, int] = {}  # key -> registered page
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached pages (refcount 0), oldest first
        self.evictions = 0

    # -- counts ---------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._lru)

    @property
    def num_used(self) -> int:
        return int(np.count_nonzero(self._ref))

    @property
    def num_available(self) -> int:
        """Pages `alloc` can hand out now: free plus evictable."""
        return self.num_free + self.num_cached

    def refcount(self, page: int) -> int:
        return int(self._ref[self._check_page(page)])

    def check(self) -> None:
        """Assert the invariants (every page in exactly one state); raises AssertionError."""
        free = set(self._free)
        cached = set(self._lru)
        used = set(np.nonzero(self._ref)[0].tolist())
        assert len(free) == len(self._free), "a page is twice on the free list"
        assert not (free & cached) and not (free & used) and not (cached & used), "a page in two states"
        assert len(free) + len(cached) + len(used) == self.num_pages, "a page leaked"
        assert all(p in self._key_of for p in cached), "a cached page without a key"
        assert all(self._page_of[k] == p for p, k in self._key_of.items()), "key maps disagree"

    def _check_page(self, page) -> int:
        if not isinstance(page, (int, np.integer)) or not 0 <= page < self.num_pages:
            raise ValueError(f"page: expected an int in [0, {self.num_pages}), got {page!r}")
        return int(page)

    # -- alloc / release --------------------------------------------------------
    def alloc(self, n: int) -> list[int]:
        """``n`` fresh pages (refcount 1), evicting least recently used cached pages if needed.

        Raises:
          ValueError: n is not a non-negative int.
          OutOfPages: fewer than n pages are free or evictable (nothing is allocated).
        """
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n: expected a non-negative int, got {n!r}")
        if n > self.num_available:
            raise OutOfPages(f"n: {n} pages requested, {self.num_free} free and {self.num_cached} evictable")
        while len(self._free) < n:
            page, _ = self._lru.popitem(last=False)
            del self._page_of[self._key_of.pop(page)]
            self._free.append(page)
            self.evictions += 1
        out = [self._free.pop() for _ in range(n)]
        self._ref[out] = 1
        return out

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page (a request finished or was cancelled).

        A page reaching refcount 0 becomes cached when registered (most recently used),
        else free. Releasing a page nobody holds raises ValueError (nothing is changed).
        """
        pages = [self._check_page(p) for p in pages]
        counts = np.bincount(np.asarray(pages, np.int64), minlength=self.num_pages) if pages else None
        if counts is not None and np.any(counts > self._ref):
            bad = np.nonzero(counts > self._ref)[0].tolist()
            raise ValueError(f"pages: {bad} released more often than held")
        for p in pages:
            self._ref[p] -= 1
            if self._ref[p] == 0:
                if p in self._key_of:
                    self._lru[p] = None
                else:
                    self._free.append(p)

    def retain(self, pages: Sequence[int]) -> None:
        """One more reference to each of ``pages``, all held already (a second holder of the
        same KV, e.g. a prefix snapshot); `release` drops it. Raises ValueError (nothing is
        changed) for a page nobody holds."""
        pages = [self._check_page(p) for p in pages]
        bad = [p for p in pages if self._ref[p] == 0]
        if bad:
            raise ValueError(f"pages: {bad} are not held; retain pages while holding them")
        for p in pages:
            self._ref[p] += 1

    # -- prefix cache -------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """The registered pages of the longest run of ``keys`` from the first one on.

        Each returned page gets one more reference (the caller now holds it and must
        `release` it) and leaves the evictable set while held.
        """
        out = []
        for key in keys:
            page = self._page_of.get(key)
            if page is None:
                break
            out.append(page)
        for p in out:
            if self._ref[p] == 0:
                del self._lru[p]
            self._ref[p] += 1
        return out

    def register(self, key: bytes, page: int) -> bool:
        """Record that ``page`` (held by the caller) holds the final KV of the prefix ``key``.

        Returns False (and changes nothing) when the key or the page is already
        registered: the first page stored for a prefix stays the shared one.
        """
        page = self._check_page(page)
        if self._ref[page] == 0:
            raise ValueError(f"page: {page} is not held; register pages while holding them")
        if key in self._page_of or page in self._key_of:
            return False
        self._page_of[key] = page
        self._key_of[page] = key
        return True

    def clear_cache(self) -> int:
        """Evict every cached page to the free list and forget all keys; returns pages evicted."""
        n = len(self._lru)
        for page in list(self._lru):
            self._free.append(page)
        self._lru.clear()
        self.evictions += n
        self._page_of = {k: p for k, p in self._page_of.items() if self._ref[p] > 0}
        self._key_of = {p: k for k, p in self._page_of.items()}
        return n
