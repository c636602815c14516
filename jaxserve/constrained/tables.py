"""Device-resident pool of constraint mask rows, and the jittable mask application.

The pool is one `uint32 [capacity_rows, W]` device array whose shape never changes, so the jitted sampler
compiles once. Row 0 is "unconstrained" (every real token allowed). A grammar with S states occupies S
consecutive rows starting at its offset; a running request with grammar state s uses row `offset + s`
(unconstrained requests use row 0). The sampler does

    logits = apply_token_mask(logits, pool.table[mask_row_ids])

before temperature / top-k / top-p.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.constrained.token_table import TokenTable

UNCONSTRAINED_ROW = 0
# Rows are allocated and written in blocks, so a single compiled write function serves every grammar size.
BLOCK_ROWS = 16


class GrammarPoolFullError(RuntimeError):
    """No room for another grammar: every resident grammar is in use. Retry when requests finish."""


def unpack_mask_bits(mask_rows: jax.Array, vocab_size: int) -> jax.Array:
    """uint32 [B, W] bit-packed rows -> bool [B, vocab_size] (bit t % 32 of word t // 32)."""
    shifts = jnp.arange(32, dtype=jnp.uint32)
    bits = (mask_rows[:, :, None] >> shifts[None, None, :]) & jnp.uint32(1)
    return bits.reshape(mask_rows.shape[0], -1)[:, :vocab_size].astype(jnp.bool_)


def apply_token_mask(logits: jax.Array, mask_rows: jax.Array) -> jax.Array:
    """Set disallowed logits to -inf. logits [B, V] float; mask_rows uint32 [B, W] with W * 32 >= V.

    Pure and jittable; rows gathered from row 0 of the pool leave every real token untouched."""
    if mask_rows.shape[1] * 32 < logits.shape[1]:
        raise ValueError(f"mask rows cover {mask_rows.shape[1] * 32} tokens, logits have {logits.shape[1]}")
    allowed = unpack_mask_bits(mask_rows, logits.shape[1])
    return jnp.where(allowed, logits, jnp.asarray(-jnp.inf, dtype=logits.dtype))


@partial(jax.jit, donate_argnums=0)
def _write_block(table: jax.Array, rows: jax.Array, row_offset: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice(table, rows, (row_offset, jnp.int32(0)))


@dataclass
class _Resident:
    first_block: int
    num_blocks: int
    refcount: int
    last_use: int


class GrammarPool:
    """Fixed-capacity device table of mask rows shared by all running constrained requests.

    `add(table)` makes a grammar resident (or reuses it; grammars are keyed by `TokenTable.key`) and returns
    its row offset; every `add` must be paired with one `release(table)`. Released grammars stay resident
    until their rows are needed (a cache for repeated schemas). Thread-safe."""

    def __init__(self, capacity_rows: int, vocab_width: int, vocab_size: int, device: jax.Device | None = None):
        if capacity_rows < 2 * BLOCK_ROWS:
            raise ValueError(f"capacity_rows must be at least {2 * BLOCK_ROWS}, got {capacity_rows}")
        if not 0 < vocab_size <= vocab_width:
            raise ValueError(f"need 0 < vocab_size ({vocab_size}) <= vocab_width ({vocab_width})")
        self.vocab_width = vocab_width
        self.vocab_size = vocab_size
        self.words_per_row = -(-vocab_width // 32)
        self.num_blocks = capacity_rows // BLOCK_ROWS
        self.capacity_rows = self.num_blocks * BLOCK_ROWS
        self._lock = threading.Lock()
        self._block_used = np.zeros(self.num_blocks, dtype=bool)
        self._block_used[0] = True  # block 0 holds the unconstrained row
        self._resident: dict[tuple, _Resident] = {}
        self._clock = 0
        host = np.zeros((self.capacity_rows, self.words_per_row), dtype=np.uint32)
        host[:BLOCK_ROWS] = unconstrained_row(vocab_size, vocab_width)
        self._table = jax.device_put(host, device)

    @property
    def table(self) -> jax.Array:
        """The current uint32 [capacity_rows, W] device table (replaced by every write; read it per step)."""
        return self._table

    def add(self, table: TokenTable) -> int:
        """Make `table` resident (reference counted) and return the row of its state 0."""
        if table.words_per_row != self.words_per_row:
            raise ValueError(
                f"grammar mask has {table.words_per_row} words per row, pool has {self.words_per_row}"
            )
        with self._lock:
            self._clock += 1
            entry = self._resident.get(table.key)
            if entry is not None:
                entry.refcount += 1
                entry.last_use = self._clock
                return entry.first_block * BLOCK_ROWS
            num_blocks = -(-table.num_states // BLOCK_ROWS)
            first = self._find_free_run(num_blocks)
            if first is None:
                self._evict_unused_until_fits(num_blocks)
                first = self._find_free_run(num_blocks)
            if first is None:
                raise GrammarPoolFullError(
                    f"grammar pool full: a grammar needs {table.num_states} rows, pool holds "
                    f"{self.capacity_rows} rows and the free ones are in use or fragmented"
                )
            self._block_used[first : first + num_blocks] = True
            self._resident[table.key] = _Resident(first, num_blocks, 1, self._clock)
            padded = np.zeros((num_blocks * BLOCK_ROWS, self.words_per_row), dtype=np.uint32)
            padded[: table.num_states] = table.mask
            for b in range(num_blocks):
                rows = padded[b * BLOCK_ROWS : (b + 1) * BLOCK_ROWS]
                self._table = _write_block(self._table, rows, np.int32((first + b) * BLOCK_ROWS))
            return first * BLOCK_ROWS

    def release(self, table: TokenTable) -> None:
        with self._lock:
            entry = self._resident.get(table.key)
            if entry is None or entry.refcount == 0:
                raise ValueError("release() of a grammar that is not held in the pool")
            entry.refcount -= 1

    def rows_in_use(self) -> int:
        with self._lock:
            return int(self._block_used.sum()) * BLOCK_ROWS

    def _find_free_run(self, num_blocks: int) -> int | None:
        free = ~self._block_used
        # Length of the free run ending at each block, vectorized: index minus index of the last used block.
        idx = np.arange(self.num_blocks)
        last_used = np.maximum.accumulate(np.where(free, -1, idx))
        run_end = np.flatnonzero(idx - last_used >= num_blocks)
        return None if run_end.size == 0 else int(run_end[0]) - num_blocks + 1

    def _evict_unused_until_fits(self, num_blocks: int) -> None:
        unused = sorted((e.last_use, k) for k, e in self._resident.items() if e.refcount == 0)
        for _, key in unused:
            entry = self._resident.pop(key)
            self._block_used[entry.first_block : entry.first_block + entry.num_blocks] = False
            if self._find_free_run(num_blocks) is not None:
                return


def unconstrained_row(vocab_size: int, vocab_width: int) -> np.ndarray:
    """uint32 [ceil(vocab_width/32)]: every id below vocab_size allowed, the padding ids masked."""
    bits = np.zeros(-(-vocab_width // 32) * 32, dtype=bool)
    bits[:vocab_size] = True
    return np.packbits(bits, bitorder="little").view(np.uint32)
