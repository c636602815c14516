"""The CPU int8 matmul (pallas_kernels/int8_matmul.cc) against its pure-JAX reference, the int8 model against
the float one, the matmul plan, and the engine serving with int8 steps."""
from __future__ import annotations

import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.native_build import cpu_identity
from pallas_kernels.int8_matmul import (KernelUnavailable, int8_matmul, int8_matmul_reference, load_kernel, pack,
                                     unpack)
from jaxserve.config import EngineConfig, cache_dir
from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.matmul_plan import MIN_INT8_WEIGHT_BYTES, MatmulPlan, plan_matmuls, projection_bytes
from jaxserve.models.contiguous import ContiguousCacheOps, ContiguousMeta, init_contiguous_cache
from jaxserve.models.forward import make_forward
from jaxserve.models.llama import fuse_projections, quantize_int8
from jaxserve.models.loader import load_params, read_model_config
from jaxserve.sampling.params import SamplingParams


@pytest.fixture(scope="module")
def kernel_isa() -> str:
    try:
        return load_kernel(cache_dir() / "kernels")
    except KernelUnavailable as e:  # a machine without a C++ compiler: the kernel is reported, never faked
        pytest.skip(f"int8 kernel unavailable: {e}")


@pytest.mark.parametrize("k, n, m", [(576, 960, 1), (576, 960, 5), (1536, 576, 33), (30, 50, 3), (64, 16, 4),
                                     (7, 9, 2)])
def test_kernel_equals_reference_and_is_close_to_float(kernel_isa, k, n, m):
    rng = np.random.default_rng(k * n + m)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, 0] = 25.0  # an outlier sets its group's scale; the other groups and rows keep their own
    p = {key: jnp.asarray(v) for key, v in pack(w).items()}
    got = np.asarray(int8_matmul(jnp.asarray(x), p["qweight"], p["scale"], p["wsum"], n))
    ref = np.asarray(int8_matmul_reference(jnp.asarray(x), p["qweight"], p["scale"], p["wsum"], n))
    assert got.shape == (m, n)
    # The same integers; only the float32 sum over groups may round in another order.
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    exact = x @ w
    # Quantization error: about half a step of x's and of w's grid per product, summed as noise over k.
    x_step = np.abs(x).max(axis=1, keepdims=True) / 127
    w_step = np.abs(w).max(axis=0, keepdims=True) / 127
    bound = 3 * np.sqrt(k) * (x_step * np.abs(w).max() + w_step * np.abs(x).max(axis=1, keepdims=True))
    assert np.all(np.abs(got - exact) <= bound)


def test_rows_are_independent_of_their_batch(kernel_isa):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((576, 960)).astype(np.float32)
    p = {key: jnp.asarray(v) for key, v in pack(w).items()}
    x = rng.standard_normal((9, 576)).astype(np.float32)
    together = np.asarray(int8_matmul(jnp.asarray(x), p["qweight"], p["scale"], p["wsum"], 960))
    for i in range(9):
        alone = np.asarray(int8_matmul(jnp.asarray(x[i:i + 1]), p["qweight"], p["scale"], p["wsum"], 960))
        np.testing.assert_array_equal(alone[0], together[i])


def test_kernel_uses_the_widest_instruction_set_of_this_cpu(kernel_isa):
    flags = set(cpu_identity().split())
    expected = ("avx512_vnni" if {"avx512_vnni", "avx512bw"} <= flags else "avx2" if "avx2" in flags
                else "portable")
    assert kernel_isa == expected


def test_pack_round_trips_and_pads():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((30, 50)).astype(np.float32)
    p = pack(w)
    assert p["qweight"].shape == (4, 64 * 16) and p["scale"].shape == (64,) and p["wsum"].shape == (1, 64)
    q = np.asarray(unpack(jnp.asarray(p["qweight"])))
    assert q.shape == (64, 64) and not q[30:].any() and not q[:, 50:].any()
    np.testing.assert_allclose(q[:30, :50] * p["scale"][:50], w, atol=np.abs(w).max() / 127)
    np.testing.assert_array_equal(p["wsum"][0], q.astype(np.int32).sum(axis=0))
    assert pack(np.ones((130, 16), np.float32))["wsum"].shape == (3, 16)  # one row per group of 64 inputs
    with pytest.raises(ValueError, match="2-D"):
        pack(w[None])


def _logits(cfg, params, prompt, int8: bool) -> np.ndarray:
    fwd = jax.jit(make_forward(cfg, "float32", ContiguousCacheOps(cfg.head_dim**-0.5), fused_projections=True,
                               int8=int8))
    cache = init_contiguous_cache(cfg, 1, 64, jnp.float32)
    n = len(prompt)
    logits, _ = fwd(params, jnp.asarray(prompt[None], jnp.int32), jnp.arange(n, dtype=jnp.int32)[None], cache,
                    ContiguousMeta(jnp.array([0], jnp.int32), jnp.array([n], jnp.int32)))
    return np.asarray(logits[0])


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # tied LM head (packed from the embedding) / biases
def test_int8_model_tracks_the_float_model(kernel_isa, family, tiny_model_dir):
    path = tiny_model_dir(family)
    cfg = read_model_config(path)
    params = fuse_projections(jax.tree.map(np.asarray, load_params(path, cfg, "float32")))
    quantized = quantize_int8(params, cfg, keep_float=False)
    assert "kernel" not in quantized["layers"]["mlp"]["down_proj"] and "qweight" in quantized["lm_head"]
    prompt = np.random.default_rng(2).integers(0, cfg.vocab_size, 20)
    ref = _logits(cfg, jax.tree.map(jnp.asarray, params), prompt, int8=False)
    got = _logits(cfg, jax.tree.map(jnp.asarray, quantized), prompt, int8=True)
    # The tiny random model's logits are small; int8 keeps them to within a few percent of their spread.
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.999


def test_plan_modes(tiny_model_dir, tmp_path):
    cfg = read_model_config(tiny_model_dir("llama"))
    rows = [1, 2, 4, 8, 64]
    assert plan_matmuls("none", "cpu", cfg, rows, 1, tmp_path) == MatmulPlan(frozenset(), plan_matmuls(
        "none", "cpu", cfg, rows, 1, tmp_path).reason)
    assert not plan_matmuls("auto", "gpu", cfg, rows, 1, tmp_path).uses_int8
    with pytest.raises(ValueError, match="CPU platform"):
        plan_matmuls("int8", "tpu", cfg, rows, 1, tmp_path)
    with pytest.raises(ValueError, match="tp-size 1"):
        plan_matmuls("int8", "cpu", cfg, rows, 2, tmp_path)
    with pytest.raises(ValueError, match="quantization must be one of"):
        plan_matmuls("fp4", "cpu", cfg, rows, 1, tmp_path)
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(quantization="fp4")


def test_plan_auto_measures_once_and_caches(kernel_isa, tiny_model_dir, tmp_path):
    cfg = read_model_config(tiny_model_dir("llama"))
    small = plan_matmuls("auto", "cpu", cfg, [1, 8], 1, tmp_path)
    assert projection_bytes(cfg) < MIN_INT8_WEIGHT_BYTES and not small.uses_int8 and "cache" in small.reason
    if kernel_isa == "portable":
        pytest.skip("neither AVX-512 VNNI nor AVX2: auto keeps float32 without measuring")
    big = cfg.replace(hidden_size=512, intermediate_size=2048, num_layers=8, num_heads=8, num_kv_heads=8,
                      head_dim=64)
    assert projection_bytes(big) >= MIN_INT8_WEIGHT_BYTES
    plan = plan_matmuls("auto", "cpu", big, [1, 4], 1, tmp_path)
    assert [t[0] for t in plan.timings] == [1, 4] and "measured in" in plan.reason
    assert plan.int8_rows == frozenset(r for r, f, q in plan.timings if q < f)
    (saved,) = (tmp_path / "matmul_plans").iterdir()
    assert json.loads(saved.read_text())["timings"] == [list(t) for t in plan.timings]
    again = plan_matmuls("auto", "cpu", big, [1, 4], 1, tmp_path)
    assert again.timings == plan.timings and "measured before" in again.reason


@pytest.fixture(scope="module")
def int8_engine(kernel_isa, tiny_engine_config) -> LLMEngine:
    eng = LLMEngine(tiny_engine_config(quantization="int8"))
    eng.warmup()
    return eng


def test_engine_serves_int8_steps_batch_invariantly(int8_engine):
    from test_engine import random_prompt, run_to_completion

    assert int8_engine.runner.matmul_plan.uses_int8
    rng = random.Random(5)
    prompts = {f"r{i}": random_prompt(rng, rng.randrange(3, 90)) for i in range(6)}
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    together = run_to_completion(int8_engine, {rid: (p, greedy) for rid, p in prompts.items()})
    for rid, p in list(prompts.items())[:2]:
        alone = run_to_completion(int8_engine, {rid: (p, greedy)})
        assert alone[rid] == together[rid]  # per-row activation scales: companions change nothing
    assert all(len(t[0]) == 12 for t in together.values())
