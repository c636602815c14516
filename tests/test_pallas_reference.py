"""The CPU paged attention implementations (the pure-JAX reference, the XLA:CPU-tuned formulation and the C++
kernel) against a naive float64 NumPy attention."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.reference import paged_attention_reference
from pallas_kernels.xla_attention import paged_attention_xla
from pallas_kernels.testing import make_problem, max_relative_error, naive_dense_attention, query_validity



@pytest.fixture(scope="module", autouse=True)
def cpu_kernel() -> str | None:
    """Builds and registers the C++ kernel (outside any trace); the reason when it cannot be (no g++)."""
    from jaxserve.config import cache_dir
    from pallas_kernels import paged_attention_cpu as cpu

    try:
        cpu.load_kernel(cache_dir() / "kernels")
    except cpu.KernelUnavailable as e:
        return str(e)
    return None


def paged_attention_cpu(*args, **options):
    """The C++ kernel for XLA:CPU (registered by the `cpu_kernel` fixture)."""
    from pallas_kernels import paged_attention_cpu as cpu

    return cpu.paged_attention_cpu(*args, **options)


IMPLS = [pytest.param(paged_attention_reference, id="reference"), pytest.param(paged_attention_xla, id="xla"),
         pytest.param(paged_attention_cpu, id="cpu")]

CASES = [
    # (seq_lens, q_lens, heads, kv_heads, head_dim, page_size, soft_cap, window)
    pytest.param([1, 15, 16, 17], [1, 1, 1, 1], 8, 8, 64, 16, None, None, id="decode-mha-edges"),
    pytest.param([31, 32, 33, 70], [1, 1, 1, 1], 24, 8, 64, 32, None, None, id="decode-gqa3"),
    pytest.param([5, 40, 17], [5, 9, 1], 8, 2, 128, 16, None, None, id="extend-gqa4-ragged"),
    pytest.param([50, 3], [20, 3], 8, 1, 64, 16, 30.0, None, id="prefill-gqa8-softcap"),
    pytest.param([45, 20, 9], [12, 1, 4], 4, 4, 64, 16, None, 7, id="extend-sliding-window"),
]


@pytest.mark.parametrize("attention", IMPLS)
@pytest.mark.parametrize("seq_lens,q_lens,heads,kv_heads,head_dim,page_size,soft_cap,window", CASES)
def test_matches_naive_attention(cpu_kernel, attention, seq_lens, q_lens, heads, kv_heads, head_dim, page_size, soft_cap, window):
    if attention is paged_attention_cpu and cpu_kernel:
        pytest.skip(cpu_kernel)
    rng = np.random.default_rng(sum(seq_lens) + heads)
    problem = make_problem(
        rng, seq_lens=seq_lens, q_lens=q_lens, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, page_size=page_size, pages_per_row=8,
    )
    scale = head_dim ** -0.5
    expected = naive_dense_attention(problem, scale=scale, soft_cap=soft_cap, sliding_window=window)
    out = jax.jit(
        lambda *a: attention(*a, scale=scale, soft_cap=soft_cap, sliding_window=window)
    )(*problem.args())
    out = np.asarray(out)
    valid = query_validity(problem)
    assert max_relative_error(out, expected, valid) < 1e-5
    # Padding queries come back as exact zeros, not NaN.
    assert np.all(out[~valid] == 0)


@pytest.mark.parametrize("attention", IMPLS)
def test_all_padding_row_and_bfloat16(cpu_kernel, attention):
    if attention is paged_attention_cpu and cpu_kernel:
        pytest.skip(cpu_kernel)
    rng = np.random.default_rng(0)
    problem = make_problem(
        rng, seq_lens=[0, 33], q_lens=[0, 2], num_heads=8, num_kv_heads=2, head_dim=64, page_size=16,
        dtype=jnp.bfloat16,
    )
    out = np.asarray(attention(*problem.args(), scale=0.125), np.float32)
    expected = naive_dense_attention(problem, scale=0.125)
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    assert np.all(out[0] == 0)
    assert max_relative_error(out, expected, query_validity(problem)) < 2e-2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(soft_cap=0.0), "soft_cap"),
        (dict(sliding_window=0), "sliding_window"),
    ],
)
@pytest.mark.parametrize("attention", IMPLS)
def test_rejects_bad_options(attention, kwargs, match):
    problem = make_problem(
        np.random.default_rng(1), seq_lens=[3], q_lens=[1], num_heads=2, num_kv_heads=1, head_dim=8, page_size=4
    )
    with pytest.raises(ValueError, match=match):
        attention(*problem.args(), scale=1.0, **kwargs)


@pytest.mark.parametrize("attention", IMPLS)
def test_rejects_bad_head_ratio(attention):
    problem = make_problem(
        np.random.default_rng(2), seq_lens=[3], q_lens=[1], num_heads=3, num_kv_heads=2, head_dim=8, page_size=4
    )
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        attention(*problem.args(), scale=1.0)


@pytest.mark.parametrize("attention", [pytest.param(paged_attention_xla, id="xla"),
                                       pytest.param(paged_attention_cpu, id="cpu")])
def test_equals_reference_on_an_engine_decode_batch(cpu_kernel, attention):
    if attention is paged_attention_cpu and cpu_kernel:
        pytest.skip(cpu_kernel)
    """The engine's CPU decode shape: many rows, one query each, a wide page table padded with the null page,
    the layer index traced (as in the scan over layers)."""
    rng = np.random.default_rng(7)
    seq_lens = list(rng.integers(1, 250, size=32))
    problem = make_problem(rng, seq_lens=seq_lens, q_lens=[1] * 32, num_heads=9, num_kv_heads=3, head_dim=64,
                           page_size=16, pages_per_row=16, num_layers=3, layer=2)
    run = jax.jit(lambda f, *a: f(*a, scale=0.125), static_argnums=0)
    ref = np.asarray(run(paged_attention_reference, *problem.args()))
    out = np.asarray(run(attention, *problem.args()))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
