"""Pure-JAX paged attention: the contract every kernel is tested against, and the CPU backend.

Contract (docs/architecture.md): `q [B, Tq, H, D]`; stacked caches
`[num_layers, num_kv_heads, num_pages, page_size, D]` indexed by a traced `layer`;
`page_table [B, pages_per_row]` (logical page -> physical page, padded with the null page 0);
`seq_lens [B]` valid KV positions after this step's tokens were written; `q_start [B]` absolute
position of each row's first query token.

Query t of row b sits at position `p = q_start[b] + t` and sees key j iff
`j < seq_lens[b]`, `j <= p` and, with a sliding window `W`, `j > p - W` (W keys including itself,
the Mistral / Hugging Face convention). Logits are `scale * q.k`, then `soft_cap * tanh(logits /
soft_cap)` when a soft cap is given; the softmax runs in float32. A padding query (`p >=
seq_lens[b]`) sees no key and returns zeros.

GQA is done by viewing q as `[B, Tq, KV, G, D]` so K/V are never repeated; the largest
intermediate is the `[B, KV, G, Tq, pages_per_row * page_size]` logits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_PRECISION = jax.lax.Precision.HIGHEST


def validate_paged_attention_args(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    page_table: jax.Array,
    seq_lens: jax.Array,
    q_start: jax.Array,
    *,
    soft_cap: float | None,
    sliding_window: int | None,
) -> None:
    """Raise ValueError when shapes or options break the contract (checks static shapes only)."""
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, q_len, num_heads, head_dim], got shape {q.shape}")
    if k_cache.ndim != 5:
        raise ValueError(
            "k_cache must be [num_layers, num_kv_heads, num_pages, page_size, head_dim], "
            f"got shape {k_cache.shape}"
        )
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} must have the same shape")
    batch, _, num_heads, head_dim = q.shape
    _, num_kv_heads, _, _, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"q head_dim {head_dim} != cache head_dim {cache_head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if page_table.ndim != 2 or page_table.shape[0] != batch:
        raise ValueError(f"page_table must be [batch={batch}, pages_per_row], got {page_table.shape}")
    if seq_lens.shape != (batch,) or q_start.shape != (batch,):
        raise ValueError(
            f"seq_lens {seq_lens.shape} and q_start {q_start.shape} must both be [batch={batch}]"
        )
    for name, arr in (("page_table", page_table), ("seq_lens", seq_lens), ("q_start", q_start)):
        if not jnp.issubdtype(arr.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer array, got {arr.dtype}")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap must be positive or None, got {soft_cap}")
    if sliding_window is not None and (int(sliding_window) != sliding_window or sliding_window < 1):
        raise ValueError(f"sliding_window must be a positive integer or None, got {sliding_window}")


def key_visibility_mask(
    query_positions: jax.Array,
    key_positions: jax.Array,
    seq_lens: jax.Array,
    sliding_window: int | None,
) -> jax.Array:
    """True where a query may attend to a key; broadcasts its (already aligned) arguments.

    Shared by the reference and the kernels so the masking rule lives in one place.
    """
    # A padding query (position >= seq_len) sees nothing, so its output is exactly zero.
    visible = (key_positions <= query_positions) & (query_positions < seq_lens)
    if sliding_window is not None:
        visible &= key_positions > query_positions - sliding_window
    return visible


def masked_softmax_terms(logits: jax.Array, visible: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """Unnormalised softmax weights along `axis` over the visible keys, and their sum (keepdims). The max is
    pinned to 0 where a query sees no key (padding), so its weights and sum are exactly 0, never NaN."""
    masked = jnp.where(visible, logits, -jnp.inf)
    peak = jnp.max(masked, axis=axis, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    weights = jnp.where(visible, jnp.exp(masked - peak), 0.0)
    return weights, jnp.sum(weights, axis=axis, keepdims=True)


def apply_soft_cap(logits: jax.Array, soft_cap: float | None) -> jax.Array:
    if soft_cap is None:
        return logits
    return soft_cap * jnp.tanh(logits / soft_cap)


def paged_attention_reference(
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
    """Attention of `q [B, Tq, H, D]` over each row's cached pages; returns `[B, Tq, H, D]` in q.dtype."""
    validate_paged_attention_args(
        q, k_cache, v_cache, page_table, seq_lens, q_start,
        soft_cap=soft_cap, sliding_window=sliding_window,
    )
    batch, q_len, num_heads, head_dim = q.shape
    _, num_kv_heads, _, page_size, _ = k_cache.shape
    group = num_heads // num_kv_heads
    pages_per_row = page_table.shape[1]
    kv_len = pages_per_row * page_size

    # One gather straight from the stacked cache (no per-layer slice copy):
    # [B, pages_per_row, KV, page_size, D] -> [B, KV, kv_len, D].
    def gather(cache: jax.Array) -> jax.Array:
        pages = cache[layer, :, page_table]
        return pages.transpose(0, 2, 1, 3, 4).reshape(batch, num_kv_heads, kv_len, head_dim)

    keys = gather(k_cache)
    values = gather(v_cache)

    grouped_q = q.reshape(batch, q_len, num_kv_heads, group, head_dim)
    # HIGHEST: on GPU the default f32 matmul is TF32, too coarse for a reference (free on CPU).
    logits = jnp.einsum(
        "btkgd,bksd->bkgts", grouped_q, keys, preferred_element_type=jnp.float32, precision=_PRECISION
    ).astype(jnp.float32) * scale
    logits = apply_soft_cap(logits, soft_cap)

    query_positions = q_start.astype(jnp.int32)[:, None] + jnp.arange(q_len, dtype=jnp.int32)[None, :]
    key_positions = jnp.arange(kv_len, dtype=jnp.int32)
    visible = key_visibility_mask(
        query_positions[:, :, None],
        key_positions[None, None, :],
        seq_lens.astype(jnp.int32)[:, None, None],
        sliding_window,
    )  # [B, Tq, kv_len]
    visible = visible[:, None, None, :, :]  # broadcast over KV, G

    weights, denom = masked_softmax_terms(logits, visible, axis=-1)
    out = jnp.einsum(
        "bkgts,bksd->btkgd", weights, values.astype(jnp.float32), preferred_element_type=jnp.float32,
        precision=_PRECISION,
    )
    denom = jnp.moveaxis(denom[..., 0], 3, 1)[..., None]  # [B, Tq, KV, G, 1]
    out = jnp.where(denom > 0, out / jnp.where(denom > 0, denom, 1.0), 0.0)
    return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)
