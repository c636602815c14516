"""The paged KV cache: device arrays and the host-side page allocator.

Device layout (docs/architecture.md): K and V each `[num_layers, num_kv_heads, num_pages, page_size,
head_dim]`; on TPU with a head_dim that is not a multiple of 128 lanes packed to `[..., page_size / n, n * head_dim]`
with n * head_dim = lcm(head_dim, 128) (`cache_shape`: 64 -> 2 tokens per 128-lane row, 96 -> 4 per 384,
192 -> 2 per 384). Page 0 is the null page that padded tokens write into; it is never allocated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxserve.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PagedKVCache:
    k: jax.Array
    v: jax.Array


def tokens_per_row(head_dim: int, page_size: int, platform: str) -> int:
    """How many tokens' vectors one row of the cache holds: 1 (the plain layout), or on TPU with a head_dim that
    is not a multiple of 128 lanes, lcm(head_dim, 128) / head_dim (the packed layout: rows of whole 128-lane
    vregs, no padding). XLA:TPU does not keep a `[..., page, D]` array with D % 128 != 0 in the row-major tiling
    the Mosaic kernel reads (at 64 it puts the page axis minor), so a plain cache was relaid out in full around
    every step: decode temporaries 1.3-2x the KV pool at head_dim 64, 96 and 192 (issue 12). A packed cache is stored as it is (tests/test_aot.py). Padding D up to 128 lanes would also avoid
    the copy but cost a third more memory and bandwidth at 96 and 192; packing costs nothing.

    Packed only for head_dims the TPU kernel reads (multiples of 16, `tpu_support`; n <= 8 then, which divides
    every page size the kernel takes); another head_dim runs the reference on the plain layout."""
    if platform != "tpu" or head_dim % 16:
        return 1
    n = math.lcm(head_dim, 128) // head_dim
    return 1 if page_size % n else n


def cache_shape(cfg: ModelConfig, num_pages: int, page_size: int, platform: str | None = None) -> tuple[int, ...]:
    """Shape of each of the K and V caches: `[L, KV, P, page, D]`, or packed `[L, KV, P, page / n, n * D]`
    (`tokens_per_row`: token `o` of a page is row `o // n`, lanes `(o % n) * D` onwards; a row-major reshape of
    the plain layout, so it holds exactly the plain layout's bytes and `kv_bytes_per_page` stays exact).
    `platform` defaults to JAX's default backend."""
    n = tokens_per_row(cfg.head_dim, page_size, platform or jax.default_backend())
    return (cfg.num_layers, cfg.num_kv_heads, num_pages, page_size // n, cfg.head_dim * n)


def init_paged_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype, sharding=None) -> PagedKVCache:
    platform = next(iter(sharding.device_set)).platform if sharding is not None else None
    shape = cache_shape(cfg, num_pages, page_size, platform)

    def zeros():
        if sharding is None:
            return jnp.zeros(shape, dtype)
        return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()

    return PagedKVCache(zeros(), zeros())


def kv_bytes_per_page(cfg: ModelConfig, page_size: int, dtype_bytes: int) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * page_size * cfg.head_dim * dtype_bytes


def kv_cache_pages(total_memory: int, weight_bytes: int, kv_memory_fraction: float, bytes_per_page: int,
                   max_pages: int | None = None) -> int:
    """Pages of the KV pool when `kv_memory_fraction` of the device's total memory holds weights + KV cache
    (SGLang's meaning; the rest is left to activations, the sampler's state and the grammar tables).
    Includes the null page; 0 when the weights alone exceed the share."""
    budget = int(total_memory * kv_memory_fraction) - weight_bytes
    pages = max(0, budget // bytes_per_page)
    if max_pages is not None:
        pages = min(pages, max_pages)
    return pages


class OutOfPages(Exception):
    """Raised by the allocator when a request needs more pages than are free."""


class PageAllocator:
    """Free list plus reference counts: sequences hold references (shared prompt pages of n > 1 samples hold
    one each), and the prefix cache may *hold* a page beyond them. A page is free when no sequence refers to
    it and the cache does not hold it; a held page nobody refers to is "cached" (the cache can evict it)."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError(f"the KV cache needs at least 2 pages (one is the null page), got {num_pages}")
        self.num_pages = num_pages
        # Pop from the end: low page ids are handed out first, which keeps tests readable.
        self._free = list(range(num_pages - 1, 0, -1))
        self._refs = [0] * num_pages
        self._held = [False] * num_pages
        self._num_cached = 0  # held by the prefix cache, referenced by no sequence

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_pages - 1

    @property
    def num_cached(self) -> int:
        """Pages only the prefix cache holds (reusable by a later prompt, evictable when pages run out)."""
        return self._num_cached

    @property
    def num_used(self) -> int:
        """Pages some sequence refers to."""
        return self.num_usable - self.num_free - self._num_cached

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"need {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def share(self, pages: list[int]) -> None:
        for p in pages:
            if self._refs[p] <= 0 and not self._held[p]:
                raise RuntimeError(f"sharing page {p} that is not allocated")
            if self._refs[p] == 0:
                self._num_cached -= 1
            self._refs[p] += 1

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if self._refs[p] <= 0:
                raise RuntimeError(f"double free of page {p}")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                if self._held[p]:
                    self._num_cached += 1
                else:
                    self._free.append(p)

    def hold(self, page: int) -> None:
        """The prefix cache keeps `page` (a sequence still refers to it) until `unhold`."""
        if self._refs[page] <= 0 or self._held[page]:
            raise RuntimeError(f"holding page {page} that no sequence refers to, or that is held already")
        self._held[page] = True

    def unhold(self, page: int) -> None:
        if not self._held[page]:
            raise RuntimeError(f"page {page} is not held")
        self._held[page] = False
        if self._refs[page] == 0:
            self._num_cached -= 1
            self._free.append(page)
