"""Paged attention written for XLA:CPU: the same contract as `reference.py`, laid out so XLA:CPU runs it fast.

Why a second pure-JAX formulation: on XLA:CPU the reference spent most of a decode step in attention
(SmolLM2-135M, 32 rows x 256 keys: ~7 ms per layer, more than the layer's matmuls). Three things made it slow,
each measured on the 2-core dev VM (docs/benchmarks.md):

- the gather `cache[layer, :, page_table]` followed by a transpose to `[B, KV, S, D]` makes XLA emit a
  per-element gather loop; gathering whole pages of one layer (`cache[layer][:, page_table]`, rows of
  `page_size * head_dim` contiguous floats) and keeping the result in `[KV, B, S, D]` order needs no
  transpose and runs at memory speed;
- `q @ K^T` with K's contracted dimension minor is ~4x slower in XLA:CPU's dot emitter than `K @ q^T`, the
  same product computed as keys x (queries of one KV head), which reads each key row once;
- the softmax is taken along the key axis of that `[KV, B, S, Tq * G]` layout, and the weighted sum of
  values is one more batched dot over (KV, B).

Everything else (masking rule, float32 softmax, zeros for padding queries) is the reference's.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.reference import (
    apply_soft_cap, key_visibility_mask, masked_softmax_terms, validate_paged_attention_args,
)

_PRECISION = jax.lax.Precision.HIGHEST


def paged_attention_xla(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array | int,
    page_table: jax.Array,
    seq_lens: jax.Array,
    q_start: jax.Array,
    *,
    scale: float,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
) -> jax.Array:
    """Attention of `q [B, Tq, H, D]` over each row's cached pages; returns `[B, Tq, H, D]` in q.dtype.

    Page-table entries must be valid page ids (`< num_pages`); the engine guarantees it (padding is the
    null page 0), and the gather relies on it instead of clamping every index."""
    validate_paged_attention_args(
        q, k_cache, v_cache, page_table, seq_lens, q_start,
        soft_cap=soft_cap, sliding_window=sliding_window,
    )
    batch, q_len, num_heads, head_dim = q.shape
    _, num_kv_heads, _, page_size, _ = k_cache.shape
    group = num_heads // num_kv_heads
    kv_len = page_table.shape[1] * page_size
    cols = q_len * group  # the queries that share one KV head, t-major

    def gather(cache: jax.Array) -> jax.Array:
        # [KV, B, pages_per_row, page_size, D] -> [KV, B, kv_len, D]: a reshape, no copy.
        pages = cache[layer].at[:, page_table].get(mode="promise_in_bounds")
        return pages.reshape(num_kv_heads, batch, kv_len, head_dim)

    keys = gather(k_cache)
    values = gather(v_cache)
    # [KV, B, D, Tq * G]: the small side of the keys x queries product.
    q_cols = q.reshape(batch, q_len, num_kv_heads, group, head_dim).transpose(2, 0, 4, 1, 3)
    q_cols = q_cols.reshape(num_kv_heads, batch, head_dim, cols)
    logits = jnp.einsum(
        "kbsd,kbdc->kbsc", keys, q_cols, preferred_element_type=jnp.float32, precision=_PRECISION
    ) * scale
    logits = apply_soft_cap(logits, soft_cap)

    query_positions = q_start.astype(jnp.int32)[:, None] + jnp.arange(q_len, dtype=jnp.int32)[None, :]
    query_positions = jnp.repeat(query_positions, group, axis=1)  # [B, Tq * G], column order of q_cols
    visible = key_visibility_mask(
        query_positions[:, None, :],
        jnp.arange(kv_len, dtype=jnp.int32)[None, :, None],
        seq_lens.astype(jnp.int32)[:, None, None],
        sliding_window,
    )[None]  # [1, B, kv_len, Tq * G]

    weights, denom = masked_softmax_terms(logits, visible, axis=2)
    denom = jnp.swapaxes(denom, 2, 3)  # [KV, B, Tq * G, 1]
    # Weights transposed to [KV, B, Tq * G, kv_len] (small) so the dot contracts the lhs's minor dimension,
    # the form XLA:CPU hands to its fast matmul library.
    out = jnp.einsum(
        "kbcs,kbsd->kbcd", jnp.swapaxes(weights, 2, 3), values, preferred_element_type=jnp.float32,
        precision=_PRECISION,
    )
    out = jnp.where(denom > 0, out / jnp.where(denom > 0, denom, 1.0), 0.0)
    out = out.reshape(num_kv_heads, batch, q_len, group, head_dim).transpose(1, 2, 0, 3, 4)
    return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)
