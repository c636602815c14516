"""Shared by the engine benchmarks: step an engine until its requests finish and measure the rates."""
from __future__ import annotations

import random
import time

from jaxserve.engine.engine import LLMEngine
from jaxserve.sampling.params import Constraint, SamplingParams


def add_batch(engine: LLMEngine, prefix: str, count: int, prompt_len: int, output_len: int, seed: int,
              constraint: Constraint | None = None) -> None:
    """The engine benchmarks' workload: `count` random prompts of `prompt_len` tokens (drawn from `seed`), seeded
    sampling at temperature 1 (so constrained and unconstrained runs take the same sampler path), and
    unconstrained rows ignore EOS so each produces exactly `output_len` tokens."""
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=output_len, temperature=1.0, ignore_eos=constraint is None, seed=seed,
                            constraint=constraint)
    grammar = engine.compile_constraint(constraint) if constraint is not None else None
    for i in range(count):
        engine.add_request(f"{prefix}-{i}", [rng.randrange(100, 49000) for _ in range(prompt_len)], params, grammar)


def drive(engine: LLMEngine, num_requests: int, t0: float) -> dict:
    """Step until all work is done. `t0`: when the requests were added.

    - output_tok_s: every generated token over the whole run (prefill included).
    - decode_tok_s: from the step in which every request has its first token (all prompts are in) to the end;
      the batch shrinks as requests finish, so runs whose outputs differ in length are not comparable here.
    - full_batch_tok_s: only the steps while every request is decoding (all started, none finished): the
      decode rate at exactly `num_requests` rows, the fair way to compare two runs whose outputs end at
      different lengths (e.g. constrained and unconstrained).
    - cpu_ms_per_token: the process's CPU time (all threads, user + system) per generated token. Time the
      hypervisor steals from this VM is not in it, so on a VM with fluctuating steal it compares two runs
      more reliably than wall-clock rates (it counts XLA's worker threads too, including any time they
      spin waiting for work, and memory stalls from other tenants still inflate it)."""
    cpu0 = time.process_time()
    generated = 0
    first_token = None
    started: set[str] = set()
    decode_t0 = decode_n0 = None
    full_t0 = full_n0 = full_t1 = full_n1 = None
    any_finished = False
    while engine.has_work():
        outputs = engine.step()
        for out in outputs:
            n = sum(len(c.token_ids) for c in out.outputs)
            generated += n
            if n:
                started.add(out.request_id)
                if first_token is None:
                    first_token = time.perf_counter() - t0
        now = time.perf_counter()
        if not any_finished and any(out.finished for out in outputs):
            any_finished = True
            if full_t0 is not None:
                full_t1, full_n1 = now, generated
        if decode_t0 is None and len(started) == num_requests:
            decode_t0, decode_n0 = now, generated
            if not any_finished:
                full_t0, full_n0 = now, generated
    end = time.perf_counter()
    cpu_s = time.process_time() - cpu0
    decode_tok_s = (generated - decode_n0) / (end - decode_t0) if decode_t0 and end > decode_t0 else None
    full_tok_s = (full_n1 - full_n0) / (full_t1 - full_t0) if full_t1 and full_t1 > full_t0 else None
    return {"output_tokens": generated, "seconds": round(end - t0, 3),
            "output_tok_s": round(generated / (end - t0), 2), "first_token_s": round(first_token or 0.0, 3),
            "decode_tok_s": round(decode_tok_s, 2) if decode_tok_s else None,
            "full_batch_tok_s": round(full_tok_s, 2) if full_tok_s else None,
            "cpu_s": round(cpu_s, 2), "cpu_ms_per_token": round(cpu_s / max(generated, 1) * 1e3, 2)}
