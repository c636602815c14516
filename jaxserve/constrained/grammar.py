"""A compiled constraint as the engine uses it: the token table plus "closing" rows that finish in budget.

A constrained request must end with text that matches, also when max_tokens (or the context) runs out.
Each state therefore has a second mask row that allows only tokens moving strictly closer to an accepting
state (fewest tokens to accept, `distance_to_accept`), and only the end tokens in accepting states. The
engine switches a row to its closing mask once the tokens left are no more than the distance plus the
end token would no longer fit after some allowed token, so the output always completes within max_tokens.
Both row sets live in the device pool as one block: rows [0, S) normal, rows [S, 2S) closing.

Token classes let the device advance a state without the host: tokens with the same (allowed?, next state)
in every state form one class, so the whole transition function is `next_by_class[state, token_class[token]]`.
The CSR of a JSON schema over a 49k vocabulary has p50 107k / max 1.56M edges but only p50 142 / max 648
classes (93 JSONSchemaBench schemas, SmolLM2), so the dense [S, C] table is small enough to live on the device.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from jaxserve.constrained.budget import BudgetMeter, CompileBudget
from jaxserve.constrained.token_table import TokenTable


@dataclass(frozen=True, eq=False)
class Grammar:
    table: TokenTable  # the compiled constraint (host-side next-state lookups)
    pool_table: TokenTable  # same key, mask = [normal rows; closing rows], what the device pool holds
    distance: np.ndarray  # int64 [S] fewest tokens to an accepting state (huge where none is reachable)
    worst_next: np.ndarray  # int64 [S] largest distance after one allowed non-end token (-1: none)
    token_class: np.ndarray  # int32 [vocab_width] class of every token id (see `token_classes`)
    next_by_class: np.ndarray  # int32 [S, C] relative next state of each class, -1 = not allowed (or end token)

    @property
    def start_state(self) -> int:
        return self.table.start_state

    @property
    def nbytes(self) -> int:
        """Host bytes this grammar holds (the table, the pool's doubled mask and the per-state arrays);
        `pool_table` shares every array of `table` but its mask."""
        return (self.table.nbytes + int(self.pool_table.mask.nbytes) + int(self.distance.nbytes)
                + int(self.worst_next.nbytes) + int(self.token_class.nbytes) + int(self.next_by_class.nbytes))

    @property
    def num_states(self) -> int:
        return self.table.num_states

    def next_state(self, state: int, token_id: int) -> int:
        return self.table.next_state(state, token_id)

    def min_tokens_needed(self) -> int:
        """Fewest tokens of any complete output, the end token included."""
        return int(self.distance[self.start_state]) + 1

    @property
    def num_classes(self) -> int:
        return int(self.next_by_class.shape[1])

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


def token_distance(table: TokenTable, meter: BudgetMeter | None = None) -> np.ndarray:
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
        if meter is not None:
            meter.check_time("grammar preparation")  # one round per level: as many as states in a chain
        level += 1
        cand = np.concatenate([preds[starts[s]:starts[s + 1]] for s in frontier]) if frontier.size else frontier
        cand = np.unique(cand)
        frontier = cand[dist[cand] == big]
        dist[frontier] = level
    return dist


_HASH_MULT = np.uint64(0x9E3779B97F4A7C15)


def _edge_hash(states: np.ndarray, targets: np.ndarray, salt: int) -> np.ndarray:
    """uint64 hash of each (state, next_state) pair (splitmix64 finaliser: every input bit moves every
    output bit, so sums of different edge sets collide only by chance, ~2^-64 per pair of tokens)."""
    with np.errstate(over="ignore"):
        x = (states.astype(np.uint64) << np.uint64(32)) ^ targets.astype(np.uint64) ^ np.uint64(salt)
        x = (x + _HASH_MULT) & np.uint64(0xFFFFFFFFFFFFFFFF)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _classes_from_signature(table: TokenTable, signature: np.ndarray,
                            meter: BudgetMeter | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Tokens with equal signatures as classes, with their [S, C] next-state table; None unless every member
    of every class has exactly the transitions of the table (a hash collision would make it fail)."""
    _, token_class = np.unique(signature, return_inverse=True)
    token_class = token_class.astype(np.int32)
    num_classes = int(token_class.max()) + 1 if token_class.size else 0
    if meter is not None:  # the dense [S, C] table can reach states x vocabulary: check before allocating
        meter.require("max_table_bytes", table.nbytes + 2 * int(table.mask.nbytes)
                      + table.num_states * num_classes * 4)
    src = np.repeat(np.arange(table.num_states, dtype=np.int64), np.diff(table.indptr))
    cls = token_class[table.next_tokens]
    next_by_class = np.full((table.num_states, num_classes), -1, np.int32)
    next_by_class[src, cls] = table.next_states
    # Every edge must agree with its class row (members sharing a state agree on the target) and every
    # member must have as many edges as its class row has entries (no member lacks one): then each member's
    # row equals the class row exactly, since a token has at most one edge per state.
    if not np.array_equal(next_by_class[src, cls], table.next_states):
        return None
    edges_per_token = np.bincount(table.next_tokens, minlength=table.vocab_width)[: table.vocab_width]
    entries_per_class = np.count_nonzero(next_by_class >= 0, axis=0)
    if not np.array_equal(edges_per_token, entries_per_class[token_class]):
        return None
    return token_class, next_by_class


def token_classes_exact(table: TokenTable, meter: BudgetMeter | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact partition by refinement, one state at a time: O(S * vocab). The fallback of `token_classes`."""
    width = table.vocab_width
    token_class = np.zeros(width, np.int64)
    for s in range(table.num_states):
        if meter is not None and (s & 63) == 0:
            meter.check_time("grammar preparation")
        lo, hi = int(table.indptr[s]), int(table.indptr[s + 1])
        target = np.full(width, -1, np.int64)
        target[table.next_tokens[lo:hi]] = table.next_states[lo:hi]
        _, token_class = np.unique(token_class * (table.num_states + 1) + target + 1, return_inverse=True)
    result = _classes_from_signature(table, token_class, meter)
    assert result is not None  # an exact partition always verifies
    return result


def token_classes(table: TokenTable, meter: BudgetMeter | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(token_class int32 [vocab_width], next_by_class int32 [S, C]): tokens with identical transitions in
    every state share a class; next_by_class[s, c] is the relative next state, -1 where the class is not
    allowed. Tokens allowed in no state (special, padding, and the end tokens, which never advance) get a class
    whose column is all -1. Vectorised: a token's signature is the sum of hashes of its (state, next state)
    edges; the result is verified against the CSR and recomputed exactly on the (astronomically rare)
    collision."""
    src = np.repeat(np.arange(table.num_states, dtype=np.int64), np.diff(table.indptr))
    for salt in (0, 0x5DEECE66D):
        signature = np.zeros(table.vocab_width, np.uint64)
        np.add.at(signature, table.next_tokens, _edge_hash(src, table.next_states, salt))
        result = _classes_from_signature(table, signature, meter)
        if result is not None:
            return result
    return token_classes_exact(table, meter)


def make_grammar(table: TokenTable, meter: BudgetMeter | None = None) -> Grammar:
    """The grammar of a compiled table. `meter`: the compile's budget (deadline and table bytes); without one
    a fresh default budget applies."""
    meter = BudgetMeter(CompileBudget()) if meter is None else meter
    meter.require("max_table_bytes", table.nbytes + 2 * int(table.mask.nbytes))
    meter.check_time("grammar preparation")
    distance = token_distance(table, meter)
    meter.check_time("grammar preparation")
    both = np.concatenate([table.mask, closing_mask(table, distance)])
    meter.check_time("grammar preparation")
    pool_table = dataclasses.replace(table, mask=both)
    src = np.repeat(np.arange(table.num_states), np.diff(table.indptr))
    worst_next = np.full(table.num_states, -1, np.int64)
    np.maximum.at(worst_next, src, distance[table.next_states])
    token_class, next_by_class = token_classes(table, meter)
    return Grammar(table=table, pool_table=pool_table, distance=distance, worst_next=worst_next,
                   token_class=token_class, next_by_class=next_by_class)
