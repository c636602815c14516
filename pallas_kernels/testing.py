"""Random paged-attention problems and a naive NumPy oracle, shared by tests and benchmarks.

Plain NumPy + JAX (no pytest) so `benchmarks/bench_attention.py` can use it on a bare GPU machine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class PagedProblem:
    """One batch of paged attention inputs, in the layout of docs/architecture.md."""

    q: jax.Array  # [B, Tq, H, D]
    k_cache: jax.Array  # [L, KV, P, S, D]
    v_cache: jax.Array
    layer: jax.Array  # int32 scalar
    page_table: jax.Array  # int32 [B, pages_per_row]
    seq_lens: jax.Array  # int32 [B]
    q_start: jax.Array  # int32 [B]

    def args(self) -> tuple[jax.Array, ...]:
        return (self.q, self.k_cache, self.v_cache, self.layer, self.page_table, self.seq_lens, self.q_start)


def make_problem(
    rng: np.random.Generator,
    *,
    seq_lens: list[int],
    q_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: jnp.dtype = jnp.float32,
    num_layers: int = 2,
    layer: int = 1,
    pages_per_row: int | None = None,
    q_len_padded: int | None = None,
    spare_pages: int = 3,
) -> PagedProblem:
    """Random caches with each row's pages scattered over a shuffled physical pool.

    Row b has `q_lens[b]` real query tokens ending at position `seq_lens[b] - 1` (a chunk whose K/V
    are already in the cache); the query axis is padded to `q_len_padded` (default max(q_lens)).
    Unused page-table slots hold the null page 0, whose contents are random junk so that a kernel
    reading past a row's length shows up as a wrong result.
    """
    if len(seq_lens) != len(q_lens):
        raise ValueError("seq_lens and q_lens must have the same length")
    if any(ql > sl for ql, sl in zip(q_lens, seq_lens)):
        raise ValueError("a row cannot have more new tokens than its sequence length")
    batch = len(seq_lens)
    pages_needed = [-(-sl // page_size) for sl in seq_lens]
    width = pages_per_row or max(1, max(pages_needed))
    if width < max(pages_needed):
        raise ValueError(f"pages_per_row {width} < pages needed {max(pages_needed)}")
    total_pages = 1 + sum(pages_needed) + spare_pages
    physical = rng.permutation(np.arange(1, total_pages))  # page 0 stays the null page
    page_table = np.zeros((batch, width), np.int32)
    cursor = 0
    for b, n in enumerate(pages_needed):
        page_table[b, :n] = physical[cursor:cursor + n]
        cursor += n
    tq = q_len_padded or max(1, max(q_lens))
    shape = (num_layers, num_kv_heads, total_pages, page_size, head_dim)
    k_cache = rng.standard_normal(shape, np.float32)
    v_cache = rng.standard_normal(shape, np.float32)
    q = rng.standard_normal((batch, tq, num_heads, head_dim), np.float32)
    q_start = np.array([sl - ql for sl, ql in zip(seq_lens, q_lens)], np.int32)
    return PagedProblem(
        q=jnp.asarray(q, dtype),
        k_cache=jnp.asarray(k_cache, dtype),
        v_cache=jnp.asarray(v_cache, dtype),
        layer=jnp.asarray(layer, jnp.int32),
        page_table=jnp.asarray(page_table),
        seq_lens=jnp.asarray(np.array(seq_lens, np.int32)),
        q_start=jnp.asarray(q_start),
    )


def naive_dense_attention(
    problem: PagedProblem,
    *,
    scale: float,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
) -> np.ndarray:
    """Per-row, per-head, per-query float64 loops over the contiguous K/V: obviously correct, slow."""
    q = np.asarray(problem.q, np.float64)
    k_cache = np.asarray(problem.k_cache, np.float64)
    v_cache = np.asarray(problem.v_cache, np.float64)
    layer = int(problem.layer)
    page_table = np.asarray(problem.page_table)
    seq_lens = np.asarray(problem.seq_lens)
    q_start = np.asarray(problem.q_start)
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads, page_size = k_cache.shape[1], k_cache.shape[3]
    group = num_heads // num_kv_heads
    out = np.zeros(q.shape, np.float64)
    for b in range(batch):
        n = int(seq_lens[b])
        positions = np.arange(n)
        pages = page_table[b, positions // page_size]
        offsets = positions % page_size
        for h in range(num_heads):
            kv = h // group
            keys = k_cache[layer, kv, pages, offsets]  # [n, D]
            values = v_cache[layer, kv, pages, offsets]
            for t in range(q_len):
                p = int(q_start[b]) + t
                if p >= n:
                    continue  # padding query: contract says output is ignored; we expect zeros
                lo = 0 if sliding_window is None else max(0, p - sliding_window + 1)
                logits = keys[lo:p + 1] @ q[b, t, h] * scale
                if soft_cap is not None:
                    logits = soft_cap * np.tanh(logits / soft_cap)
                w = np.exp(logits - logits.max())
                out[b, t, h] = (w / w.sum()) @ values[lo:p + 1]
    return out


def query_validity(problem: PagedProblem) -> np.ndarray:
    """Bool [B, Tq]: which query slots are real tokens (the rest are padding, output ignored)."""
    q_len = problem.q.shape[1]
    positions = np.asarray(problem.q_start)[:, None] + np.arange(q_len)[None, :]
    return positions < np.asarray(problem.seq_lens)[:, None]


def max_relative_error(actual: np.ndarray, expected: np.ndarray, valid: np.ndarray) -> float:
    """max |a - e| / max(|e|) over the real query tokens; NaN anywhere in them counts as infinite."""
    a = np.asarray(actual, np.float64)[valid]
    e = np.asarray(expected, np.float64)[valid]
    if a.size == 0:
        return 0.0
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.max(np.abs(a - e)) / max(np.max(np.abs(e)), 1e-30))


TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2}


@dataclass(frozen=True)
class KernelCase:
    """One kernel-vs-reference comparison (a sample of the test grid)."""

    name: str
    seq_lens: tuple[int, ...]
    q_lens: tuple[int, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: jnp.dtype = jnp.float32
    soft_cap: float | None = None
    sliding_window: int | None = None
    packed: bool = False  # hand the kernel the packed TPU cache layout (`packed_cache`)


def packed_cache(cache: jax.Array) -> jax.Array:
    """The TPU layout of jaxserve.engine.kv_cache.cache_shape for a plain `[L, KV, P, S, D]` cache:
    `[L, KV, P, S / n, n * D]` with n * D = lcm(D, 128) (a row-major reshape; n = 1 when D % 128 == 0)."""
    *lead, page_size, head_dim = cache.shape
    n = math.lcm(head_dim, 128) // head_dim
    if page_size % n:
        raise ValueError(f"page_size {page_size} is not a multiple of the {n} tokens per packed row at head_dim {head_dim}")
    return cache.reshape(*lead, page_size // n, n * head_dim)


def _edge_lens(page_size: int) -> tuple[int, ...]:
    return (1, page_size - 1, page_size, page_size + 1)


GPU_CASES = (
    KernelCase("decode-g1-d64-p16-edges", _edge_lens(16), (1,) * 4, 4, 4, 64, 16),
    KernelCase("decode-g3-d128-p32-edges-bf16", _edge_lens(32), (1,) * 4, 6, 2, 128, 32, jnp.bfloat16),
    KernelCase("decode-g4-d128-p16-long-ragged", (300, 3, 77, 129, 0), (1, 1, 1, 1, 0), 8, 2, 128, 16),
    KernelCase("decode-g8-d64-p32-softcap-bf16", (64, 65, 200), (1, 1, 1), 8, 1, 64, 32, jnp.bfloat16, soft_cap=25.0),
    KernelCase("extend-g4-d64-p16-ragged", (40, 17, 5, 0), (9, 1, 5, 0), 8, 2, 64, 16),
    KernelCase("prefill-g3-d128-p32-window-bf16", (70, 33), (70, 20), 6, 2, 128, 32, jnp.bfloat16, sliding_window=19),
)

TPU_CASES = (
    KernelCase("decode-g1-d128-p64-edges", _edge_lens(64), (1,) * 4, 2, 2, 128, 64),
    KernelCase("decode-g4-d64-p16-edges-bf16", _edge_lens(16), (1,) * 4, 8, 2, 64, 16, jnp.bfloat16),
    KernelCase("decode-g8-d128-p32-long-ragged", (260, 31, 0, 97), (1, 1, 0, 1), 8, 1, 128, 32, soft_cap=30.0),
    KernelCase(
        "extend-g3-d64-p64-ragged-window-bf16", (150, 64, 9), (40, 1, 9), 6, 2, 64, 64, jnp.bfloat16, sliding_window=50
    ),
    # head_dims off the 128-lane grid in the packed layout the engine stores on TPU (4, 2 and 8 tokens per row)
    # and one in the plain layout.
    KernelCase("decode-g4-d96-p16-edges-packed-bf16", _edge_lens(16), (1,) * 4, 8, 2, 96, 16, jnp.bfloat16, packed=True),
    KernelCase("extend-g2-d192-p32-ragged-window-packed", (70, 33, 5), (20, 1, 5), 4, 2, 192, 32, sliding_window=19,
               packed=True),
    KernelCase("decode-g2-d80-p16-long-softcap-packed", (150, 17), (1, 1), 4, 2, 80, 16, soft_cap=20.0, packed=True),
    KernelCase("decode-g3-d96-p16-plain", (40, 3), (1, 1), 3, 1, 96, 16),
)


@dataclass(frozen=True)
class CheckResult:
    relative_error: float
    tolerance: float
    padding_is_zero: bool

    @property
    def passed(self) -> bool:
        return self.relative_error < self.tolerance and self.padding_is_zero


def check_kernel(kernel, case: KernelCase, *, seed: int, **kernel_kwargs) -> CheckResult:
    """Run `kernel` (a paged-attention callable of the contract) on fresh random data vs the reference.

    Each row gets one spare null slot in its page table; padding query slots must come back zero.
    """
    from pallas_kernels.reference import paged_attention_reference  # local: keep testing import-light

    problem = make_problem(
        np.random.default_rng(seed), seq_lens=list(case.seq_lens), q_lens=list(case.q_lens),
        num_heads=case.num_heads, num_kv_heads=case.num_kv_heads, head_dim=case.head_dim,
        page_size=case.page_size, dtype=case.dtype,
        pages_per_row=-(-max(case.seq_lens) // case.page_size) + 1,
    )
    options = dict(scale=case.head_dim ** -0.5, soft_cap=case.soft_cap, sliding_window=case.sliding_window)
    expected = np.asarray(paged_attention_reference(*problem.args(), **options), np.float32)
    args = problem.args()
    if case.packed:
        args = (args[0], packed_cache(args[1]), packed_cache(args[2]), *args[3:])
    actual = np.asarray(kernel(*args, **options, **kernel_kwargs), np.float32)
    valid = query_validity(problem)
    return CheckResult(
        relative_error=max_relative_error(actual, expected, valid),
        tolerance=TOLERANCE[jnp.dtype(case.dtype)],
        padding_is_zero=bool(np.all(actual[~valid] == 0)),
    )
