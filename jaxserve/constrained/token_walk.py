"""Byte DFA x vocabulary -> TokenTable, walking every token through every state at once.

The walk goes depth by depth down the vocabulary trie carrying the live (origin state, trie node, current
state) triples as flat arrays: a prefix shared by many tokens is stepped once, and a triple dies as soon as
its current state is dead. Most states send most bytes to one successor (a JSON string's inside loops on
itself; a length-counted string steps to the next count): when every byte below a trie node follows that
chain of successors, the node's whole subtree is emitted as one range of tokens without walking it (the
end state follows from each token's length), so the cost is close to the size of the output.
"""
from __future__ import annotations

import numpy as np

from jaxserve.constrained.budget import BudgetMeter, CompileBudget
from jaxserve.constrained.regex_dfa import DEAD, ByteDfa
from jaxserve.constrained.token_table import TokenTable
from jaxserve.constrained.vocab import VocabInfo

_MASK_CHUNK_CELLS = 1 << 25  # bound the bool scratch used for bit packing (states x vocab_width)


def _expand(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner, item) for item in range(starts[i], starts[i] + counts[i]) for every i, vectorized."""
    total = int(counts.sum())
    owner = np.repeat(np.arange(counts.size), counts)
    offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    return owner, starts[owner] + offsets


def _successor_chains(trans: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """For each state q its main successor succ(q) (the live target of the most bytes) and
    chain[q, k] = succ^k(q) (DEAD absorbs), plus follow[q, k]: 256-bit set (uint64 x 4) of the bytes b with
    trans[p, b] == succ(p) for every p among succ^0(q) .. succ^(k-1)(q) (all bytes for k = 0)."""
    n = trans.shape[0]
    ext = np.concatenate([trans, np.full((1, 256), DEAD, dtype=trans.dtype)])  # row n: DEAD
    ext = np.where(ext == DEAD, n, ext)
    # Row mode without a dense count matrix: sort each row, measure runs, keep the longest live run.
    srt = np.sort(ext, axis=1).ravel()
    is_start = np.ones(srt.size, dtype=bool)
    is_start[1:] = srt[1:] != srt[:-1]
    is_start[::256] = True
    run_pos = np.flatnonzero(is_start)
    run_len = np.diff(np.append(run_pos, srt.size))
    run_row, run_val = run_pos // 256, srt[run_pos]
    run_len[run_val == n] = 0
    order = np.lexsort((run_len, run_row))
    last = np.flatnonzero(np.append(run_row[order][1:] != run_row[order][:-1], True))
    best = order[last]
    succ = np.where(run_len[best] > 0, run_val[best], n)
    succ[n] = n
    follows = np.packbits(ext == succ[:, None], axis=1, bitorder="little").view(np.uint64).copy()
    follows[n] = 0
    follows[succ == n] = 0
    chain = np.empty((n + 1, max_len + 1), dtype=np.int64)
    follow = np.empty((n + 1, max_len + 1, 4), dtype=np.uint64)
    chain[:, 0] = np.arange(n + 1)
    follow[:, 0] = np.uint64(0xFFFFFFFFFFFFFFFF)
    for k in range(1, max_len + 1):
        follow[:, k] = follow[:, k - 1] & follows[chain[:, k - 1]]
        chain[:, k] = succ[chain[:, k - 1]]
    chain[chain == n] = DEAD
    return chain[:n], follow[:n]


DEFAULT_MAX_PAIRS = CompileBudget.max_table_pairs  # allowed (state, token) pairs: bounds time and memory


def _meter(meter: BudgetMeter | None, max_pairs: int) -> BudgetMeter:
    return BudgetMeter(CompileBudget(max_table_pairs=max_pairs)) if meter is None else meter


def walk_vocabulary(dfa: ByteDfa, vocab: VocabInfo, max_pairs: int = DEFAULT_MAX_PAIRS,
                    meter: BudgetMeter | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (state, token, next_state) with the token's bytes leading from state to a live state.

    Raises ConstraintTooComplex as soon as the walk's frontier or the pairs found exceed the meter's budget
    (without a meter: the default budget with `max_pairs` pairs)."""
    meter = _meter(meter, max_pairs)
    trie = vocab.trie
    trans = dfa.transitions
    num_states = dfa.num_states
    token_ptr = trie.string_token_ptr
    max_len = len(trie.levels)
    meter.check_time("token walk")
    # chain int64 + follow 4 x uint64 per (state, length): bounded like the other table arrays.
    meter.require("max_table_bytes", (num_states + 1) * (max_len + 1) * 40)
    chain, follow = _successor_chains(trans, max_len)
    trie_states = np.arange(num_states, dtype=np.int32)
    # Emitted ranges: strings [lo, hi) from origin; a string of length L ends at chain[cur, L - depth].
    out_origin, out_lo, out_hi, out_cur, out_depth = [], [], [], [], []
    pairs = 0
    if trie.levels:
        first = trie.levels[0]
        meter.require("max_walk_items", num_states * first.byte.size)  # before allocating the first frontier
        cur = trans[trie_states][:, first.byte.astype(np.int64)].ravel()  # state-major
        origin = np.repeat(trie_states, first.byte.size)
        node = np.tile(np.arange(first.byte.size, dtype=np.int64), trie_states.size)
        keep = cur != DEAD
        origin, node, cur = origin[keep], node[keep], cur[keep].astype(np.int64)
        for depth, level in enumerate(trie.levels, start=1):
            meter.check_time("token walk")
            below = level.below_bytes[node]
            allowed = follow[cur, level.below_depth[node]]
            bulk = ((below & ~allowed) == 0).all(axis=1)
            out_origin.append(origin[bulk])
            out_lo.append(level.subtree_lo[node[bulk]])
            out_hi.append(level.subtree_hi[node[bulk]])
            out_cur.append(cur[bulk])
            out_depth.append(np.full(int(bulk.sum()), depth))
            # Pairs found so far, counted as they are found (the expansion below is what costs memory).
            pairs += int((out_hi[-1] - out_lo[-1]).sum())
            meter.require("max_table_pairs", pairs)
            origin, node, cur = origin[~bulk], node[~bulk], cur[~bulk]
            end = level.end_string[node]
            is_end = end >= 0
            out_origin.append(origin[is_end])
            out_lo.append(end[is_end])
            out_hi.append(end[is_end] + 1)
            out_cur.append(cur[is_end])
            out_depth.append(np.full(int(is_end.sum()), depth))
            pairs += int(is_end.sum())
            meter.require("max_table_pairs", pairs)
            if depth == max_len or origin.size == 0:
                break
            meter.require("max_walk_items", int(level.child_count[node].sum()))
            owner, child = _expand(level.child_start[node], level.child_count[node])
            nxt = trans[cur[owner], trie.levels[depth].byte[child]]
            keep = nxt != DEAD
            origin, node, cur = origin[owner[keep]], child[keep], nxt[keep].astype(np.int64)
    if out_origin:
        lo, hi = np.concatenate(out_lo), np.concatenate(out_hi)
        meter.require("max_table_pairs", int((hi - lo).sum()))
        meter.check_time("token walk")
        owner, string = _expand(lo, hi - lo)
        cur = np.concatenate(out_cur)[owner]
        state = chain[cur, trie.string_lengths[string] - np.concatenate(out_depth)[owner]]
        origin = np.concatenate(out_origin).astype(np.int32)[owner]
    else:
        origin, string, state = (np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64))
    # Strings -> token ids (several ids can share bytes).
    meter.require("max_table_pairs", int((token_ptr[string + 1] - token_ptr[string]).sum()))
    owner, index = _expand(token_ptr[string], token_ptr[string + 1] - token_ptr[string])
    return origin[owner], trie.string_token_ids[index], state[owner].astype(np.int32)


def _drop_dead_ends(origin, token, nxt, accepting, num_states, meter: BudgetMeter):
    """Remove tokens into states where generation could neither stop nor continue (a vocabulary without
    some byte sequence the DFA needs), until none are left."""
    while True:
        meter.check_time("token table")  # one round per state of a stuck chain
        has_token = np.bincount(origin, minlength=num_states) > 0
        stuck = ~accepting & ~has_token
        bad = stuck[nxt]
        if not bad.any():
            return origin, token, nxt
        origin, token, nxt = origin[~bad], token[~bad], nxt[~bad]


def table_nbytes_estimate(num_states: int, vocab_width: int, num_pairs: int) -> int:
    """Bytes of a TokenTable and the Grammar made from it, before any is allocated: the mask three times
    (table, closing rows, the pool's concatenation), the CSR, and the per-state arrays."""
    mask = num_states * -(-vocab_width // 32) * 4
    return 3 * mask + num_pairs * 8 + num_states * (256 * 4 + 40)


def build_token_table(dfa: ByteDfa, vocab: VocabInfo, key: tuple,
                      max_pairs: int = DEFAULT_MAX_PAIRS, meter: BudgetMeter | None = None) -> TokenTable:
    meter = _meter(meter, max_pairs)
    origin, token, nxt = walk_vocabulary(dfa, vocab, max_pairs, meter)
    num_states = dfa.num_states
    meter.require("max_table_bytes", table_nbytes_estimate(num_states, vocab.vocab_width, origin.size))
    origin, token, nxt = _drop_dead_ends(origin, token, nxt, dfa.accepting, num_states, meter)
    if not dfa.accepting[dfa.start] and not np.any(origin == dfa.start):
        raise ValueError("no sequence of this vocabulary's tokens matches the constraint")
    # Group by state (CSR); a stable sort on small integers is a radix sort.
    order = np.argsort(origin.astype(np.int16) if num_states < 2**15 else origin, kind="stable")
    origin, token, nxt = origin[order], token[order].astype(np.int32), nxt[order].astype(np.int32)
    counts = np.bincount(origin, minlength=num_states)
    indptr = np.zeros(num_states + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    eos = np.asarray(vocab.eos_token_ids, dtype=np.int64)
    accepting = dfa.accepting.copy()
    words = -(-vocab.vocab_width // 32)
    mask = np.zeros((num_states, words), dtype=np.uint32)
    chunk = max(1, _MASK_CHUNK_CELLS // (words * 32))
    for lo in range(0, num_states, chunk):
        meter.check_time("token table")
        hi = min(lo + chunk, num_states)
        bits = np.zeros((hi - lo, words * 32), dtype=bool)
        a, b = indptr[lo], indptr[hi]
        bits[origin[a:b] - lo, token[a:b]] = True
        bits[np.ix_(np.flatnonzero(accepting[lo:hi]), eos)] = True
        mask[lo:hi] = np.packbits(bits, axis=1, bitorder="little").view(np.uint32)
    total_allowed = counts + accepting * eos.size
    forced = np.full(num_states, -1, dtype=np.int32)
    single_token = (total_allowed == 1) & (counts == 1)
    forced[single_token] = token[indptr[:-1][single_token]]
    forced[(total_allowed == 1) & (counts == 0)] = int(eos[0])
    return TokenTable(
        key=key,
        vocab_width=vocab.vocab_width,
        start_state=dfa.start,
        mask=mask,
        indptr=indptr,
        next_tokens=token,
        next_states=nxt,
        transitions=dfa.transitions,
        token_bytes=vocab.tokens,
        accepting=accepting,
        finished=accepting & (counts == 0),
        forced_token=forced,
        eos_token_ids=tuple(int(e) for e in eos),
    )
