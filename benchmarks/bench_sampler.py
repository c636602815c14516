"""Per-call cost of the jitted sampler on this machine.

For each batch size (default 1, 32, 64) and each parameter mix, times `sample` on random [B, V] logits
(V = 49152, SmolLM2's vocabulary) after a warm-up call, and reports the median milliseconds per call:
  greedy        temperature 0 (no sort-free filter branch, no penalties)
  temperature   temperature 1, no filtering
  top_p_peaked  temperature 1, top_p 0.95, "peaked" logits (Gaussian std 2, 16 tokens per row raised by
                15, like a confident LM step): the nucleus fits in the top-k cap
  top_p_wide    temperature 1, top_p 0.95, Gaussian logits of std 3: a nucleus of ~3400 tokens, wider than
                the cap (the value-search fallback)
  top_k_min_p   top_k 50, min_p 0.05
  penalties     temperature 1, presence/frequency/repetition penalties, 300 logit_bias entries
Also prints the one-time compile time. The last stdout line is JSON.

  python benchmarks/bench_sampler.py [--rows 1,32,64] [--vocab 49152] [--iters 20]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.constrained.tables import unconstrained_row
from jaxserve.sampling.batch import SamplingRow, build_sampling_batch
from jaxserve.sampling.params import SamplingParams
from jaxserve.sampling.penalties import init_penalty_state
from jaxserve.sampling.sampler import sample

MIXES = {
    "greedy": (SamplingParams(temperature=0.0), "wide"),
    "temperature": (SamplingParams(temperature=1.0), "wide"),
    "top_p_peaked": (SamplingParams(temperature=1.0, top_p=0.95), "peaked"),
    "top_p_wide": (SamplingParams(temperature=1.0, top_p=0.95), "wide"),
    "top_k_min_p": (SamplingParams(temperature=1.0, top_k=50, min_p=0.05), "wide"),
    "penalties": (
        SamplingParams(
            temperature=1.0,
            presence_penalty=0.5,
            frequency_penalty=0.5,
            repetition_penalty=1.2,
            logit_bias=tuple((i * 97, 1.0) for i in range(300)),
        ),
        "wide",
    ),
}


def make_logits(rng: np.random.Generator, rows: int, vocab: int) -> dict[str, np.ndarray]:
    wide = (rng.standard_normal((rows, vocab)) * 3.0).astype(np.float32)
    peaked = (rng.standard_normal((rows, vocab)) * 2.0).astype(np.float32)
    for row in peaked:
        row[rng.choice(vocab, 16, replace=False)] += 15.0
    return {"wide": wide, "peaked": peaked}


def time_calls(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,32,64")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    vocab = args.vocab
    rng = np.random.default_rng(0)
    table = jnp.asarray(np.stack([unconstrained_row(vocab, vocab)] * 4))
    ends = jnp.asarray([0, -1], jnp.int32)
    results: dict[str, dict[str, float]] = {}
    compile_s: dict[str, float] = {}
    for rows in (int(r) for r in args.rows.split(",")):
        state = init_penalty_state(rows, vocab)
        logits_by_kind = {k: jnp.asarray(v) for k, v in make_logits(rng, rows, vocab).items()}
        results[str(rows)] = {}
        for name, (params, kind) in MIXES.items():
            logits = logits_by_kind[kind]
            batch = jax.device_put(
                build_sampling_batch([SamplingRow(params, seed=i, step=0, slot=i) for i in range(rows)], rows)
            )
            if name == "greedy":
                t0 = time.perf_counter()
                jax.block_until_ready(sample(logits, batch, state, table, ends))
                compile_s[str(rows)] = round(time.perf_counter() - t0, 2)
            else:
                jax.block_until_ready(sample(logits, batch, state, table, ends))
            ms = time_calls(lambda: sample(logits, batch, state, table, ends).tokens, args.iters)
            results[str(rows)][name] = round(ms, 2)
            print(f"B={rows:3d} V={vocab} {name:12s} {ms:8.2f} ms/call", flush=True)
    print(
        json.dumps(
            {
                "benchmark": "sampler",
                "vocab": vocab,
                "ms_per_call": results,
                "compile_s": compile_s,
                "backend": jax.default_backend(),
                "cpus": jax.device_count(),
                "machine": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                # Shared machines: a load average above the core count inflates every number above.
                "load_avg_1m": round(os.getloadavg()[0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
