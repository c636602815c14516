"""The jitted per-row sampler: one pure function the runner calls inside its jitted step.

Processing order for row b (all rows in one program, parameters per row):
  grammar mask -> end-token suppression -> logit_bias -> penalties      = the "processed" logits
  logprobs = log_softmax(processed)  (before temperature and filtering: they describe the model as
                                      steered by mask/bias/penalties, are the same for a greedy and a
                                      sampled request, and stay finite for tokens top-k/top-p removed)
  greedy rows: token = argmax(processed)
  others: / temperature -> top-k -> top-p -> min-p -> one draw from the kept, renormalised softmax.

Randomness: row b at step s uses fold_in(key(seed_b), s) only (see `row_uniforms`), so a seeded request
produces the same tokens whatever else is in the batch and wherever its row is. The draw is an inverse-CDF
lookup with one uniform per row (two-level: block sums, then within the block), because drawing V Gumbel
variates per row costs ~5x the rest of the sampler on XLA:CPU.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from jaxserve.constrained.tables import (
    UNCONSTRAINED_ROW,
    GrammarTables,
    advance_grammar_rows,
    grammar_mask_rows,
    unpack_mask_bits,
)
from jaxserve.sampling.batch import GREEDY_TEMPERATURE, SamplingBatch
from jaxserve.sampling.filters import order_keys, thresholds_by_search, thresholds_from_top, top_k_barrier
from jaxserve.sampling.penalties import PenaltyState, apply_penalties, record_tokens

# How many of each row's largest logits `lax.top_k` fetches when some row filters with top-k / top-p.
# Rows whose cut lies within them are resolved exactly from these; others fall back to bisection.
DEFAULT_TOP_K_CAP = 256
# Block width of the two-level inverse-CDF draw.
_CDF_BLOCK = 128


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SampleOutput:
    """tokens i32 [B]; logprob f32 [B] (of the chosen token); top_ids i32 [B, N], top_logprobs f32 [B, N]
    (N = num_top_logprobs, descending); num_allowed i32 [B]: tokens the grammar mask allows (1 = forced,
    0 = the mask allows nothing: the row's token is meaningless and the engine must fail the request);
    penalty: the state with this step's tokens recorded."""

    tokens: jax.Array
    logprob: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array
    num_allowed: jax.Array
    penalty: PenaltyState


def row_keys(seed: jax.Array, step: jax.Array) -> jax.Array:
    """Typed PRNG keys [B]: fold_in(key(seed_b), step_b) with seed given as threefry key data u32 [B, 2]."""
    base = jax.random.wrap_key_data(seed, impl="threefry2x32")
    return jax.vmap(jax.random.fold_in)(base, step)


def row_uniforms(seed: jax.Array, step: jax.Array) -> jax.Array:
    """One uniform in (0, 1] per row from fold_in(key(seed_b), step_b).

    The folded key's last 32-bit word is itself threefry output, so it serves as the random bits directly
    (23 mantissa bits, the way jax.random.uniform builds floats) instead of hashing once more: one threefry
    per row instead of two, which shortens the sampler's compile by about a second on this CPU."""
    bits = jax.random.key_data(row_keys(seed, step))[:, 1]
    unit = jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32) - 1.0  # [0, 1)
    return 1.0 - unit


def _mask_and_bias(
    logits: jax.Array, batch: SamplingBatch, mask_table: jax.Array, end_token_ids: jax.Array
) -> tuple[jax.Array, jax.Array]:
    rows, vocab = logits.shape
    is_end = jnp.zeros(vocab, jnp.bool_).at[jnp.where(end_token_ids < 0, vocab, end_token_ids)].set(
        True, mode="drop"
    )

    def masked(allowed: jax.Array) -> tuple[jax.Array, jax.Array]:
        # allowed: [B, V], or [1, V] when every row uses the same mask row.
        num_allowed = jnp.broadcast_to(jnp.sum(allowed, axis=1, dtype=jnp.int32), (rows,))
        # The grammar outranks min_tokens: if the mask allows only end tokens, suppressing them would leave
        # nothing to sample, so the row keeps them.
        has_other = jnp.any(allowed & ~is_end[None, :], axis=1)
        suppress = (batch.suppress_end & has_other)[:, None] & is_end[None, :]
        return jnp.where(allowed & ~suppress, logits.astype(jnp.float32), -jnp.inf), num_allowed

    # Unconstrained batches (all rows on mask row 0) unpack one row instead of B (same program).
    x, num_allowed = jax.lax.cond(
        jnp.any(batch.mask_row != 0),
        lambda: masked(unpack_mask_bits(mask_table[batch.mask_row], vocab)),
        lambda: masked(unpack_mask_bits(mask_table[:1], vocab)),
    )
    bias_idx = jnp.where(batch.bias_ids < 0, vocab, batch.bias_ids)
    row_idx = jnp.arange(rows)[:, None]
    x = x.at[row_idx, bias_idx].add(batch.bias_vals, mode="drop")
    return x, num_allowed


def _draw(weights: jax.Array, uniform: jax.Array) -> jax.Array:
    """Index i with probability weights[i] / sum(weights) per row, for uniform in (0, 1].

    Picks the first index whose cumulative weight reaches uniform * total: zero-weight entries never are
    first to reach it, so disallowed tokens are never drawn, whatever the rounding."""
    rows, vocab = weights.shape
    blocks = -(-vocab // _CDF_BLOCK)
    w = jnp.pad(weights, ((0, 0), (0, blocks * _CDF_BLOCK - vocab))).reshape(rows, blocks, _CDF_BLOCK)
    block_cum = jnp.cumsum(jnp.sum(w, axis=2), axis=1)
    target = uniform * block_cum[:, -1]
    block = jnp.minimum(jnp.sum(block_cum < target[:, None], axis=1), blocks - 1)
    before = jnp.where(block > 0, jnp.take_along_axis(block_cum, jnp.maximum(block - 1, 0)[:, None], 1)[:, 0], 0.0)
    in_block = jnp.take_along_axis(w, block[:, None, None], axis=1)[:, 0, :]
    in_cum = jnp.cumsum(in_block, axis=1)
    offset = jnp.sum(in_cum < (target - before)[:, None], axis=1)
    # Rounding can leave the in-block sum a hair below the block total: never step past the last
    # positive-weight entry of the block.
    last_positive = jnp.max(jnp.where(in_block > 0, jnp.arange(_CDF_BLOCK), 0), axis=1)
    return (block * _CDF_BLOCK + jnp.minimum(offset, last_positive)).astype(jnp.int32)


@partial(jax.jit, static_argnames=("num_top_logprobs", "top_k_cap"))
def sample(
    logits: jax.Array,
    batch: SamplingBatch,
    penalty: PenaltyState,
    mask_table: jax.Array,
    end_token_ids: jax.Array,
    num_top_logprobs: int = 20,
    top_k_cap: int = DEFAULT_TOP_K_CAP,
) -> SampleOutput:
    """Sample one token per row.

    logits f32 [B, V]; batch: SamplingBatch of B rows; penalty: PenaltyState [R, V];
    mask_table u32 [S, ceil(V/32)] (row 0 = unconstrained); end_token_ids i32 [E] (-1 = padding).
    Jitted here for standalone use; inside the runner's jitted step it simply inlines."""
    rows, vocab = logits.shape
    if num_top_logprobs < 0 or num_top_logprobs > vocab:
        raise ValueError(f"num_top_logprobs must be in [0, {vocab}], got {num_top_logprobs}")
    cap = min(max(top_k_cap, num_top_logprobs, 1), vocab)
    if top_k_cap < 1:
        raise ValueError(f"top_k_cap must be positive, got {top_k_cap}")

    x, num_allowed = _mask_and_bias(logits, batch, mask_table, end_token_ids)
    processed = apply_penalties(
        x, penalty, batch.slot, batch.presence_penalty, batch.frequency_penalty, batch.repetition_penalty
    )
    log_normalizer = jax.nn.logsumexp(processed, axis=1)

    greedy = batch.temperature <= GREEDY_TEMPERATURE
    temperature = jnp.where(greedy, 1.0, batch.temperature)
    scaled = processed / temperature[:, None]
    k_on = (batch.top_k > 0) & (batch.top_k < vocab)
    needs_cut = ~greedy & (k_on | (batch.top_p < 1.0))

    num_top = max(num_top_logprobs, 1)  # the first top id doubles as the greedy token

    def without_cut(_):
        vals, ids = top_k_barrier(processed, num_top)
        return jnp.full(rows, jnp.iinfo(jnp.int32).min, jnp.int32), vals, ids

    def with_cut(_):
        vals, ids = top_k_barrier(processed, cap)
        # Same elementwise division as `scaled`, so these are bit-identical to the scaled values.
        top_scaled = vals / temperature[:, None]
        lse_full = jax.nn.logsumexp(scaled, axis=1)
        thr, resolved = thresholds_from_top(top_scaled, batch.top_k, batch.top_p, lse_full, vocab)
        unresolved = needs_cut & ~resolved
        hint = top_scaled[:, -1]
        thr = jax.lax.cond(
            jnp.any(unresolved),
            lambda t: jnp.where(
                unresolved, thresholds_by_search(scaled, batch.top_k, batch.top_p, hint, unresolved, cap), t
            ),
            lambda t: t,
            thr,
        )
        return jnp.where(needs_cut, thr, jnp.iinfo(jnp.int32).min), vals[:, :num_top], ids[:, :num_top]

    threshold, top_vals, top_ids = jax.lax.cond(jnp.any(needs_cut), with_cut, without_cut, None)

    def draw(_):
        row_max = jnp.max(scaled, axis=1, keepdims=True)
        keep = (order_keys(scaled) >= threshold[:, None]) & (scaled - row_max >= jnp.log(batch.min_p)[:, None])
        weights = jnp.where(keep, jnp.exp(scaled - row_max), 0.0)
        return _draw(weights, row_uniforms(batch.seed, batch.step))

    # An all-greedy batch skips the draw's [B, V] passes (same program, no recompile).
    drawn = jax.lax.cond(jnp.all(greedy), lambda _: jnp.zeros(rows, jnp.int32), draw, None)
    # lax.top_k puts the lowest index first among equal values, so top_ids[:, 0] is jnp.argmax, for free.
    tokens = jnp.where(greedy, top_ids[:, 0].astype(jnp.int32), drawn)
    chosen = jnp.take_along_axis(processed, tokens[:, None], axis=1)[:, 0]

    return SampleOutput(
        tokens=tokens,
        logprob=chosen - log_normalizer,
        top_ids=top_ids[:, :num_top_logprobs].astype(jnp.int32),
        top_logprobs=top_vals[:, :num_top_logprobs] - log_normalizer[:, None],
        num_allowed=num_allowed,
        penalty=record_tokens(penalty, batch.slot, tokens),
    )


def sample_with_grammar(
    logits: jax.Array,
    batch: SamplingBatch,
    penalty: PenaltyState,
    grammar: GrammarTables,
    end_token_ids: jax.Array,
    grammar_state: jax.Array,
    num_top_logprobs: int = 20,
    top_k_cap: int = DEFAULT_TOP_K_CAP,
) -> tuple[SampleOutput, jax.Array]:
    """`sample` with the grammar states kept on the device, so a constrained row can be dispatched before the
    host has read its previous token (host work then overlaps the device step, as for unconstrained rows).

    grammar_state i32 [R]: per slot, the normal pool row of the state after the slot's latest sampled token.
    Each row takes its state from there (`grammar_from_device`) or from the host (`grammar_row`), picks the
    mask row from it and `tokens_left`, samples, and stores the advanced state for its slot (padding rows and
    non-final prefill chunks, slot -1, store nothing). Returns (output, updated grammar_state)."""
    stored = grammar_state[jnp.maximum(batch.slot, 0)]
    state_row = jnp.where(batch.grammar_from_device & (batch.slot >= 0), stored, batch.grammar_row)
    constrained = state_row != UNCONSTRAINED_ROW
    mask_row = jnp.where(constrained, grammar_mask_rows(grammar, state_row, batch.tokens_left), batch.mask_row)
    out = sample(logits, dataclasses.replace(batch, mask_row=mask_row), penalty, grammar.mask, end_token_ids,
                 num_top_logprobs=num_top_logprobs, top_k_cap=top_k_cap)
    new_state = advance_grammar_rows(grammar, state_row, out.tokens, end_token_ids)
    slots = jnp.where(batch.slot >= 0, batch.slot, grammar_state.shape[0])
    return out, grammar_state.at[slots].set(new_state, mode="drop")
