"""The engine on the tiny random model: batch invariance, paging, preemption, no recompilation, stops."""
from __future__ import annotations

import asyncio
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.engine.attention import PagedCacheOps, PagedMeta
from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.kv_cache import init_paged_cache
from jaxserve.models.contiguous import ContiguousCacheOps, ContiguousMeta, init_contiguous_cache
from jaxserve.models.forward import make_forward
from jaxserve.models.loader import load_params, read_model_config
from jaxserve.sampling.params import Constraint, SamplingParams
from pallas_kernels.reference import paged_attention_reference

@pytest.fixture(scope="module")
def engine(tiny_engine_config) -> LLMEngine:
    # 63 usable pages of 16 tokens: long prompts of the batch-invariance test also get preempted.
    eng = LLMEngine(tiny_engine_config())
    eng.warmup()
    return eng


def run_to_completion(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]],
                      arrivals: dict[str, int] | None = None) -> dict[str, list[list[int]]]:
    """Add each request (prompt, params[, grammar]) at its arrival step (default 0) and step until all finish;
    token ids per choice."""
    arrivals = arrivals or {rid: 0 for rid in requests}
    tokens: dict[str, list[list[int]]] = {rid: [[] for _ in range(req[1].n)] for rid, req in requests.items()}
    done: set[str] = set()
    step = 0
    while len(done) < len(requests):
        for rid, at in arrivals.items():
            if at == step:
                engine.add_request(rid, *requests[rid])
        for out in engine.step():
            for c in out.outputs:
                tokens[out.request_id][c.index].extend(c.token_ids)
            if out.finished:
                done.add(out.request_id)
        step += 1
        assert step < 10_000, "engine made no progress"
    return tokens


def random_prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(100, 49000) for _ in range(length)]


def test_batch_invariance_with_random_arrivals(engine):
    rng = random.Random(0)
    lengths = [1, 2, 15, 16, 17, 31, 33, 64, 65, 100, 127, 150, 199, 230, 255, 256, 257, 280, 299, 300, 5, 40, 77, 120]
    requests = {}
    for i, n in enumerate(lengths):
        if i % 4 == 3:  # some rows sample with a seed, some use penalties: still per-row and batch-independent
            params = SamplingParams(max_tokens=rng.randint(1, 24), temperature=0.8, seed=1000 + i)
        elif i % 4 == 2:
            params = SamplingParams(max_tokens=rng.randint(1, 24), temperature=0, presence_penalty=1.5, frequency_penalty=0.5)
        else:
            params = SamplingParams(max_tokens=rng.randint(1, 24), temperature=0)
        requests[f"r{i}"] = (random_prompt(rng, n), params)
    alone = {rid: run_to_completion(engine, {rid: req})[rid] for rid, req in requests.items()}
    arrivals = {rid: rng.randrange(0, 40) for rid in requests}
    together = run_to_completion(engine, requests, arrivals)
    assert together == alone
    assert engine.allocator.num_used == 0


def test_paged_logits_match_contiguous(tiny_model_dir):
    path = tiny_model_dir("qwen2")
    cfg = read_model_config(path)
    params = jax.tree.map(jnp.asarray, load_params(path, cfg, "float32"))
    scale = cfg.head_dim**-0.5
    prompt = np.random.default_rng(3).integers(0, cfg.vocab_size, 45)
    n = len(prompt)

    contiguous = jax.jit(make_forward(cfg, "float32", ContiguousCacheOps(scale)))
    cache = init_contiguous_cache(cfg, 1, 64, jnp.float32)
    ref, _ = contiguous(params, jnp.asarray(prompt[None], jnp.int32), jnp.arange(n, dtype=jnp.int32)[None], cache,
                        ContiguousMeta(jnp.array([0], jnp.int32), jnp.array([n], jnp.int32)))
    ref = np.asarray(ref[0])

    page_size, num_pages = 8, 16
    paged = jax.jit(make_forward(cfg, "float32", PagedCacheOps(paged_attention_reference, scale)))
    pages = np.random.default_rng(4).permutation(np.arange(1, num_pages))[:8]  # shuffled, never the null page
    kv = init_paged_cache(cfg, num_pages, page_size, jnp.float32)
    got = []
    chunk = 11  # chunks straddle page boundaries; the last chunk is padded to the same shape
    for start in range(0, n, chunk):
        length = min(chunk, n - start)
        pos = np.arange(start, start + chunk)
        valid = pos < start + length
        toks = np.zeros(chunk, np.int32)
        toks[:length] = prompt[start:start + length]
        meta = PagedMeta(
            page_table=jnp.asarray(pages[None], jnp.int32),
            seq_lens=jnp.array([start + length], jnp.int32),
            q_start=jnp.array([start], jnp.int32),
            slot_page=jnp.asarray(np.where(valid, pages[np.minimum(pos, n - 1) // page_size], 0)[None], jnp.int32),
            slot_offset=jnp.asarray((pos % page_size)[None], jnp.int32),
        )
        logits, kv = paged(params, jnp.asarray(toks[None]), jnp.asarray(pos[None], jnp.int32), kv, meta)
        got.append(np.asarray(logits[0, :length]))
    np.testing.assert_allclose(np.concatenate(got), ref, atol=1e-4, rtol=0)


def test_preemption_completes_everything_with_the_same_tokens(engine):
    small = engine  # 63 usable pages of 16 tokens: far fewer than 8 requests x 9-12 pages
    rng = random.Random(1)
    requests = {f"p{i}": (random_prompt(rng, rng.randint(110, 160)), SamplingParams(max_tokens=30, temperature=0))
                for i in range(8)}
    alone = {rid: run_to_completion(small, {rid: req})[rid] for rid, req in requests.items()}
    small.flush_prefix_cache()  # the prompts computed alone must not make the pool big enough
    before = small.stats().num_preemptions_total
    together = run_to_completion(small, requests)
    assert small.stats().num_preemptions_total > before, "the pool was meant to be too small"
    assert together == alone
    assert small.allocator.num_used == 0

    # Aborts in the middle (waiting, prefilling and decoding requests alike) free every page too.
    for rid, req in requests.items():
        small.add_request(rid, *req)
    for _ in range(6):
        small.step()
    for rid in list(requests)[::2]:
        small.abort(rid)
    while small.has_work():
        small.step()
    assert small.allocator.num_used == 0
    # Every page is free or held only by the prefix cache, which gives them all back when flushed.
    assert small.allocator.num_free + small.allocator.num_cached == small.allocator.num_usable
    small.flush_prefix_cache()
    assert small.allocator.num_free == small.allocator.num_usable


def _serve_a_mixed_load_counting_compiles(engine) -> list[float]:
    """Serve every kind of request through `engine`; the compilations on this (the engine's) thread."""
    import threading

    compiles = []
    me = threading.current_thread()

    def listener(event, duration, **kw):
        # Compiles of the background thread (warmup(background=True)) are expected; serving must not compile.
        if event == "/jax/core/compile/backend_compile_duration" and threading.current_thread() is me:
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        rng = random.Random(7)
        requests = {}
        for i in range(200):
            params = SamplingParams(
                max_tokens=rng.randint(1, 6), temperature=rng.choice([0.0, 0.7, 1.3]), top_p=rng.choice([1.0, 0.9]),
                top_k=rng.choice([-1, 5, 50]), min_p=rng.choice([0.0, 0.05]), seed=rng.choice([None, i]),
                presence_penalty=rng.choice([0.0, 0.5]), repetition_penalty=rng.choice([1.0, 1.2]),
                logit_bias=((rng.randrange(49152), 5.0),) if i % 5 == 0 else (),
                logprobs=rng.choice([None, 0, 5]), min_tokens=rng.choice([0, 1]), n=rng.choice([1, 1, 2]),
            )
            requests[f"c{i}"] = (random_prompt(rng, rng.randint(1, 200)), params)
        # Constrained requests too: adding a grammar writes the device pool (programs compiled when the
        # pool is built) and constrained rows read their state on the device; none of it compiles.
        for i, constraint in enumerate([Constraint("regex", r"(yes|no|maybe)"), Constraint("json_object"),
                                        Constraint("regex", r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)")] * 4):
            params = SamplingParams(max_tokens=rng.randint(8, 16), temperature=rng.choice([0.0, 1.0]), seed=i,
                                    n=rng.choice([1, 2]), constraint=constraint)
            requests[f"g{i}"] = (random_prompt(rng, rng.randint(1, 50)), params, engine.compile_constraint(constraint))
        arrivals = {rid: i // 4 for i, rid in enumerate(requests)}
        run_to_completion(engine, requests, arrivals)
    finally:
        jax.monitoring.clear_event_listeners()
    return compiles


def test_no_compilation_after_warmup(engine):
    before = engine.runner.num_compiled()
    compiles = _serve_a_mixed_load_counting_compiles(engine)
    assert engine.runner.num_compiled() == before
    assert compiles == [], f"{len(compiles)} compilations after warm-up"
    assert engine.runner.programs.compiled_while_serving == 0


def test_no_compilation_while_buckets_compile_in_the_background(tiny_engine_config, tmp_path):
    """Serving starts once the essential programs are ready; steps use the ready buckets (padded) while the
    rest compile on their own thread, and the scheduler forms only prefill chunks they hold."""
    eng = LLMEngine(tiny_engine_config(executable_cache_dir=str(tmp_path)))
    eng.warmup(background=True)
    programs = eng.runner.programs
    assert len(programs) == eng.runner.essential_count < len(eng.runner.program_specs())
    compiles = _serve_a_mixed_load_counting_compiles(eng)
    assert compiles == [], f"{len(compiles)} compilations on the serving thread"
    assert programs.compiled_while_serving == 0
    assert programs.wait_background(timeout=600) and programs.background_error is None
    assert len(programs) == len(eng.runner.program_specs())


def test_seeds_are_reproducible_and_independent_of_companions(engine):
    rng = random.Random(5)
    prompt = random_prompt(rng, 20)
    # The tiny model's logits are very peaked (std ~8); a high temperature makes samples vary.
    seeded = SamplingParams(max_tokens=12, temperature=20.0, seed=42)
    alone = run_to_completion(engine, {"s": (prompt, seeded)})["s"]
    others = {f"o{i}": (random_prompt(rng, 30 + i), SamplingParams(max_tokens=8, temperature=20.0)) for i in range(5)}
    together = run_to_completion(engine, {"s": (prompt, seeded), **others})["s"]
    assert together == alone
    other_seed = run_to_completion(engine, {"s": (prompt, seeded.replace(seed=43))})["s"]
    assert other_seed != alone


def test_n_samples_share_the_prompt_and_differ(engine):
    prompt = random_prompt(random.Random(9), 45)
    before = engine.num_prefill_tokens_computed
    out = run_to_completion(engine, {"n": (prompt, SamplingParams(n=3, max_tokens=10, temperature=20.0, seed=3))})["n"]
    # The prompt is computed once; each follower recomputes only the last prompt token (its own sample).
    assert engine.num_prefill_tokens_computed - before == 45 + 2
    assert len(out) == 3 and all(len(o) == 10 for o in out)
    assert len({tuple(o) for o in out}) == 3
    # Choice i of a seeded request samples exactly like a lone request with seed + i.
    singles = [run_to_completion(engine, {f"s{i}": (prompt, SamplingParams(max_tokens=10, temperature=20.0, seed=3 + i))})[f"s{i}"][0]
               for i in range(3)]
    assert out == singles
    assert engine.allocator.num_used == 0
    greedy = run_to_completion(engine, {"g": (prompt, SamplingParams(n=2, max_tokens=10, temperature=0))})["g"]
    assert greedy[0] == greedy[1]


def collect(engine: LLMEngine, rid: str, prompt: list[int], params: SamplingParams):
    engine.add_request(rid, prompt, params)
    outs = []
    while engine.has_work():
        outs.extend(o for o in engine.step() if o.request_id == rid)
    return outs


def test_max_tokens_min_tokens_and_stop_token_ids(engine):
    prompt = random_prompt(random.Random(11), 10)
    base = run_to_completion(engine, {"b": (prompt, SamplingParams(max_tokens=12, temperature=0))})["b"][0]
    assert len(base) == 12
    outs = collect(engine, "st", prompt, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(base[4],)))
    final = outs[-1].outputs[-1]
    ids = [t for o in outs for c in o.outputs for t in c.token_ids]
    assert ids == base[: base.index(base[4]) + 1]
    assert final.finish_reason == "stop" and final.stop_reason == base[4]
    outs = collect(engine, "len", prompt, SamplingParams(max_tokens=3, temperature=0))
    assert outs[-1].outputs[-1].finish_reason == "length"
    assert outs[-1].num_output_tokens == 3


def test_stop_strings_are_cut_and_never_streamed(engine):
    tok = engine.tokenizer
    prompt = random_prompt(random.Random(12), 10)
    outs = collect(engine, "t", prompt, SamplingParams(max_tokens=16, temperature=0))
    text = "".join(c.text for o in outs for c in o.outputs)
    assert text == tok.decode([t for o in outs for c in o.outputs for t in c.token_ids])
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), text
    outs = collect(engine, "t2", prompt, SamplingParams(max_tokens=16, temperature=0, stop=(stop,)))
    streamed = "".join(c.text for o in outs for c in o.outputs)
    assert streamed == text[: text.index(stop)]
    assert outs[-1].outputs[-1].finish_reason == "stop" and outs[-1].outputs[-1].stop_reason == stop
    kept = collect(engine, "t3", prompt, SamplingParams(max_tokens=16, temperature=0, stop=(stop,), no_stop_trim=True))
    assert "".join(c.text for o in kept for c in o.outputs) == text[: text.index(stop) + len(stop)]


def test_logprobs_are_reported_per_token(engine):
    prompt = random_prompt(random.Random(13), 10)
    outs = collect(engine, "lp", prompt, SamplingParams(max_tokens=4, temperature=0, logprobs=3))
    lps = [lp for o in outs for c in o.outputs for lp in c.logprobs]
    ids = [t for o in outs for c in o.outputs for t in c.token_ids]
    assert [lp.token_id for lp in lps] == ids
    for lp in lps:
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id  # greedy picks the top token
        assert lp.logprob <= 0 and abs(lp.logprob - lp.top[0][1]) < 1e-5


def test_bad_requests_raise_value_error(engine):
    with pytest.raises(ValueError, match="context length"):
        engine.validate([1] * 500, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="empty"):
        engine.validate([], SamplingParams())
    with pytest.raises(ValueError, match="vocabulary"):
        engine.validate([10**7], SamplingParams())
    with pytest.raises(ValueError, match="temperature"):
        engine.validate([1], SamplingParams(temperature=-1))


def test_async_engine_streams_and_aborts(engine):
    async def main():
        aeng = AsyncEngine(engine)
        await aeng.start()
        try:
            prompt = random_prompt(random.Random(14), 12)
            texts = []
            async for out in aeng.generate(prompt, SamplingParams(max_tokens=8, temperature=0), "a1"):
                texts.extend(out.outputs)
            assert texts[-1].finish_reason == "length"
            gen = aeng.generate(prompt, SamplingParams(max_tokens=400, temperature=0), "a2")
            await gen.__anext__()
            await gen.aclose()  # a disconnecting client: the request is aborted
            for _ in range(100):
                if engine.allocator.num_used == 0 and not engine.has_work():
                    break
                await asyncio.sleep(0.05)
            assert engine.allocator.num_used == 0
            with pytest.raises(ValueError):
                async for _ in aeng.generate([1] * 600, SamplingParams(max_tokens=4), "a3"):
                    pass
        finally:
            await aeng.shutdown()

    asyncio.run(main())


def test_overlapped_and_synchronous_steps_give_the_same_tokens(engine, tiny_engine_config):
    sync = LLMEngine(tiny_engine_config(), overlap=False)
    rng = random.Random(21)
    requests = {f"o{i}": (random_prompt(rng, rng.randint(1, 120)),
                          SamplingParams(max_tokens=rng.randint(1, 12), temperature=rng.choice([0.0, 20.0]), seed=i,
                                         stop_token_ids=(rng.randrange(100, 49000),)))
                for i in range(12)}
    assert run_to_completion(sync, requests) == run_to_completion(engine, requests)
    assert sync.allocator.num_used == 0 and engine.allocator.num_used == 0


def test_kv_pool_on_an_accelerator_is_a_share_of_device_memory_for_weights_and_kv(engine, monkeypatch):
    """--kv-memory-fraction has SGLang's meaning: weights + KV within that share of the device's memory (the
    AOT report sizes the pool the same way), capped at what the running requests' full contexts need."""
    import dataclasses
    import math

    from jaxserve.engine.kv_cache import kv_bytes_per_page

    class Device:
        def __init__(self, limit: int) -> None:
            self.limit = limit

        def memory_stats(self):
            return {"bytes_limit": self.limit, "bytes_in_use": self.limit // 2}  # in use does not matter

    cfg = dataclasses.replace(engine.config, num_pages=None, kv_memory_fraction=0.5)
    monkeypatch.setattr(engine, "config", cfg)
    per_page = kv_bytes_per_page(engine.model_config, cfg.page_size, 4)
    full = cfg.max_running_requests * math.ceil(engine.max_model_len / cfg.page_size) + 1
    weights = 10 * per_page
    import types

    def devices(d):  # the engine reads its mesh's first device
        monkeypatch.setattr(engine, "mesh", types.SimpleNamespace(devices=np.array([d], dtype=object)))

    devices(Device(60 * per_page))
    assert engine._num_pages("gpu", weights) == 20  # 30 pages of budget, 10 taken by the weights
    devices(Device(10_000 * per_page))
    assert engine._num_pages("tpu", weights) == full
    devices(Device(20 * per_page))
    with pytest.raises(ValueError, match="kv-memory-fraction"):
        engine._num_pages("gpu", weights)
