"""The model forward with each pure-JAX attention backend, against the same forward with attention removed.

    python benchmarks/bench_forward_attention.py [--model PATH] [--shapes 32x1x16 1x256x32] [--rounds 8] [--int8]

Shapes are rows x tokens x pages-per-row (page size 16; decode rows sit at position 200, prefill rows
start at 0). The variants are timed round-robin in one process (min of `--rounds`), so a busy or
throttled machine affects them alike. Uses the engine's layout: per-layer weights on CPU, fused
projections, paged cache of 1024 pages. Prints a line per shape, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.engine.attention import PagedCacheOps, PagedMeta
from jaxserve.engine.host_memory import keep_freed_memory_in_heap
from jaxserve.engine.kv_cache import init_paged_cache
from jaxserve.models.forward import make_forward
from jaxserve.config import cache_dir
from jaxserve.models.llama import fuse_projections, quantize_int8, unstack_layers
from jaxserve.models.loader import load_params, read_model_config, resolve_model_dir
from pallas_kernels.int8_matmul import load_kernel
from pallas_kernels.paged_attention_cpu import load_kernel as load_attention_kernel, paged_attention_cpu
from pallas_kernels.reference import paged_attention_reference
from pallas_kernels.xla_attention import paged_attention_xla

PAGE = 16
NUM_PAGES = 1024


@dataclass(frozen=True)
class NoAttention:
    """Writes nothing and attends to nothing: the rest of the forward pass alone."""

    def update_and_attend(self, q, k, v, cache, layer, meta):
        return q + k.sum() + v.sum(), cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--shapes", nargs="+", default=["32x1x16", "1x256x32"])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--int8", action="store_true", help="also each variant with the CPU int8 matmuls")
    args = ap.parse_args()
    keep_freed_memory_in_heap()
    path = resolve_model_dir(args.model)
    cfg = read_model_config(path)
    scan = jax.devices()[0].platform != "cpu"
    params = load_params(path, cfg, "float32")
    params = jax.device_put(fuse_projections(params if scan else unstack_layers(params, cfg.num_layers)))
    scale = cfg.head_dim**-0.5
    variants = {"no_attention": NoAttention(), "reference": PagedCacheOps(paged_attention_reference, scale),
                "xla": PagedCacheOps(paged_attention_xla, scale)}
    if jax.devices()[0].platform == "cpu":
        load_attention_kernel(cache_dir() / "kernels")
        variants["cpu"] = PagedCacheOps(paged_attention_cpu, scale)
    int8_params = None
    if args.int8:
        load_kernel(cache_dir() / "kernels")
        int8_params = jax.device_put(quantize_int8(params, cfg, keep_float=False))
        variants |= {f"{name} int8": ops for name, ops in variants.items() if name != "reference"}
    results = []
    for spec in args.shapes:
        rows, tokens, width = (int(x) for x in spec.split("x"))
        table = (np.arange(1, rows * width + 1, dtype=np.int32).reshape(rows, width) * 7) % NUM_PAGES
        first = 200 if tokens == 1 else 0
        pos = np.broadcast_to(np.arange(first, first + tokens), (rows, tokens)).astype(np.int32)
        if (first + tokens) > width * PAGE:
            raise ValueError(f"shape {spec}: {first + tokens} positions do not fit {width} pages")
        meta = PagedMeta(jnp.asarray(table), jnp.full((rows,), first + tokens, jnp.int32), jnp.asarray(pos[:, 0]),
                         jnp.asarray(np.take_along_axis(table, pos // PAGE, axis=1)), jnp.asarray(pos % PAGE))
        runs = {}
        for name, ops in variants.items():
            int8 = name.endswith(" int8")
            fwd = jax.jit(make_forward(cfg, "float32", ops, scan_layers=scan, fused_projections=True, int8=int8),
                          donate_argnums=(3,))
            state = {"cache": init_paged_cache(cfg, NUM_PAGES, PAGE, jnp.float32)}

            def run(fwd=fwd, state=state, p=int8_params if int8 else params):
                logits, state["cache"] = fwd(p, jnp.full((rows, tokens), 5, jnp.int32), jnp.asarray(pos),
                                             state["cache"], meta, jnp.full((rows,), tokens - 1, jnp.int32))
                logits.block_until_ready()

            run()
            run()
            runs[name] = run
        times = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
        ms = {name: round(min(v) * 1e3, 1) for name, v in times.items()}
        print(f"{spec}: " + ", ".join(f"{k} {v} ms" for k, v in ms.items()), flush=True)
        results.append({"shape": spec, "ms": ms})
    print(json.dumps({"bench": "forward_attention", "device": jax.devices()[0].device_kind, "results": results}))


if __name__ == "__main__":
    main()
