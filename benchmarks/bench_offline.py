"""Engine-only throughput (no HTTP): output tokens/s at several concurrency levels, and the overhead of
one decode step at batch 1 against one bare jitted forward pass of the same model.

    python benchmarks/bench_offline.py [--model PATH] [--concurrency 1 8 32 64] [--prompt-len 128] [--output-len 128]
        [--json-schema SCHEMA --constrained-concurrency 32 --pairs 3]

Prints a human-readable line per level, then one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import EngineConfig
from jaxserve.engine.engine import LLMEngine
from jaxserve.models.contiguous import ContiguousCacheOps, ContiguousMeta, init_contiguous_cache
from jaxserve.models.forward import make_forward
from jaxserve.sampling.params import SamplingParams

from engine_drive import add_batch, drive  # benchmarks/ is on sys.path when a script here runs


def run_level(engine: LLMEngine, concurrency: int, prompt_len: int, output_len: int, seed: int,
              constraint=None) -> dict:
    # The constraint is compiled here, before the clock starts (the engine caches it).
    if constraint is not None:
        engine.compile_constraint(constraint)
    t0 = time.perf_counter()
    add_batch(engine, f"b{concurrency}", concurrency, prompt_len, output_len, seed, constraint)
    return {"concurrency": concurrency, **drive(engine, concurrency, t0)}


def decode_step_overhead(engine: LLMEngine, context: int, iters: int = 20) -> dict:
    """Median engine decode step at batch 1 vs a bare jitted forward [1, 1] over a contiguous cache."""
    cfg = engine.model_config
    params = engine.runner.params
    fwd = jax.jit(make_forward(cfg, engine.dtype, ContiguousCacheOps(cfg.head_dim**-0.5),
                               scan_layers=engine.runner.scan_layers, fused_projections=True), donate_argnums=(3,))
    kv_dtype = jnp.float32 if engine.dtype == "float32" else jnp.bfloat16
    cache = init_contiguous_cache(cfg, 1, context + iters + 8, kv_dtype)
    bare = []
    for i in range(iters + 3):
        pos = context + i
        t0 = time.perf_counter()
        logits, cache = fwd(params, jnp.array([[5]], jnp.int32), jnp.array([[pos]], jnp.int32), cache,
                            ContiguousMeta(jnp.array([pos], jnp.int32), jnp.array([1], jnp.int32)), jnp.zeros(1, jnp.int32))
        int(jnp.argmax(logits[0]))  # the engine also waits for its sampled token
        bare.append(time.perf_counter() - t0)
    engine.add_request("overhead", [7] * context, SamplingParams(max_tokens=iters + 4, temperature=0, ignore_eos=True))
    steps = []
    while engine.has_work():
        t0 = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t0)
    bare_ms = float(np.median(bare[3:])) * 1e3
    step_ms = float(np.median(steps[2:])) * 1e3  # skip the prefill step
    return {"context": context, "bare_forward_ms": round(bare_ms, 2), "engine_decode_step_ms": round(step_ms, 2),
            "ratio": round(step_ms / bare_ms, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="HF directory or .gguf; default: the embedded SmolLM2-135M")
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32, 64], help="levels (none: only the pairs)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json-schema", default=None, help="also run --constrained-concurrency with this JSON schema on every request")
    ap.add_argument("--constrained-concurrency", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=1, help="unconstrained/json_schema pairs, order alternating")
    args = ap.parse_args()

    cfg = EngineConfig(model=args.model, max_running_requests=max([*args.concurrency, args.constrained_concurrency]),
                       max_model_len=args.max_model_len, dtype=args.dtype)
    t0 = time.perf_counter()
    engine = LLMEngine(cfg)
    load_s = time.perf_counter() - t0
    warm_s = engine.warmup()
    print(f"load {load_s:.1f}s, warm-up {warm_s:.1f}s ({engine.runner.num_compiled()} programs)", flush=True)
    results = []
    for c in args.concurrency:
        r = run_level(engine, c, args.prompt_len, args.output_len, seed=c)
        print(f"concurrency {c:3d}: {r['output_tok_s']:8.2f} output tok/s ({r['seconds']} s), decode {r['decode_tok_s']} tok/s, "
              f"full batch {r['full_batch_tok_s']} tok/s", flush=True)
        results.append(r)
    constrained = []
    pairs = []
    host_matcher = None
    if args.json_schema:
        from jaxserve.constrained.host_matcher import HostGrammar
        from jaxserve.sampling.params import Constraint

        # Each pair runs the same prompts unconstrained and with the schema back to back, so both see the same
        # machine state; the order alternates between pairs so a drift of the machine's speed cancels out.
        c = args.constrained_concurrency
        runs = (("unconstrained", None), ("json_schema", Constraint("json_schema", args.json_schema)))
        # Which path the schema takes: the device tables, or a host matcher per request (synchronous steps).
        path = "host" if isinstance(engine.compile_constraint(runs[1][1]), HostGrammar) else "device"
        print(f"json_schema runs on the {path} path", flush=True)
        for pair in range(args.pairs):
            by_label = {}
            for label, constraint in (runs if pair % 2 == 0 else runs[::-1]):
                r = run_level(engine, c, args.prompt_len, args.output_len, seed=c, constraint=constraint)
                print(f"pair {pair} concurrency {c:3d} {label}: {r['output_tok_s']:8.2f} output tok/s, "
                      f"decode {r['decode_tok_s']} tok/s, full batch {r['full_batch_tok_s']} tok/s, "
                      f"{r['cpu_ms_per_token']} CPU ms/token", flush=True)
                constrained.append({"pair": pair, "constraint": label, **r})
                by_label[label] = r
            # Rates: negative = the constraint is slower. CPU time per token: positive = the constraint costs more.
            pairs.append({key: round(by_label["json_schema"][key] / by_label["unconstrained"][key] - 1.0, 4)
                          for key in ("output_tok_s", "full_batch_tok_s", "cpu_ms_per_token")
                          if by_label["json_schema"][key] and by_label["unconstrained"][key]})
        stats = engine.stats()
        host_matcher = {"path": path, "requests": stats.num_constrained_host_matcher_total,
                        "host_seconds": round(stats.host_matcher_seconds_total, 3)}
        for key in ("output_tok_s", "full_batch_tok_s", "cpu_ms_per_token"):
            diffs = sorted(p[key] for p in pairs if key in p)
            if diffs:
                print(f"json_schema vs unconstrained, {key}: median {float(np.median(diffs)):+.1%} "
                      f"over {len(diffs)} pairs {[f'{d:+.1%}' for d in diffs]}", flush=True)
    overhead = decode_step_overhead(engine, args.prompt_len)
    print(f"batch-1 decode step {overhead['engine_decode_step_ms']} ms vs bare forward "
          f"{overhead['bare_forward_ms']} ms (x{overhead['ratio']})", flush=True)
    by_c = {r["concurrency"]: r["output_tok_s"] for r in results}
    summary = {
        "bench": "offline", "model": engine.model_name, "dtype": engine.dtype,
        "device": jax.devices()[0].device_kind, "cpus": __import__("os").cpu_count(), "machine": platform.machine(),
        "prompt_len": args.prompt_len, "output_len": args.output_len, "load_s": round(load_s, 2),
        "warmup_s": round(warm_s, 2), "levels": results, "constrained_levels": constrained,
        "constrained_vs_unconstrained": pairs, "constraint_path": host_matcher,
        "scaling_vs_1": {c: round(v / by_c[args.concurrency[0]], 2) for c, v in by_c.items()} if by_c else {},
        "decode_overhead": overhead,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
