"""Which matmul precision is fastest on this CPU, per batch size: one decode step's matmuls of SmolLM2-135M
(30 layers of q/k/v, o, gate/up, down, and the LM head) under XLA:CPU as

  f32       float32 weights and activations
  bf16      bfloat16 weights and activations, float32 accumulation
  w8        int8 weights (per output channel scales), float32 activations (weights converted in the dot)
  w8a8      int8 weights and int8 activations (per row scales, quantized in the program), int32 accumulation
  int8k     the same arithmetic as w8a8 through jaxserve's CPU kernel (pallas_kernels/int8_matmul.cc, a custom
            call: AVX-512 VNNI or AVX2), the path `--quantization auto` measures at start-up

    python benchmarks/bench_cpu_precision.py [--rows 1 8 32] [--iters 20]

Median ms per step, and GB/s of weights read. Prints a JSON line last.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_common import machine  # noqa: E402

from pallas_kernels.int8_matmul import int8_matmul, load_kernel, pack  # noqa: E402
from jaxserve.config import cache_dir  # noqa: E402

HIDDEN, INTER, LAYERS, VOCAB, HEADS, KV, HEAD_DIM = 576, 1536, 30, 49152, 9, 3, 64
SHAPES = [(HIDDEN, (HEADS + 2 * KV) * HEAD_DIM), (HEADS * HEAD_DIM, HIDDEN), (HIDDEN, 2 * INTER), (INTER, HIDDEN)]


def make_weights(kind: str, rng: np.random.Generator) -> list:
    out = []
    for k, n in SHAPES * LAYERS + [(HIDDEN, VOCAB)]:
        w = rng.standard_normal((k, n), dtype=np.float32) * 0.02
        if kind == "f32":
            out.append(jnp.asarray(w))
        elif kind == "int8k":
            out.append({key: jnp.asarray(v) for key, v in pack(w).items()})
        elif kind == "bf16":
            out.append(jnp.asarray(w, dtype=jnp.bfloat16))
        else:
            scale = np.abs(w).max(axis=0) / 127.0
            q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
            out.append((jnp.asarray(q), jnp.asarray(scale.astype(np.float32))))
    return out


def matmul(kind: str, x: jax.Array, w, n: int) -> jax.Array:
    if kind == "f32":
        return x @ w
    if kind == "bf16":
        return jnp.dot(x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)
    if kind == "int8k":
        return int8_matmul(x, w["qweight"], w["scale"], w["wsum"], n)
    q, scale = w
    if kind == "w8":
        return jnp.dot(x, q.astype(jnp.float32)) * scale
    # w8a8: symmetric per-row activation scales; int8 x int8 -> int32 (what VNNI / AMX accelerate)
    amax = jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True), 1e-6)
    xq = jnp.clip(jnp.round(x * (127.0 / amax)), -127, 127).astype(jnp.int8)
    acc = jax.lax.dot(xq, q, preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * (amax / 127.0) * scale


def nbytes_of(w) -> int:
    if isinstance(w, dict):
        return sum(v.nbytes for v in w.values())
    return w.nbytes if not isinstance(w, tuple) else w[0].nbytes + w[1].nbytes


def step_fn(kind: str):
    def step(x, weights):
        # One step's matmuls in sequence (each output feeds the next of matching width, so none is dead code).
        h = x
        outs = []
        for i, w in enumerate(weights[:-1]):
            k, n = SHAPES[i % len(SHAPES)]
            outs.append(matmul(kind, h[:, :k] if h.shape[1] >= k else jnp.tile(h, (1, -(-k // h.shape[1])))[:, :k], w,
                               n))
            h = outs[-1]
        logits = matmul(kind, x, weights[-1], VOCAB)
        return logits.sum() + sum(o.sum() for o in outs)

    return jax.jit(step)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--kinds", nargs="+", default=["f32", "bf16", "w8", "w8a8", "int8k"])
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    results = {}
    if "int8k" in args.kinds:
        print(f"int8 kernel: {load_kernel(cache_dir() / 'kernels')}", flush=True)
    for kind in args.kinds:
        weights = make_weights(kind, rng)
        nbytes = sum(nbytes_of(w) for w in weights)
        fn = step_fn(kind)
        for rows in args.rows:
            x = jnp.asarray(rng.standard_normal((rows, HIDDEN), dtype=np.float32))
            fn(x, weights).block_until_ready()
            times = []
            for _ in range(args.iters):
                t0 = time.perf_counter()
                fn(x, weights).block_until_ready()
                times.append(time.perf_counter() - t0)
            ms = float(np.median(times)) * 1e3
            results.setdefault(kind, {})[rows] = {"ms": round(ms, 2), "weights_gb_s": round(nbytes / ms / 1e6, 1)}
            print(f"{kind:5s} rows {rows:3d}: {ms:8.2f} ms per step ({nbytes / 2**20:.0f} MiB of weights, "
                  f"{nbytes / ms / 1e6:.1f} GB/s)", flush=True)
        del weights
    print(json.dumps({"bench": "cpu_precision", "machine": machine(), "results": results}))


if __name__ == "__main__":
    main()
