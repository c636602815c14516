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
