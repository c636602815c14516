"""Paged attention on the CPU as a C++ custom call (paged_attention_cpu.cc): the contract of `reference.py`,
read straight from the pages, each row only up to its own length.

`paged_attention_cpu` takes the reference's arguments. It needs float32 queries and caches in the plain
`[L, KV, P, S, D]` layout (the CPU engine's); anything else is computed by `xla_attention` instead, a
choice made once per traced shape and logged. `load_kernel` builds and registers the custom call (once per
machine and process) and checks it against the reference."""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.native_build import KernelUnavailable, load
from pallas_kernels.reference import paged_attention_reference, validate_paged_attention_args
from pallas_kernels.xla_attention import paged_attention_xla

log = logging.getLogger(__name__)

TARGET = "jaxserve_paged_attention_cpu"


def paged_attention_cpu(
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
) -> jax.Array:
    """Attention of `q [B, Tq, H, D]` over each row's cached pages; returns `[B, Tq, H, D]` in q.dtype (the
    kernel must be registered: `load_kernel`). Page-table entries must be valid page ids, as for the others."""
    validate_paged_attention_args(
        q, k_cache, v_cache, page_table, seq_lens, q_start,
        soft_cap=soft_cap, sliding_window=sliding_window,
    )
    options = dict(scale=scale, soft_cap=soft_cap, sliding_window=sliding_window)
    if not all(a.dtype == jnp.float32 for a in (q, k_cache, v_cache)) or k_cache.shape[-1] != q.shape[-1]:
        log.warning("CPU attention kernel: float32 caches in the plain layout only; %s q with %s cache %s uses "
                    "the pure-JAX xla attention", q.dtype, k_cache.dtype, k_cache.shape)
        return paged_attention_xla(q, k_cache, v_cache, layer, page_table, seq_lens, q_start, **options)
    i32 = jnp.int32
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        q, k_cache, v_cache, jnp.asarray(layer, i32).reshape(()), page_table.astype(i32), seq_lens.astype(i32),
        q_start.astype(i32), scale=np.float32(scale), soft_cap=np.float32(soft_cap or 0.0),
        window=np.int32(sliding_window or 0))


def load_kernel(build_dir: Path) -> None:
    """Build (once per machine) and register the kernel, and check it once against the reference; raises
    `KernelUnavailable` when it cannot be built or loaded, or computes other numbers than the reference."""
    load("paged_attention_cpu.cc", Path(build_dir), ((TARGET, "JaxservePagedAttentionCpu"),))
    _self_check()


@functools.lru_cache(maxsize=None)
def _self_check() -> None:
    # Decode and prefill rows, ragged lengths, a padding query, a window and a soft cap.
    from pallas_kernels.testing import make_problem, max_relative_error, query_validity

    problem = make_problem(np.random.default_rng(0), seq_lens=[37, 5, 0, 20], q_lens=[1, 5, 0, 9], num_heads=6,
                           num_kv_heads=2, head_dim=32, page_size=8, dtype=jnp.float32, pages_per_row=6)
    for options in (dict(scale=0.2), dict(scale=0.2, soft_cap=5.0, sliding_window=7)):
        got = np.asarray(paged_attention_cpu(*problem.args(), **options))
        want = np.asarray(paged_attention_reference(*problem.args(), **options))
        valid = query_validity(problem)
        err = max_relative_error(got, want, valid)
        if not err < 1e-5 or np.any(got[~valid] != 0):
            raise KernelUnavailable(f"the CPU attention kernel differs from the reference (relative error {err:.3g})")


__all__ = ["KernelUnavailable", "load_kernel", "paged_attention_cpu"]
