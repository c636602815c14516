"""The jitted per-row sampler against NumPy references: filtering statistics, penalties, bias, seeds,
grammar mask, end-token suppression, logprobs, and one compilation for every parameter mix."""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxserve.constrained.grammar import make_grammar
from jaxserve.constrained.tables import GrammarPool, unconstrained_row
from jaxserve.constrained.token_table import TokenTable
from jaxserve.sampling.batch import MAX_LOGIT_BIAS, SamplingRow, build_sampling_batch, seed_key_data
from jaxserve.sampling.params import SamplingParams
from jaxserve.sampling.penalties import (
    add_prompt_tokens,
    init_penalty_state,
    record_tokens,
    reset_slots,
)
from jaxserve.sampling.sampler import sample, sample_with_grammar

V = 64
# Nearly every call uses the same shapes (rows, slots, mask-table rows, end ids), so the file compiles the
# sampler three times (default cap, the small cap that forces the search path, and an 8-row bucket):
# compiles dominate its time.
ROWS = 4096
SLOTS = 16
MASK_ROWS = 4
END_WIDTH = 3
NO_END = (-1,)


def mask_table(*allowed_sets: list[int]) -> jax.Array:
    """Row 0 unconstrained, then one row per allowed set (bit t % 32 of word t // 32); padded to MASK_ROWS."""
    rows = [unconstrained_row(V, V)]
    for allowed in allowed_sets:
        bits = np.zeros(-(-V // 32) * 32, bool)
        bits[list(allowed)] = True
        rows.append(np.packbits(bits, bitorder="little").view(np.uint32))
    rows += [rows[0]] * (MASK_ROWS - len(rows))
    return jnp.asarray(np.stack(rows))


def end_ids(*ids: int) -> jax.Array:
    return jnp.asarray(list(ids) + [-1] * (END_WIDTH - len(ids)), jnp.int32)


def fixed_logits(seed: int = 0) -> np.ndarray:
    # Distinct values (no ties at a cut) with a realistic spread.
    return (np.random.default_rng(seed).standard_normal(V) * 2.0).astype(np.float32)


def run(logits, rows, *, table=None, end=NO_END, state=None, **kw):
    """Sample `rows` (padded to ROWS with inert rows); logits [V] for every row or [len(rows), V]."""
    logits = np.asarray(logits, np.float32)
    padded = np.zeros((ROWS, V), np.float32)
    padded[: len(rows)] = logits
    batch = build_sampling_batch(rows, ROWS)
    state = init_penalty_state(SLOTS, V) if state is None else state
    table = mask_table() if table is None else table
    return sample(jnp.asarray(padded), batch, state, table, end_ids(*end), **kw)


def ref_filtered_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Hugging Face order: temperature -> top-k -> top-p -> min-p, as a sorted-prefix computation; a cut
    inside a run of equal values keeps the whole run (a value threshold cannot split ties)."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros_like(p, bool)
    k = top_k if 0 < top_k < len(p) else len(p)
    keep = p >= p[order[k - 1]]
    if top_p < 1.0:
        pk = np.where(keep, p, 0.0)
        pk /= pk.sum()
        cum = np.cumsum(pk[order])
        last = int(np.searchsorted(cum, top_p))  # first index whose cumulative mass reaches top_p
        keep &= p >= p[order[min(last, len(p) - 1)]]
    keep &= p >= min_p * p.max()
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def rows_for(params: SamplingParams, n: int, seed0: int = 0) -> list[SamplingRow]:
    return [SamplingRow(params, seed=seed0 + i, step=0, slot=-1) for i in range(n)]


FILTER_CASES = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=1.3, min_p=0.1),
    dict(temperature=0.9, top_k=12, top_p=0.7, min_p=0.05),
]


def tied_logits() -> np.ndarray:
    """Runs of equal values: 3 at 3.0, 20 at 1.0, the rest spread below."""
    logits = np.linspace(-4.0, -1.0, V).astype(np.float32)
    logits[10:13] = 3.0
    logits[20:40] = 1.0
    return logits


def assert_frequencies_match(logits: np.ndarray, params: SamplingParams) -> None:
    n = ROWS
    expected = ref_filtered_probs(logits, params.temperature, params.top_k, params.top_p, params.min_p)
    out = run(logits, rows_for(params, n))
    counts = np.bincount(np.asarray(out.tokens), minlength=V)
    assert counts[expected == 0].sum() == 0, "a filtered-out token was sampled"
    support = expected > 0
    chi2 = float(np.sum((counts[support] - n * expected[support]) ** 2 / (n * expected[support])))
    dof = int(support.sum()) - 1
    # Fixed seeds make this deterministic; the bound is ~5 standard deviations above the chi2 mean.
    assert chi2 < dof + 5 * np.sqrt(2 * max(dof, 1)) + 5, (chi2, dof)
    tv = 0.5 * np.abs(counts / n - expected).sum()
    assert tv < 0.05


@pytest.mark.parametrize("case", FILTER_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_empirical_frequencies_match_filtered_softmax(case):
    assert_frequencies_match(fixed_logits(1), SamplingParams(**case))


@pytest.mark.parametrize("case", [dict(top_k=15), dict(top_p=0.6)], ids=["top_k", "top_p"])
def test_a_cut_inside_tied_values_keeps_the_whole_run(case):
    # top_k=15 and top_p=0.6 both cut inside the run of 20 equal logits: the whole run stays (23 tokens
    # with the 3 above it), the 20 with equal odds.
    assert_frequencies_match(tied_logits(), SamplingParams(**case))


@pytest.mark.parametrize("logits", [fixed_logits(2), tied_logits()], ids=["distinct", "ties"])
def test_search_fallback_gives_the_same_tokens_as_the_top_k_cap(logits):
    # With a cap of 4 every top-k > 4 and every wide nucleus falls back to the value search; with the
    # default cap (>= V) all rows resolve from lax.top_k. The thresholds, hence the tokens, must agree.
    cases = [dict(top_k=20), dict(top_p=0.9), dict(top_k=30, top_p=0.6, temperature=0.8), dict(top_p=0.3)]
    rows = [r for i, c in enumerate(cases) for r in rows_for(SamplingParams(**c), 512, seed0=1000 * i)]
    default = run(logits, rows)
    capped = run(logits, rows, top_k_cap=4)
    np.testing.assert_array_equal(np.asarray(default.tokens), np.asarray(capped.tokens))
    for i, c in enumerate(cases):
        chunk = np.asarray(capped.tokens[512 * i : 512 * (i + 1)])
        p = SamplingParams(**c)
        expected = ref_filtered_probs(logits, p.temperature, p.top_k, p.top_p, p.min_p)
        assert np.all(expected[chunk] > 0), "a token outside the top-k / nucleus was sampled"


def ref_processed(logits, params: SamplingParams, prompt: list[int], generated: list[int]) -> np.ndarray:
    x = logits.astype(np.float64).copy()
    for tok, bias in params.logit_bias:
        x[tok] += bias
    counts = np.bincount(np.asarray(generated, int), minlength=len(x)) if generated else np.zeros(len(x))
    seen = counts > 0
    seen[prompt] = True
    rp = params.repetition_penalty
    x = np.where(seen, np.where(x > 0, x / rp, x * rp), x)
    x -= params.frequency_penalty * counts
    x -= params.presence_penalty * (counts > 0)
    return x


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def masked_log_softmax(x: np.ndarray, allowed: list[int]) -> np.ndarray:
    y = np.full(len(x), -np.inf)
    y[allowed] = x[allowed]
    return y - y.max() - np.log(np.exp(y - y.max()).sum())


def assert_logprobs_match(out, row: int, expected: np.ndarray) -> None:
    """The top logprobs (20, in descending order) and the chosen token's logprob against a reference."""
    order = np.argsort(-expected, kind="stable")[:20]
    np.testing.assert_array_equal(np.asarray(out.top_ids[row]), order)
    np.testing.assert_allclose(np.asarray(out.top_logprobs[row]), expected[order], atol=2e-5)
    np.testing.assert_allclose(float(out.logprob[row]), expected[int(out.tokens[row])], atol=2e-5)


# Masking the vocabulary to 20 tokens makes the 20 top logprobs the whole distribution.
TWENTY = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 30, 31, 40, 50, 51, 63]


def test_penalties_bias_and_logprobs_match_numpy_and_greedy_is_argmax():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((4, V)).astype(np.float32) * 3
    params = [
        SamplingParams(temperature=0.0, presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, logit_bias=((5, 100.0), (6, -100.0), (7, 2.5))),
        SamplingParams(temperature=0.0, frequency_penalty=-1.0, repetition_penalty=0.7, logit_bias=((9, -3.0),)),
        SamplingParams(temperature=0.8, top_p=0.9, presence_penalty=-2.0),
    ]
    prompts = [[1, 2, 3, 40], [10], [7, 8, 9, 9, 63], [0]]
    generated = [[2, 2, 50, 51, 51, 51], [4], [9, 9, 11], [30, 31, 30]]
    slots = [3, 0, 2, 1]

    state = init_penalty_state(SLOTS, V)
    width = max(map(len, prompts))
    padded = np.zeros((4, width), np.int32)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    slot_arr = jnp.asarray(slots, jnp.int32)
    state = reset_slots(state, slot_arr)
    state = add_prompt_tokens(state, slot_arr, jnp.asarray(padded), jnp.asarray(lengths))
    for step in range(max(map(len, generated))):
        toks = np.asarray([g[step] if step < len(g) else 0 for g in generated], np.int32)
        live = np.asarray([s if step < len(g) else -1 for s, g in zip(slots, generated)], np.int32)
        state = record_tokens(state, jnp.asarray(live), jnp.asarray(toks))

    rows = [SamplingRow(p, seed=i, step=0, slot=s, mask_row=1) for i, (p, s) in enumerate(zip(params, slots))]
    out = run(logits, rows, state=state, table=mask_table(TWENTY))
    for i in range(4):
        expected = masked_log_softmax(ref_processed(logits[i], params[i], prompts[i], generated[i]), TWENTY)
        assert_logprobs_match(out, i, expected)
        if params[i].greedy:
            assert int(out.tokens[i]) == int(np.argmax(expected))
    # The sampled tokens were recorded in the rows' slots.
    counts = np.asarray(out.penalty.output_counts)
    for i, s in enumerate(slots):
        before = np.bincount(generated[i], minlength=V)
        before[int(out.tokens[i])] += 1
        np.testing.assert_array_equal(counts[s], before)


def test_greedy_rows_are_argmax_of_unconstrained_logits():
    logits = np.random.default_rng(8).standard_normal((300, V)).astype(np.float32)
    logits[0, [7, 30]] = 9.0  # a tie: argmax takes the lower index
    rows = [SamplingRow(SamplingParams(temperature=0.0, top_k=2, top_p=0.1), seed=i, step=0, slot=-1) for i in range(300)]
    out = run(logits, rows)
    np.testing.assert_array_equal(np.asarray(out.tokens[:300]), np.argmax(logits, axis=1))
    for i in range(0, 300, 50):
        assert_logprobs_match(out, i, log_softmax(logits[i].astype(np.float64)))


def test_prompt_tokens_only_feed_repetition_penalty():
    logits = fixed_logits(7)
    logits[:4] = [2.0, 2.0, -2.0, -2.0]
    state = init_penalty_state(SLOTS, V)
    # Row 1 of the prompt array is padding past its length 2: token 5 must not be marked.
    state = add_prompt_tokens(state, jnp.asarray([0]), jnp.asarray([[0, 2, 5]]), jnp.asarray([2]))
    assert np.asarray(state.prompt_mask[0]).nonzero()[0].tolist() == [0, 2]
    p = SamplingParams(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0, repetition_penalty=2.0)
    out = run(logits, [SamplingRow(p, seed=0, step=0, slot=0, mask_row=1)], state=state, table=mask_table(TWENTY))
    expected = logits.astype(np.float64)
    expected[0] /= 2.0
    expected[2] *= 2.0
    assert_logprobs_match(out, 0, masked_log_softmax(expected, TWENTY))


def test_slot_minus_one_reads_and_records_nothing():
    state = record_tokens(init_penalty_state(2, V), jnp.asarray([0, -1]), jnp.asarray([3, 4]))
    counts = np.asarray(state.output_counts)
    assert counts[0, 3] == 1 and counts.sum() == 1  # -1 must not wrap around to the last slot
    state = reset_slots(state, jnp.asarray([-1, 0]))
    assert np.asarray(state.output_counts).sum() == 0


def test_same_seed_and_step_give_the_same_token_whatever_the_batch():
    logits = fixed_logits(4)
    target = SamplingParams(temperature=1.0, top_p=0.95)
    other = [SamplingParams(temperature=0.0), SamplingParams(top_k=3), SamplingParams(min_p=0.2, temperature=2.0)]
    rng = np.random.default_rng(5)
    tokens = []
    for position in (0, 5, 11):
        rows = [SamplingRow(other[i % 3], seed=int(rng.integers(1 << 40)), step=i, slot=-1) for i in range(12)]
        rows[position] = SamplingRow(target, seed=1234, step=7, slot=-1)
        row_logits = np.stack([fixed_logits(100 + i) for i in range(12)])
        row_logits[position] = logits
        tokens.append(int(run(row_logits, rows).tokens[position]))
    alone = int(run(logits, [SamplingRow(target, seed=1234, step=7, slot=-1)]).tokens[0])
    assert tokens == [alone] * 3
    # The key of (seed, step) is fold_in(key(seed), step): a 32-bit seed matches jax.random.key.
    assert seed_key_data(1234) == tuple(int(w) for w in jax.random.key_data(jax.random.key(1234)))


def test_a_row_samples_the_same_in_every_row_bucket():
    # The runner pads to a few row buckets; a seeded row must not change when its bucket does. (Tokens
    # could differ only if a uniform fell within float rounding of a CDF boundary: ~1e-7 per draw.)
    rng = np.random.default_rng(11)
    mixes = [
        SamplingParams(temperature=0.9, top_p=0.8),
        SamplingParams(temperature=1.2, top_k=7, min_p=0.05),
        SamplingParams(temperature=0.0, presence_penalty=0.5),
        SamplingParams(temperature=1.0, top_p=0.97, top_k=40),
    ]
    rows = [SamplingRow(mixes[i % 4], seed=int(rng.integers(1 << 31)), step=i, slot=-1) for i in range(8)]
    logits = rng.standard_normal((8, V)).astype(np.float32) * 2
    big = run(logits, rows)
    small_batch = build_sampling_batch(rows, 8)
    small = sample(jnp.asarray(logits), small_batch, init_penalty_state(SLOTS, V), mask_table(), end_ids(*NO_END))
    np.testing.assert_array_equal(np.asarray(big.tokens[:8]), np.asarray(small.tokens))
    # XLA:CPU may order a row's reductions differently per batch shape: logprobs agree to float rounding.
    np.testing.assert_allclose(np.asarray(big.logprob[:8]), np.asarray(small.logprob), rtol=1e-6)


def test_different_seeds_and_steps_give_different_samples():
    logits = np.zeros(V, np.float32)  # uniform: any two draws collide with probability 1/64
    params = SamplingParams(temperature=1.0)
    by_seed = np.asarray(run(logits, rows_for(params, 256)).tokens[:256])
    by_step = np.asarray(run(logits, [SamplingRow(params, seed=9, step=s, slot=-1) for s in range(256)]).tokens[:256])
    for draws in (by_seed, by_step):
        assert len(np.unique(draws)) > 55  # 256 uniform draws over 64 tokens cover ~63 of them
    assert not np.array_equal(by_seed, by_step)


def test_grammar_mask_leaves_only_allowed_tokens():
    logits = fixed_logits(6)
    allowed = [3, 17, 40, 63]
    forced = [21]
    table = mask_table(allowed, forced)
    params = SamplingParams(temperature=1.0)
    rows = [SamplingRow(params, seed=i, step=0, slot=-1, mask_row=1 + (i % 3 == 0)) for i in range(600)]
    out = run(logits, rows, table=table)
    tokens = np.asarray(out.tokens[:600])
    is_forced = np.arange(600) % 3 == 0
    assert np.all(tokens[is_forced] == 21)
    assert set(tokens[~is_forced].tolist()) == set(allowed)  # all reachable, nothing else
    np.testing.assert_array_equal(np.asarray(out.num_allowed[:600]), np.where(is_forced, 1, 4))
    assert int(run(logits, rows[:1]).num_allowed[0]) == V


def test_suppressed_end_tokens_are_never_sampled():
    logits = np.zeros(V, np.float32)
    logits[[0, 1]] = 20.0  # end tokens dominate
    ends = (0, 1)
    sampled = SamplingParams(temperature=1.5)
    rows = [SamplingRow(sampled, seed=i, step=0, slot=-1, suppress_end=True) for i in range(500)]
    rows.append(SamplingRow(SamplingParams(temperature=0.0), seed=0, step=0, slot=-1, suppress_end=True))
    rows.append(SamplingRow(SamplingParams(temperature=0.0), seed=0, step=0, slot=-1, suppress_end=False))
    tokens = np.asarray(run(logits, rows, end=ends).tokens[: len(rows)])
    assert not np.isin(tokens[:-1], [0, 1]).any()
    assert tokens[-1] == 0
    # A grammar that only allows an end token wins over min_tokens: suppressing it would leave nothing.
    only_end = run(logits, [SamplingRow(sampled, seed=1, step=0, slot=-1, mask_row=1, suppress_end=True)],
                   table=mask_table([1]), end=ends)
    assert int(only_end.tokens[0]) == 1


def test_one_compilation_serves_every_parameter_mix():
    logits = jnp.asarray(np.random.default_rng(9).standard_normal((ROWS, V)).astype(np.float32))
    state = init_penalty_state(SLOTS, V)
    table = mask_table([1, 2, 3])
    ends = end_ids(0, 1)
    mixes = [
        [SamplingParams(temperature=0.0)] * 8,
        [SamplingParams(temperature=1.0)] * 8,
        [SamplingParams(top_k=3), SamplingParams(top_p=0.5)] * 4,
        [SamplingParams(min_p=0.3, presence_penalty=1.0, logit_bias=((1, 5.0),) * 300)] * 8,
        [SamplingParams(top_k=50, top_p=0.99, repetition_penalty=1.5)] * 8,
    ]
    batches = [
        build_sampling_batch(
            [SamplingRow(p, seed=i, step=j, slot=i, mask_row=i % 2, suppress_end=bool(i % 3)) for i, p in enumerate(mix)],
            ROWS,
        )
        for j, mix in enumerate(mixes)
    ]
    sample(logits, batches[0], state, table, ends).tokens.block_until_ready()  # warm-up: at most one compile
    compiles: list[str] = []

    def listener(event: str, *args, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for batch in batches:
            state = sample(logits, batch, state, table, ends).penalty
        state.output_counts.block_until_ready()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    assert int(np.asarray(state.output_counts).sum()) == 8 * len(batches)


def test_build_sampling_batch_pads_and_rejects_bad_rows():
    params = SamplingParams(temperature=0.5, logit_bias=((3, 1.0),))
    batch = build_sampling_batch([SamplingRow(params, seed=(1 << 40) + 7, step=2, slot=1, mask_row=4)], 4)
    assert batch.bias_ids.shape == (4, MAX_LOGIT_BIAS)
    assert batch.bias_ids[0, 0] == 3 and batch.bias_ids[0, 1] == -1 and batch.bias_vals[0, 0] == 1.0
    assert batch.seed[0].tolist() == [256, 7]
    assert batch.slot.tolist() == [1, -1, -1, -1] and batch.temperature.tolist() == [0.5, 0, 0, 0]
    with pytest.raises(ValueError, match="do not fit"):
        build_sampling_batch([SamplingRow(params, seed=0, step=0, slot=0)] * 3, 2)
    with pytest.raises(ValueError, match="step"):
        build_sampling_batch([SamplingRow(params, seed=0, step=-1, slot=0)], 2)
    with pytest.raises(ValueError, match="either a mask_row or a grammar state"):
        build_sampling_batch([SamplingRow(params, seed=0, step=0, slot=0, mask_row=1, grammar_row=16)], 2)
    with pytest.raises(ValueError, match="slot"):
        build_sampling_batch([SamplingRow(params, seed=0, step=0, slot=-1, grammar_from_device=True)], 2)


def two_state_grammar():
    """State 0: token 5 -> 1, token 6 -> 0. State 1 (accepting): token 7 -> 0, end token 1."""
    bits = np.zeros((2, V), bool)
    bits[0, [5, 6]] = True
    bits[1, [7, 1]] = True
    table = TokenTable(
        key=("two",), vocab_width=V, start_state=0, mask=np.packbits(bits, axis=1, bitorder="little").view(np.uint32),
        indptr=np.array([0, 2, 3]), next_tokens=np.array([5, 6, 7], np.int32), next_states=np.array([1, 0, 0], np.int32),
        transitions=np.full((2, 256), -1, np.int32), token_bytes=(), accepting=np.array([False, True]),
        finished=np.zeros(2, bool), forced_token=np.full(2, -1, np.int32), eos_token_ids=(1,),
    )
    return make_grammar(table)


def test_sample_with_grammar_reads_picks_and_stores_states_on_the_device():
    pool = GrammarPool(capacity_rows=64, vocab_width=V, vocab_size=V, class_map_slots=2, next_capacity=1024)
    grammar = two_state_grammar()
    off = pool.add(grammar).offset
    logits = np.zeros((8, V), np.float32)
    logits[:, 7], logits[:, 6], logits[:, 5] = 3.0, 2.0, 1.0
    logits[4, 1] = 9.0
    greedy = SamplingParams(temperature=0.0)
    rows = [
        SamplingRow(greedy, seed=0, step=0, slot=0, grammar_row=off, tokens_left=10),  # host state 0: 6 wins
        SamplingRow(greedy, seed=0, step=0, slot=1, grammar_row=off, grammar_from_device=True, tokens_left=10),
        SamplingRow(greedy, seed=0, step=0, slot=2),  # unconstrained: 7 wins, state stays 0
        SamplingRow(greedy, seed=0, step=0, slot=3, grammar_row=off, tokens_left=2),  # closing: only 5 gets closer
        SamplingRow(greedy, seed=0, step=0, slot=4, grammar_row=off + 1, tokens_left=10),  # end token: state kept
        SamplingRow(greedy, seed=0, step=0, slot=-1, grammar_row=off + 1, tokens_left=10),  # stores nothing
    ]
    stored = jnp.asarray([0, off + 1, 0, 0, 0, 0, 77, 0], jnp.int32)  # slot 1: state 1 from an earlier step
    out, state = sample_with_grammar(jnp.asarray(logits), build_sampling_batch(rows, 8), init_penalty_state(8, V),
                                     pool.tables, jnp.asarray([1], jnp.int32), stored)
    assert np.asarray(out.tokens[:6]).tolist() == [6, 7, 7, 5, 1, 7]
    assert np.asarray(out.num_allowed[:6]).tolist() == [2, 2, V, 1, 2, 2]
    assert np.asarray(state).tolist() == [off, off, 0, off + 1, off + 1, 0, 77, 0]
