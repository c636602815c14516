"""The paged KV cache: device arrays and the host-side page allocator.

Device layout (docs/architecture.md): K and V each `[num_layers, num_kv_heads, num_pages, page_size,
head_dim]`. Page 0 is the null page that padded tokens write into; it is never allocated.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxserve.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PagedKVCache:
    k: jax.Array
    v: jax.Array


def init_paged_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype, sharding=None) -> PagedKVCache:
    shape = (cfg.num_layers, cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)

    def zeros():
        if sharding is None:
            return jnp.zeros(shape, dtype)
        return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()

    return PagedKVCache(zeros(), zeros())


def kv_bytes_per_page(cfg: ModelConfig, page_size: int, dtype_bytes: int) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * page_size * cfg.head_dim * dtype_bytes


class OutOfPages(Exception):
    """Raised by the allocator when a request needs more pages than are free."""


class PageAllocator:
    """Free list plus reference counts (shared prompt pages of n > 1 samples hold one count each)."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError(f"the KV cache needs at least 2 pages (one is the null page), got {num_pages}")
        self.num_pages = num_pages
        # Pop from the end: low page ids are handed out first, which keeps tests readable.
        self._free = list(range(num_pages - 1, 0, -1))
        self._refs = [0] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_pages - 1

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_free

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"need {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def share(self, pages: list[int]) -> None:
        for p in pages:
            if self._refs[p] <= 0:
                raise RuntimeError(f"sharing page {p} that is not allocated")
            self._refs[p] += 1

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if self._refs[p] <= 0:
                raise RuntimeError(f"double free of page {p}")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)
