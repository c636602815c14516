"""Deviceless AOT: the engine's real programs compiled for TPU (libtpu) and H100/H200 (CUDA plugin + ptxas).

No chip is needed: `jaxserve.aot` lowers every program the engine compiles at start-up against compile-only
devices of the target topology and asks the target's compiler for memory and cost analysis. A compact
engine shape (8 rows, 1,024 tokens of context, a 64-token prefill budget: 19 programs per target, every
kind the engine has) keeps the whole module under 4 minutes on a 2-core CPU; the KV pool is sized as on
the chip (0.85 of its memory for weights + KV), so "within the chip's HBM" is the real question.
"""
from __future__ import annotations

import importlib.util
import shutil
from functools import partial
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _has_libtpu() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def _has_cuda_plugin() -> bool:
    if importlib.util.find_spec("jax_plugins") is None or not any(
            importlib.util.find_spec(m) for m in ("jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12")):
        return False
    nvidia = importlib.util.find_spec("nvidia")
    roots = list(nvidia.submodule_search_locations or []) if nvidia else []
    return shutil.which("ptxas") is not None or any(
        p.name == "ptxas" for root in roots for p in Path(root).glob("**/bin/ptxas"))


needs_tpu = pytest.mark.skipif(not _has_libtpu(), reason="libtpu not installed (pip install -e '.[test]' brings it)")
needs_cuda = pytest.mark.skipif(not _has_cuda_plugin(),
                                reason="jax CUDA plugin or ptxas not installed (pip install -e '.[test]' brings them)")

COMPACT = dict(max_running_requests=8, max_model_len=1024, max_num_batched_tokens=64)


def _check_all_fit(report):
    from jaxserve.aot import summary

    failed = [f"{r.name}: {r.error}" for r in report.failures()]
    assert not failed, "\n".join(failed)
    kinds = {r.kind for r in report.results}
    assert kinds == {"forward-decode", "forward-prefill", "sampler", "copy-pages", "fork-slots"}
    hbm = report.target.chip.hbm_bytes
    for r in report.results:
        assert 0 < r.hbm_bytes <= hbm, f"{r.name} needs {r.hbm_bytes} bytes of {hbm}"
    s = summary(report)
    assert s["kv_tokens"] > 0
    # Everything resident at once (weights, KV pool, sampler state, grammar tables) plus the largest
    # program's temporaries fits too.
    resident = report.shape.weight_bytes + s["kv_cache_bytes"] + report.shape.state_bytes
    assert resident + max(r.temp_bytes for r in report.results) <= hbm
    return s


@pytest.mark.parametrize("target", [
    pytest.param("v6e-1", marks=needs_tpu),
    pytest.param("h100", marks=needs_cuda),
    pytest.param("h200", marks=needs_cuda),
])
def test_llama_8b_every_program_compiles_within_hbm(target):
    from jaxserve.aot import run_aot

    report = run_aot("llama-3.1-8b", target, kv_memory_fraction=0.85, **COMPACT)
    s = _check_all_fit(report)
    assert len(report.results) == 19
    # The decode programs do not copy the cache: their temporaries stay far below the KV pool the chip holds
    # at this fraction (the compact engine caps its own pool at 8 x 1,024 tokens).
    from jaxserve.engine.kv_cache import kv_cache_pages

    chip_pool = kv_cache_pages(report.target.chip.hbm_bytes, report.shape.weight_bytes, 0.85,
                               report.shape.bytes_per_page) * report.shape.bytes_per_page
    assert s["max_decode_temp_bytes"] < 0.05 * chip_pool
    if report.target.platform == "tpu":  # libtpu gives costs, the kernel's included (pl.CostEstimate)
        decode = [r for r in report.results if r.kind == "forward-decode"]
        assert all(r.flops and r.bytes_accessed for r in decode)
        # The roofline finds a compiled decode program for each batch (at a context the compact engine holds:
        # the report's default 2,048 tokens exceed its max_model_len of 1,024).
        from jaxserve.aot import load_model_config, roofline

        entries = roofline(load_model_config("llama-3.1-8b"), report.target.chip, report.results, report.shape,
                           batches=(1, 8), context=1024)
        assert [e["compiled"] for e in entries] == ["ok", "ok"]


@needs_tpu
def test_smollm2_every_program_compiles_within_hbm_v5e():
    from jaxserve.aot import run_aot

    _check_all_fit(run_aot("smollm2-135m", "v5e-1", kv_memory_fraction=0.85, **COMPACT))


def _decode_temp_ratio(head_dim: int, rows: int, target: str = "v6e-1") -> float:
    from jaxserve.aot import load_model_config, run_aot

    cfg = load_model_config("llama-3.1-8b").replace(head_dim=head_dim, num_layers=4)
    report = run_aot("llama-3.1-8b", target, cfg=cfg, kv_memory_fraction=0.85, **COMPACT,
                     programs_filter=lambda p: p.kind == "forward-decode" and p.shape == (rows, 1, 64))
    (r,) = report.results
    kv = report.shape.num_pages * report.shape.bytes_per_page
    if r.error:  # the target rejected it (e.g. out of HBM because of relayout copies): as bad as it gets
        pytest.fail(f"decode at head_dim {head_dim} did not compile: {r.error}")
    return r.temp_bytes / kv


@needs_tpu
@pytest.mark.parametrize("head_dim,rows", [
    (64, 1),  # the TPU cache packs two 64-wide tokens per 128-lane row (kv_cache.cache_shape)
    (96, 1),  # four 96-wide tokens per 384-lane row
    (192, 1),  # two 192-wide tokens per 384-lane row
    (128, 1),
    (256, 1),
    (128, 8),  # 2+ rows: the K/V write scatters head_dim vectors (engine/attention.py write_kv)
    (256, 8),
    (96, 8),  # ... into lane offsets of the packed rows
    (192, 8),
])
def test_decode_temporaries_below_5_percent_of_kv_cache(head_dim, rows):
    assert _decode_temp_ratio(head_dim, rows) < 0.05


@needs_tpu
def test_negative_control_plain_head_dim_192_cache_is_relaid_out(monkeypatch):
    """A plain `[.., page, 192]` cache (no packing) is copied to the kernel's layout around every step: the
    temporaries check above must see it (1.34x the pool: the copy pads 192 lanes to 256)."""
    from jaxserve.engine import kv_cache

    monkeypatch.setattr(kv_cache, "tokens_per_row", lambda head_dim, page_size, platform: 1)
    assert _decode_temp_ratio(192, 1) > 0.25


@needs_tpu
def test_negative_control_kv_head_window_scatter_copies_the_cache(monkeypatch):
    """The K/V write formulated as `cache.at[layer, :, page, offset].set(new)` (a [KV, D] scatter window) makes
    XLA:TPU copy both whole caches in every layer at 2+ rows: the temporaries check above must see it."""
    from jaxserve.engine import attention

    def kv_head_window(cache, new, layer, slot_page, slot_offset):
        return cache.at[layer, :, slot_page, slot_offset].set(new.astype(cache.dtype))

    monkeypatch.setattr(attention, "write_kv", kv_head_window)
    assert _decode_temp_ratio(128, 8) > 0.25


@needs_tpu
def test_negative_control_vmem_over_the_limit_is_rejected():
    """The same AOT path with a deliberately broken kernel configuration (K/V blocks of 32,768 keys: 64 MiB of
    double-buffered VMEM at head_dim 128) must fail to compile, so the checks above can fail."""
    from jaxserve.aot import load_model_config, run_aot
    from pallas_kernels.paged_attention_tpu import TpuKernelConfig, paged_attention_tpu

    broken = partial(paged_attention_tpu, config=TpuKernelConfig(keys_per_block=32768))
    # Two layers and 128-token pages: the VMEM limit is per kernel call, and 32 layers or a block of 2,048
    # small pages only make the same rejection take minutes instead of seconds.
    cfg = load_model_config("llama-3.1-8b").replace(num_layers=2)
    report = run_aot("llama-3.1-8b", "v6e-1", cfg=cfg, kv_memory_fraction=0.85, max_running_requests=8,
                     page_size=128, max_model_len=32768, max_num_batched_tokens=128, attend=broken,
                     programs_filter=lambda p: p.kind == "forward-decode" and p.shape == (1, 1, 256))
    (r,) = report.results
    assert r.error is not None and "vmem" in r.error.lower(), r.error


@needs_cuda
def test_negative_control_shared_memory_over_the_limit_is_rejected():
    from jaxserve.aot import run_aot
    from pallas_kernels.paged_attention_gpu import GpuKernelConfig, paged_attention_gpu

    broken = partial(paged_attention_gpu, config=GpuKernelConfig(keys_per_block=1024, num_stages=4))
    report = run_aot("llama-3.1-8b", "h100", kv_memory_fraction=0.85, **COMPACT, attend=broken,
                     programs_filter=lambda p: p.kind == "forward-decode" and p.shape == (1, 1, 64))
    (r,) = report.results
    assert r.error is not None, "a 1,024-key block (4 stages x 2 x 256 KiB of shared memory) compiled"


def test_kv_pool_uses_sglang_fraction_of_total_memory():
    from jaxserve.engine.kv_cache import kv_cache_pages

    gib = 1024**3
    assert kv_cache_pages(32 * gib, 15 * gib, 0.85, 2 * 1024**2) == (int(32 * gib * 0.85) - 15 * gib) // (2 * 1024**2)
    assert kv_cache_pages(16 * gib, 15 * gib, 0.85, 2 * 1024**2) == 0  # needs tensor parallelism
    assert kv_cache_pages(32 * gib, 1 * gib, 0.85, 2 * 1024**2, max_pages=100) == 100


def test_targets_parse():
    from jaxserve.aot import parse_target

    assert parse_target("v5e-4").topology == "v5e:2x2" and parse_target("v5e-4").num_chips == 4
    assert parse_target("v6e-8").topology == "v6e:2x4"
    assert parse_target("h200").chip.hbm_bandwidth == 4.8e12
    with pytest.raises(ValueError):
        parse_target("a100")


def test_programs_compile_in_order_and_rejections_are_reported():
    import jax
    import jax.numpy as jnp

    from jaxserve.aot import Program, compile_programs
    from jaxserve.models.sharding import make_mesh

    x = jax.ShapeDtypeStruct((8, 16), jnp.float32)
    ok = jax.jit(lambda a: jnp.tanh(a @ a.T))
    bad = jax.jit(lambda a: a @ a)  # (8, 16) @ (8, 16): rejected while lowering
    programs = [Program(f"p{i}", "forward-decode", bad if i == 2 else ok, (x,), (i,)) for i in range(5)]
    seen = []
    results = compile_programs(programs, make_mesh(jax.devices()[:1]), progress=lambda r: seen.append(r.name))
    assert [r.name for r in results] == seen == ["p0", "p1", "p2", "p3", "p4"]
    assert [r.error is None for r in results] == [True, True, False, True, True]
    assert "TypeError" in results[2].error
    assert all(r.output_bytes == 8 * 8 * 4 for r in results if r.error is None)


def test_compiles_stay_out_of_the_persistent_cache_even_after_it_was_used(tmp_path):
    # JAX decides once per process whether its persistent cache is used; compile_programs must still keep the
    # target's executables out of it (a deviceless one cannot be read back) and leave the cache working after.
    import jax
    import jax.numpy as jnp
    from jax.experimental.compilation_cache import compilation_cache

    from jaxserve.aot import Program, compile_programs
    from jaxserve.models.sharding import make_mesh

    settings = {"jax_compilation_cache_dir": str(tmp_path), "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_enable_compilation_cache": True}
    saved = {k: getattr(jax.config, k) for k in settings}
    entries = lambda: sorted(p.name for p in tmp_path.iterdir())
    try:
        for k, v in settings.items():
            jax.config.update(k, v)
        compilation_cache.reset_cache()
        jax.jit(lambda a: a * 3.0 + 1.0).lower(jnp.ones(7)).compile()  # the process now uses the cache
        before = entries()
        assert before, "the first compile should have written a cache entry"
        x = jax.ShapeDtypeStruct((5, 9), jnp.float32)
        program = Program("p", "forward-decode", jax.jit(lambda a: jnp.sin(a) @ a.T), (x,), (1,))
        [result] = compile_programs([program], make_mesh(jax.devices()[:1]))
        assert result.error is None
        assert entries() == before
        jax.jit(lambda a: a * 5.0 - 2.0).lower(jnp.ones(11)).compile()
        assert len(entries()) > len(before), "the cache should work again after compile_programs"
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)
        compilation_cache.reset_cache()
