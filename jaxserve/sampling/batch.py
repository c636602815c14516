"""`SamplingBatch`: the per-row sampling parameters of one jitted step, as arrays.

Every parameter is a per-row array (never a static argument), so one compiled program serves every mix of
requests. `build_sampling_batch` is the host side: it turns validated `SamplingParams` plus the engine's
per-row state (seed, step, penalty slot, grammar state, end-token suppression) into NumPy arrays padded to
the row bucket; the runner moves them to the device (`jax.device_put`) with the rest of the step's inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import jax
import numpy as np

from jaxserve.sampling.params import MAX_LOGIT_BIAS_ENTRIES, SamplingParams

# Width of the sparse logit_bias pairs. It equals the most entries SamplingParams accepts (300), so every valid
# request fits and the width never changes (no recompiles). The cost is a [B, 300] scatter-add per step and
# B * 300 * 8 bytes of host->device traffic (150 KiB at B = 64): negligible next to the [B, V] work.
MAX_LOGIT_BIAS = MAX_LOGIT_BIAS_ENTRIES

# Temperatures at or below this are treated as greedy: dividing logits by a near-zero temperature only
# reproduces argmax with extra overflow risk (the same cut vLLM makes).
GREEDY_TEMPERATURE = 1e-5

_UINT32_MASK = (1 << 32) - 1
_INT32_MAX = (1 << 31) - 1
_UINT64_MASK = (1 << 64) - 1


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling inputs of one step; B rows (padding rows included).

    temperature         f32 [B]     <= GREEDY_TEMPERATURE: greedy (argmax of the processed logits)
    top_p               f32 [B]     1 = off
    top_k               i32 [B]     <= 0 or >= V = off
    min_p               f32 [B]     0 = off
    presence_penalty    f32 [B]     OpenAI: subtracted once from every token already generated
    frequency_penalty   f32 [B]     OpenAI: subtracted per occurrence in the generated tokens
    repetition_penalty  f32 [B]     HF: prompt + generated tokens, logit / p if > 0 else logit * p; 1 = off
    bias_ids            i32 [B, K]  logit_bias token ids, -1 = padding
    bias_vals           f32 [B, K]  logit_bias values (added to the logits)
    suppress_end        bool [B]    end tokens get -inf (min_tokens not reached, or ignore_eos)
    seed                u32 [B, 2]  threefry key data of the row's seed ([hi, lo] 32-bit words)
    step                i32 [B]     the row's sampling step; the key is fold_in(key(seed), step)
    slot                i32 [B]     row of the PenaltyState; -1 = none (padding rows, non-final prefill
                                    chunks): no penalties read, sampled token not recorded
    mask_row            i32 [B]     row of the grammar mask table; 0 = unconstrained. Rows with a grammar
                                    state (below) get theirs computed on the device instead
    grammar_row         i32 [B]     the row's grammar state as the host knows it: its normal pool row
                                    (grammar offset + state); 0 = no grammar
    grammar_from_device bool [B]    the state is the one the device stored for `slot` when it sampled the
                                    row's previous token (still in flight, so unknown to the host)
    tokens_left         i32 [B]     tokens the row may still emit, this one included: picks the closing
                                    mask row (`Grammar.mask_row`)
    """

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    min_p: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    repetition_penalty: jax.Array
    bias_ids: jax.Array
    bias_vals: jax.Array
    suppress_end: jax.Array
    seed: jax.Array
    step: jax.Array
    slot: jax.Array
    mask_row: jax.Array
    grammar_row: jax.Array
    grammar_from_device: jax.Array
    tokens_left: jax.Array

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]


@dataclass(frozen=True)
class SamplingRow:
    """What the engine knows about one row when it builds a step.

    `seed` is the request's seed (or one the engine drew for it); `step` counts the tokens this sequence has
    sampled so far (so step s of a given seed always uses the same key); `suppress_end` is true while
    min_tokens is not reached or when the request set ignore_eos. A constrained row gives `grammar_row` (its
    state's normal pool row, ignored when `grammar_from_device`) and `tokens_left` instead of a `mask_row`.
    """

    params: SamplingParams
    seed: int
    step: int
    slot: int
    mask_row: int = 0
    suppress_end: bool = False
    grammar_row: int = 0
    grammar_from_device: bool = False
    tokens_left: int = 0


def seed_key_data(seed: int) -> tuple[int, int]:
    """Threefry key data for an integer seed: the same words `jax.random.key(seed)` uses for
    0 <= seed < 2**32, extended to 64 bits (larger or negative seeds are taken modulo 2**64)."""
    s = seed & _UINT64_MASK
    return (s >> 32) & _UINT32_MASK, s & _UINT32_MASK


def build_sampling_batch(rows: Sequence[SamplingRow], num_rows: int) -> SamplingBatch:
    """NumPy arrays for `rows`, padded to `num_rows` (the row bucket) with inert greedy rows (slot -1)."""
    if num_rows < len(rows):
        raise ValueError(f"{len(rows)} rows do not fit in a batch of {num_rows}")
    temperature = np.zeros(num_rows, np.float32)
    top_p = np.ones(num_rows, np.float32)
    top_k = np.full(num_rows, -1, np.int32)
    min_p = np.zeros(num_rows, np.float32)
    presence = np.zeros(num_rows, np.float32)
    frequency = np.zeros(num_rows, np.float32)
    repetition = np.ones(num_rows, np.float32)
    bias_ids = np.full((num_rows, MAX_LOGIT_BIAS), -1, np.int32)
    bias_vals = np.zeros((num_rows, MAX_LOGIT_BIAS), np.float32)
    suppress_end = np.zeros(num_rows, np.bool_)
    seed = np.zeros((num_rows, 2), np.uint32)
    step = np.zeros(num_rows, np.int32)
    slot = np.full(num_rows, -1, np.int32)
    mask_row = np.zeros(num_rows, np.int32)
    grammar_row = np.zeros(num_rows, np.int32)
    grammar_from_device = np.zeros(num_rows, np.bool_)
    tokens_left = np.zeros(num_rows, np.int32)
    for i, row in enumerate(rows):
        p = row.params
        if len(p.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries, got {len(p.logit_bias)}")
        if row.step < 0:
            raise ValueError(f"step must be non-negative, got {row.step}")
        if row.mask_row < 0:
            raise ValueError(f"mask_row must be non-negative, got {row.mask_row}")
        if row.grammar_row < 0:
            raise ValueError(f"grammar_row must be non-negative, got {row.grammar_row}")
        if row.mask_row and (row.grammar_row or row.grammar_from_device):
            raise ValueError("a row gives either a mask_row or a grammar state, not both")
        if row.grammar_from_device and row.slot < 0:
            raise ValueError("grammar_from_device needs the row's slot (where the device stored the state)")
        temperature[i] = p.temperature
        top_p[i] = p.top_p
        # validate() bounds top_k to int32. Should an unvalidated value get here anyway, <= 0 and anything past
        # int32 (>= any vocabulary) both mean off: write -1 rather than overflow and fail the whole step.
        top_k[i] = p.top_k if 0 < p.top_k <= _INT32_MAX else -1
        min_p[i] = p.min_p
        presence[i] = p.presence_penalty
        frequency[i] = p.frequency_penalty
        repetition[i] = p.repetition_penalty
        for j, (tok, val) in enumerate(p.logit_bias):
            bias_ids[i, j] = tok
            bias_vals[i, j] = val
        suppress_end[i] = row.suppress_end
        seed[i] = seed_key_data(row.seed)
        step[i] = row.step
        slot[i] = row.slot
        mask_row[i] = row.mask_row
        grammar_row[i] = row.grammar_row
        grammar_from_device[i] = row.grammar_from_device
        tokens_left[i] = row.tokens_left
    return SamplingBatch(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        presence_penalty=presence,
        frequency_penalty=frequency,
        repetition_penalty=repetition,
        bias_ids=bias_ids,
        bias_vals=bias_vals,
        suppress_end=suppress_end,
        seed=seed,
        step=step,
        slot=slot,
        mask_row=mask_row,
        grammar_row=grammar_row,
        grammar_from_device=grammar_from_device,
        tokens_left=tokens_left,
    )
