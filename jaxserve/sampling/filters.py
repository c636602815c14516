"""Exact top-k / top-p thresholds without sorting the vocabulary.

A full sort of [64, 49152] logits costs about 2 s on XLA:CPU, so it is never done. Instead:
1. `lax.top_k` with a small cap C gives each row's C largest values in order; a row whose top-k (k <= C)
   and top-p cut both fall inside them is resolved exactly from those C values.
2. Rows that are not (top_k > C, or a flat distribution whose nucleus is wider than C) get their thresholds
   by bisection over the float ordering: 32 halvings of the 32-bit key space land exactly on an element,
   each a masked sum over the row. This branch runs (lax.cond) only when some row needs it.
Which path a row takes depends on that row alone, so a row's result never depends on its batch companions.

Thresholds are returned as int32 "order keys" (see `order_keys`): a token is kept iff its key >= the
threshold. Keys order like the floats (-inf lowest) and stay well defined for "keep everything".
Ties at a threshold are all kept (a value-threshold cut cannot split equal values).

Conventions follow Hugging Face's warpers: top-k keeps the k largest; top-p keeps the smallest prefix of
the descending order (of the top-k-renormalised distribution) whose mass reaches top_p.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

KEEP_ALL = jnp.iinfo(jnp.int32).min


def order_keys(x: jax.Array) -> jax.Array:
    """int32 keys with key(a) < key(b) iff a < b for non-NaN floats (and -0.0 just below +0.0)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def thresholds_from_top(
    top_vals: jax.Array, top_k: jax.Array, top_p: jax.Array, lse_full: jax.Array, vocab_size: int
) -> tuple[jax.Array, jax.Array]:
    """Thresholds from each row's C largest (already temperature-scaled) values, in descending order.

    top_vals f32 [B, C]; top_k i32 [B] (<= 0 or >= V: off); top_p f32 [B] (>= 1: off);
    lse_full f32 [B]: logsumexp of the whole scaled row (the top-p normaliser when top-k is off).
    Returns (threshold key i32 [B], resolved bool [B]); unresolved rows need `thresholds_by_bisection`."""
    cap = top_vals.shape[1]
    k_on = (top_k > 0) & (top_k < vocab_size)
    k_in_cap = k_on & (top_k <= cap)
    k_idx = jnp.clip(top_k - 1, 0, cap - 1)
    thr_k = jnp.where(k_in_cap, jnp.take_along_axis(top_vals, k_idx[:, None], axis=1)[:, 0], -jnp.inf)

    position = jnp.arange(cap)[None, :]
    in_k = jnp.where(k_in_cap[:, None], position < top_k[:, None], True)
    lse_k = jax.nn.logsumexp(jnp.where(in_k, top_vals, -jnp.inf), axis=1)
    lse = jnp.where(k_in_cap, lse_k, lse_full)
    probs = jnp.where(in_k, jnp.exp(top_vals - lse[:, None]), 0.0)
    mass_through = jnp.cumsum(probs, axis=1)
    # Index of the first position whose cumulative mass reaches top_p: the last token the nucleus keeps.
    first_reaching = jnp.sum(mass_through < top_p[:, None], axis=1)
    last_kept = jnp.where(k_in_cap, jnp.minimum(first_reaching, top_k - 1), first_reaching)
    p_on = top_p < 1.0
    thr_p = jnp.where(
        p_on, jnp.take_along_axis(top_vals, jnp.clip(last_kept, 0, cap - 1)[:, None], axis=1)[:, 0], -jnp.inf
    )
    resolved = (~k_on | k_in_cap) & (~p_on | k_in_cap | (first_reaching < cap))
    return order_keys(jnp.maximum(thr_k, thr_p)), resolved


def _largest_key_reaching(keys: jax.Array, weights: jax.Array, target: jax.Array) -> jax.Array:
    """Per row, the largest key t with sum(weights[keys >= t]) >= target (KEEP_ALL if even t = min fails).

    Bisection in unsigned key space keeps `lo` satisfying and `hi` failing; after 32 halvings hi = lo + 1,
    so lo is exactly the key of an element."""
    ukeys = jax.lax.bitcast_convert_type(keys ^ KEEP_ALL, jnp.uint32)  # signed order -> unsigned order
    rows = keys.shape[0]

    def mass_at_or_above(t: jax.Array) -> jax.Array:
        return jnp.sum(jnp.where(ukeys >= t[:, None], weights, 0.0), axis=1)

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = mass_at_or_above(mid) >= target
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo = jnp.zeros(rows, jnp.uint32)
    hi = jnp.max(ukeys, axis=1) + jnp.uint32(1)  # nothing is >= max + 1: fails for any target > 0
    lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return jax.lax.bitcast_convert_type(lo, jnp.int32) ^ KEEP_ALL


def thresholds_by_bisection(
    scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, vocab_size: int
) -> jax.Array:
    """Exact top-k then top-p threshold keys over whole rows (scaled f32 [B, V], -inf = disallowed)."""
    keys = order_keys(scaled)
    allowed = jnp.isfinite(scaled)
    k_on = (top_k > 0) & (top_k < vocab_size)

    def top_k_keys(_):
        counted = _largest_key_reaching(keys, allowed.astype(jnp.float32), top_k.astype(jnp.float32))
        return jnp.where(k_on, counted, KEEP_ALL)

    thr_k = jax.lax.cond(jnp.any(k_on), top_k_keys, lambda _: jnp.full_like(top_k, KEEP_ALL), None)
    in_k = allowed & (keys >= thr_k[:, None])
    lse_k = jax.nn.logsumexp(jnp.where(in_k, scaled, -jnp.inf), axis=1, keepdims=True)
    probs = jnp.where(in_k, jnp.exp(scaled - lse_k), 0.0)
    p_on = top_p < 1.0

    def top_p_keys(_):
        return jnp.where(p_on, _largest_key_reaching(keys, probs, top_p), KEEP_ALL)

    thr_p = jax.lax.cond(jnp.any(p_on), top_p_keys, lambda _: jnp.full_like(top_k, KEEP_ALL), None)
    return jnp.maximum(thr_k, thr_p)
