"""Shared by the engine benchmarks: step an engine until its requests finish and measure the rates."""
from __future__ import annotations

import time

from jaxserve.engine.engine import LLMEngine


def drive(engine: LLMEngine, num_requests: int, t0: float) -> dict:
    """Step until all work is done. `t0`: when the requests were added. Decode-only tok/s counts from the
    step in which every request has its first token (all prompts are in) to the end."""
    generated = 0
    first_token = None
    started: set[str] = set()
    decode_t0 = decode_n0 = None
    while engine.has_work():
        for out in engine.step():
            n = sum(len(c.token_ids) for c in out.outputs)
            generated += n
            if n:
                started.add(out.request_id)
                if first_token is None:
                    first_token = time.perf_counter() - t0
        if decode_t0 is None and len(started) == num_requests:
            decode_t0, decode_n0 = time.perf_counter(), generated
    end = time.perf_counter()
    decode_tok_s = (generated - decode_n0) / (end - decode_t0) if decode_t0 and end > decode_t0 else None
    return {"output_tokens": generated, "seconds": round(end - t0, 3),
            "output_tok_s": round(generated / (end - t0), 2), "first_token_s": round(first_token or 0.0, 3),
            "decode_tok_s": round(decode_tok_s, 2) if decode_tok_s else None}
