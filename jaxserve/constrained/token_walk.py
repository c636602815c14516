"""Byte DFA x vocabulary -> TokenTable, walking every token through every state at once.

The walk goes depth by depth down the vocabulary trie carrying the live (origin state, trie node, current
state) triples as flat arrays: a prefix shared by many tokens is stepped once, and a triple dies as soon as
its current state is dead. When every byte below a trie node loops on the current state (the inside of a
JSON string, digits of a number), the node's whole subtree is emitted as one range of tokens without
walking it, so the cost is close to the size of the output.
"""
from __future__ import annotations

import numpy as np

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


def _self_loop_bytes(trans: np.ndarray) -> np.ndarray:
    """uint64 [S, 4]: 256-bit set of the bytes on which each state stays where it is."""
    loops = trans == np.arange(trans.shape[0])[:, None]
    return np.packbits(loops, axis=1, bitorder="little").view(np.uint64)


def walk_vocabulary(dfa: ByteDfa, vocab: VocabInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (state, token, next_state) with the token's bytes leading from state to a live state."""
    trie = vocab.trie
    trans = dfa.transitions
    num_states = dfa.num_states
    token_ptr = trie.string_token_ptr
    loop_bits = _self_loop_bytes(trans)
    has_loop = loop_bits.any(axis=1)
    # Emitted token ranges: tokens string_token_ids[lo:hi] go from origin to state.
    out_origin, out_lo, out_hi, out_state = [], [], [], []
    if trie.levels:
        first = trie.levels[0]
        cur = trans[:, first.byte.astype(np.int64)].ravel()  # [S * n1], state-major
        origin = np.repeat(np.arange(num_states, dtype=np.int32), first.byte.size)
        node = np.tile(np.arange(first.byte.size, dtype=np.int64), num_states)
        keep = cur != DEAD
        origin, node, cur = origin[keep], node[keep], cur[keep]
        for depth, level in enumerate(trie.levels):
            stays = has_loop[cur]
            idx = np.flatnonzero(stays)
            below, loops = level.below_bytes[node[idx]], loop_bits[cur[idx]]
            stays[idx] = ((below[:, 0] & ~loops[:, 0]) | (below[:, 1] & ~loops[:, 1])
                          | (below[:, 2] & ~loops[:, 2]) | (below[:, 3] & ~loops[:, 3])) == 0
            out_origin.append(origin[stays])
            out_lo.append(token_ptr[level.subtree_lo[node[stays]]])
            out_hi.append(token_ptr[level.subtree_hi[node[stays]]])
            out_state.append(cur[stays])
            origin, node, cur = origin[~stays], node[~stays], cur[~stays]
            end = level.end_string[node]
            is_end = end >= 0
            out_origin.append(origin[is_end])
            out_lo.append(token_ptr[end[is_end]])
            out_hi.append(token_ptr[end[is_end] + 1])
            out_state.append(cur[is_end])
            if depth + 1 == len(trie.levels) or origin.size == 0:
                break
            owner, child = _expand(level.child_start[node], level.child_count[node])
            nxt = trans[cur[owner], trie.levels[depth + 1].byte[child]]
            keep = nxt != DEAD
            origin, node, cur = origin[owner[keep]], child[keep], nxt[keep]
    if not out_origin:
        return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32)
    lo, hi = np.concatenate(out_lo), np.concatenate(out_hi)
    owner, index = _expand(lo, hi - lo)
    origin = np.concatenate(out_origin).astype(np.int32)[owner]
    state = np.concatenate(out_state).astype(np.int32)[owner]
    return origin, trie.string_token_ids[index], state


def _drop_dead_ends(origin, token, nxt, accepting, num_states):
    """Remove tokens into states where generation could neither stop nor continue (a vocabulary without
    some byte sequence the DFA needs), until none are left."""
    while True:
        has_token = np.bincount(origin, minlength=num_states) > 0
        stuck = ~accepting & ~has_token
        bad = stuck[nxt]
        if not bad.any():
            return origin, token, nxt
        origin, token, nxt = origin[~bad], token[~bad], nxt[~bad]


def build_token_table(dfa: ByteDfa, vocab: VocabInfo, key: tuple) -> TokenTable:
    origin, token, nxt = walk_vocabulary(dfa, vocab)
    num_states = dfa.num_states
    origin, token, nxt = _drop_dead_ends(origin, token, nxt, dfa.accepting, num_states)
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
