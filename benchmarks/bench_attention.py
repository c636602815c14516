"""Paged attention on this machine: native kernel checks, copy bandwidth, decode kernel timings.

    python benchmarks/bench_attention.py                 # on a GPU: checks, bandwidth, decode table
    python benchmarks/bench_attention.py --checks-only   # just the kernel-vs-reference checks
    python benchmarks/bench_attention.py --small         # tiny shapes; on CPU the kernels run interpreted

Decode timings use Llama-3-8B attention shapes (32 query heads, 8 KV heads, head_dim 128, bf16,
page_size 16) at every (batch, context) pair, for three implementations on the same stacked cache:
ours (`pallas_gpu` / `pallas_tpu`), the pure-JAX reference (XLA), and jax's own
`jax.experimental.pallas.ops.gpu.paged_attention` (fed `k_cache[layer]`, its per-layer layout).
Each timed call is a device loop of `--inner` dependent attention calls inside one jit (launch and
host overhead amortised the same way for everyone; the loop's own per-iteration cost is measured
with a trivial body and subtracted, both numbers are reported); achieved bandwidth counts the K/V bytes a
decode step must read (batch * context * kv_heads * head_dim * 2 (K and V) * itemsize), compared
with the card's measured copy bandwidth (read + write of a large array).

Only jax, numpy and this repository's `pallas_kernels` are imported (no pytest, fastapi, pydantic),
so it runs on a bare accelerator VM. A table is printed, then one JSON line last.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
import zlib
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.paged_attention_gpu import GpuKernelConfig, paged_attention_gpu  # noqa: E402
from pallas_kernels.paged_attention_tpu import paged_attention_tpu  # noqa: E402
from pallas_kernels.reference import paged_attention_reference  # noqa: E402
from pallas_kernels.testing import (  # noqa: E402
    GPU_CASES,
    TPU_CASES,
    CheckResult,
    KernelCase,
    check_kernel,
    make_problem,
    max_relative_error,
    naive_dense_attention,
    query_validity,
)

GOAL_BATCH, GOAL_CONTEXT, GOAL_FRACTION = 64, 2048, 0.70


@dataclass(frozen=True)
class DecodeShape:
    batch: int
    context: int
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16
    dtype: str = "bfloat16"

    @property
    def kv_bytes(self) -> int:
        """K/V bytes one decode step reads: the floor on its memory traffic."""
        itemsize = jnp.dtype(self.dtype).itemsize
        return self.batch * self.context * self.num_kv_heads * self.head_dim * 2 * itemsize


# ----------------------------------------------------------------------------------------------
# Correctness checks (the same cases as tests/test_pallas_kernels.py, natively when possible)


def run_checks(platform: str, small: bool) -> list[dict]:
    native = platform in ("gpu", "tpu")
    results = []

    def record(name: str, fn) -> None:
        start = time.perf_counter()
        try:
            result = fn()
            entry = dict(name=name, passed=result.passed, relative_error=result.relative_error,
                         tolerance=result.tolerance, padding_is_zero=result.padding_is_zero)
        except Exception as exc:  # a lowering/compile failure is a failed check, reported, not hidden
            entry = dict(name=name, passed=False, error=f"{type(exc).__name__}: {exc}"[:500])
        entry["seconds"] = round(time.perf_counter() - start, 2)
        results.append(entry)
        status = "PASS" if entry["passed"] else "FAIL"
        print(f"[check] {status} {name} {entry.get('relative_error', entry.get('error'))} ({entry['seconds']}s)",
              flush=True)

    seed = lambda case: zlib.crc32(case.name.encode())  # noqa: E731
    gpu_cases = GPU_CASES[:2] if small and not native else GPU_CASES
    if platform != "tpu":
        for case in gpu_cases:
            record(f"pallas_gpu/{case.name}", functools.partial(
                check_kernel, paged_attention_gpu, case, seed=seed(case), interpret=not native, poison_output=True))
        split = KernelCase("split-kv", (300, 45, 0, 129), (1, 1, 0, 1), 8, 2, 64, 16)
        record("pallas_gpu/split-kv", functools.partial(
            check_kernel, paged_attention_gpu, split, seed=1, interpret=not native, poison_output=True,
            config=GpuKernelConfig(keys_per_block=32, num_kv_splits=4)))
    if platform == "tpu":  # elsewhere the TPU kernel only runs interpreted: tests/test_pallas_kernels.py
        for case in TPU_CASES:
            record(f"pallas_tpu/{case.name}", functools.partial(
                check_kernel, paged_attention_tpu, case, seed=seed(case), interpret=False))

    # The reference itself against a float64 NumPy loop, on this backend.
    def reference_vs_naive(case: KernelCase) -> CheckResult:
        problem = make_problem(np.random.default_rng(5), seq_lens=list(case.seq_lens), q_lens=list(case.q_lens),
                               num_heads=case.num_heads, num_kv_heads=case.num_kv_heads, head_dim=case.head_dim,
                               page_size=case.page_size)
        options = dict(scale=case.head_dim ** -0.5, soft_cap=case.soft_cap, sliding_window=case.sliding_window)
        actual = np.asarray(jax.jit(functools.partial(paged_attention_reference, **options))(*problem.args()))
        valid = query_validity(problem)
        return CheckResult(
            relative_error=max_relative_error(actual, naive_dense_attention(problem, **options), valid),
            tolerance=1e-5,
            padding_is_zero=bool(np.all(actual[~valid] == 0)),
        )

    record("reference/vs-naive-extend", functools.partial(reference_vs_naive, GPU_CASES[4]))
    return results


# ----------------------------------------------------------------------------------------------
# Timing


def measure_copy_bandwidth(num_bytes: int, repeats: int) -> float:
    """GB/s of `x + 1` over a large float32 array: reads and writes `num_bytes` each."""
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    step = jax.jit(lambda a: a + 1.0)
    step(x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(x).block_until_ready()
        times.append(time.perf_counter() - start)
    del x
    return 2 * num_bytes / min(times) / 1e9


def make_decode_problem(shape: DecodeShape, key: jax.Array):
    """Device-side random stacked cache (one layer) with shuffled pages; every row at full context."""
    pages_per_row = shape.context // shape.page_size
    num_pages = shape.batch * pages_per_row + 1  # + the null page
    dtype = jnp.dtype(shape.dtype)
    k_key, v_key, q_key, p_key = jax.random.split(key, 4)
    cache_shape = (1, shape.num_kv_heads, num_pages, shape.page_size, shape.head_dim)
    k_cache = jax.random.normal(k_key, cache_shape, dtype)
    v_cache = jax.random.normal(v_key, cache_shape, dtype)
    q = jax.random.normal(q_key, (shape.batch, 1, shape.num_heads, shape.head_dim), dtype)
    page_table = (jax.random.permutation(p_key, num_pages - 1) + 1).astype(jnp.int32)
    page_table = page_table.reshape(shape.batch, pages_per_row)
    seq_lens = jnp.full((shape.batch,), shape.context, jnp.int32)
    q_start = seq_lens - 1
    return q, k_cache, v_cache, jnp.int32(0), page_table, seq_lens, q_start


def decode_impls(platform: str, interpret: bool, gpu_config: GpuKernelConfig) -> dict:
    """name -> fn(q, k_cache, v_cache, layer, page_table, seq_lens, q_start, *, scale) -> [B, 1, H, D]."""
    from pallas_kernels.xla_attention import paged_attention_xla

    impls = {"reference": paged_attention_reference, "xla": paged_attention_xla}
    if platform == "tpu":
        impls["ours"] = paged_attention_tpu
    else:
        impls["ours"] = functools.partial(paged_attention_gpu, interpret=interpret, config=gpu_config)
        try:
            from jax.experimental.pallas.ops.gpu import paged_attention as jax_ops_paged
        except ImportError as exc:  # reported in the table, not hidden
            print(f"[bench] jax.experimental.pallas.ops.gpu.paged_attention unavailable: {exc}", flush=True)
        else:
            def jax_kernel(q, k_cache, v_cache, layer, page_table, seq_lens, q_start, *, scale):
                del layer, q_start  # one-layer cache; decode: the query sits at seq_len - 1
                # jax's kernel has no scale argument: pre-scale q; its layout is [KV, P, S, D] per layer.
                # It splits the page table into k_splits equal partitions (default 16): keep that a divisor.
                pages_per_row = page_table.shape[1]
                k_splits = max(d for d in (1, 2, 4, 8, 16) if pages_per_row % d == 0)
                layer_shape = k_cache.shape[1:]  # reshape, not k_cache[0]: a guaranteed bitcast, no copy
                out = jax_ops_paged.paged_attention(
                    (q[:, 0] * scale).astype(q.dtype), k_cache.reshape(layer_shape), v_cache.reshape(layer_shape),
                    page_table, seq_lens,
                    k_splits=k_splits, interpret=interpret,
                )
                return out[:, None]
            impls["jax_pallas_gpu"] = jax_kernel
    return impls


def time_decode(fn, args: tuple, *, scale: float, inner: int, repeats: int) -> tuple[float, jax.Array]:
    """Seconds per iteration of a device loop of `inner` chained calls (each q depends on the last output).

    A `fori_loop` keeps compile time independent of `inner` (one kernel instance per implementation);
    its per-iteration overhead is measured by `loop_overhead` and subtracted by the caller.
    """

    @jax.jit
    def chain(q, *rest):
        def body(_, out):
            return fn(q + (out * 1e-3).astype(q.dtype), *rest, scale=scale).astype(q.dtype)

        return jax.lax.fori_loop(0, inner, body, q)

    chain(*args).block_until_ready()  # compile + warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        chain(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    single = jax.jit(functools.partial(fn, scale=scale))(*args)
    return statistics.median(times) / inner, single


def loop_overhead(args: tuple, *, inner: int, repeats: int) -> float:
    """Per-iteration cost of the timing loop itself (a trivial body on the same q)."""
    seconds, _ = time_decode(lambda q, *rest, scale: q * scale, args, scale=0.5, inner=inner, repeats=repeats)
    return seconds


def run_decode_benchmarks(platform, shapes, *, interpret, inner, repeats, copy_gbps, gpu_config,
                          deadline: float) -> tuple[list[dict], list[dict]]:
    """Timed rows, and the shapes skipped because the time budget ran out (reported, not hidden)."""
    rows, skipped = [], []
    for shape in shapes:
        if time.monotonic() > deadline:
            skipped.append(asdict(shape))
            print(f"[decode] time budget spent: skipping batch={shape.batch} context={shape.context}", flush=True)
            continue
        args = make_decode_problem(shape, jax.random.key(shape.batch * 100003 + shape.context))
        scale = shape.head_dim ** -0.5
        outputs = {}
        shape_rows = []
        overhead = loop_overhead(args, inner=inner, repeats=repeats)
        for name, fn in decode_impls(platform, interpret, gpu_config).items():
            entry = dict(asdict(shape), impl=name)
            try:
                raw, outputs[name] = time_decode(fn, args, scale=scale, inner=inner, repeats=repeats)
                entry.update(_timing_fields(raw, overhead, shape.kv_bytes, copy_gbps))
            except Exception as exc:  # record the failure in the table; the JSON line says which
                entry.update(error=f"{type(exc).__name__}: {exc}"[:300])
            shape_rows.append(entry)
            print(f"[decode] {entry}", flush=True)
        if "reference" in outputs:
            expected = np.asarray(outputs["reference"], np.float32)
            valid = np.ones(expected.shape[:2], bool)
            for entry in shape_rows:
                if entry["impl"] in outputs:
                    entry["rel_err_vs_reference"] = round(
                        max_relative_error(np.asarray(outputs[entry["impl"]], np.float32), expected, valid), 5)
        rows.extend(shape_rows)
        del args, outputs
    return rows, skipped


def _timing_fields(raw: float, overhead: float, kv_bytes: int, copy_gbps: float) -> dict:
    """us per call net of the loop overhead (raw kept too); GB/s from the net time."""
    net = raw - overhead
    if net <= 0.05 * raw:  # the loop overhead swamps the kernel: do not report a bandwidth
        return dict(us=round(raw * 1e6, 2), raw_us=round(raw * 1e6, 2), loop_overhead_us=round(overhead * 1e6, 2),
                    gbps=None, frac_of_copy_bw=None)
    gbps = kv_bytes / net / 1e9
    return dict(us=round(net * 1e6, 2), raw_us=round(raw * 1e6, 2), loop_overhead_us=round(overhead * 1e6, 2),
                gbps=round(gbps, 1), frac_of_copy_bw=round(gbps / copy_gbps, 3))


def sweep_gpu_configs(shape: DecodeShape, *, inner: int, repeats: int, copy_gbps: float,
                      deadline: float) -> list[dict]:
    """A few kernel configurations at the goal shape, to show how sensitive the kernel is to them."""
    args = make_decode_problem(shape, jax.random.key(7))
    overhead = loop_overhead(args, inner=inner, repeats=repeats)
    rows = []
    for keys, warps, stages, splits in [(64, 4, 2, None), (128, 4, 2, None), (128, 4, 3, None), (128, 8, 2, None),
                                        (256, 8, 2, None), (128, 4, 2, 1), (128, 4, 2, 4)]:
        config = GpuKernelConfig(keys_per_block=keys, num_warps=warps, num_stages=stages, num_kv_splits=splits)
        entry = dict(keys_per_block=keys, num_warps=warps, num_stages=stages, num_kv_splits=splits)
        if time.monotonic() > deadline:
            entry["skipped"] = "time budget spent"
            rows.append(entry)
            continue
        try:
            raw, _ = time_decode(functools.partial(paged_attention_gpu, config=config), args,
                                 scale=shape.head_dim ** -0.5, inner=inner, repeats=repeats)
            entry.update(_timing_fields(raw, overhead, shape.kv_bytes, copy_gbps))
        except Exception as exc:
            entry.update(error=f"{type(exc).__name__}: {exc}"[:300])
        print(f"[sweep] {entry}", flush=True)
        rows.append(entry)
    return rows


def print_table(checks: list[dict], copy_gbps: float, decode_rows: list[dict]) -> None:
    passed = sum(c["passed"] for c in checks)
    print(f"\nkernel checks: {passed}/{len(checks)} passed" if checks else "\nkernel checks: skipped")
    for c in checks:
        if not c["passed"]:
            print(f"  FAILED {c['name']}: {c.get('error') or c.get('relative_error')}")
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s")
    header = f"{'batch':>6} {'context':>7} {'impl':>15} {'us/call':>10} {'GB/s':>8} {'of copy':>8} {'rel err':>9}"
    print(header)
    print("-" * len(header))
    for r in decode_rows:
        if "error" in r:
            print(f"{r['batch']:>6} {r['context']:>7} {r['impl']:>15}  ERROR {r['error'][:80]}")
            continue
        gbps = "n/a" if r["gbps"] is None else f"{r['gbps']:.1f}"
        frac = "n/a" if r["frac_of_copy_bw"] is None else f"{r['frac_of_copy_bw']:.1%}"
        print(f"{r['batch']:>6} {r['context']:>7} {r['impl']:>15} {r['us']:>10.1f} {gbps:>8} {frac:>8} "
              f"{r.get('rel_err_vs_reference', float('nan')):>9.2g}")


def goal_summary(decode_rows: list[dict]) -> dict:
    def find(impl):
        for r in decode_rows:
            if (r["batch"] == GOAL_BATCH and r["context"] == GOAL_CONTEXT and r["impl"] == impl
                    and r.get("gbps") is not None):
                return r
        return None

    ours, theirs = find("ours"), find("jax_pallas_gpu")
    if ours is None:
        return dict(measured=False)
    summary = dict(measured=True, batch=GOAL_BATCH, context=GOAL_CONTEXT, frac_of_copy_bw=ours["frac_of_copy_bw"],
                   target_frac=GOAL_FRACTION)
    if theirs is not None:
        summary["speedup_vs_jax_kernel"] = round(theirs["us"] / ours["us"], 3)
    summary["met"] = ours["frac_of_copy_bw"] >= GOAL_FRACTION and summary.get("speedup_vs_jax_kernel", 0) >= 1.0
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checks-only", action="store_true")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--small", action="store_true", help="tiny shapes (implied on CPU)")
    parser.add_argument("--batches", default="8,64,256")
    parser.add_argument("--contexts", default="512,2048,8192")
    parser.add_argument("--inner", type=int, default=20, help="chained calls per timed jit")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-sweep", action="store_true", help="skip the kernel-config sweep at the goal shape")
    parser.add_argument("--time-budget-s", type=float, default=180.0,
                        help="start no new decode shape (or the sweep) after this many seconds")
    args = parser.parse_args()
    deadline = time.monotonic() + args.time_budget_s

    platform = jax.default_backend()
    small = args.small or platform == "cpu"
    interpret = platform == "cpu"
    device = jax.devices()[0]
    print(f"[bench] jax {jax.__version__} on {platform}: {device.device_kind}", flush=True)

    checks = [] if args.skip_checks else run_checks(platform, small)
    copy_gbps = None
    decode_rows: list[dict] = []
    skipped_shapes: list[dict] = []
    sweep_rows: list[dict] = []
    if not args.checks_only:
        copy_gbps = measure_copy_bandwidth((64 << 20) if small else (4 << 30), repeats=args.repeats)
        print(f"[bench] copy bandwidth {copy_gbps:.1f} GB/s", flush=True)
        if small:
            shapes = [DecodeShape(batch=2, context=64, num_heads=8, num_kv_heads=2, head_dim=64)]
            inner, repeats = 2, 1
        else:
            shapes = [DecodeShape(batch=int(b), context=int(c))
                      for b in args.batches.split(",") for c in args.contexts.split(",")]
            # The goal shape first, so a tight time budget still measures it.
            shapes.sort(key=lambda sh: (sh.batch, sh.context) != (GOAL_BATCH, GOAL_CONTEXT))
            inner, repeats = args.inner, args.repeats
        gpu_config = GpuKernelConfig()
        decode_rows, skipped_shapes = run_decode_benchmarks(
            platform, shapes, interpret=interpret, inner=inner, repeats=repeats, copy_gbps=copy_gbps,
            gpu_config=gpu_config, deadline=deadline)
        if platform == "gpu" and not small and not args.no_sweep and time.monotonic() < deadline:
            sweep_rows = sweep_gpu_configs(DecodeShape(GOAL_BATCH, GOAL_CONTEXT), inner=inner, repeats=repeats,
                                           copy_gbps=copy_gbps, deadline=deadline + 60)
        print_table(checks, copy_gbps, decode_rows)
    else:
        passed = sum(c["passed"] for c in checks)
        print(f"\nkernel checks: {passed}/{len(checks)} passed")

    failed = [c["name"] for c in checks if not c["passed"]]
    print(json.dumps(dict(
        benchmark="bench_attention",
        jax=jax.__version__,
        platform=platform,
        device=device.device_kind,
        small=small,
        checks=None if args.skip_checks else dict(passed=len(checks) - len(failed), failed=failed),
        copy_bandwidth_gbps=None if copy_gbps is None else round(copy_gbps, 1),
        decode=decode_rows,
        skipped_shapes=skipped_shapes,
        sweep=sweep_rows,
        goal=goal_summary(decode_rows) if decode_rows else None,
    )))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
