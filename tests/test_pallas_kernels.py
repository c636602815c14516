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
from pallas_kernels.reference import paged_attention_reference
from pallas_kernels.testing import make_problem, max_relative_error, query_validity

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _edge_lens(page_size: int) -> list[int]:
    return [1, page_size - 1, page_size, page_size + 1]


# (id, seq_lens, q_lens, heads, kv_heads, head_dim, page_size, dtype, soft_cap, window)
GPU_CASES = [
    ("decode-g1-d64-p16-edges", _edge_lens(16), [1] * 4, 4, 4, 64, 16, jnp.float32, None, None),
    ("decode-g3-d128-p32-edges-bf16", _edge_lens(32), [1] * 4, 6, 2, 128, 32, jnp.bfloat16, None, None),
    ("decode-g4-d128-p16-long-ragged", [300, 3, 77, 129, 0], [1, 1, 1, 1, 0], 8, 2, 128, 16, jnp.float32, None, None),
    ("decode-g8-d64-p32-softcap-bf16", [64, 65, 200], [1, 1, 1], 8, 1, 64, 32, jnp.bfloat16, 25.0, None),
    ("extend-g4-d64-p16-ragged", [40, 17, 5, 0], [9, 1, 5, 0], 8, 2, 64, 16, jnp.float32, None, None),
    ("prefill-g3-d128-p32-window-bf16", [70, 33], [70, 20], 6, 2, 128, 32, jnp.bfloat16, None, 19),
]

TPU_CASES = [
    ("decode-g1-d128-p64-edges", _edge_lens(64), [1] * 4, 2, 2, 128, 64, jnp.float32, None, None),
    ("decode-g4-d64-p16-edges-bf16", _edge_lens(16), [1] * 4, 8, 2, 64, 16, jnp.bfloat16, None, None),
    ("decode-g8-d128-p32-long-ragged", [260, 31, 0, 97], [1, 1, 0, 1], 8, 1, 128, 32, jnp.float32, 30.0, None),
    ("extend-g3-d64-p64-ragged-window-bf16", [150, 64, 9], [40, 1, 9], 6, 2, 64, 64, jnp.bfloat16, None, 50),
]


def _check(kernel, case, seed: int, **kernel_kwargs) -> None:
    _, seq_lens, q_lens, heads, kv_heads, head_dim, page_size, dtype, soft_cap, window = case
    problem = make_problem(
        np.random.default_rng(seed), seq_lens=seq_lens, q_lens=q_lens, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, page_size=page_size, dtype=dtype,
        pages_per_row=-(-max(seq_lens) // page_size) + 1,  # one extra null slot per row
    )
    options = dict(scale=head_dim ** -0.5, soft_cap=soft_cap, sliding_window=window)
    expected = np.asarray(paged_attention_reference(*problem.args(), **options), np.float32)
    actual = np.asarray(kernel(*problem.args(), **options, interpret=True, **kernel_kwargs), np.float32)
    valid = query_validity(problem)
    error = max_relative_error(actual, expected, valid)
    assert error < TOLERANCE[dtype], f"relative error {error}"
    assert np.all(actual[~valid] == 0), "padding query slots must be zeros"


@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_kernel_matches_reference(case):
    _check(paged_attention_gpu, case, seed=zlib.crc32(case[0].encode()), poison_output=True)


def test_gpu_kernel_split_kv_matches_reference():
    case = ("split", [300, 45, 0, 129], [1, 1, 0, 1], 8, 2, 64, 16, jnp.float32, None, None)
    _check(paged_attention_gpu, case, seed=7, config=GpuKernelConfig(keys_per_block=32, num_kv_splits=4))


@pytest.mark.parametrize("case", TPU_CASES, ids=[c[0] for c in TPU_CASES])
def test_tpu_kernel_matches_reference(case):
    config = TpuKernelConfig(keys_per_block=128, target_rows=32)  # several KV and query blocks per row
    _check(paged_attention_tpu, case, seed=zlib.crc32(case[0].encode()), config=config)


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
