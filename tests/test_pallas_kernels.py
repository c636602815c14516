"""Pallas paged-attention kernels (GPU/Triton and TPU/Mosaic) in interpret mode against the reference.

Each case draws fresh random caches with shuffled page tables (junk in the null page and in unused
pages) and compares every real query token with the pure-JAX reference; padding query slots must be
exactly zero. Both interpreters fill output buffers with NaN before the kernel runs
(`test_interpreters_poison_unwritten_outputs` pins that down), and the GPU kernel is additionally
run with an explicit NaN-filled output buffer, so an element the kernel forgets to write fails.

Interpret mode is slow on 2 cores, so the grid is sampled: every page size, GQA ratio, head_dim and
the edge lengths (1, page_size-1, page_size, page_size+1) appear, plus long ragged mixes, an empty
row, soft-cap, sliding window and a forced KV split.
"""
from __future__ import annotations

import zlib
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.paged_attention_gpu import GpuKernelConfig, paged_attention_gpu
from pallas_kernels.paged_attention_tpu import TpuKernelConfig, paged_attention_tpu
from pallas_kernels.testing import GPU_CASES, TPU_CASES, KernelCase, check_kernel, make_problem


def _assert_passes(kernel, case: KernelCase, **kwargs) -> None:
    result = check_kernel(kernel, case, seed=zlib.crc32(case.name.encode()), interpret=True, **kwargs)
    assert result.relative_error < result.tolerance, f"relative error {result.relative_error}"
    assert result.padding_is_zero, "padding query slots must be zeros"


@pytest.mark.parametrize("case", GPU_CASES, ids=[c.name for c in GPU_CASES])
def test_gpu_kernel_matches_reference(case):
    _assert_passes(paged_attention_gpu, case, poison_output=True)


def test_gpu_kernel_split_kv_matches_reference():
    case = KernelCase("split-kv", (300, 45, 0, 129), (1, 1, 0, 1), 8, 2, 64, 16)
    _assert_passes(paged_attention_gpu, case, poison_output=True, config=GpuKernelConfig(keys_per_block=32, num_kv_splits=4))


@pytest.mark.parametrize("case", TPU_CASES, ids=[c.name for c in TPU_CASES])
def test_tpu_kernel_matches_reference(case):
    config = TpuKernelConfig(keys_per_block=128, target_rows=32)  # several KV and query blocks per row
    _assert_passes(paged_attention_tpu, case, config=config)


def test_interpreters_poison_unwritten_outputs():
    """The NaN-poisoning the kernel tests rely on: an output a kernel never writes reads back NaN."""

    def writes_nothing(x_ref, o_ref):
        del x_ref, o_ref

    x = jnp.ones((8, 128), jnp.float32)
    for interpret in (True, pltpu.InterpretParams()):
        out = pl.pallas_call(writes_nothing, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=interpret)(x)
        assert np.all(np.isnan(np.asarray(out)))


def test_kernels_reject_unsupported_shapes():
    problem = make_problem(
        np.random.default_rng(3), seq_lens=[5], q_lens=[1], num_heads=2, num_kv_heads=1, head_dim=48, page_size=12
    )
    with pytest.raises(ValueError, match="head_dim 48"):
        paged_attention_gpu(*problem.args(), scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="page_size 12"):
        paged_attention_tpu(*problem.args(), scale=1.0, interpret=True)


@pytest.mark.parametrize("head_dim,q_len,window", [
    (64, 1, None), (64, 20, None), (64, 20, 7),  # 2 tokens per 128-lane row
    (96, 1, None), (96, 20, 7),  # 4 tokens per 384-lane row
    (192, 20, None),  # 2 tokens per 384-lane row
])
def test_tpu_kernel_reads_the_packed_cache(head_dim, q_len, window):
    """The packed layout of kv_cache.cache_shape (TPU, head_dim % 128 != 0: rows of lcm(head_dim, 128) lanes):
    the TPU kernel (interpreted) reads it directly, the dispatcher and PagedCacheOps hand other backends the plain
    view, and write_kv puts each token where the plain layout's write would."""
    from jaxserve.engine.attention import PagedCacheOps, PagedMeta, write_kv
    from jaxserve.engine.kv_cache import PagedKVCache, tokens_per_row
    from pallas_kernels import paged_attention
    from pallas_kernels.reference import paged_attention_reference
    from pallas_kernels.testing import packed_cache

    rng = np.random.default_rng(head_dim)
    L, KV, P, S, D, H, B = 2, 3, 12, 16, head_dim, 9, 2
    k, v = (jnp.asarray(rng.standard_normal((L, KV, P, S, D)), jnp.float32) for _ in range(2))
    pk, pv = packed_cache(k), packed_cache(v)
    assert pk.shape[3] == S // tokens_per_row(D, S, "tpu") and pk.shape[4] % 128 == 0  # the engine's TPU layout
    q = jnp.asarray(rng.standard_normal((B, q_len, H, D)), jnp.float32)
    page_table = jnp.asarray([[1, 3, 5, 7], [2, 4, 6, 8]], jnp.int32)
    seq_lens = jnp.asarray([40, 55], jnp.int32)
    args = (1, page_table, seq_lens, seq_lens - q_len)
    opts = dict(scale=D**-0.5, sliding_window=window)
    want = paged_attention_reference(q, k, v, *args, **opts)
    np.testing.assert_allclose(paged_attention_tpu(q, pk, pv, *args, **opts, interpret=True), want, atol=1e-5)
    np.testing.assert_allclose(paged_attention(q, pk, pv, *args, **opts, impl="reference"), want, atol=1e-6)

    new = jnp.asarray(rng.standard_normal((B, q_len, KV, D)), jnp.float32)
    slots = rng.permutation(np.arange(16, P * S))[: B * q_len].reshape(B, q_len)  # distinct, off the null page
    slot_page, slot_offset = jnp.asarray(slots // S, jnp.int32), jnp.asarray(slots % S, jnp.int32)
    plain = k.at[1, :, slot_page, slot_offset].set(new)
    assert bool(jnp.all(write_kv(k, new, 1, slot_page, slot_offset) == plain))
    assert bool(jnp.all(write_kv(pk, new, 1, slot_page, slot_offset).reshape(k.shape) == plain))

    meta = PagedMeta(page_table, seq_lens, seq_lens - q_len, slot_page, slot_offset)
    ops = PagedCacheOps(paged_attention_reference, D**-0.5, window)  # reads the plain layout only
    out_plain, cache_plain = ops.update_and_attend(q, new, new, PagedKVCache(k, v), 1, meta)
    out_packed, cache_packed = ops.update_and_attend(q, new, new, PagedKVCache(pk, pv), 1, meta)
    np.testing.assert_allclose(out_packed, out_plain, atol=1e-6)
    assert cache_packed.k.shape == pk.shape
    assert bool(jnp.all(cache_packed.k.reshape(k.shape) == cache_plain.k))
    # The kernel through PagedCacheOps on the packed cache it was handed (the engine's TPU path).
    ops_tpu = PagedCacheOps(partial(paged_attention_tpu, interpret=True), D**-0.5, window)
    out_kernel, _ = ops_tpu.update_and_attend(q, new, new, PagedKVCache(pk, pv), 1, meta)
    np.testing.assert_allclose(out_kernel, out_plain, atol=1e-5)


def test_cache_shape_packs_whole_128_lane_rows_on_tpu_only():
    from jaxserve.config import ModelConfig
    from jaxserve.engine.kv_cache import cache_shape
    from jaxserve.models.testing import tiny_hf_config

    cfg = ModelConfig.from_hf_config(tiny_hf_config("llama"))

    def shape(head_dim: int, platform: str, page_size: int = 16) -> tuple[int, ...]:
        return cache_shape(cfg.replace(head_dim=head_dim), 5, page_size, platform)[3:]

    assert [shape(d, "tpu") for d in (64, 96, 128, 192, 256)] == [(8, 128), (4, 384), (16, 128), (8, 384), (16, 256)]
    assert shape(80, "tpu") == (2, 640)  # 8 tokens per row: lcm(80, 128) = 640
    assert shape(40, "tpu") == (16, 40)  # not a multiple of 16: the reference runs on the plain layout
    assert [shape(d, p) for d in (64, 96, 192) for p in ("cpu", "gpu")] == [(16, d) for d in (64, 96, 192) for _ in "ab"]
