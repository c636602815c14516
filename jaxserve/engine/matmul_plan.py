"""Which matmul each compiled step uses on the CPU: float32 (XLA's dot) or int8 x int8 (pallas_kernels'
custom call, AVX-512 VNNI or AVX2), per number of rows the step multiplies.

`--quantization auto` (the default) measures both on this machine with the model's own projection shapes at
every row count the shape buckets use, once, and keeps the verdict in a file beside the other caches (keyed
by CPU, model shapes and kernel source): a decode step reads every weight once, so int8 (a quarter of the
bytes) wins where weights dominate; XLA's float GEMM may win at large prefill chunks on some CPUs. Below
MIN_INT8_WEIGHT_BYTES the weights sit in cache and float32 is kept without measuring. Off the CPU,
quantization is not offered. `int8` forces the kernel for every step, `none` never uses it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig, cache_dir as default_cache_dir

log = logging.getLogger(__name__)

QUANTIZATION_CHOICES = ("auto", "none", "int8")
# Below this many bytes of float32 projection weights (tiny test models) float32 is kept without measuring.
MIN_INT8_WEIGHT_BYTES = 32 << 20


@dataclass(frozen=True)
class MatmulPlan:
    """The verdict: int8 for the steps whose matmul row count is in `int8_rows`."""

    int8_rows: frozenset[int]
    reason: str  # one line for the start-up log
    timings: tuple[tuple[int, float, float], ...] = ()  # (rows, float32 ms, int8 ms) per layer, when measured

    @property
    def uses_int8(self) -> bool:
        return bool(self.int8_rows)

    def int8_for(self, rows: int) -> bool:
        return rows in self.int8_rows


def projection_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) of one layer's fused projections: qkv, o, gate_up, down."""
    q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return [(cfg.hidden_size, q_dim + 2 * kv_dim), (q_dim, cfg.hidden_size),
            (cfg.hidden_size, 2 * cfg.intermediate_size), (cfg.intermediate_size, cfg.hidden_size)]


def projection_bytes(cfg: ModelConfig) -> int:
    per_layer = sum(k * n for k, n in projection_shapes(cfg))
    return 4 * (per_layer * cfg.num_layers + cfg.hidden_size * cfg.vocab_size)


def measure(cfg: ModelConfig, row_counts: list[int], reps: int = 7) -> list[tuple[int, float, float]]:
    """(rows, float32 ms, int8 ms) for one layer's projections at each row count (the kernel registered).
    The four run chained, as in the model (independent matmuls would run concurrently and mislead), and the
    two precisions alternate, so a busy machine slows both alike; medians of `reps`."""
    from pallas_kernels.int8_matmul import int8_matmul, pack

    rng = np.random.default_rng(0)
    shapes = projection_shapes(cfg)
    floats = [jnp.asarray(rng.standard_normal((k, n), dtype=np.float32) * 0.02) for k, n in shapes]
    packed = [{key: jnp.asarray(v) for key, v in pack(np.asarray(w)).items()} for w in floats]

    def layer(matmul, x, ws):
        for w, (k, n) in zip(ws, shapes):
            x = matmul(x[:, :k], w, n)  # each output feeds the next projection, sliced to its input width
        return x

    f32 = jax.jit(partial(layer, lambda x, w, n: jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST)))
    int8 = jax.jit(partial(layer, lambda x, w, n: int8_matmul(x, w["qweight"], w["scale"], w["wsum"], n)))
    out = []
    for rows in sorted(set(row_counts)):
        x = jnp.asarray(rng.standard_normal((rows, cfg.hidden_size), dtype=np.float32))
        times: dict[str, list[float]] = {"f32": [], "int8": []}
        for name, fn, ws in (("f32", f32, floats), ("int8", int8, packed)):
            jax.block_until_ready(fn(x, ws))  # compile
        for _ in range(reps):
            for name, fn, ws in (("f32", f32, floats), ("int8", int8, packed)):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(x, ws))
                times[name].append(time.perf_counter() - t0)
        out.append((rows, round(1000 * statistics.median(times["f32"]), 4),
                    round(1000 * statistics.median(times["int8"]), 4)))
    return out


def plan_matmuls(mode: str, platform: str, cfg: ModelConfig, row_counts: list[int], tp: int,
                 cache_dir: Path | None) -> MatmulPlan:
    """The plan for `mode` (QUANTIZATION_CHOICES). Raises ValueError when int8 is forced where it cannot
    run (not the CPU, tensor parallelism, or the kernel failed to build: the message says why)."""
    if mode not in QUANTIZATION_CHOICES:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_CHOICES)}, got {mode!r}")
    everything = frozenset(row_counts)
    if mode == "none":
        return MatmulPlan(frozenset(), "float32 matmuls (--quantization none)")
    if platform != "cpu" or tp > 1:
        if mode == "int8":
            raise ValueError("--quantization int8 is the CPU int8 kernel: it needs the CPU platform and --tp-size 1")
        return MatmulPlan(frozenset(), f"float matmuls ({platform}{f', tp {tp}' if tp > 1 else ''})")
    from pallas_kernels.int8_matmul import KernelUnavailable, load_kernel

    build_dir = (cache_dir or default_cache_dir()) / "kernels"
    try:
        isa = load_kernel(build_dir)
    except KernelUnavailable as e:
        if mode == "int8":
            raise ValueError(f"--quantization int8: the CPU int8 kernel is unavailable: {e}") from e
        return MatmulPlan(frozenset(), f"float32 matmuls (the int8 kernel is unavailable: {e})")
    if mode == "int8":
        return MatmulPlan(everything, "int8 matmuls (--quantization int8)")
    if isa == "portable":
        return MatmulPlan(frozenset(), "float32 matmuls (this CPU has neither AVX-512 VNNI nor AVX2 for the int8 "
                                       "kernel)")
    if projection_bytes(cfg) < MIN_INT8_WEIGHT_BYTES:
        return MatmulPlan(frozenset(), "float32 matmuls (weights small enough to stay in cache)")
    return _measured(cfg, sorted(everything), cache_dir, isa)


def _measured(cfg: ModelConfig, row_counts: list[int], cache_dir: Path | None, isa: str) -> MatmulPlan:
    from pallas_kernels.native_build import cpu_identity, library_path

    key_text = json.dumps([projection_shapes(cfg), row_counts, cpu_identity(), jax.__version__,
                           library_path("int8_matmul.cc", Path("/")).name])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:24]
    path = cache_dir / "matmul_plans" / f"{key}.json" if cache_dir is not None else None
    timings = None
    if path is not None and path.exists():
        try:
            timings = [tuple(t) for t in json.loads(path.read_text())["timings"]]
        except (OSError, ValueError, KeyError):
            timings = None
    source = "measured before"
    if timings is None:
        t0 = time.perf_counter()
        timings = measure(cfg, row_counts)
        source = f"measured in {time.perf_counter() - t0:.1f} s"
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"timings": timings}))
            tmp.replace(path)
    int8_rows = frozenset(rows for rows, f32_ms, int8_ms in timings if int8_ms < f32_ms)
    float_rows = sorted(set(row_counts) - int8_rows)
    reason = (f"int8 matmuls ({isa}) for steps of {', '.join(map(str, sorted(int8_rows))) or 'no'} rows, float32 for "
              f"{', '.join(map(str, float_rows)) or 'none'} ({source}; layer ms float32/int8: "
              + ", ".join(f"{r}: {a:.2f}/{b:.2f}" for r, a, b in timings) + ")")
    return MatmulPlan(int8_rows, reason, tuple(timings))
