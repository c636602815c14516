"""Exact top-k / top-p thresholds without sorting the vocabulary.

A full sort of [64, 49152] logits costs about 2 s on XLA:CPU, so it is never done. Instead:
1. `lax.top_k` with a small cap C gives each row's C largest values in order; a row whose top-k (k <= C)
   and top-p cut both fall inside them is resolved exactly from those C values.
2. Rows that are not (top_k > C, or a flat distribution whose nucleus is wider than C) bisect on values
   (a masked sum over the row per step) until at most C elements lie between the bounds, then one more
   lax.top_k over those finds the exact cut. This branch runs (lax.cond) only when some row needs it.
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


def top_k_barrier(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """lax.top_k behind an optimization barrier. Without it, when the values feed the threshold arithmetic,
    XLA:CPU was measured running a full-vocabulary sort instead of its TopK kernel (40 ms instead of 0.3 ms
    for one row of 49152; 2 s at 64 rows). One barrier per output: a barrier over both folds into one whose
    operand is the TopK tuple itself, on which the TopK decomposer of XLA:CPU and XLA:GPU CHECK-fails in a
    multi-device program (tensor parallelism); per-output barriers cost the same (bench_sampler.py)."""
    values, indices = jax.lax.top_k(x, k)
    return jax.lax.optimization_barrier(values), jax.lax.optimization_barrier(indices)


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
    Returns (threshold key i32 [B], resolved bool [B]); unresolved rows need `thresholds_by_search`."""
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


_MAX_SEARCH_STEPS = 64  # value bisection reaches adjacent floats well within this for finite logits


def _cut_by_search(
    x: jax.Array, weights: jax.Array, target: jax.Array, hint: jax.Array, needed: jax.Array, cap: int
) -> jax.Array:
    """Per row, the largest element value t with sum(weights[x >= t]) >= target, as an order key.

    x f32 [B, V] (-inf = excluded, weight 0); weights f32 [B, V] >= 0; target f32 [B] > 0; hint f32 [B]:
    a first guess (the cap's smallest value); needed bool [B]: rows to solve (others return KEEP_ALL).
    Bisection on values keeps P(lo) true and P(hi) false (P(t) = mass(x >= t) >= target) and stops once at
    most `cap` elements lie in [lo, hi); one lax.top_k over those then finds the exact element. A few full
    passes instead of 32: the cut lies among the few elements between lo and hi."""
    finite = jnp.isfinite(x)
    weights_and_ones = jnp.stack([weights, finite.astype(jnp.float32)], axis=1)  # [B, 2, V]
    total = jnp.sum(weights, axis=1)
    target = jnp.minimum(target, total)  # rounding: the whole row always qualifies
    lo = jnp.min(jnp.where(finite, x, jnp.inf), axis=1)
    hi = jnp.nextafter(jnp.max(x, axis=1), jnp.inf)  # nothing is >= hi: P(hi) false
    count_lo = jnp.sum(finite, axis=1, dtype=jnp.int32)
    count_hi = jnp.zeros_like(count_lo)
    mass_hi = jnp.zeros_like(total)

    def splittable(lo, hi):
        mid = lo + (hi - lo) * 0.5
        return (mid > lo) & (mid < hi)

    def active(state):
        _, lo, hi, count_lo, count_hi, _ = state
        return needed & (count_lo - count_hi > cap) & splittable(lo, hi)

    def keep_going(state):
        return (state[0] < _MAX_SEARCH_STEPS) & jnp.any(active(state))

    def step(state):
        it, lo, hi, count_lo, count_hi, mass_hi = state
        mid = jnp.where(it == 0, jnp.clip(hint, lo, hi), lo + (hi - lo) * 0.5)
        # Mass and count in one pass: a batched mat-vec is ~1.7x faster on XLA:CPU than two masked sums.
        at_or_above = (x >= mid[:, None]).astype(jnp.float32)
        mass_and_count = jnp.einsum("bv,bkv->bk", at_or_above, weights_and_ones)
        mass, count = mass_and_count[:, 0], mass_and_count[:, 1].astype(jnp.int32)
        go = active(state) & (mid > lo) & (mid < hi)
        ok = mass >= target
        lo = jnp.where(go & ok, mid, lo)
        count_lo = jnp.where(go & ok, count, count_lo)
        hi = jnp.where(go & ~ok, mid, hi)
        count_hi = jnp.where(go & ~ok, count, count_hi)
        mass_hi = jnp.where(go & ~ok, mass, mass_hi)
        return it + 1, lo, hi, count_lo, count_hi, mass_hi

    _, lo, hi, _, _, mass_hi = jax.lax.while_loop(
        keep_going, step, (jnp.int32(0), lo, hi, count_lo, count_hi, mass_hi)
    )
    candidate = finite & (x >= lo[:, None]) & (x < hi[:, None])
    cand_vals, cand_ids = top_k_barrier(jnp.where(candidate, x, -jnp.inf), cap)
    cand_weights = jnp.where(jnp.isfinite(cand_vals), jnp.take_along_axis(weights, cand_ids, axis=1), 0.0)
    mass_through = mass_hi[:, None] + jnp.cumsum(cand_weights, axis=1)
    first_reaching = jnp.sum(mass_through < target[:, None], axis=1)
    # Not reached among the candidates (rounding between the two summation orders, or a run of more than
    # `cap` equal values): the lowest candidate, lo, is the cut.
    value = jnp.where(
        first_reaching < cap,
        jnp.take_along_axis(cand_vals, jnp.minimum(first_reaching, cap - 1)[:, None], axis=1)[:, 0],
        lo,
    )
    value = jnp.where(jnp.isfinite(value), value, lo)
    return jnp.where(needed, order_keys(value), KEEP_ALL)


def thresholds_by_search(
    scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, hint: jax.Array, needed: jax.Array, cap: int
) -> jax.Array:
    """Exact top-k then top-p threshold keys over whole rows (scaled f32 [B, V], -inf = disallowed) for the
    `needed` rows; `hint` f32 [B] is the smallest of the row's `cap` largest values."""
    vocab_size = scaled.shape[1]
    allowed = jnp.isfinite(scaled)
    k_needed = needed & (top_k > cap) & (top_k < vocab_size)

    def top_k_keys(_):
        return _cut_by_search(scaled, allowed.astype(jnp.float32), top_k.astype(jnp.float32), hint, k_needed, cap)

    thr_k = jax.lax.cond(jnp.any(k_needed), top_k_keys, lambda _: jnp.full_like(top_k, KEEP_ALL), None)
    # A top-k within the cap always resolves its row, so a row here has top-k off or larger than the cap.
    in_k = allowed & (order_keys(scaled) >= thr_k[:, None])
    restricted = jnp.where(in_k, scaled, -jnp.inf)
    lse_k = jax.nn.logsumexp(restricted, axis=1, keepdims=True)
    probs = jnp.where(in_k, jnp.exp(scaled - lse_k), 0.0)
    p_needed = needed & (top_p < 1.0)

    def top_p_keys(_):
        return _cut_by_search(restricted, probs, top_p, hint, p_needed, cap)

    thr_p = jax.lax.cond(jnp.any(p_needed), top_p_keys, lambda _: jnp.full_like(top_k, KEEP_ALL), None)
    return jnp.maximum(thr_k, thr_p)
