"""Penalty state kept on device across steps, and the penalties it feeds.

`PenaltyState` has one row per running-sequence slot (R slots, V vocab). The runner owns it, donates it to
the jitted step and gets the updated state back, so updates are in place. Semantics:
- presence / frequency penalties follow OpenAI: they look at generated (output) tokens only;
- repetition_penalty follows Hugging Face: it looks at prompt and generated tokens, and divides positive
  logits by the penalty and multiplies negative ones by it.
Slot -1 means "no slot": such rows read zero counts and their tokens are not recorded.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PenaltyState:
    """output_counts i32 [R, V]: occurrences of each token among the slot's generated tokens.
    prompt_mask bool [R, V]: tokens present in the slot's prompt."""

    output_counts: jax.Array
    prompt_mask: jax.Array

    @property
    def num_slots(self) -> int:
        return self.output_counts.shape[0]


def init_penalty_state(num_slots: int, vocab_size: int) -> PenaltyState:
    if num_slots < 1 or vocab_size < 1:
        raise ValueError(f"need num_slots >= 1 and vocab_size >= 1, got {num_slots} and {vocab_size}")
    return PenaltyState(
        output_counts=jnp.zeros((num_slots, vocab_size), jnp.int32),
        prompt_mask=jnp.zeros((num_slots, vocab_size), jnp.bool_),
    )


def _scatter_slots(slots: jax.Array, num_slots: int) -> jax.Array:
    """Slot indices for a scatter: -1 (no slot) becomes out of bounds so mode='drop' skips it
    (a plain -1 would wrap around to the last slot)."""
    return jnp.where(slots < 0, num_slots, slots)


def reset_slots(state: PenaltyState, slots: jax.Array) -> PenaltyState:
    """Clear the rows of `slots` (i32 [B], -1 ignored): call when a sequence takes a slot, before its prompt."""
    idx = _scatter_slots(slots, state.num_slots)
    return PenaltyState(
        output_counts=state.output_counts.at[idx].set(0, mode="drop"),
        prompt_mask=state.prompt_mask.at[idx].set(False, mode="drop"),
    )


def add_prompt_tokens(state: PenaltyState, slots: jax.Array, tokens: jax.Array, lengths: jax.Array) -> PenaltyState:
    """Mark prompt tokens: `tokens` i32 [B, T] padded, the first `lengths[b]` valid. Call once per prefill
    chunk (chunks accumulate)."""
    valid = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    rows = jnp.broadcast_to(_scatter_slots(slots, state.num_slots)[:, None], tokens.shape)
    rows = jnp.where(valid, rows, state.num_slots)
    return PenaltyState(
        output_counts=state.output_counts,
        prompt_mask=state.prompt_mask.at[rows, tokens].set(True, mode="drop"),
    )


def record_tokens(state: PenaltyState, slots: jax.Array, tokens: jax.Array) -> PenaltyState:
    """Count one generated token per row (`tokens` i32 [B]); rows with slot -1 are skipped."""
    idx = _scatter_slots(slots, state.num_slots)
    return PenaltyState(
        output_counts=state.output_counts.at[idx, tokens].add(1, mode="drop"),
        prompt_mask=state.prompt_mask,
    )


def apply_penalties(
    logits: jax.Array,
    state: PenaltyState,
    slots: jax.Array,
    presence: jax.Array,
    frequency: jax.Array,
    repetition: jax.Array,
) -> jax.Array:
    """Penalised logits [B, V]. Skips the [B, V] gathers entirely (lax.cond, same program) when no row has
    a penalty, which is the common case."""
    any_penalty = jnp.any((presence != 0.0) | (frequency != 0.0) | (repetition != 1.0))

    def penalise(x: jax.Array) -> jax.Array:
        has_slot = (slots >= 0)[:, None]
        safe = jnp.maximum(slots, 0)
        counts = jnp.where(has_slot, state.output_counts[safe], 0)
        seen = jnp.where(has_slot, state.prompt_mask[safe] | (counts > 0), False)
        rep = repetition[:, None]
        x = jnp.where(seen, jnp.where(x > 0, x / rep, x * rep), x)
        x = x - frequency[:, None] * counts.astype(x.dtype)
        return x - presence[:, None] * (counts > 0).astype(x.dtype)

    return jax.lax.cond(any_penalty, penalise, lambda x: x, logits)
