"""A compiled constraint as the engine uses it: the token table plus "closing" rows that finish in budget.

A constrained request must end with text that matches, also when max_tokens (or the context) runs out.
Each state therefore has a second mask row that allows only tokens moving strictly closer to an accepting
state (fewest tokens to accept, `distance_to_accept`), and only the end tokens in accepting states. The
engine switches a row to its closing mask once the tokens left are no more than the distance plus the
end token would no longer fit after some allowed token, so the output always completes within max_tokens.
Both row sets live in the device pool as one block: rows [0, S) normal, rows [S, 2S) closing.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from jaxserve.constrained.token_table import TokenTable


@dataclass(frozen=True, eq=False)
class Grammar:
    table: TokenTable  # the compiled constraint (host-side next-state lookups)
    pool_table: TokenTable  # same key, mask = [normal rows; closing rows], what the device pool holds
    distance: np.ndarray  # int64 [S] fewest tokens to an accepting state (huge where none is reachable)
    worst_next: np.ndarray  # int64 [S] largest distance after one allowed non-end token (-1: none)

    @property
    def start_state(self) -> int:
        return self.table.start_state

    @property
    def num_states(self) -> int:
        return self.table.num_states

    def next_state(self, state: int, token_id: int) -> int:
        return self.table.next_state(state, token_id)

    def min_tokens_needed(self) -> int:
        """Fewest tokens of any complete output, the end token included."""
        return int(self.distance[self.start_state]) + 1

    def mask_row(self, state: int, tokens_left: int) -> int:
        """Row of `state` relative to the grammar's pool offset. The normal row is safe while any allowed
        token still leaves room to reach acceptance and end (worst_next + 1 more tokens); after that the
        closing row, whose tokens all get strictly closer, finishes in at most distance + 1 tokens."""
        closing = tokens_left < int(self.worst_next[state]) + 2
        return state + (self.num_states if closing else 0)


def closing_mask(table: TokenTable, distance: np.ndarray) -> np.ndarray:
    """uint32 [S, W]: per state, the allowed tokens that strictly reduce the distance to acceptance; in
    accepting states only the end tokens."""
    num_states, width = table.mask.shape
    out = np.zeros((num_states, width), np.uint32)
    src = np.repeat(np.arange(num_states), np.diff(table.indptr))
    keep = distance[table.next_states] < distance[src]
    toks = table.next_tokens[keep].astype(np.int64)
    rows = src[keep]
    np.bitwise_or.at(out, (rows, toks >> 5), (np.uint32(1) << (toks & 31).astype(np.uint32)))
    eos_bits = np.zeros(width, np.uint32)
    for e in table.eos_token_ids:
        if 0 <= e < table.vocab_width:
            eos_bits[e >> 5] |= np.uint32(1) << np.uint32(e & 31)
    out[table.accepting] = table.mask[table.accepting] & eos_bits
    return out


def token_distance(table: TokenTable) -> np.ndarray:
    """int64 [S]: fewest tokens from each state to an accepting state (breadth-first search backwards over
    the distinct state -> state edges of the token table)."""
    num_states = table.num_states
    src = np.repeat(np.arange(num_states, dtype=np.int64), np.diff(table.indptr))
    pairs = np.unique(src * num_states + table.next_states.astype(np.int64))
    pair_src, pair_dst = np.divmod(pairs, num_states)
    order = np.argsort(pair_dst, kind="stable")
    preds = pair_src[order]
    starts = np.searchsorted(pair_dst[order], np.arange(num_states + 1))
    big = np.iinfo(np.int64).max // 4
    dist = np.full(num_states, big, np.int64)
    frontier = np.flatnonzero(table.accepting)
    dist[frontier] = 0
    level = 0
    while frontier.size:
        level += 1
        cand = np.concatenate([preds[starts[s]:starts[s + 1]] for s in frontier]) if frontier.size else frontier
        cand = np.unique(cand)
        frontier = cand[dist[cand] == big]
        dist[frontier] = level
    return dist


def make_grammar(table: TokenTable) -> Grammar:
    distance = token_distance(table)
    both = np.concatenate([table.mask, closing_mask(table, distance)])
    pool_table = dataclasses.replace(table, mask=both)
    src = np.repeat(np.arange(table.num_states), np.diff(table.indptr))
    worst_next = np.full(table.num_states, -1, np.int64)
    np.maximum.at(worst_next, src, distance[table.next_states])
    return Grammar(table=table, pool_table=pool_table, distance=distance, worst_next=worst_next)
