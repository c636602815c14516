"""Shape buckets of the runner and the CPU host-memory tuning (no model needed)."""
from __future__ import annotations

import platform

import pytest

from jaxserve.engine.host_memory import keep_freed_memory_in_heap
from jaxserve.engine.runner import Buckets


def test_short_prefill_width_for_xla_attention():
    b = Buckets.make(16, 128, 256, 256, short_prefill_width=True)
    assert b.page_widths == (16, 32, 64, 128)
    assert b.prefill_widths == (16, 128)
    # A 128-token prompt (8 pages) runs as 128 tokens over 16 pages, not 256 tokens over the 128 pages of the
    # longest context; two of them share one step.
    assert b.prefill_shape(1, 128, 8) == (1, 128, 16)
    assert b.prefill_shape(2, 128, 8) == (2, 128, 16)
    assert b.prefill_shape(4, 16, 17) == (4, 16, 128)
    assert b.prefill_shape(1, 200, 128) == (1, 256, 128)
    assert b.prefill_shapes == ((1, 16), (4, 16), (16, 16), (8, 32), (1, 64), (4, 64), (1, 128), (2, 128), (1, 256))
    # The scheduler's chunk cap per number of rows follows the shapes.
    assert b.prefill_tokens_for_rows()[:4] == (256, 128, 64, 64)
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        b.prefill_shape(1, 16, 129)


def test_kernels_keep_one_prefill_width():
    b = Buckets.make(128, 512, 2048, 2048)
    assert b.prefill_widths == (512,)
    assert b.prefill_shape(1, 100, 3)[2] == 512


def test_cpu_buckets_one_decode_width_and_small_samplers():
    b = Buckets.make(64, 128, 256, 256, one_decode_width=True, small_samplers=True)
    assert b.page_widths == (128,) and b.decode_shape(3, 5) == (4, 128)
    assert b.sample_rows[:4] == (1, 2, 4, 8)  # one stream samples one row, not eight
    assert Buckets.make(64, 128, 256, 256).sample_rows[0] == 8


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_host_malloc_tuning_applies_on_glibc():
    assert keep_freed_memory_in_heap() is True
    assert keep_freed_memory_in_heap() is True  # idempotent


@pytest.mark.parametrize("field,value", [("attention_backend", "fast"), ("layer_loop", "unrolled"),
                                         ("dtype", "float16"), ("kv_memory_fraction", 1.5)])
def test_engine_config_rejects_bad_values(field, value):
    from jaxserve.config import EngineConfig

    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})
