"""Paged attention inside the model: write the new K/V into their pages, then attend over the pages.

`PagedCacheOps` is the `KVCacheOps` the engine hands to the model. The attention itself is a backend
function with the contract of docs/architecture.md: the pure-JAX reference (CPU default) or a Pallas
kernel (GPU/TPU), chosen once at start-up.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Callable

import jax

from jaxserve.engine.kv_cache import PagedKVCache

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "xla", "reference", "pallas")


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
        # Advanced indices (layer, page, offset) around a full slice: the indexed block is [B, T, KV, D],
        # exactly the layout of k and v, so this is one in-place scatter into the donated cache.
        kc = cache.k.at[layer, :, meta.slot_page, meta.slot_offset].set(k.astype(cache.k.dtype))
        vc = cache.v.at[layer, :, meta.slot_page, meta.slot_offset].set(v.astype(cache.v.dtype))
        out = self.attend(
            q, kc, vc, layer, meta.page_table, meta.seq_lens, meta.q_start,
            scale=self.scale, sliding_window=self.sliding_window,
        )
        return out, PagedKVCache(kc, vc)


def select_attention(backend: str, platform: str, *, interpret: bool = False) -> tuple[Callable[..., jax.Array], str]:
    """Resolve --attention-backend to an attention function and a name for logs. `xla` (and `auto` on CPU) is
    the pure-JAX formulation tuned for XLA:CPU, `reference` the plain contract implementation, `pallas` (and
    `auto` on GPU/TPU) our kernels; a shape a kernel does not support falls back to the reference with a log
    line (decided per shape inside `pallas_kernels.paged_attention`), never a wrong result."""
    from pallas_kernels import paged_attention
    from pallas_kernels.reference import paged_attention_reference
    from pallas_kernels.xla_attention import paged_attention_xla

    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r} (choose {', '.join(ATTENTION_BACKENDS)})")
    if backend == "reference":
        return paged_attention_reference, "reference"
    if backend == "xla" or (backend == "auto" and platform == "cpu"):
        return paged_attention_xla, "xla"
    if platform not in ("gpu", "cuda", "tpu") and not interpret:
        raise ValueError(f"the pallas attention backend needs a GPU or TPU (platform is {platform}); "
                         "use --attention-backend reference")
    name = f"pallas ({platform}{', interpret' if interpret else ''})"
    return partial(paged_attention, impl="pallas", interpret=interpret), name
