"""How the kernels lay queries out: all query heads of one KV head, for a block of tokens, as rows.

A kernel program owns one (row b, KV head, query block) and computes a `[rows_per_block, head_dim]`
tile of queries against blocks of that KV head's pages, so K/V are read once per query block no
matter how many query heads share them (GQA). Inside a query block, row `r` is query token
`r // group` (relative to the block) and query head `r % group` of the KV head; rows at or past
`tokens_per_block * group` are padding, added so the tile height suits the hardware (a power of
two >= 16 for Triton's `dot`, a multiple of the sublane count on TPU).

Decode (`q_len == 1`) is just the case of one token per block: `group` useful rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class QueryBlocking:
    """Static tiling of the query axis; every field is a Python int (part of the compiled shape)."""

    group: int  # query heads per KV head
    q_len: int  # Tq of the batch
    tokens_per_block: int
    rows_per_block: int
    num_q_blocks: int

    @property
    def useful_rows(self) -> int:
        return self.tokens_per_block * self.group


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def choose_query_blocking(
    *, q_len: int, group: int, target_rows: int, min_rows: int, power_of_two_rows: bool
) -> QueryBlocking:
    """Pack as many tokens per block as fit in `target_rows` rows (at least one token per block)."""
    if q_len < 1 or group < 1:
        raise ValueError(f"q_len ({q_len}) and group ({group}) must be positive")
    tokens = max(1, min(q_len, target_rows // group))
    if power_of_two_rows:
        rows = max(min_rows, _next_power_of_two(tokens * group))
    else:
        rows = max(min_rows, -(-tokens * group // min_rows) * min_rows)
    return QueryBlocking(
        group=group,
        q_len=q_len,
        tokens_per_block=tokens,
        rows_per_block=rows,
        num_q_blocks=-(-q_len // tokens),
    )


def pack_queries(q: jax.Array, num_kv_heads: int, blocking: QueryBlocking) -> jax.Array:
    """`[B, Tq, H, D]` -> `[B, KV, num_q_blocks * rows_per_block, D]` (padding rows are zeros)."""
    batch, q_len, _, head_dim = q.shape
    g, tokens, blocks = blocking.group, blocking.tokens_per_block, blocking.num_q_blocks
    grouped = q.reshape(batch, q_len, num_kv_heads, g, head_dim).transpose(0, 2, 1, 3, 4)
    grouped = jnp.pad(grouped, ((0, 0), (0, 0), (0, blocks * tokens - q_len), (0, 0), (0, 0)))
    rows = grouped.reshape(batch, num_kv_heads, blocks, tokens * g, head_dim)
    rows = jnp.pad(rows, ((0, 0), (0, 0), (0, 0), (0, blocking.rows_per_block - tokens * g), (0, 0)))
    return rows.reshape(batch, num_kv_heads, blocks * blocking.rows_per_block, head_dim)


def unpack_outputs(out: jax.Array, blocking: QueryBlocking) -> jax.Array:
    """Inverse of `pack_queries`: `[B, KV, num_q_blocks * rows_per_block, D]` -> `[B, Tq, H, D]`."""
    batch, num_kv_heads, _, head_dim = out.shape
    g, tokens, blocks = blocking.group, blocking.tokens_per_block, blocking.num_q_blocks
    rows = out.reshape(batch, num_kv_heads, blocks, blocking.rows_per_block, head_dim)[:, :, :, : tokens * g]
    grouped = rows.reshape(batch, num_kv_heads, blocks * tokens, g, head_dim)[:, :, : blocking.q_len]
    return grouped.transpose(0, 2, 1, 3, 4).reshape(batch, blocking.q_len, num_kv_heads * g, head_dim)


def row_query_positions(
    row_ids: jax.Array, q_block: jax.Array, q_start: jax.Array, blocking: QueryBlocking
) -> tuple[jax.Array, jax.Array]:
    """Absolute position of each tile row's query token, and whether the row is a real query slot.

    Pure jnp on traced values so it runs inside Pallas kernels (both lowerings) and in tests.
    """
    token = q_block * blocking.tokens_per_block + jax.lax.div(row_ids, jnp.int32(blocking.group))
    in_tile = (row_ids < blocking.useful_rows) & (token < blocking.q_len)
    return q_start + token, in_tile
