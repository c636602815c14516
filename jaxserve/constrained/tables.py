"""Device-resident pool of constraint mask rows and transition tables, and the jittable mask application.

The pool is a few device arrays whose shapes never change, so the jitted sampler compiles once
(`GrammarTables`):
  - `mask` uint32 [capacity_rows, W]: row 0 is "unconstrained" (every real token allowed). A grammar with S
    states occupies 2S consecutive rows from its offset: [0, S) its normal rows, [S, 2S) its closing rows
    (`jaxserve.constrained.grammar`). A request in state s uses row `offset + s` (or `offset + S + s` once
    it must close); unconstrained requests use row 0.
  - `row_meta` int32 [capacity_rows, 5], per pool row: the grammar's offset, its S, `worst_next` of the
    row's state, the base of the state's row in `next_state`, and the grammar's slot in `class_map`
    (-1: no device transition tables). With it the sampler picks the closing row and advances the state on
    the device, so constrained rows need no host round trip between steps.
  - `class_map` int32 [class_map_slots, vocab_width]: token -> token class, one slot per grammar.
  - `next_state` int32 [next_capacity]: each grammar's `next_by_class` [S, C] flattened (relative states,
    -1 = not allowed).
A grammar whose transition tables do not fit (out of class-map slots or next-state entries even after
evicting unused grammars) is still resident with its mask rows; its rows advance on the host (the engine
then runs steps synchronously while it runs). That fallback is logged and counted (`num_host_advance`).

A host-matched sequence (constrained/host_matcher.py: a constraint the device tables cannot hold) holds a
block of its own (`add_host_rows`): state 0 forever, no transition tables, its row rewritten by the engine
after every token (`write_host_row`).

The sampler does

    logits = apply_token_mask(logits, pool.table[mask_row_ids])

before temperature / top-k / top-p.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from jaxserve.constrained.grammar import Grammar

log = logging.getLogger(__name__)

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


@partial(jax.jit, donate_argnums=0)
def _write_entries(table: jax.Array, values: jax.Array, base: jax.Array, count: jax.Array) -> jax.Array:
    """table[base : base + count] = values[:count] with a fixed-width `values` (one compiled program for any
    count). A scatter, not dynamic_update_slice: that would clamp a block near the end onto live entries."""
    i = jnp.arange(values.shape[0], dtype=jnp.int32)
    idx = jnp.where(i < count, base + i, table.shape[0])
    return table.at[idx].set(values, mode="drop")


# Columns of `GrammarTables.row_meta`.
META_OFFSET = 0  # pool row of the grammar's state 0
META_STATES = 1  # S: the closing row of a state is its normal row + S
META_WORST_NEXT = 2  # `Grammar.worst_next` of the row's state (capped at _WORST_CAP)
_TABLE_WRITERS = {"_table": _write_block, "_meta": _write_block, "_class_map": _write_block, "_next": _write_entries}
META_NEXT_BASE = 3  # index of the state's row of next_by_class in `next_state` (-1: none)
META_CLASS_SLOT = 4  # the grammar's row of `class_map` (-1: no device tables, the host advances it)
META_COLUMNS = 5
_WORST_CAP = 1 << 30  # unreachable acceptance is "huge" on the host (int64); any value > max tokens works
NEXT_BLOCK = 1024  # the next-state table is allocated in blocks of this many entries
_NEXT_WRITE = 1 << 15  # entries per write call (fixed, so one compiled write serves every grammar)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class GrammarTables:
    """The pool's device arrays as one jit argument (see the module docstring for the layout)."""

    mask: jax.Array  # uint32 [capacity_rows, W]
    row_meta: jax.Array  # int32 [capacity_rows, META_COLUMNS]
    class_map: jax.Array  # int32 [class_map_slots, vocab_width]
    next_state: jax.Array  # int32 [next_capacity]


def grammar_mask_rows(tables: GrammarTables, state_row: jax.Array, tokens_left: jax.Array) -> jax.Array:
    """Mask row of each row's state: state_row i32 [B] (the normal row offset + s; 0 = unconstrained),
    tokens_left i32 [B] (tokens the row may still emit, this one included). Exactly `Grammar.mask_row`: the
    closing row once tokens_left < worst_next + 2."""
    meta = jnp.take(tables.row_meta, state_row, axis=0, mode="clip")
    closing = tokens_left < meta[:, META_WORST_NEXT] + 2
    return state_row + jnp.where(closing, meta[:, META_STATES], 0)


def advance_grammar_rows(tables: GrammarTables, state_row: jax.Array, tokens: jax.Array,
                         end_token_ids: jax.Array) -> jax.Array:
    """Normal row of each row's state after emitting `tokens` i32 [B]. Unchanged for unconstrained rows, end
    tokens (as `TokenTable.next_state`), grammars without device tables and disallowed tokens (only
    sampled when the mask allowed nothing: the engine aborts that request)."""
    meta = jnp.take(tables.row_meta, state_row, axis=0, mode="clip")
    slot = meta[:, META_CLASS_SLOT]
    cls = tables.class_map[jnp.maximum(slot, 0), tokens]
    nxt = jnp.take(tables.next_state, meta[:, META_NEXT_BASE] + cls, mode="clip")
    is_end = jnp.any(tokens[:, None] == end_token_ids[None, :], axis=1)
    moves = (state_row != UNCONSTRAINED_ROW) & (slot >= 0) & (meta[:, META_NEXT_BASE] >= 0) & ~is_end & (nxt >= 0)
    return jnp.where(moves, meta[:, META_OFFSET] + nxt, state_row)


@dataclass(frozen=True)
class GrammarResidency:
    """Where a grammar lives in the pool: the row of its state 0, and whether the device can advance its
    states (False: the host must, so its rows never read their state from the device)."""

    offset: int
    device_advance: bool


@dataclass
class _Resident:
    first_block: int
    num_blocks: int
    refcount: int
    last_use: int
    class_slot: int = -1  # -1: no device transition tables
    next_first_block: int = 0
    next_num_blocks: int = 0


class GrammarPool:
    """Fixed-capacity device tables shared by all running constrained requests.

    `add(grammar)` makes a grammar resident (or reuses it; grammars are keyed by `TokenTable.key`) and
    returns its `GrammarResidency`; every `add` must be paired with one `release(grammar)`. Released
    grammars stay resident until their space is needed (a cache for repeated schemas): mask rows, class-map
    slot and next-state entries are evicted together. Thread-safe. `device`: a device or a sharding
    (a tensor-parallel engine replicates the tables over its mesh); None = the default device."""

    def __init__(self, capacity_rows: int, vocab_width: int, vocab_size: int, device: Any = None,
                 *, class_map_slots: int = 64, next_capacity: int = 1 << 22):
        if capacity_rows < 2 * BLOCK_ROWS:
            raise ValueError(f"capacity_rows must be at least {2 * BLOCK_ROWS}, got {capacity_rows}")
        if not 0 < vocab_size <= vocab_width:
            raise ValueError(f"need 0 < vocab_size ({vocab_size}) <= vocab_width ({vocab_width})")
        if class_map_slots < 0 or next_capacity < 0:
            raise ValueError(f"class_map_slots ({class_map_slots}) and next_capacity ({next_capacity}) must be >= 0")
        self.vocab_width = vocab_width
        self.vocab_size = vocab_size
        self.words_per_row = -(-vocab_width // 32)
        self.num_blocks = capacity_rows // BLOCK_ROWS
        self.capacity_rows = self.num_blocks * BLOCK_ROWS
        self.class_map_slots = class_map_slots
        self.num_next_blocks = next_capacity // NEXT_BLOCK
        self.next_capacity = self.num_next_blocks * NEXT_BLOCK
        self.num_host_advance = 0  # grammars made resident without device transition tables
        self._lock = threading.Lock()
        self._block_used = np.zeros(self.num_blocks, dtype=bool)
        self._block_used[0] = True  # block 0 holds the unconstrained row
        self._next_used = np.zeros(self.num_next_blocks, dtype=bool)
        self._free_class_slots = list(range(class_map_slots - 1, -1, -1))
        self._resident: dict[tuple, _Resident] = {}
        self._host_blocks: set[int] = set()  # blocks held by host-matched sequences (add_host_rows)
        self._clock = 0
        host = np.zeros((self.capacity_rows, self.words_per_row), dtype=np.uint32)
        host[:BLOCK_ROWS] = unconstrained_row(vocab_size, vocab_width)
        self._table = jax.device_put(host, device)
        meta = np.zeros((self.capacity_rows, META_COLUMNS), np.int32)
        meta[:, [META_WORST_NEXT, META_NEXT_BASE, META_CLASS_SLOT]] = -1
        self._meta = jax.device_put(meta, device)
        # Size-0 tables would break the gathers of the jitted advance; one unused entry keeps them valid.
        self._class_map = jax.device_put(np.zeros((max(class_map_slots, 1), vocab_width), np.int32), device)
        self._next = jax.device_put(np.full(max(self.next_capacity, 1), -1, np.int32), device)
        # Compile every write program now (engine start-up), so adding a grammar while serving never does.
        self._table = _write_block(self._table, host[:BLOCK_ROWS], np.int32(0))
        self._meta = _write_block(self._meta, meta[:BLOCK_ROWS], np.int32(0))
        self._class_map = _write_block(self._class_map, np.zeros((1, vocab_width), np.int32), np.int32(0))
        self._next = _write_entries(self._next, np.zeros(_NEXT_WRITE, np.int32), np.int32(0), np.int32(0))
        self.mirror: Callable[..., None] | None = None

    def _write(self, name: str, *args: Any) -> None:
        """One device write into a table; `mirror` (multi-host serving: engine/multihost.py) publishes it first
        so every host's copy of the tables gets the same writes in the same order."""
        if self.mirror is not None:
            self.mirror("grammar", name, args)
        self.apply_write(name, *args)

    def apply_write(self, name: str, *args: Any) -> None:
        if name not in _TABLE_WRITERS:
            raise ValueError(f"no grammar table {name!r}")
        setattr(self, name, _TABLE_WRITERS[name](getattr(self, name), *args))

    @property
    def table(self) -> jax.Array:
        """The current uint32 [capacity_rows, W] mask table (replaced by every write; read it per step)."""
        return self._table

    @property
    def tables(self) -> GrammarTables:
        """Every device table as the sampler takes them (replaced by every write; read it per step)."""
        with self._lock:
            return GrammarTables(self._table, self._meta, self._class_map, self._next)

    def add(self, grammar: "Grammar") -> GrammarResidency:
        """Make `grammar` resident (reference counted): its mask rows, and its transition tables when they
        fit. GrammarPoolFullError when even its mask rows do not fit."""
        table = grammar.pool_table
        if table.words_per_row != self.words_per_row:
            raise ValueError(
                f"grammar mask has {table.words_per_row} words per row, pool has {self.words_per_row}"
            )
        if grammar.token_class.shape[0] != self.vocab_width:
            raise ValueError(f"grammar classes cover {grammar.token_class.shape[0]} tokens, pool has {self.vocab_width}")
        with self._lock:
            self._clock += 1
            entry = self._resident.get(table.key)
            if entry is not None:
                entry.refcount += 1
                entry.last_use = self._clock
                # Transition tables can be added only while nobody runs the grammar: a running request's
                # step in flight was built assuming the host advances it.
                if entry.refcount == 1 and entry.class_slot < 0:
                    self._place_transitions(grammar, entry)
                return self._residency(entry)
            num_blocks = -(-table.num_states // BLOCK_ROWS)
            first = self._find_free_run(self._block_used, num_blocks)
            if first is None:
                self._evict_unused_until(lambda: self._find_free_run(self._block_used, num_blocks) is not None)
                first = self._find_free_run(self._block_used, num_blocks)
            if first is None:
                raise GrammarPoolFullError(
                    f"grammar pool full: a grammar needs {table.num_states} rows, pool holds "
                    f"{self.capacity_rows} rows and the free ones are in use or fragmented"
                )
            self._block_used[first : first + num_blocks] = True
            entry = _Resident(first, num_blocks, 1, self._clock)
            self._resident[table.key] = entry
            padded = np.zeros((num_blocks * BLOCK_ROWS, self.words_per_row), dtype=np.uint32)
            padded[: table.num_states] = table.mask
            for b in range(num_blocks):
                rows = padded[b * BLOCK_ROWS : (b + 1) * BLOCK_ROWS]
                self._write("_table", rows, np.int32((first + b) * BLOCK_ROWS))
            self._place_transitions(grammar, entry)
            return self._residency(entry)

    def add_host_rows(self) -> int:
        """One block of rows for a sequence whose mask the host computes each step (constrained/host_matcher.py):
        returns its row offset; its state is always 0 and never advances on the device (the engine rewrites
        row `offset` with `write_host_row` after every token). GrammarPoolFullError when no block is free."""
        with self._lock:
            first = self._find_free_run(self._block_used, 1)
            if first is None:
                self._evict_unused_until(lambda: self._find_free_run(self._block_used, 1) is not None)
                first = self._find_free_run(self._block_used, 1)
            if first is None:
                raise GrammarPoolFullError(f"grammar pool full: all {self.capacity_rows} rows are in use")
            self._block_used[first] = True
            offset = first * BLOCK_ROWS
            self._host_blocks.add(first)
            meta = np.zeros((BLOCK_ROWS, META_COLUMNS), np.int32)
            meta[:, META_OFFSET] = offset
            meta[:, META_STATES] = 1  # worst_next -1: the closing row (offset + 1) is never chosen
            meta[:, [META_WORST_NEXT, META_NEXT_BASE, META_CLASS_SLOT]] = -1
            self._write("_meta", meta, np.int32(offset))
            return offset

    def write_host_row(self, offset: int, row: np.ndarray) -> None:
        """Row `offset` (from add_host_rows) := `row`, uint32 [W]. The whole block is written: one compiled
        write serves every grammar and host row, so serving never compiles."""
        block = np.zeros((BLOCK_ROWS, self.words_per_row), dtype=np.uint32)
        block[0] = row
        with self._lock:
            if offset // BLOCK_ROWS not in self._host_blocks:
                raise ValueError(f"row {offset} is not a host-matcher row")
            self._write("_table", block, np.int32(offset))

    def release_host_rows(self, offset: int) -> None:
        with self._lock:
            block = offset // BLOCK_ROWS
            if block not in self._host_blocks:
                raise ValueError("release_host_rows() of rows that are not held")
            self._host_blocks.remove(block)
            self._block_used[block] = False

    def release(self, grammar: "Grammar") -> None:
        with self._lock:
            entry = self._resident.get(grammar.pool_table.key)
            if entry is None or entry.refcount == 0:
                raise ValueError("release() of a grammar that is not held in the pool")
            entry.refcount -= 1

    def residency(self, grammar: "Grammar") -> GrammarResidency | None:
        with self._lock:
            entry = self._resident.get(grammar.pool_table.key)
            return None if entry is None else self._residency(entry)

    def num_references(self) -> int:
        """Outstanding add() and add_host_rows() calls not yet released (0 when no constrained request runs)."""
        with self._lock:
            return sum(e.refcount for e in self._resident.values()) + len(self._host_blocks)

    def rows_in_use(self) -> int:
        with self._lock:
            return int(self._block_used.sum()) * BLOCK_ROWS

    def next_entries_in_use(self) -> int:
        with self._lock:
            return int(self._next_used.sum()) * NEXT_BLOCK

    def class_slots_in_use(self) -> int:
        with self._lock:
            return self.class_map_slots - len(self._free_class_slots)

    @staticmethod
    def _residency(entry: _Resident) -> GrammarResidency:
        return GrammarResidency(entry.first_block * BLOCK_ROWS, entry.class_slot >= 0)

    def _place_transitions(self, grammar: "Grammar", entry: _Resident) -> None:
        """Give `entry` a class-map slot and next-state entries when they fit (evicting unused grammars),
        then write its row metadata; otherwise log the host fallback."""
        num_states = grammar.num_states
        nbc = grammar.next_by_class
        need = -(-nbc.size // NEXT_BLOCK)

        def fits() -> bool:
            return bool(self._free_class_slots) and self._find_free_run(self._next_used, need) is not None

        if need <= self.num_next_blocks and self.class_map_slots > 0:
            if not fits() and self._fits_after_evicting_unused(need):
                self._evict_unused_until(fits)
            if fits():
                first = self._find_free_run(self._next_used, need)
                self._next_used[first : first + need] = True
                entry.class_slot = self._free_class_slots.pop()
                entry.next_first_block, entry.next_num_blocks = first, need
                self._write("_class_map", grammar.token_class[None].astype(np.int32), np.int32(entry.class_slot))
                flat = nbc.astype(np.int32).ravel()
                base = first * NEXT_BLOCK
                for lo in range(0, flat.size, _NEXT_WRITE):
                    part = flat[lo : lo + _NEXT_WRITE]
                    values = np.zeros(_NEXT_WRITE, np.int32)
                    values[: part.size] = part
                    self._write("_next", values, np.int32(base + lo), np.int32(part.size))
        if entry.class_slot < 0:
            self.num_host_advance += 1
            log.warning(
                "constraint %.60s: its transition table (%d states x %d token classes) does not fit the device "
                "tables (%d class-map slots, %d next-state entries, %d in use); its rows advance on the host, "
                "so engine steps are synchronous while it runs (raise grammar_class_map_slots / "
                "grammar_next_capacity)", str(grammar.table.key[:2]), num_states, grammar.num_classes,
                self.class_map_slots, self.next_capacity, int(self._next_used.sum()) * NEXT_BLOCK,
            )
        offset = entry.first_block * BLOCK_ROWS
        meta = np.zeros((entry.num_blocks * BLOCK_ROWS, META_COLUMNS), np.int32)
        meta[:, META_OFFSET] = offset
        meta[:, META_STATES] = num_states
        meta[:, [META_WORST_NEXT, META_NEXT_BASE, META_CLASS_SLOT]] = -1
        meta[:num_states, META_WORST_NEXT] = np.minimum(grammar.worst_next, _WORST_CAP)
        if entry.class_slot >= 0:
            meta[:num_states, META_NEXT_BASE] = entry.next_first_block * NEXT_BLOCK + np.arange(num_states) * nbc.shape[1]
            meta[:num_states, META_CLASS_SLOT] = entry.class_slot
        for b in range(entry.num_blocks):
            self._write("_meta", meta[b * BLOCK_ROWS : (b + 1) * BLOCK_ROWS], np.int32(offset + b * BLOCK_ROWS))

    def _fits_after_evicting_unused(self, need: int) -> bool:
        """Whether evicting every released grammar would make room for transition tables of `need` blocks
        (cached grammars are not thrown out for a grammar that could not fit anyway)."""
        used = self._next_used.copy()
        slots = len(self._free_class_slots)
        for e in self._resident.values():
            if e.refcount == 0 and e.class_slot >= 0:
                slots += 1
                used[e.next_first_block : e.next_first_block + e.next_num_blocks] = False
        return slots > 0 and self._find_free_run(used, need) is not None

    @staticmethod
    def _find_free_run(used: np.ndarray, num_blocks: int) -> int | None:
        if num_blocks == 0:
            return 0
        free = ~used
        # Length of the free run ending at each block, vectorized: index minus index of the last used block.
        idx = np.arange(used.size)
        last_used = np.maximum.accumulate(np.where(free, -1, idx)) if used.size else idx
        run_end = np.flatnonzero(idx - last_used >= num_blocks)
        return None if run_end.size == 0 else int(run_end[0]) - num_blocks + 1

    def _evict_unused_until(self, done) -> None:
        """Evict released grammars, least recently used first, until `done()` (or none is left)."""
        unused = sorted((e.last_use, k) for k, e in self._resident.items() if e.refcount == 0)
        for _, key in unused:
            entry = self._resident.pop(key)
            self._block_used[entry.first_block : entry.first_block + entry.num_blocks] = False
            if entry.class_slot >= 0:
                self._free_class_slots.append(entry.class_slot)
                self._next_used[entry.next_first_block : entry.next_first_block + entry.next_num_blocks] = False
            if done():
                return


def unconstrained_row(vocab_size: int, vocab_width: int) -> np.ndarray:
    """uint32 [ceil(vocab_width/32)]: every id below vocab_size allowed, the padding ids masked."""
    bits = np.zeros(-(-vocab_width // 32) * 32, dtype=bool)
    bits[:vocab_size] = True
    return np.packbits(bits, bitorder="little").view(np.uint32)
