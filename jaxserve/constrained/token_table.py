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
      - next state of an allowed non-EOS token t: `next_tokens[indptr[s]:indptr[s+1]]` (sorted) holds t and
        `next_states` at the same index holds the target (CSR).
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
    accepting: np.ndarray  # bool [S]
    finished: np.ndarray  # bool [S]
    forced_token: np.ndarray  # int32 [S]
    eos_token_ids: tuple[int, ...]

    @property
    def num_states(self) -> int:
        return int(self.mask.shape[0])

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
        lo, hi = int(self.indptr[state]), int(self.indptr[state + 1])
        i = lo + int(np.searchsorted(self.next_tokens[lo:hi], token_id))
        if i < hi and int(self.next_tokens[i]) == token_id:
            return int(self.next_states[i])
        raise ValueError(f"token {token_id} is not allowed in state {state} of this constraint")
