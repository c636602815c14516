"""End-to-end engine decode throughput on a random-weight model of a real size (default: Llama-3-8B
shapes, bfloat16), for a lent GPU/TPU. Imports no server packages.

    python benchmarks/bench_engine_device.py [--batches 1 32 128] [--tiny]

`--tiny` runs a small model of the same family so the script can be checked on a CPU. Prints one line per
batch size, then a JSON line last.
"""
from __future__ import annotations

import argparse
import json
import time

import jax

from jaxserve.config import EngineConfig, ModelConfig, RopeScaling
from jaxserve.engine.engine import LLMEngine, ModelParts
from jaxserve.models.testing import random_params, synthetic_tokenizer
from jaxserve.sampling.params import SamplingParams

from engine_drive import drive  # benchmarks/ is on sys.path when a script here runs

LLAMA3_8B = ModelConfig(
    family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
    num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192), max_position_embeddings=8192, eos_token_ids=(1,),
)
TINY = LLAMA3_8B.replace(vocab_size=4096, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8,
                         num_kv_heads=2, head_dim=32)


def run(engine: LLMEngine, batch: int, prompt_len: int, output_len: int) -> dict:
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", [(7 * i + j) % 4000 + 2 for j in range(prompt_len)], params)
    return {"batch": batch, **drive(engine, batch, t0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--attention-backend", default="auto")
    args = ap.parse_args()
    cfg = TINY if args.tiny else LLAMA3_8B
    dtype = "bfloat16"
    t0 = time.perf_counter()
    params = random_params(cfg, dtype)
    tokenizer = synthetic_tokenizer(cfg.vocab_size)
    engine = LLMEngine(
        EngineConfig(dtype=dtype, max_running_requests=max(args.batches), max_num_batched_tokens=512,
                     max_model_len=args.prompt_len + args.output_len + 16, attention_backend=args.attention_backend,
                     compilation_cache_dir=None),
        parts=ModelParts(cfg, params, tokenizer, "llama3-8b-random" if not args.tiny else "tiny-random"),
    )
    init_s = time.perf_counter() - t0
    warm_s = engine.warmup()
    print(f"init {init_s:.1f}s, warm-up {warm_s:.1f}s ({engine.runner.num_compiled()} programs), attention "
          f"{engine.runner.attention_name}, {engine.allocator.num_usable} KV pages", flush=True)
    results = []
    for b in args.batches:
        r = run(engine, b, args.prompt_len, args.output_len)
        print(f"batch {b:4d}: decode {r['decode_tok_s']} tok/s, end to end {r['output_tok_s']} tok/s", flush=True)
        results.append(r)
    print(json.dumps({"bench": "engine_device", "model": engine.model_name, "dtype": dtype,
                      "device": jax.devices()[0].device_kind, "attention": engine.runner.attention_name,
                      "init_s": round(init_s, 1), "warmup_s": round(warm_s, 1), "results": results}))


if __name__ == "__main__":
    main()
