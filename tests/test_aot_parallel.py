"""Deviceless AOT of tensor-parallel engines: every program of Llama-3.3-70B (bf16, tp 8) for a v6e-8 slice and
for 8 x H200, and of Llama-3.1-8B (tp 4) for v5e-4, compiled by libtpu / the CUDA plugin with the engine's own
sharding rules and shard_map'd kernels (jaxserve.aot). A minimal engine shape (2 rows, 256 tokens: one
program of each kind) keeps this module within a few minutes on 2 cores; the KV pool is sized per chip at
0.85 of its memory, so "weights + KV + temporaries within the chip" is the real question at these sizes.
"""
from __future__ import annotations

import pytest

from test_aot import needs_cuda, needs_tpu

pytestmark = pytest.mark.slow

MINIMAL = dict(max_running_requests=2, max_model_len=256, max_num_batched_tokens=16)
KINDS = {"forward-decode", "forward-prefill", "sampler", "copy-pages", "fork-slots"}


def _check(report, tp: int, repeat: int):
    from jaxserve.aot import summary
    from jaxserve.engine.kv_cache import kv_cache_pages

    failed = [f"{r.name}: {r.error}" for r in report.failures()]
    assert not failed, "\n".join(failed)
    assert {r.kind for r in report.results} == KINDS
    s = summary(report)
    plan, hbm = report.shape.tp_plan, report.target.chip.hbm_bytes
    assert (s["tp_size"], plan.kv_repeat) == (tp, repeat)
    # Per chip: weights are ~1/tp of the model's, and weights + KV pool + sampler state + the largest
    # program's temporaries fit the chip.
    assert s["weight_bytes"] < hbm
    for r in report.results:
        assert 0 < r.hbm_bytes <= hbm, f"{r.name} needs {r.hbm_bytes} bytes of {hbm}"
    resident = s["weight_bytes"] + s["kv_cache_bytes"] + report.shape.state_bytes
    assert resident + max(r.temp_bytes for r in report.results) <= hbm
    # The KV tokens a serving engine gets at this fraction (the minimal shape caps its own pool).
    chip_pages = kv_cache_pages(hbm, report.shape.weight_bytes, 0.85, report.shape.bytes_per_page)
    assert chip_pages * report.shape.engine_config.page_size > 100_000
    # Decode programs copy nothing large (the KV cache, a weight shard): temporaries < 5 % of the chip's pool.
    assert s["max_decode_temp_bytes"] < 0.05 * chip_pages * report.shape.bytes_per_page
    return s


@needs_tpu
def test_llama_70b_tp8_compiles_for_v6e_8():
    from jaxserve.aot import run_aot

    s = _check(run_aot("llama-3.3-70b", "v6e-8", kv_memory_fraction=0.85, **MINIMAL), tp=8, repeat=1)
    assert 16 * 2**30 < s["weight_bytes"] < 17 * 2**30  # 70.6B params x 2 bytes / 8 chips


@needs_cuda
def test_llama_70b_tp8_compiles_for_8_h200():
    from jaxserve.aot import run_aot

    _check(run_aot("llama-3.3-70b", "h200-8", kv_memory_fraction=0.85, **MINIMAL), tp=8, repeat=1)


@needs_tpu
def test_llama_8b_tp4_compiles_for_v5e_4():
    """One v5e chip (16 GiB) cannot hold the 15 GiB of weights plus a KV pool; four can."""
    from jaxserve.aot import run_aot

    one_chip = run_aot("llama-3.1-8b", "v5e-4", tp_size=1, kv_memory_fraction=0.85, **MINIMAL)
    assert one_chip.shape.num_pages < 2 and not one_chip.results
    _check(run_aot("llama-3.1-8b", "v5e-4", kv_memory_fraction=0.85, **MINIMAL), tp=4, repeat=1)


@needs_tpu
def test_kv_heads_fewer_than_chips_are_repeated_on_v6e_8():
    """Qwen2.5-7B has 4 KV heads of 7 query heads each: at tp 8 each KV head is stored twice (one per chip) and
    each group padded to 8 query heads (the plan reports both costs)."""
    from jaxserve.aot import run_aot

    report = run_aot("qwen2.5-7b", "v6e-8", kv_memory_fraction=0.85, kinds={"forward-decode"}, **MINIMAL)
    assert not report.failures()
    assert report.shape.tp_plan.kv_repeat == 2
    assert report.shape.tp_plan.model_config.num_heads == 32
    assert any("repeated x2" in note and "padded to 32" in note for note in report.notes)
