"""Prefix caching over KV pages (RadixAttention at page granularity).

A radix tree over token ids whose edges are whole pages: the node for page i of a path holds the physical
page with the KV of exactly those `page_size` tokens at positions [i * page_size, (i + 1) * page_size),
given everything before them on the path. A prompt reuses the longest cached path of its leading full
pages (at least one prompt token is always computed, for its logits). Finished sequences insert their
computed full pages. The tree *holds* its pages in the allocator (beyond the references of the sequences
using them), so a page in use can never be freed under a sequence; when pages run out, least recently used
leaves that no sequence refers to are evicted. `cache_salt` gives each tenant a tree of its own.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from jaxserve.engine.kv_cache import PageAllocator


@dataclass(eq=False)
class _Node:
    key: tuple[int, ...]  # the page's tokens
    page: int
    parent: "_Node | None"
    children: dict[tuple[int, ...], "_Node"] = field(default_factory=dict)
    last_use: int = 0


@dataclass(frozen=True)
class PrefixCacheStats:
    num_queries: int
    num_query_tokens: int  # prompt tokens looked up
    num_hit_tokens: int  # of them, found in the cache
    num_inserted_pages: int
    num_evicted_pages: int
    num_cached_pages: int  # pages the tree holds now


class RadixPrefixCache:
    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        self.allocator = allocator
        self.page_size = page_size
        self._roots: dict[str | None, _Node] = {}
        self._clock = itertools.count(1)
        self._num_nodes = 0
        self.num_queries = 0
        self.num_query_tokens = 0
        self.num_hit_tokens = 0
        self.num_inserted_pages = 0
        self.num_evicted_pages = 0

    def _root(self, salt: str | None) -> _Node:
        root = self._roots.get(salt)
        if root is None:
            root = self._roots[salt] = _Node((), 0, None)
        return root

    def _keys(self, tokens: list[int], num_pages: int):
        ps = self.page_size
        return (tuple(tokens[i * ps:(i + 1) * ps]) for i in range(num_pages))

    def match(self, tokens: list[int], salt: str | None = None) -> list[int]:
        """Pages of the longest cached prefix of `tokens` in whole pages, leaving at least one token to
        compute. The caller takes its own references (`allocator.share`)."""
        usable = max(len(tokens) - 1, 0) // self.page_size
        node = self._roots.get(salt)
        pages: list[int] = []
        if node is not None:
            now = next(self._clock)
            for key in self._keys(tokens, usable):
                node = node.children.get(key)
                if node is None:
                    break
                node.last_use = now
                pages.append(node.page)
        return pages

    def record(self, query_tokens: int, hit_tokens: int) -> None:
        """Count one admitted prompt's lookup (an admission retried for want of pages counts once)."""
        self.num_queries += 1
        self.num_query_tokens += query_tokens
        self.num_hit_tokens += hit_tokens

    def cached_tokens(self, tokens: list[int], salt: str | None = None) -> int:
        """How many leading tokens `match` would reuse now (a read-only look: no statistics, no LRU touch)."""
        node = self._roots.get(salt)
        count = 0
        if node is not None:
            for key in self._keys(tokens, max(len(tokens) - 1, 0) // self.page_size):
                node = node.children.get(key)
                if node is None:
                    break
                count += self.page_size
        return count

    def insert(self, tokens: list[int], pages: list[int], salt: str | None = None) -> None:
        """Cache the full pages of `tokens` (whose KV is in `pages`, which a sequence still refers to)."""
        node = self._root(salt)
        now = next(self._clock)
        num_pages = min(len(tokens) // self.page_size, len(pages))
        for key, page in zip(self._keys(tokens, num_pages), pages):
            child = node.children.get(key)
            if child is None:
                child = node.children[key] = _Node(key, page, node)
                self.allocator.hold(page)
                self._num_nodes += 1
                self.num_inserted_pages += 1
            # else: the same tokens are cached in another page already; this sequence's copy goes when it
            # releases it, and the path continues through the cached one.
            child.last_use = now
            node = child

    def evict(self, num_pages: int) -> int:
        """Free up to `num_pages` pages: least recently used leaves that no sequence refers to first (a
        parent becomes a candidate once its children are gone). Returns how many were freed."""
        if num_pages <= 0 or not self._num_nodes:
            return 0
        heap = [(n.last_use, id(n), n) for n in self._leaves() if self.allocator.refcount(n.page) == 0]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_pages:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            self._drop(node)
            freed += 1
            if parent is not None and parent.parent is not None and not parent.children \
                    and self.allocator.refcount(parent.page) == 0:
                heapq.heappush(heap, (parent.last_use, id(parent), parent))
        return freed

    def flush(self) -> int:
        """Drop every node no sequence refers to (all of them when idle); returns the pages freed."""
        return self.evict(self._num_nodes)

    def _leaves(self):
        stack = [n for root in self._roots.values() for n in root.children.values()]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            else:
                yield node

    def _drop(self, node: _Node) -> None:
        del node.parent.children[node.key]
        self.allocator.unhold(node.page)
        self._num_nodes -= 1
        self.num_evicted_pages += 1

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self.num_queries, self.num_query_tokens, self.num_hit_tokens,
                                self.num_inserted_pages, self.num_evicted_pages, self._num_nodes)
