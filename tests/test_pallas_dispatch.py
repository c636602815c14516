"""`paged_attention(impl=...)` picks the right implementation and falls back loudly, never wrongly."""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import paged_attention, paged_attention_reference, resolve_impl, supports
from pallas_kernels.testing import make_problem, max_relative_error, query_validity

SHAPE = dict(head_dim=128, page_size=16, dtype=jnp.bfloat16)


@pytest.mark.parametrize(
    "impl,platform,expected",
    [
        ("auto", "cpu", "reference"),
        ("auto", "gpu", "pallas_gpu"),
        ("auto", "cuda", "pallas_gpu"),
        ("auto", "tpu", "pallas_tpu"),
        ("pallas", "tpu", "pallas_tpu"),
        ("reference", "gpu", "reference"),
        ("pallas_tpu", "tpu", "pallas_tpu"),
    ],
)
def test_resolve_impl(impl, platform, expected):
    assert resolve_impl(impl, platform=platform, **SHAPE) == expected


def test_pallas_on_cpu_needs_interpret_and_uses_the_gpu_kernel():
    with pytest.raises(ValueError, match="interpret=True"):
        resolve_impl("pallas", platform="cpu", **SHAPE)
    assert resolve_impl("pallas", platform="cpu", interpret=True, **SHAPE) == "pallas_gpu"
    with pytest.raises(ValueError, match="needs a tpu device"):
        resolve_impl("pallas_tpu", platform="cpu", **SHAPE)


def test_unsupported_shape_falls_back_with_a_log_line(caplog):
    with caplog.at_level(logging.WARNING, logger="pallas_kernels.paged_attention"):
        assert resolve_impl("auto", platform="gpu", head_dim=96, page_size=16, dtype=jnp.bfloat16) == "reference"
    assert "head_dim 96" in caplog.text and "using the reference" in caplog.text
    ok, reason = supports(head_dim=96, page_size=16, dtype=jnp.bfloat16, platform="gpu")
    assert not ok and "power of two" in reason
    # An explicit kernel request is not silently rerouted.
    with pytest.raises(ValueError, match="head_dim 96"):
        resolve_impl("pallas_gpu", platform="gpu", head_dim=96, page_size=16, dtype=jnp.bfloat16)


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="unknown attention impl"):
        resolve_impl("flash", platform="gpu", **SHAPE)


def test_pallas_interpret_under_jit_matches_reference():
    problem = make_problem(
        np.random.default_rng(11), seq_lens=[33, 7, 0], q_lens=[4, 1, 0], num_heads=8, num_kv_heads=2,
        head_dim=64, page_size=16,
    )
    options = dict(scale=0.125, soft_cap=None, sliding_window=None)
    step = jax.jit(lambda *a: paged_attention(*a, **options, impl="pallas", interpret=True))
    actual = np.asarray(step(*problem.args()))
    expected = np.asarray(paged_attention_reference(*problem.args(), **options))
    assert max_relative_error(actual, expected, query_validity(problem)) < 1e-5
    auto = np.asarray(jax.jit(lambda *a: paged_attention(*a, **options))(*problem.args()))
    np.testing.assert_array_equal(auto, expected)  # auto on CPU is the reference itself
