"""Ragged paged attention for TPU (Pallas, Mosaic lowering): decode, extend and prefill.

Grid `(row, KV head, query block, KV block)`; the last axis is sequential ("arbitrary") and carries
an online softmax in VMEM scratch. The layer index, page table, sequence lengths and query starts
are scalar-prefetched into SMEM, so each step knows which physical pages to fetch before it runs.
The stacked caches stay in HBM (`memory_space=ANY`); each step DMAs its block of pages, one
`[page_size, head_dim]` copy per page, into one half of a two-slot VMEM buffer while it computes on
the other half (double buffering within a (row, head, query block)). Steps outside the KV range a
query block can see (past the causal / length limit, before the sliding window) issue no DMA and no
compute.

All query heads of one KV head (times a block of query tokens) form the tile's rows
(`query_layout`), so each K/V page is read once per query block. A small per-row token-offset
table replaces vector integer division inside the kernel.

Cache layouts: the plain `[L, KV, P, page, D]`, or packed `[L, KV, P, page / n, n * D]` with n * D =
lcm(D, 128) (jaxserve.engine.kv_cache.cache_shape, TPU at D % 128 != 0): each DMA copies whole 128-lane rows
and the kernel takes the n lane slices of a row as n interleaved key sets under one online softmax.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.query_layout import QueryBlocking, choose_query_blocking, pack_queries, unpack_outputs
from pallas_kernels.reference import apply_soft_cap, key_visibility_mask, validate_paged_attention_args

_NT_DIMS = (((1,), (1,)), ((), ()))  # q @ k.T without materialising the transpose


@dataclass(frozen=True)
class TpuKernelConfig:
    """Tuning knobs (static)."""

    # K/V positions per grid step (a whole number of pages). None: 512, lowered until the double-buffered
    # K/V blocks fit `VMEM_BLOCK_BUDGET`; an explicit value is used as given (the compiler rejects one whose
    # scratch exceeds the chip's scoped VMEM, which the AOT tests rely on).
    keys_per_block: int | None = None
    target_rows: int = 128  # query rows per tile for prefill/extend


# Bytes of the K and V double buffers of one grid step: a quarter of the default scoped VMEM limit of the
# smallest current generation (16 MiB on v5e; 32 MiB on v6e, 128 MiB physical on both), which leaves room for
# the query/output tiles and Mosaic's own buffers on every generation.
VMEM_BLOCK_BUDGET = 4 * 1024 * 1024
DEFAULT_KEYS_PER_BLOCK = 512


def keys_per_block_for(config: TpuKernelConfig, page_size: int, head_dim: int, itemsize: int) -> int:
    """The K/V positions per grid step: the explicit value, or the default within `VMEM_BLOCK_BUDGET`."""
    if config.keys_per_block is not None:
        return config.keys_per_block
    per_key = 2 * 2 * head_dim * itemsize  # K and V, two slots each
    fit = max(page_size, (VMEM_BLOCK_BUDGET // per_key) // page_size * page_size)
    return min(DEFAULT_KEYS_PER_BLOCK, fit)


def _cost_estimate(batch: int, num_kv_heads: int, blocking: QueryBlocking, kv_blocks: int, keys_per_block: int,
                   head_dim: int, q_itemsize: int, kv_itemsize: int) -> pl.CostEstimate:
    """XLA's cost model sees a custom call as free; this is the kernel's work when every page-table slot is
    visible (the compiled program's upper bound): two matmuls and one exp per (tile row, key)."""
    tiles = batch * num_kv_heads * blocking.num_q_blocks
    keys = kv_blocks * keys_per_block
    rows = blocking.rows_per_block
    return pl.CostEstimate(
        flops=int(4 * tiles * rows * keys * head_dim),
        transcendentals=int(tiles * rows * keys),
        bytes_accessed=int(2 * tiles * rows * head_dim * q_itemsize + 2 * tiles * keys * head_dim * kv_itemsize),
    )


def tpu_support(*, head_dim: int, page_size: int, dtype: jnp.dtype) -> tuple[bool, str]:
    """Whether the Mosaic kernel handles these shapes; the reason when it does not."""
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        return False, f"dtype {dtype} not supported (float32, bfloat16)"
    sublanes = 8 if dtype == jnp.float32 else 16
    if page_size % sublanes:
        return False, f"page_size {page_size} must be a multiple of {sublanes} for {dtype} pages"
    if head_dim % 16:
        # Multiples of 16 pack into whole 128-lane rows at <= 8 tokens per row (kv_cache.tokens_per_row). Compiled
        # decode with no cache copy, as at 128 and 256: v6e at 48, 64, 80, 96, 112, 160, 192; v5e at 96, 192
        # (tests/test_aot.py checks 64, 96, 192).
        return False, f"head_dim {head_dim} must be a multiple of 16"
    return True, "ok"


def packing_of(cache_shape: tuple[int, ...], head_dim: int) -> int:
    """Tokens per cache row: 1 for the plain `[L, KV, P, page, D]` layout, n for a packed
    `[L, KV, P, page / n, n * D]` one (jaxserve.engine.kv_cache.cache_shape on TPU: n * D = lcm(D, 128))."""
    minor = cache_shape[-1]
    if minor % head_dim:
        raise ValueError(f"cache minor dimension {minor} is not a multiple of head_dim {head_dim}")
    return minor // head_dim


def unpacked_shape(cache_shape: tuple[int, ...], head_dim: int) -> tuple[int, ...]:
    pack = packing_of(cache_shape, head_dim)
    return (*cache_shape[:3], cache_shape[3] * pack, head_dim)


def _row_token_offsets(blocking: QueryBlocking) -> np.ndarray:
    """int32 [rows, 1]: query token of each tile row relative to its block, -1 for padding rows."""
    rows = np.arange(blocking.rows_per_block)
    token = np.where(rows < blocking.useful_rows, rows // blocking.group, -1)
    return token.astype(np.int32)[:, None]


def _attention_kernel(
    # scalar prefetch (SMEM)
    layer_ref,  # [1]
    page_table_ref,  # [B * pages_per_row_padded]
    seq_lens_ref,  # [B]
    q_start_ref,  # [B]
    # inputs
    row_token_ref,  # [rows, 1] int32 (VMEM)
    q_ref,  # [rows, D] (VMEM)
    k_hbm,  # [L, KV, P, S / pack, pack * D] (HBM; pack = 1: the plain layout)
    v_hbm,
    # output
    o_ref,  # [rows, D]
    # scratch
    k_buf,  # [2, keys_per_block / pack, pack * D]
    v_buf,
    sems,  # DMA semaphores [2 (k, v), 2 (slot)]
    acc_ref,  # [rows, D] f32
    max_ref,  # [rows, 1] f32
    sum_ref,  # [rows, 1] f32
    *,
    blocking: QueryBlocking,
    pages_per_block: int,
    pages_per_row: int,
    scale: float,
    soft_cap: float | None,
    sliding_window: int | None,
):
    b, kv_head, q_block, block = (pl.program_id(i) for i in range(4))
    num_blocks = pl.num_programs(3)
    head_dim = q_ref.shape[-1]
    # A packed cache (head_dim % 128 != 0) holds `pack` consecutive tokens per row of lcm(head_dim, 128) lanes:
    # [L, KV, P, page / pack, pack * head_dim].
    pack = k_hbm.shape[4] // head_dim
    rows_per_page = k_hbm.shape[3]
    page_size = rows_per_page * pack
    keys_per_block = pages_per_block * page_size
    layer = layer_ref[0]
    seq_len = seq_lens_ref[b]
    q_start = q_start_ref[b]

    first_token = q_start + q_block * blocking.tokens_per_block
    last_visible = jnp.minimum(seq_len, first_token + blocking.tokens_per_block)  # exclusive
    # lax.div, not //: the operands are non-negative and floor division lowers to sign logic.
    blocks_hi = jax.lax.div(last_visible + keys_per_block - 1, keys_per_block)
    blocks_lo = jnp.int32(0)
    if sliding_window is not None:
        blocks_lo = jax.lax.div(jnp.maximum(first_token - sliding_window + 1, 0), keys_per_block)
    active = (block >= blocks_lo) & (block < blocks_hi)

    def page_copies(kv_block, slot):
        copies = []
        for p in range(pages_per_block):
            page = page_table_ref[b * pages_per_row + kv_block * pages_per_block + p]
            for which, (hbm, buf) in enumerate(((k_hbm, k_buf), (v_hbm, v_buf))):
                copies.append(
                    pltpu.make_async_copy(
                        hbm.at[layer, kv_head, page],
                        buf.at[slot, pl.ds(p * rows_per_page, rows_per_page)],
                        sems.at[which, slot],
                    )
                )
        return copies

    @pl.when(block == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        max_ref[...] = jnp.full_like(max_ref, -jnp.inf)
        sum_ref[...] = jnp.zeros_like(sum_ref)

    @pl.when(active & (block == blocks_lo))
    def _fetch_first():
        for copy in page_copies(block, jax.lax.rem(block, 2)):
            copy.start()

    @pl.when(active & (block + 1 < blocks_hi))
    def _prefetch_next():
        for copy in page_copies(block + 1, jax.lax.rem(block + 1, 2)):
            copy.start()

    @pl.when(active)
    def _compute():
        slot = jax.lax.rem(block, 2)
        for copy in page_copies(block, slot):
            copy.wait()
        k_rows = k_buf[slot]  # [keys_per_block / pack, pack * head_dim]
        v_rows = v_buf[slot]
        q = q_ref[...]
        # Lane slice i of the packed rows holds the keys i, i + pack, i + 2 pack, ... of the block (at 96 or 192 a
        # slice straddles 128-lane vregs and Mosaic realigns it: work on the visible block only, unlike a relayout of
        # the whole HBM cache; not yet timed on a chip).
        ks = [k_rows[:, i * head_dim:(i + 1) * head_dim] for i in range(pack)]
        vs = [v_rows[:, i * head_dim:(i + 1) * head_dim] for i in range(pack)]
        logits = []
        for i in range(pack):
            part = jax.lax.dot_general(q, ks[i], _NT_DIMS, preferred_element_type=jnp.float32) * scale
            part = apply_soft_cap(part, soft_cap)
            shape = part.shape
            row_token = jnp.broadcast_to(row_token_ref[...], shape)
            token = q_block * blocking.tokens_per_block + row_token
            in_tile = (row_token >= 0) & (token < blocking.q_len)
            query_pos = jnp.where(in_tile, q_start + token, -1)  # padding rows see nothing
            key_pos = block * keys_per_block + pack * jax.lax.broadcasted_iota(jnp.int32, shape, 1) + i
            visible = key_visibility_mask(query_pos, key_pos, seq_len, sliding_window)
            logits.append(jnp.where(visible, part, -jnp.inf))
        prev_max = max_ref[...]
        new_max = prev_max
        for part in logits:
            new_max = jnp.maximum(new_max, jnp.max(part, axis=1, keepdims=True))
        # Rows with no visible key so far keep max -inf; use 0 so exp() gives 0, not NaN.
        safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)
        correction = jnp.exp(prev_max - safe_max)
        total = sum_ref[...] * correction
        acc = acc_ref[...] * correction
        for part, v in zip(logits, vs):
            probs = jnp.exp(part - safe_max)
            total = total + jnp.sum(probs, axis=1, keepdims=True)
            acc = acc + jnp.dot(probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
        sum_ref[...] = total
        max_ref[...] = new_max
        acc_ref[...] = acc

    @pl.when(block == num_blocks - 1)
    def _finalize():
        total = sum_ref[...]
        has_keys = total > 0
        out = acc_ref[...] / jnp.where(has_keys, total, 1.0)
        o_ref[...] = jnp.where(has_keys, out, 0.0).astype(o_ref.dtype)


@functools.partial(
    jax.jit,
    static_argnames=("scale", "soft_cap", "sliding_window", "config", "interpret"),
)
def paged_attention_tpu(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array | int,
    page_table: jax.Array,
    seq_lens: jax.Array,
    q_start: jax.Array,
    *,
    scale: float,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    config: TpuKernelConfig = TpuKernelConfig(),
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """Paged attention (contract of docs/architecture.md) with the Mosaic TPU Pallas kernel.

    `interpret=True` runs Pallas' TPU interpret mode (DMAs, semaphores and SMEM simulated on CPU;
    DMAs land only when waited on, so a missing wait reads poisoned memory); pass
    `pltpu.InterpretParams(...)` for its options (e.g. race detection over several cores).
    """
    batch, q_len, num_heads, head_dim = q.shape
    pack = packing_of(k_cache.shape, head_dim)
    logical = jax.ShapeDtypeStruct(unpacked_shape(k_cache.shape, head_dim), k_cache.dtype)
    validate_paged_attention_args(
        q, logical, jax.ShapeDtypeStruct(unpacked_shape(v_cache.shape, head_dim), v_cache.dtype), page_table,
        seq_lens, q_start, soft_cap=soft_cap, sliding_window=sliding_window
    )
    _, num_kv_heads, _, page_size, _ = logical.shape
    rows_per_page = page_size // pack
    ok, reason = tpu_support(head_dim=head_dim, page_size=page_size, dtype=k_cache.dtype)
    if not ok:
        raise ValueError(f"paged_attention_tpu: {reason}")
    sublanes = 8 if k_cache.dtype == jnp.float32 else 16
    blocking = choose_query_blocking(
        q_len=q_len, group=num_heads // num_kv_heads, target_rows=1 if q_len == 1 else config.target_rows,
        min_rows=sublanes, power_of_two_rows=False,
    )
    pages_per_row = page_table.shape[1]
    keys_wanted = keys_per_block_for(config, page_size, head_dim, jnp.dtype(k_cache.dtype).itemsize)
    pages_per_block = max(1, min(keys_wanted // page_size, pages_per_row))
    kv_blocks = -(-pages_per_row // pages_per_block)
    padded_width = kv_blocks * pages_per_block
    page_table = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, padded_width - pages_per_row)))
    rows = blocking.rows_per_block
    keys_per_block = pages_per_block * page_size
    packed_q = pack_queries(q.astype(k_cache.dtype), num_kv_heads, blocking)

    q_spec = pl.BlockSpec((None, None, rows, head_dim), lambda b, h, i, j, *_: (b, h, i, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(batch, num_kv_heads, blocking.num_q_blocks, kv_blocks),
        in_specs=[
            pl.BlockSpec((rows, 1), lambda *_: (0, 0)),
            q_spec,
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=q_spec,
        scratch_shapes=[
            pltpu.VMEM((2, pages_per_block * rows_per_page, pack * head_dim), k_cache.dtype),
            pltpu.VMEM((2, pages_per_block * rows_per_page, pack * head_dim), v_cache.dtype),
            pltpu.SemaphoreType.DMA((2, 2)),
            pltpu.VMEM((rows, head_dim), jnp.float32),
            pltpu.VMEM((rows, 1), jnp.float32),
            pltpu.VMEM((rows, 1), jnp.float32),
        ],
    )
    kernel = functools.partial(
        _attention_kernel,
        blocking=blocking,
        pages_per_block=pages_per_block,
        pages_per_row=padded_width,
        scale=float(scale),
        soft_cap=None if soft_cap is None else float(soft_cap),
        sliding_window=None if sliding_window is None else int(sliding_window),
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(packed_q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=interpret if isinstance(interpret, pltpu.InterpretParams) else (
            pltpu.InterpretParams() if interpret else False),
        name=f"jaxserve_paged_attention_rows{rows}_pages{pages_per_block}",
        cost_estimate=_cost_estimate(batch, num_kv_heads, blocking, kv_blocks, keys_per_block, head_dim,
                                     jnp.dtype(q.dtype).itemsize, jnp.dtype(k_cache.dtype).itemsize),
    )(
        jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)),
        page_table.reshape(-1),
        seq_lens.astype(jnp.int32),
        q_start.astype(jnp.int32),
        jnp.asarray(_row_token_offsets(blocking)),
        packed_q,
        k_cache,
        v_cache,
    )
    return unpack_outputs(out, blocking)


__all__ = ["TpuKernelConfig", "keys_per_block_for", "paged_attention_tpu", "tpu_support"]
