"""Paged attention inside the model: write the new K/V into their pages, then attend over the pages.

`PagedCacheOps` is the `KVCacheOps` the engine hands to the model. The attention itself is a backend
function with the contract of docs/architecture.md: our C++ kernel on the CPU (pure JAX where it cannot be
built) or a Pallas kernel (GPU/TPU), chosen once at start-up.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

from jaxserve.engine.kv_cache import PagedKVCache

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "cpu", "xla", "reference", "pallas")


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PagedMeta:
    page_table: jax.Array  # [B, pages_per_row] int32
    seq_lens: jax.Array  # [B] int32, valid KV positions after this step
    q_start: jax.Array  # [B] int32, position of the row's first new token
    slot_page: jax.Array  # [B, T] int32, physical page each new token is written to (0 = null page)
    slot_offset: jax.Array  # [B, T] int32, offset inside that page


@dataclass(frozen=True)
class PagedCacheOps:
    attend: Callable[..., jax.Array]
    scale: float
    sliding_window: int | None = None

    def update_and_attend(self, q, k, v, cache: PagedKVCache, layer, meta: PagedMeta):
        kc = write_kv(cache.k, k, layer, meta.slot_page, meta.slot_offset)
        vc = write_kv(cache.v, v, layer, meta.slot_page, meta.slot_offset)
        ka, va = kc, vc
        if kc.shape[-1] != q.shape[-1] and not _reads_packed_cache(self.attend):
            # A packed cache (kv_cache.cache_shape, TPU) for a backend that reads the plain layout only.
            ka = kc.reshape(*kc.shape[:3], -1, q.shape[-1])
            va = vc.reshape(*vc.shape[:3], -1, q.shape[-1])
        out = self.attend(
            q, ka, va, layer, meta.page_table, meta.seq_lens, meta.q_start,
            scale=self.scale, sliding_window=self.sliding_window,
        )
        return out, PagedKVCache(kc, vc)


def _reads_packed_cache(attend) -> bool:
    """Whether an attention function takes the packed cache layout (the dispatcher and the TPU kernel do)."""
    from pallas_kernels import paged_attention
    from pallas_kernels.paged_attention_tpu import paged_attention_tpu

    while isinstance(attend, partial):
        attend = attend.func
    return attend is paged_attention or attend is paged_attention_tpu


_WRITE_DIMS = jax.lax.ScatterDimensionNumbers(
    update_window_dims=(1,), inserted_window_dims=(0, 1, 2, 3), scatter_dims_to_operand_dims=(0, 1, 2, 3, 4))


def write_kv(cache: jax.Array, new: jax.Array, layer, slot_page: jax.Array, slot_offset: jax.Array) -> jax.Array:
    """Write `new` [B, T, KV, D] into the stacked cache at (layer, head, slot_page[b, t], slot_offset[b, t]) for
    every token and KV head: one in-place scatter into the donated cache. The cache is `[L, KV, P, page, D]`,
    or packed `[L, KV, P, page / n, n * D]` (n tokens per row, kv_cache.cache_shape): token `o` of a page is
    row `o // n`, lanes `(o % n) * D` onwards.

    Each scattered element is one head_dim vector (the window is part of the cache's minor dimension only),
    indexed by all leading coordinates. The equivalent `cache.at[layer, :, page, offset].set(new)` has a
    [KV, D] window; XLA:TPU then lays the caches out KV-head-minor through the layer scan and copies both
    whole caches to the row-major layout of the attention kernel in every layer (temporaries = the KV pool
    again, issue 12). With the D-only window the scatter keeps the cache's own layout: no copy on TPU, GPU or
    CPU (tests/test_aot.py checks the compiled temporaries)."""
    b, t, kv, d = new.shape
    pack = cache.shape[-1] // d
    shape = (b, t, kv)
    offset = slot_offset.astype(jnp.int32)[:, :, None]
    index = jnp.stack([
        jnp.broadcast_to(jnp.asarray(layer, jnp.int32), shape),
        jnp.broadcast_to(jnp.arange(kv, dtype=jnp.int32)[None, None, :], shape),
        jnp.broadcast_to(slot_page.astype(jnp.int32)[:, :, None], shape),
        jnp.broadcast_to(offset // pack if pack > 1 else offset, shape),
        jnp.broadcast_to(offset % pack * d if pack > 1 else jnp.zeros_like(offset), shape),
    ], axis=-1).reshape(b * t * kv, 5)
    # Padded tokens all write to the null page (duplicate indices: whichever lands is never read).
    return jax.lax.scatter(cache, index, new.astype(cache.dtype).reshape(b * t * kv, d), _WRITE_DIMS,
                           indices_are_sorted=False, unique_indices=False,
                           mode=jax.lax.GatherScatterMode.FILL_OR_DROP)


def select_attention(backend: str, platform: str, *, interpret: bool = False,
                     build_dir: Path | None = None) -> tuple[Callable[..., jax.Array], str]:
    """Resolve --attention-backend to an attention function and a name for logs. `cpu` (and `auto` on CPU) is
    our C++ kernel for XLA:CPU (`pallas_kernels.paged_attention_cpu`, built once per machine into
    `build_dir`); where it cannot be built, `auto` takes `xla`, the pure-JAX formulation tuned for XLA:CPU,
    and says why. `reference` is the plain contract implementation, `pallas` (and `auto` on GPU/TPU) our
    kernels; a shape a kernel does not support falls back to the reference with a log line (decided per
    shape inside `pallas_kernels.paged_attention`), never a wrong result."""
    from pallas_kernels import paged_attention
    from pallas_kernels.reference import paged_attention_reference
    from pallas_kernels.xla_attention import paged_attention_xla

    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r} (choose {', '.join(ATTENTION_BACKENDS)})")
    if backend == "reference":
        return paged_attention_reference, "reference"
    if backend == "xla":
        return paged_attention_xla, "xla"
    if backend == "cpu" or (backend == "auto" and platform == "cpu"):
        from jaxserve.config import cache_dir
        from pallas_kernels.paged_attention_cpu import KernelUnavailable, load_kernel, paged_attention_cpu

        if platform != "cpu":
            raise ValueError(f"the cpu attention backend is a kernel for XLA:CPU (platform is {platform})")
        try:
            load_kernel(build_dir or cache_dir() / "kernels")
        except KernelUnavailable as e:
            if backend == "cpu":
                raise ValueError(f"--attention-backend cpu: the kernel is unavailable: {e}") from e
            log.warning("the CPU attention kernel is unavailable (%s); using the pure-JAX xla attention", e)
            return paged_attention_xla, "xla"
        return paged_attention_cpu, "cpu"
    if platform not in ("gpu", "cuda", "tpu") and not interpret:
        raise ValueError(f"the pallas attention backend needs a GPU or TPU (platform is {platform}); "
                         "use --attention-backend reference")
    name = f"pallas ({platform}{', interpret' if interpret else ''})"
    return partial(paged_attention, impl="pallas", interpret=interpret), name
