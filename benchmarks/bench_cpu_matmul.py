"""XLA:CPU matmul throughput on SmolLM2-135M's decode shapes under XLA's alternative CPU code paths, next to
OpenBLAS through NumPy (and, with the default flags, NumPy's memory read and copy rates): does an XLA flag make the 32-row (decode) or 512-row (prefill) matmuls faster?

    python benchmarks/bench_cpu_matmul.py [--rows 32 512] [--repeats 2]

Each flag set runs in its own process (XLA flags are process-wide), `--repeats` times, round-robin, so the
spread between repeats of the default shows the machine's noise. Times: median of 15 calls. Prints a line per
run, then one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

FLAG_SETS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "xnn_graph_greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "xnn_graph_greedy_slinky": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY_SLINKY",
    "ynn_dot": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT",
}
HIDDEN, INTERMEDIATE, VOCAB, LAYERS = 576, 1536, 49152, 8


def measure(rows: list[int]) -> dict:
    """In this process (flags already in the environment): GFLOP/s of 8 layers' MLPs and of the LM head."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench_sampler import time_calls  # median ms of timed calls; benchmarks/ is on sys.path here

    def median_ms(fn, *args) -> float:
        fn(*args)  # compile / warm up outside the timed calls
        return time_calls(lambda: fn(*args), 15)

    rng = np.random.default_rng(0)
    w_gate_up = jnp.asarray(rng.standard_normal((HIDDEN, 2 * INTERMEDIATE)) * 0.02, jnp.float32)
    w_down = jnp.asarray(rng.standard_normal((INTERMEDIATE, HIDDEN)) * 0.02, jnp.float32)
    w_head = jnp.asarray(rng.standard_normal((HIDDEN, VOCAB)) * 0.02, jnp.float32)

    @jax.jit
    def mlps(x, w_gate_up, w_down):
        for _ in range(LAYERS):
            gate, up = jnp.split(x @ w_gate_up, 2, axis=-1)
            x = x + (jax.nn.silu(gate) * up) @ w_down
        return x

    head = jax.jit(lambda x, w: x @ w)
    out = {}
    for m in rows:
        x = jnp.asarray(rng.standard_normal((m, HIDDEN)), jnp.float32)
        mlp_ms = median_ms(mlps, x, w_gate_up, w_down)
        head_ms = median_ms(head, x, w_head)
        mlp_flop = LAYERS * 2 * m * (HIDDEN * 2 * INTERMEDIATE + INTERMEDIATE * HIDDEN)
        head_flop = 2 * m * HIDDEN * VOCAB
        out[m] = {"mlp_ms": round(mlp_ms, 2), "mlp_gflops": round(mlp_flop / mlp_ms / 1e6, 1),
                  "head_ms": round(head_ms, 2), "head_gflops": round(head_flop / head_ms / 1e6, 1)}
        if os.environ.get("XLA_FLAGS", "") == "":
            xn, wn = np.asarray(x), np.asarray(w_head)
            numpy_ms = median_ms(lambda a, b: a @ b, xn, wn)
            out[m]["numpy_head_gflops"] = round(head_flop / numpy_ms / 1e6, 1)
    if os.environ.get("XLA_FLAGS", "") == "":
        # The memory rates the decode step is bound by: one NumPy thread reading, and copying, 256 MB.
        big = np.ones(64 * 1024 * 1024, np.float32)
        dst = np.empty_like(big)
        out["memory"] = {"read_gb_s": round(big.nbytes / median_ms(np.sum, big) / 1e6, 2),
                         "copy_gb_s": round(2 * big.nbytes / median_ms(np.copyto, dst, big) / 1e6, 2)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, nargs="+", default=[32, 512])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.rows)))
        return
    runs: dict[str, list[dict]] = {name: [] for name in FLAG_SETS}
    for repeat in range(args.repeats):
        for name, flags in FLAG_SETS.items():
            env = {**os.environ, "XLA_FLAGS": flags}
            proc = subprocess.run([sys.executable, __file__, "--child", "--rows", *map(str, args.rows)], env=env,
                                  capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                runs[name].append({"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"})
            else:
                runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"repeat {repeat} {name:24s} {json.dumps(runs[name][-1])}", flush=True)
    print(json.dumps({"bench": "cpu_matmul", "rows": args.rows, "flag_sets": FLAG_SETS, "runs": runs}))


if __name__ == "__main__":
    main()
