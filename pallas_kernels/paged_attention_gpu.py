"""Ragged paged attention for CUDA GPUs (Pallas, Triton lowering): decode, extend and prefill.

One kernel covers every batch shape of the contract: a program owns one (row, KV head, query
block[, KV split]) and walks that row's page table in blocks of `pages_per_block` pages, gathering
K/V pages straight from the stacked cache `[L, KV, P, S, D]` with pointer arithmetic and keeping an
online softmax in registers. Decode is the `q_len == 1` case (all query heads of the KV head as one
tile); for small decode batches the KV axis is split across programs and the partial softmaxes are
merged in XLA (flash-decoding), so the GPU is filled even at batch 8.

Why the Triton lowering and not Mosaic GPU: the gather is the heart of paged attention, and Triton
expresses it as one vector load through the page table; Mosaic GPU is built around TMA bulk copies
and warpgroup matmuls on Hopper+, where every scattered page would be its own async copy and
barrier, and it does not run on Ampere. The Triton lowering runs on A100/H100/H200, is what jax's own
`pallas.ops.gpu.paged_attention` (our baseline) uses, and runs unchanged in Pallas' generic interpret
mode on CPU, which is how CI tests it. It is deprecated in favour of Mosaic GPU; when it is removed
this module is the one to port.

Offsets into the stacked cache switch to 64-bit automatically in the Triton lowering once the array
exceeds 4 GiB, so large caches are safe.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.query_layout import (
    QueryBlocking,
    choose_query_blocking,
    pack_queries,
    row_query_positions,
    unpack_outputs,
)
from pallas_kernels.reference import apply_soft_cap, key_visibility_mask, validate_paged_attention_args

# Programs needed to keep a large GPU busy (H100: 132 SMs, about two resident programs each).
_TARGET_PROGRAMS = 264
_MAX_KV_SPLITS = 16


@dataclass(frozen=True)
class GpuKernelConfig:
    """Tuning knobs (static); the defaults suit Llama-class head_dim 128 in bf16."""

    # K/V positions loaded per loop step (a whole number of pages). None: 128, halved until the pipelined K/V
    # tiles fit `SHARED_MEMORY_BUDGET`; an explicit value is used as given (the compiler rejects one over the
    # chip's shared memory per block).
    keys_per_block: int | None = None
    target_rows: int = 64  # query rows per tile for prefill/extend
    num_warps: int = 4
    num_stages: int = 2
    num_kv_splits: int | None = None  # None: choose from the grid size (decode only)


# Shared memory for the K and V tiles of all pipeline stages: below the opt-in limit per block of A100
# (163 KiB), H100 and H200 (227 KiB), leaving room for Triton's own scratch.
SHARED_MEMORY_BUDGET = 128 * 1024
DEFAULT_KEYS_PER_BLOCK = 128


def keys_per_block_for(config: GpuKernelConfig, head_dim: int, itemsize: int) -> int:
    """The K/V positions per loop step: the explicit value, or the default within `SHARED_MEMORY_BUDGET`."""
    if config.keys_per_block is not None:
        return config.keys_per_block
    keys = DEFAULT_KEYS_PER_BLOCK
    while keys > 16 and 2 * config.num_stages * keys * head_dim * itemsize > SHARED_MEMORY_BUDGET:
        keys //= 2
    return keys


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def gpu_support(*, head_dim: int, page_size: int, dtype: jnp.dtype, config: GpuKernelConfig = GpuKernelConfig()) -> tuple[bool, str]:
    """Whether the Triton kernel handles these shapes; the reason when it does not."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return False, f"dtype {jnp.dtype(dtype)} not supported (float32, bfloat16, float16)"
    if not _is_power_of_two(head_dim) or head_dim < 16:
        return False, f"head_dim {head_dim} must be a power of two >= 16 (Triton tile sizes)"
    if not _is_power_of_two(page_size):
        return False, f"page_size {page_size} must be a power of two (Triton tile sizes)"
    if head_dim > 256:
        return False, f"head_dim {head_dim} > 256 does not fit the register tile"
    return True, "ok"


def _kv_split_count(config: GpuKernelConfig, programs: int, kv_blocks: int, q_len: int) -> int:
    if config.num_kv_splits is not None:
        return max(1, min(config.num_kv_splits, kv_blocks))
    if q_len > 1 or programs >= _TARGET_PROGRAMS:
        return 1
    # Each split should still own at least two KV blocks, or the merge costs more than it buys.
    return max(1, min(_MAX_KV_SPLITS, -(-_TARGET_PROGRAMS // programs), kv_blocks // 2))


def _attention_kernel(
    layer_ref,  # [1] int32
    seq_lens_ref,  # [B] int32
    q_start_ref,  # [B] int32
    page_table_ref,  # [pages_per_row_padded] int32: this row's table
    q_ref,  # [rows, D]
    k_ref,  # [L, KV, P, S, D]: the whole stacked cache, gathered through the page table
    v_ref,
    *out_refs,  # [poison buffer (aliased to o),] o [rows, D][, m, l: [rows] float32 when split]
    blocking: QueryBlocking,
    pages_per_block: int,
    num_kv_splits: int,
    scale: float,
    soft_cap: float | None,
    sliding_window: int | None,
    precision: jax.lax.Precision,
    poison_output: bool,
):
    if poison_output:
        out_refs = out_refs[1:]  # the aliased input is the same buffer as o_ref
    o_ref, *split_refs = out_refs
    b, kv_head, q_block, split = (pl.program_id(i) for i in range(4))
    page_size, head_dim = k_ref.shape[-2], k_ref.shape[-1]
    keys_per_block = pages_per_block * page_size
    rows = blocking.rows_per_block
    layer = layer_ref[0]
    seq_len = seq_lens_ref[b]
    q_start = q_start_ref[b]

    row_ids = jnp.arange(rows, dtype=jnp.int32)
    query_pos, in_tile = row_query_positions(row_ids, q_block, q_start, blocking)
    query_pos = jnp.where(in_tile, query_pos, -1)  # padding rows see nothing

    # KV blocks this query block can see: up to its last query (causal, and < seq_len) and, with a
    # sliding window, from its first query's window start.
    first_token = q_start + q_block * blocking.tokens_per_block
    last_visible = jnp.minimum(seq_len, first_token + blocking.tokens_per_block)  # exclusive
    blocks_hi = jax.lax.div(last_visible + keys_per_block - 1, keys_per_block)
    blocks_lo = jnp.int32(0)
    if sliding_window is not None:
        blocks_lo = jax.lax.div(jnp.maximum(first_token - sliding_window + 1, 0), keys_per_block)
    blocks_hi = jnp.maximum(blocks_hi, blocks_lo)
    per_split = jax.lax.div(blocks_hi - blocks_lo + num_kv_splits - 1, jnp.int32(num_kv_splits))
    split_lo = jnp.minimum(blocks_lo + split * per_split, blocks_hi)
    split_hi = jnp.minimum(split_lo + per_split, blocks_hi)

    q = q_ref[...]

    def body(block, carry):
        acc, row_max, row_sum = carry
        pages = page_table_ref[pl.ds(block * pages_per_block, pages_per_block)]
        k = k_ref[layer, kv_head, pages].reshape(keys_per_block, head_dim)
        v = v_ref[layer, kv_head, pages].reshape(keys_per_block, head_dim)
        logits = jnp.dot(q, k.T, precision=precision, preferred_element_type=jnp.float32) * scale
        logits = apply_soft_cap(logits, soft_cap)
        key_pos = block * keys_per_block + jnp.arange(keys_per_block, dtype=jnp.int32)
        visible = key_visibility_mask(query_pos[:, None], key_pos[None, :], seq_len, sliding_window)
        logits = jnp.where(visible, logits, -jnp.inf)
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
        # A row that has seen no visible key yet keeps max -inf; use 0 so exp() gives 0, not NaN.
        safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)
        correction = jnp.exp(row_max - safe_max)
        probs = jnp.exp(logits - safe_max[:, None])
        acc = acc * correction[:, None] + jnp.dot(
            probs.astype(v.dtype), v, precision=precision, preferred_element_type=jnp.float32
        )
        return acc, new_max, row_sum * correction + jnp.sum(probs, axis=1)

    init = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, row_max, row_sum = jax.lax.fori_loop(split_lo, split_hi, body, init)
    has_keys = row_sum > 0
    out = acc / jnp.where(has_keys, row_sum, 1.0)[:, None]
    o_ref[...] = jnp.where(has_keys[:, None], out, 0.0).astype(o_ref.dtype)
    if split_refs:
        m_ref, l_ref = split_refs
        m_ref[...] = row_max
        l_ref[...] = row_sum


def _merge_splits(out: jax.Array, row_max: jax.Array, row_sum: jax.Array) -> jax.Array:
    """Combine per-split normalised outputs `[S, ..., D]` weighted by their softmax mass."""
    total_max = jnp.max(row_max, axis=0)
    total_max = jnp.where(total_max == -jnp.inf, 0.0, total_max)
    weight = row_sum * jnp.exp(row_max - total_max[None])  # [S, ...]
    denom = jnp.sum(weight, axis=0)
    merged = jnp.sum(out * weight[..., None], axis=0) / jnp.where(denom > 0, denom, 1.0)[..., None]
    return jnp.where(denom[..., None] > 0, merged, 0.0)


@functools.partial(
    jax.jit,
    static_argnames=("scale", "soft_cap", "sliding_window", "config", "interpret", "poison_output"),
)
def paged_attention_gpu(
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
    config: GpuKernelConfig = GpuKernelConfig(),
    interpret: bool = False,
    poison_output: bool = False,
) -> jax.Array:
    """Paged attention (contract of docs/architecture.md) with the Triton-lowered Pallas kernel.

    `poison_output=True` (tests) hands the kernel a NaN-filled output buffer, so an element the
    kernel forgets to write shows up as NaN on a real GPU too (the interpreter poisons by itself).
    """
    validate_paged_attention_args(
        q, k_cache, v_cache, page_table, seq_lens, q_start, soft_cap=soft_cap, sliding_window=sliding_window
    )
    batch, q_len, num_heads, head_dim = q.shape
    _, num_kv_heads, _, page_size, _ = k_cache.shape
    ok, reason = gpu_support(head_dim=head_dim, page_size=page_size, dtype=k_cache.dtype, config=config)
    if not ok:
        raise ValueError(f"paged_attention_gpu: {reason}")
    group = num_heads // num_kv_heads
    blocking = choose_query_blocking(
        q_len=q_len, group=group, target_rows=1 if q_len == 1 else config.target_rows,
        min_rows=16, power_of_two_rows=True,
    )
    pages_per_row = page_table.shape[1]
    # Triton's dot needs every tile dimension >= 16, so a block holds at least 16 keys.
    min_pages = max(1, 16 // page_size)
    keys_wanted = keys_per_block_for(config, head_dim, jnp.dtype(k_cache.dtype).itemsize)
    pages_per_block = max(min_pages, min(keys_wanted // page_size, _next_pow2(pages_per_row)))
    kv_blocks = -(-pages_per_row // pages_per_block)
    # Pad the table with the null page so the last block's gather stays in bounds.
    page_table = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, kv_blocks * pages_per_block - pages_per_row)))
    splits = _kv_split_count(config, batch * num_kv_heads * blocking.num_q_blocks, kv_blocks, q_len)

    rows = blocking.rows_per_block
    packed_q = pack_queries(q.astype(k_cache.dtype), num_kv_heads, blocking)
    grid = (batch, num_kv_heads, blocking.num_q_blocks, splits)
    whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
    in_specs = [
        whole((1,)),
        whole((batch,)),
        whole((batch,)),
        pl.BlockSpec((None, page_table.shape[1]), lambda b, h, i, s: (b, 0)),
        pl.BlockSpec((None, None, rows, head_dim), lambda b, h, i, s: (b, h, i, 0)),
        whole(k_cache.shape),
        whole(v_cache.shape),
    ]
    out_dtype = jnp.float32 if splits > 1 else q.dtype
    out_shape = [jax.ShapeDtypeStruct((splits, *packed_q.shape), out_dtype)]
    out_specs = [pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, i, s: (s, b, h, i, 0))]
    if splits > 1:
        stat_shape = jax.ShapeDtypeStruct((splits, *packed_q.shape[:-1]), jnp.float32)
        stat_spec = pl.BlockSpec((None, None, None, rows), lambda b, h, i, s: (s, b, h, i))
        out_shape += [stat_shape, stat_shape]
        out_specs += [stat_spec, stat_spec]
    if poison_output:
        in_specs.append(out_specs[0])

    kernel = functools.partial(
        _attention_kernel,
        blocking=blocking,
        pages_per_block=pages_per_block,
        num_kv_splits=splits,
        scale=float(scale),
        soft_cap=None if soft_cap is None else float(soft_cap),
        sliding_window=None if sliding_window is None else int(sliding_window),
        precision=jax.lax.Precision.HIGHEST if k_cache.dtype == jnp.float32 else jax.lax.Precision.DEFAULT,
        poison_output=poison_output,
    )
    from jax.experimental.pallas import triton as plgpu  # deferred: only the GPU path needs it

    results = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name=f"jaxserve_paged_attention_rows{rows}_pages{pages_per_block}_splits{splits}",
        input_output_aliases={7: 0} if poison_output else {},
        cost_estimate=pl.CostEstimate(  # every page-table slot visible: the compiled program's upper bound
            flops=int(4 * batch * num_kv_heads * blocking.num_q_blocks * rows * page_table.shape[1] * page_size * head_dim),
            transcendentals=int(batch * num_kv_heads * blocking.num_q_blocks * rows * page_table.shape[1] * page_size),
            bytes_accessed=int(2 * packed_q.size * packed_q.dtype.itemsize + 2 * batch * num_kv_heads
                               * blocking.num_q_blocks * page_table.shape[1] * page_size * head_dim
                               * jnp.dtype(k_cache.dtype).itemsize),
        ),
    )(
        jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)),
        seq_lens.astype(jnp.int32),
        q_start.astype(jnp.int32),
        page_table,
        packed_q,
        k_cache,
        v_cache,
        *([jnp.full(out_shape[0].shape, jnp.nan, out_dtype)] if poison_output else []),
    )
    if splits > 1:
        out = _merge_splits(*results)
    else:
        out = results[0][0]
    return unpack_outputs(out.astype(q.dtype), blocking)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


__all__ = ["GpuKernelConfig", "gpu_support", "keys_per_block_for", "paged_attention_gpu"]
