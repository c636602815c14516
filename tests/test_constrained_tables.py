"""GrammarPool allocation and the jittable apply_token_mask."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.constrained.tables import (
    BLOCK_ROWS,
    UNCONSTRAINED_ROW,
    GrammarPool,
    GrammarPoolFullError,
    apply_token_mask,
    unconstrained_row,
)
from jaxserve.constrained.token_table import TokenTable


def _table(key, allowed_per_state, vocab_width=70):
    s = len(allowed_per_state)
    bits = np.zeros((s, -(-vocab_width // 32) * 32), dtype=bool)
    for i, ids in enumerate(allowed_per_state):
        bits[i, list(ids)] = True
    mask = np.packbits(bits, axis=1, bitorder="little").view(np.uint32)
    return TokenTable(
        key=key, vocab_width=vocab_width, start_state=0, mask=mask,
        indptr=np.zeros(s + 1, np.int64), next_tokens=np.zeros(0, np.int32), next_states=np.zeros(0, np.int32),
        transitions=np.full((s, 256), -1, np.int32), token_bytes=(),
        accepting=np.zeros(s, bool), finished=np.zeros(s, bool), forced_token=np.full(s, -1, np.int32),
        eos_token_ids=(),
    )


def test_apply_token_mask_sets_disallowed_to_neg_inf():
    logits = jnp.arange(2 * 70, dtype=jnp.float32).reshape(2, 70)
    t = _table(("a",), [{0, 33, 69}, {5}])
    out = jax.jit(apply_token_mask)(logits, jnp.asarray(t.mask))
    finite = np.isfinite(np.asarray(out))
    assert sorted(np.flatnonzero(finite[0])) == [0, 33, 69]
    assert sorted(np.flatnonzero(finite[1])) == [5]
    assert float(out[1, 5]) == float(logits[1, 5])


def test_unconstrained_row_masks_only_padding():
    row = unconstrained_row(vocab_size=65, vocab_width=70)
    logits = jnp.zeros((1, 70))
    out = np.asarray(apply_token_mask(logits, jnp.asarray(row)[None]))
    assert np.isfinite(out[0, :65]).all() and np.isneginf(out[0, 65:]).all()


def test_pool_add_gather_release_and_full():
    pool = GrammarPool(capacity_rows=4 * BLOCK_ROWS, vocab_width=70, vocab_size=65)
    a = _table(("a",), [{1}, {2, 3}])
    big = _table(("big",), [{4}] * (2 * BLOCK_ROWS))
    off_a = pool.add(a)
    assert off_a == BLOCK_ROWS and pool.add(a) == off_a  # deduplicated by key, refcounted
    off_big = pool.add(big)
    rows = np.asarray(pool.table)[[UNCONSTRAINED_ROW, off_a, off_a + 1, off_big + 2 * BLOCK_ROWS - 1]]
    logits = np.asarray(apply_token_mask(jnp.zeros((4, 70)), jnp.asarray(rows)))
    assert np.isfinite(logits[0, :65]).all() and np.isneginf(logits[0, 65:]).all()
    assert np.flatnonzero(np.isfinite(logits[1])).tolist() == [1]
    assert np.flatnonzero(np.isfinite(logits[2])).tolist() == [2, 3]
    assert np.flatnonzero(np.isfinite(logits[3])).tolist() == [4]
    other = _table(("other",), [{7}] * 2)
    with pytest.raises(GrammarPoolFullError, match="pool full"):
        pool.add(other)
    pool.release(big)
    off_other = pool.add(other)  # evicts the unused grammar
    assert off_other == off_big
    pool.release(a)
    pool.release(a)
    with pytest.raises(ValueError, match="not held"):
        pool.release(a)


def test_pool_rejects_mismatched_width():
    pool = GrammarPool(capacity_rows=2 * BLOCK_ROWS, vocab_width=70, vocab_size=65)
    with pytest.raises(ValueError, match="words per row"):
        pool.add(_table(("w",), [{1}], vocab_width=200))
