"""GrammarPool allocation (mask rows and device transition tables) and the jittable mask application and
state advance."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.constrained.grammar import make_grammar
from jaxserve.constrained.tables import (
    BLOCK_ROWS,
    NEXT_BLOCK,
    UNCONSTRAINED_ROW,
    GrammarPool,
    GrammarPoolFullError,
    advance_grammar_rows,
    apply_token_mask,
    grammar_mask_rows,
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


def _grammar(key, allowed_per_state, vocab_width=70):
    """A grammar whose state i allows `allowed_per_state[i]` (each token moves to state 0; no state accepts)."""
    table = _table(key, allowed_per_state, vocab_width)
    src = [s for s, ids in enumerate(allowed_per_state) for _ in ids]
    toks = [t for ids in allowed_per_state for t in sorted(ids)]
    indptr = np.concatenate([[0], np.cumsum([len(ids) for ids in allowed_per_state])]).astype(np.int64)
    table = dataclasses.replace(table, indptr=indptr, next_tokens=np.asarray(toks, np.int32),
                                next_states=np.zeros(len(src), np.int32))
    return make_grammar(table)


def _random_grammar(key, num_states, rng, vocab_width=70, eos=0):
    """Random transitions over tokens 1..vocab_width-7 (the top ids are "padding"), state 0 accepting."""
    src, toks, nxt = [], [], []
    for s in range(num_states):
        ids = rng.choice(np.arange(1, vocab_width - 6), size=rng.integers(1, 20), replace=False)
        for t in sorted(ids):
            src.append(s), toks.append(t), nxt.append(rng.integers(0, num_states))
    bits = np.zeros((num_states, -(-vocab_width // 32) * 32), dtype=bool)
    bits[src, toks] = True
    bits[0, eos] = True
    accepting = np.zeros(num_states, bool)
    accepting[0] = True
    table = TokenTable(
        key=key, vocab_width=vocab_width, start_state=0,
        mask=np.packbits(bits, axis=1, bitorder="little").view(np.uint32),
        indptr=np.concatenate([[0], np.cumsum(np.bincount(src, minlength=num_states))]).astype(np.int64),
        next_tokens=np.asarray(toks, np.int32), next_states=np.asarray(nxt, np.int32),
        transitions=np.full((num_states, 256), -1, np.int32), token_bytes=(), accepting=accepting,
        finished=np.zeros(num_states, bool), forced_token=np.full(num_states, -1, np.int32), eos_token_ids=(eos,),
    )
    return make_grammar(table)


def test_pool_add_gather_release_and_full():
    pool = GrammarPool(capacity_rows=4 * BLOCK_ROWS, vocab_width=70, vocab_size=65)
    a = _grammar(("a",), [{1}, {2, 3}])  # 2 states: 4 pool rows (normal + closing)
    big = _grammar(("big",), [{4}] * BLOCK_ROWS)  # 2 blocks of rows
    off_a = pool.add(a).offset
    assert off_a == BLOCK_ROWS and pool.add(a).offset == off_a  # deduplicated by key, refcounted
    off_big = pool.add(big).offset
    rows = np.asarray(pool.table)[[UNCONSTRAINED_ROW, off_a, off_a + 1, off_big + BLOCK_ROWS - 1]]
    logits = np.asarray(apply_token_mask(jnp.zeros((4, 70)), jnp.asarray(rows)))
    assert np.isfinite(logits[0, :65]).all() and np.isneginf(logits[0, 65:]).all()
    assert np.flatnonzero(np.isfinite(logits[1])).tolist() == [1]
    assert np.flatnonzero(np.isfinite(logits[2])).tolist() == [2, 3]
    assert np.flatnonzero(np.isfinite(logits[3])).tolist() == [4]
    other = _grammar(("other",), [{7}] * 2)
    with pytest.raises(GrammarPoolFullError, match="pool full"):
        pool.add(other)
    pool.release(big)
    off_other = pool.add(other).offset  # evicts the unused grammar
    assert off_other == off_big
    pool.release(a)
    pool.release(a)
    with pytest.raises(ValueError, match="not held"):
        pool.release(a)


def test_pool_rejects_mismatched_width():
    pool = GrammarPool(capacity_rows=2 * BLOCK_ROWS, vocab_width=70, vocab_size=65)
    with pytest.raises(ValueError, match="words per row"):
        pool.add(_grammar(("w",), [{1}], vocab_width=200))
    with pytest.raises(ValueError, match="must be >= 0"):
        GrammarPool(capacity_rows=2 * BLOCK_ROWS, vocab_width=70, vocab_size=65, next_capacity=-1)


_advance = jax.jit(advance_grammar_rows)
_mask_rows = jax.jit(grammar_mask_rows)


def check_device_tables(pool, grammar, end_ids=(0,)):
    """The device tables give every (state, token) of `grammar` the host's next state, and every
    (state, tokens_left) the host's mask row."""
    res = pool.residency(grammar)
    assert res is not None and res.device_advance
    table, width = grammar.table, pool.vocab_width
    states = np.repeat(np.arange(grammar.num_states), width)
    tokens = np.tile(np.arange(width), grammar.num_states)
    got = np.asarray(_advance(pool.tables, jnp.asarray(res.offset + states, jnp.int32), jnp.asarray(tokens, jnp.int32),
                              jnp.asarray(end_ids, jnp.int32)))
    want_map = {(s, int(t)): int(n) for s in range(grammar.num_states)
                for t, n in zip(table.next_tokens[table.indptr[s]:table.indptr[s + 1]],
                                table.next_states[table.indptr[s]:table.indptr[s + 1]])}
    want = np.array([res.offset + want_map.get((int(s), int(t)), int(s)) for s, t in zip(states, tokens)])
    np.testing.assert_array_equal(got, want)
    for left in (1, 2, 3, 5, 100):
        rows = np.asarray(_mask_rows(pool.tables, jnp.asarray(res.offset + np.arange(grammar.num_states), jnp.int32),
                                     jnp.full(grammar.num_states, left, jnp.int32)))
        want_rows = [res.offset + grammar.mask_row(s, left) for s in range(grammar.num_states)]
        np.testing.assert_array_equal(rows, want_rows)


def test_pool_transition_tables_follow_add_release_and_evict():
    rng = np.random.default_rng(0)
    # Room for two grammars' class maps and three next-state blocks (each small grammar needs one).
    pool = GrammarPool(capacity_rows=32 * BLOCK_ROWS, vocab_width=70, vocab_size=65, class_map_slots=2,
                       next_capacity=3 * NEXT_BLOCK)
    g1, g2, g3, g4 = (_random_grammar((f"g{i}",), int(rng.integers(3, 12)), rng) for i in range(1, 5))
    assert all(g.next_by_class.size <= NEXT_BLOCK for g in (g1, g2, g3, g4))
    assert pool.add(g1).device_advance and pool.add(g2).device_advance
    check_device_tables(pool, g1)
    check_device_tables(pool, g2)
    # Both class-map slots are held by running grammars: g3 is resident for its mask rows only.
    r3 = pool.add(g3)
    assert not r3.device_advance and pool.num_host_advance == 1
    assert pool.class_slots_in_use() == 2 and pool.next_entries_in_use() == 2 * NEXT_BLOCK
    # Unconstrained rows and host-advanced grammars never move on the device.
    rows = jnp.asarray([UNCONSTRAINED_ROW, r3.offset], jnp.int32)
    toks = jnp.asarray(g3.table.next_tokens[:1].tolist() * 2, jnp.int32)
    assert np.asarray(_advance(pool.tables, rows, toks, jnp.asarray([0], jnp.int32))).tolist() == rows.tolist()
    # Releasing g1 lets g4 evict it: its rows, class-map slot and next-state block go together.
    pool.release(g1)
    assert pool.add(g4).device_advance
    assert pool.residency(g1) is None
    check_device_tables(pool, g2)
    check_device_tables(pool, g4)
    # g3 gets device tables once nobody runs it and an unused grammar makes room (never while it runs).
    pool.release(g3)
    pool.release(g2)
    assert pool.add(g3).device_advance
    assert pool.residency(g2) is None
    check_device_tables(pool, g3)
    check_device_tables(pool, g4)
    assert pool.class_slots_in_use() == 2 and pool.next_entries_in_use() == 2 * NEXT_BLOCK
    # A grammar larger than the whole next-state table always advances on the host.
    big = _random_grammar(("big",), 80, rng)
    assert big.next_by_class.size > 3 * NEXT_BLOCK
    pool.release(g4)
    assert not pool.add(big).device_advance and pool.num_host_advance == 2
    assert pool.residency(g4) is not None  # nothing was evicted for a grammar that cannot fit anyway
    # Nor for one that would not fit even after evicting every unused grammar: g3 runs in one of the three
    # next-state blocks, so a grammar of three blocks cannot get device tables and the cached g4 stays.
    mid = next(g for g in (_random_grammar(("mid", n), n, rng) for n in range(30, 200))
               if 2 * NEXT_BLOCK < g.next_by_class.size <= 3 * NEXT_BLOCK)
    assert not pool.add(mid).device_advance and pool.residency(g4) is not None
    pool.release(g3)
    assert pool.add(g3).device_advance  # still resident, tables kept
    pool.release(g3)
    pool.release(mid)
    assert pool.add(mid).device_advance  # now evicting the unused g3 and g4 makes room
    assert pool.residency(g3) is None and pool.residency(g4) is None
    check_device_tables(pool, mid)
