"""Where the time of an engine step goes: wraps the runner's jitted forward and sampler programs with timers
(each call waits for its result, so the host/device overlap is switched off while profiling) and drives one
batch of requests through the engine.

    python benchmarks/profile_engine_steps.py [--concurrency 32] [--prompt-len 128] [--output-len 128]
        [--json-schema SCHEMA_TEXT [--runs N]]

Prints, per program and shape, the number of calls, the median and the total seconds; then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import jax

from jaxserve.config import EngineConfig
from jaxserve.engine.engine import LLMEngine
from jaxserve.sampling.params import Constraint

from engine_drive import add_batch  # benchmarks/ is on sys.path when a script here runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--json-schema", default=None)
    ap.add_argument("--runs", type=int, default=1, help="with --json-schema: alternate unconstrained / json_schema runs")
    args = ap.parse_args()

    engine = LLMEngine(EngineConfig(model=args.model, max_running_requests=args.concurrency,
                                    max_model_len=args.max_model_len))
    warm_s = engine.warmup()
    runner = engine.runner
    timings: dict[str, list[float]] = defaultdict(list)
    program = runner._program
    print(runner.matmul_plan.reason, flush=True)

    def timed_program(kind: str, shape: tuple[int, ...]):
        # Every step program comes from runner._program (ready executables): time each call to completion.
        compiled = program(kind, shape)
        name = {"forward": "forward rows x tokens x pages", "sample": "sampler rows"}.get(kind, kind)
        name = f"{name} {'x'.join(map(str, shape))}"
        if kind == "forward" and runner.matmul_plan.int8_for(shape[0] * shape[1]):
            name += " (int8)"

        def call(*a):
            t0 = time.perf_counter()
            out = compiled(*a)
            jax.block_until_ready(out)
            timings[name].append(time.perf_counter() - t0)
            return out

        return call

    runner._program = timed_program
    schema = Constraint("json_schema", args.json_schema) if args.json_schema else None
    runs = []
    for run in range(args.runs):
        # With --runs > 1 and a schema, runs alternate unconstrained / json_schema in this one process, so the
        # programs' medians compare under the same machine state.
        constraint = schema if schema is not None and (args.runs == 1 or run % 2 == 1) else None
        timings.clear()
        add_batch(engine, f"r{run}", args.concurrency, args.prompt_len, args.output_len, args.concurrency, constraint)
        steps, t0 = [], time.perf_counter()
        while engine.has_work():
            s0 = time.perf_counter()
            engine.step()
            steps.append((time.perf_counter() - s0, len(engine.scheduler.running)))
        total = time.perf_counter() - t0
        full = [dt for dt, n in steps if n == args.concurrency]
        rows = {}
        label = "json_schema" if constraint is not None else "unconstrained"
        print(f"run {run} ({label})")
        for name, v in sorted(timings.items(), key=lambda kv: -sum(kv[1])):
            rows[name] = {"calls": len(v), "median_ms": round(statistics.median(v) * 1e3, 1), "total_s": round(sum(v), 2)}
            print(f"  {name:45s} calls {len(v):4d}  median {rows[name]['median_ms']:8.1f} ms  total {rows[name]['total_s']:7.2f} s")
        step_ms = round(statistics.median(full) * 1e3, 1) if full else None
        print(f"  {len(steps)} steps in {total:.1f} s; median step with all {args.concurrency} requests running: {step_ms} ms",
              flush=True)
        runs.append({"run": run, "constrained": constraint is not None, "steps": len(steps), "seconds": round(total, 2),
                     "full_batch_step_ms": step_ms, "programs": rows})
    print(json.dumps({"bench": "profile_engine_steps", "concurrency": args.concurrency, "warmup_s": round(warm_s, 1),
                      "runs": runs}))


if __name__ == "__main__":
    main()
