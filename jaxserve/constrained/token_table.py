"""TokenTable: a compiled constraint as host arrays (DFA states x vocabulary).

Produced by `jaxserve.constrained.compiler.compile_constraint`; the mask rows go to the device through
`jaxserve.constrained.tables.GrammarPool`, the next-state lookup stays on the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class TokenTable:
    """Token-level automaton of one constraint.

    States are 0..num_states-1; `start_state` is where generation begins. For state s:
      - `mask[s]`: bit-packed allowed tokens, uint32 [num_states, ceil(vocab_width / 32)], bit t % 32 of word
        t // 32 (little-endian bit order). EOS ids are allowed exactly in accepting states; ids at or beyond
        the tokenizer size (logit padding) and special tokens are never allowed.
      - next state of every allowed non-EOS token: `next_tokens[indptr[s]:indptr[s+1]]` are the tokens
        (grouped by state, in no particular order inside a state) and `next_states` the targets (CSR).
        `next_state(s, t)` answers one lookup by stepping the token's bytes through `transitions`.
      - `forced_token[s]`: the only allowed token id, or -1 when zero or several tokens are allowed.
      - `accepting[s]`: the text so far matches; `finished[s]`: accepting and nothing but EOS can follow.
    `key` identifies the table (kind, spec, vocabulary fingerprint) for caches and the device pool.
    """

    key: tuple
    vocab_width: int
    start_state: int
    mask: np.ndarray  # uint32 [S, W]
    indptr: np.ndarray  # int64 [S + 1]
    next_tokens: np.ndarray  # int32 [nnz]
    next_states: np.ndarray  # int32 [nnz]
    transitions: np.ndarray  # int32 [S, 256] byte-level DFA, -1 = dead
    token_bytes: tuple  # the vocabulary's bytes per token id (shared, not copied)
    accepting: np.ndarray  # bool [S]
    finished: np.ndarray  # bool [S]
    forced_token: np.ndarray  # int32 [S]
    eos_token_ids: tuple[int, ...]

    @property
    def num_states(self) -> int:
        return int(self.mask.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of this table's own arrays (token_bytes is the shared vocabulary, not counted)."""
        return sum(int(a.nbytes) for a in (self.mask, self.indptr, self.next_tokens, self.next_states,
                                           self.transitions, self.accepting, self.finished, self.forced_token))

    @property
    def words_per_row(self) -> int:
        return int(self.mask.shape[1])

    def is_allowed(self, state: int, token_id: int) -> bool:
        if not 0 <= token_id < self.vocab_width:
            return False
        return bool((self.mask[state, token_id >> 5] >> np.uint32(token_id & 31)) & np.uint32(1))

    def allowed_tokens(self, state: int) -> np.ndarray:
        """Sorted int64 ids of every allowed token in `state` (EOS included where accepting)."""
        bits = np.unpackbits(self.mask[state].view(np.uint8), bitorder="little")[: self.vocab_width]
        return np.flatnonzero(bits)

    def next_state(self, state: int, token_id: int) -> int:
        """State after emitting `token_id` in `state`. EOS in an accepting state keeps the state.

        Raises ValueError when the token is not allowed (the sampler's mask should make that impossible)."""
        if token_id in self.eos_token_ids and self.accepting[state]:
            return state
        data = self.token_bytes[token_id] if 0 <= token_id < len(self.token_bytes) else None
        if data and self.is_allowed(state, token_id):
            s = state
            for b in data:
                s = int(self.transitions[s, b])
            return s
        raise ValueError(f"token {token_id} is not allowed in state {state} of this constraint")


def distance_to_accept(table: TokenTable) -> np.ndarray:
    """int64 [S]: fewest bytes from each state to an accepting state (over the byte-level DFA, which is small;
    any token that lowers it moves toward the end)."""
    src, byte = np.nonzero(table.transitions >= 0)
    edges = np.unique(np.stack([src, table.transitions[src, byte]], axis=1), axis=0)
    big = np.iinfo(np.int64).max // 4
    dist = np.where(table.accepting, 0, big).astype(np.int64)
    while True:
        new = dist.copy()
        np.minimum.at(new, edges[:, 0], dist[edges[:, 1]] + 1)
        if (new == dist).all():
            return dist
        dist = new


def sample_walk(table: TokenTable, rng: np.random.Generator, *, max_tokens: int = 400,
                finish_after: int = 100, distances: np.ndarray | None = None) -> tuple[list[int], bool]:
    """A stand-in for a random model: uniform over the allowed tokens for `finish_after` tokens, then only
    tokens that get closer to acceptance. Returns (token ids without the EOS, ended with EOS)."""
    dist = distance_to_accept(table) if distances is None else distances
    eos = set(table.eos_token_ids)
    state, out = table.start_state, []
    for step in range(max_tokens):
        allowed = table.allowed_tokens(state)
        if step >= finish_after:
            if table.accepting[state]:
                return out, True
            lo, hi = int(table.indptr[state]), int(table.indptr[state + 1])
            closer = table.next_tokens[lo:hi][dist[table.next_states[lo:hi]] < dist[state]]
            allowed = closer if closer.size else allowed
        if allowed.size == 0:
            raise ValueError(f"state {state} allows no token")
        token = int(rng.choice(allowed))
        if token in eos:
            return out, True
        out.append(token)
        state = table.next_state(state, token)
    return out, False
