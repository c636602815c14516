"""Tensor and data parallelism on 8 fake CPU devices (conftest sets --xla_force_host_platform_device_count=8).

Tensor parallelism must not change what the model computes: tp = 2, 4, 8 give the greedy tokens and (within
float tolerance) the logprobs of tp = 1, on the tiny model of every family (4 query heads, 2 KV heads; Mistral 1),
so at tp 4 and 8 KV heads are repeated and at tp 8 query heads are padded, while each device holds about 1/tp
of the weights.
"""
from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from jaxserve.engine.offline import LLM
from jaxserve.models.testing import FAMILIES
from jaxserve.sampling.params import Constraint, SamplingParams

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices: XLA_FLAGS from tests/conftest.py")

# Small shapes: few buckets to compile per engine (each tp value is a new set of programs).
ENGINE = dict(max_running_requests=4, max_num_batched_tokens=32, max_model_len=128, page_size=16, num_pages=32)
PROMPTS = [[100, 2000, 345, 8000, 12, 77, 5, 901, 33], [4000, 31, 999]]


@pytest.fixture(scope="module")
def tp_model(tmp_path_factory, smollm2_tokenizer_dir):
    """tp_model(family, **config) -> the tiny model of that family (seed 1), config.json fields overridden."""
    from jaxserve.models.testing import make_tiny_model

    made = {}

    def get(family: str, **overrides) -> str:
        key = (family, tuple(sorted(overrides.items())))
        if key not in made:
            made[key] = str(make_tiny_model(tmp_path_factory.mktemp(f"tp-{family}"), family, seed=1,
                                            tokenizer_dir=smollm2_tokenizer_dir, **overrides))
        return made[key]

    return get


def _greedy(model: str, tp: int, **kw):
    llm = LLM(model, tp_size=tp, **{**ENGINE, **kw})
    out = llm.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0.0, logprobs=5))
    tokens = [o.outputs[0].token_ids for o in out]
    logprobs = [[[lp for _, lp in t.top] for t in o.outputs[0].logprobs] for o in out]
    return tokens, np.asarray(logprobs), llm


@pytest.mark.parametrize("family,overrides,tps", [
    # Every tp on one family; tp 8 (KV heads repeated, query heads padded) on the others.
    *[(f, {}, (2, 4, 8) if f == "llama" else (8,)) for f in FAMILIES],
    # Groups of 3 query heads (like Qwen2.5-7B's 7): padded to 4 per KV head at tp 4.
    ("qwen2", {"num_attention_heads": 6}, (4,)),
])
def test_tensor_parallel_matches_one_device(tp_model, family, overrides, tps):
    from jaxserve.models.sharding import device_bytes

    model = tp_model(family, **overrides)
    ref_tokens, ref_logprobs, ref = _greedy(model, 1)
    total = device_bytes(ref.engine.runner.params, ref.engine.runner.mesh.devices.flat[0])
    for tp in tps:
        tokens, logprobs, llm = _greedy(model, tp)
        assert tokens == ref_tokens, f"tp={tp}"
        np.testing.assert_allclose(logprobs, ref_logprobs, atol=2e-4, err_msg=f"tp={tp}")
        runner = llm.engine.runner
        assert runner.mesh.size == tp
        kv, heads = ref.engine.model_config.num_kv_heads, ref.engine.model_config.num_heads
        assert runner.plan.kv_repeat == max(1, tp // kv)
        assert runner.cache.k.shape[1] == kv * runner.plan.kv_repeat
        assert runner.plan.model_config.num_heads % tp == 0 and runner.plan.model_config.num_heads >= heads
        # Every device holds about 1/tp of the weights (norms are replicated; repeated KV heads add a little).
        for device in runner.mesh.devices.flat:
            share = device_bytes(runner.params, device) / total
            assert share < 1.25 / tp, f"tp={tp}: {device} holds {share:.3f} of the weights"
        # The KV cache is split by KV head: one shard per device.
        assert {s.data.shape[1] for s in runner.cache.k.addressable_shards} == {runner.cache.k.shape[1] // tp}


def test_tensor_parallel_serves_constrained_forked_and_prefix_cached_requests(tp_model):
    """The rest of a step under tp: grammar tables replicated over the mesh, n > 1 page copies, the prefix
    cache's reuse and prompt logprobs."""
    model = tp_model("llama")
    regex = Constraint("regex", r"(yes|no)-[0-9]{2}")
    params = [SamplingParams(max_tokens=8, temperature=0.0, constraint=regex),
              SamplingParams(max_tokens=5, temperature=0.8, seed=3, n=2),
              SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2)]
    prompts = [PROMPTS[0] * 4, PROMPTS[0] + [5, 6, 7], list(range(300, 340))]  # 36 tokens: two whole pages
    results = {}
    for tp in (1, 4):
        llm = LLM(model, tp_size=tp, **ENGINE)
        first = llm.generate(prompts, params)
        again = llm.generate(prompts[:1], params[:1])  # the prompt's pages come from the prefix cache
        results[tp] = (first, again, llm.engine.stats().num_prefix_hit_tokens_total)
    (one, one_again, hits1), (four, four_again, hits4) = results[1], results[4]
    assert one[0].outputs[0].token_ids == four[0].outputs[0].token_ids
    assert re.fullmatch(r"(yes|no)-[0-9]{2}", "".join(c.text for c in four[0].outputs)), four[0].outputs[0].text
    assert [c.token_ids for c in one[1].outputs] == [c.token_ids for c in four[1].outputs]
    assert one_again[0].outputs[0].token_ids == four_again[0].outputs[0].token_ids == one[0].outputs[0].token_ids
    assert hits4 == hits1 > 0


def test_tensor_parallel_rejects_what_cannot_be_split(tp_model):
    model = tp_model("llama")
    with pytest.raises(ValueError, match="cannot be repeated evenly over tp_size 3"):
        LLM(model, tp_size=3, **ENGINE)
    with pytest.raises(ValueError, match="needs 16 devices"):
        LLM(model, tp_size=16, **ENGINE)


# -- data parallelism ---------------------------------------------------------------------------------
def _serve_mixed_load(engine, prompts, params):
    """Send every request at once to `engine` (an AsyncEngine-like); returns (outputs, the most requests each
    replica had active at one moment while the load ran)."""
    import asyncio

    async def one(ids, p):
        tokens = []
        async for out in engine.generate(ids, p):
            tokens.extend(out.outputs[0].token_ids if out.outputs else [])
        return tokens

    async def run():
        await engine.start()
        peaks = [0] * len(getattr(engine, "replicas", [engine]))
        both_busy = False
        try:
            tasks = [asyncio.create_task(one(ids, p)) for ids, p in zip(prompts, params)]
            while not all(t.done() for t in tasks):
                active = [r.num_active for r in getattr(engine, "replicas", [engine])]
                peaks = [max(a, b) for a, b in zip(peaks, active)]
                both_busy = both_busy or all(a > 0 for a in active)
                await asyncio.sleep(0.005)
            return [t.result() for t in tasks], peaks, both_busy
        finally:
            await engine.shutdown()

    return asyncio.run(run())


@pytest.fixture(scope="module")
def mixed_load(tp_model):
    """(model, prompts, params, the outputs of one engine on one device)."""
    from jaxserve.config import EngineConfig
    from jaxserve.engine.async_engine import AsyncEngine
    from jaxserve.engine.engine import LLMEngine

    model = tp_model("qwen2")
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(100, 40000, size=int(n))] for n in rng.integers(3, 40, size=12)]
    params = [SamplingParams(max_tokens=int(m), temperature=0.0) for m in rng.integers(2, 10, size=12)]
    expected, _, _ = _serve_mixed_load(AsyncEngine(LLMEngine(EngineConfig(model=model, **ENGINE))), prompts, params)
    return model, prompts, params, expected


@pytest.mark.parametrize("tp", [1, 2])
def test_data_parallel_replicas_share_a_mixed_load(mixed_load, tp):
    from jaxserve.config import EngineConfig
    from jaxserve.engine.data_parallel import DataParallelEngine

    model, prompts, params, expected = mixed_load
    config = EngineConfig(model=model, dp_size=2, tp_size=tp, **ENGINE)
    dp = DataParallelEngine.from_config(config)
    assert [r.engine.mesh.size for r in dp.replicas] == [tp, tp]
    groups = [set(r.engine.mesh.devices.flat) for r in dp.replicas]
    assert not groups[0] & groups[1]  # disjoint device groups
    outputs, peaks, both_busy = _serve_mixed_load(dp, prompts, params)
    assert both_busy, f"the replicas were never busy at once (peaks {peaks})"
    assert min(dp.routed) >= 3, dp.routed
    assert outputs == expected
    assert dp.stats().num_generated_tokens_total == sum(len(o) for o in outputs)


def test_data_parallel_routes_a_repeated_prefix_to_the_replica_that_cached_it(tp_model):
    import asyncio

    from jaxserve.config import EngineConfig
    from jaxserve.engine.data_parallel import DataParallelEngine

    dp = DataParallelEngine.from_config(EngineConfig(model=tp_model("llama"), dp_size=2, **ENGINE))
    shared = list(range(1000, 1048))  # three whole pages

    async def run():
        await dp.start()
        try:
            for tail in ([7], [8, 9], [10], [11, 12]):
                async for _ in dp.generate(shared + tail, SamplingParams(max_tokens=2, temperature=0.0)):
                    pass
        finally:
            await dp.shutdown()

    asyncio.run(run())
    hits = [r.stats().num_prefix_hit_tokens_total for r in dp.replicas]
    assert dp.routed_by_affinity == 3
    assert sorted(hits) == [0, 3 * 48], hits  # every repeat reused the 48 cached tokens on one replica


def test_data_parallel_needs_enough_devices(tp_model):
    from jaxserve.config import EngineConfig
    from jaxserve.engine.data_parallel import DataParallelEngine

    with pytest.raises(ValueError, match="needs 16 devices"):
        DataParallelEngine.from_config(EngineConfig(model=tp_model("llama"), dp_size=4, tp_size=4, **ENGINE))


def test_server_over_data_parallel_replicas(tp_model):
    """The HTTP server runs on the replicas as on one engine: completions, health, metrics, cache flush."""
    import asyncio

    import httpx

    from jaxserve.config import EngineConfig, ServerConfig
    from jaxserve.engine.data_parallel import DataParallelEngine
    from jaxserve.server.app import build_app

    config = EngineConfig(model=tp_model("llama"), dp_size=2, **ENGINE)
    dp = DataParallelEngine.from_config(config)

    async def never_called():
        raise AssertionError("the engine is set directly")

    app = build_app(ServerConfig(engine=config, served_model_name="tiny"), never_called)
    app.state.jaxserve.engine = dp

    async def go():
        await dp.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120) as c:
                body = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 4, "temperature": 0}
                answers = await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(6)))
                health = await c.get("/health")
                metrics = await c.get("/metrics")
                flushed = await c.post("/flush_cache")
            return answers, health, metrics, flushed
        finally:
            await dp.shutdown()

    answers, health, metrics, flushed = asyncio.run(go())
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert len({a.json()["choices"][0]["text"] for a in answers}) == 1
    assert health.status_code == 200
    assert metrics.status_code == 200 and "jaxserve" in metrics.text
    assert flushed.status_code == 200, flushed.text
    assert sum(dp.routed) == 6 and min(dp.routed) >= 1


def test_weights_go_to_their_shards_one_host_tensor_at_a_time(tp_model, monkeypatch):
    """Loading never holds the model in host memory: each parameter is read, sliced onto its devices and
    let go before the next one is read; each device receives only its slice."""
    from pathlib import Path

    from jaxserve.models.deferred import Deferred
    from jaxserve.models.llama import fuse_projections
    from jaxserve.models.loader import load_params_deferred, read_model_config
    from jaxserve.models.sharding import (
        adapt_params, device_bytes, make_mesh, param_shardings, place_params, plan_tensor_parallel,
    )

    path = Path(tp_model("qwen3"))
    cfg = read_model_config(path)
    plan = plan_tensor_parallel(cfg, 4)
    tree = fuse_projections(adapt_params(load_params_deferred(path, cfg, "float32"), cfg, plan), groups=4)
    events: list[str] = []

    def tracked(leaf: Deferred) -> Deferred:
        def make():
            events.append("read")
            return leaf.materialize()
        return Deferred(leaf.shape, leaf.dtype, make)

    original = jax.make_array_from_callback

    def place(shape, sharding, callback):
        slices = []
        out = original(shape, sharding, lambda index: slices.append(callback(index).shape) or callback(index))
        events.append("placed")
        assert slices and all(np.prod(s) <= np.prod(shape) for s in slices)
        return out

    monkeypatch.setattr(jax, "make_array_from_callback", place)
    tree = jax.tree.map(tracked, tree)
    mesh = make_mesh(jax.devices()[:4])
    placed = place_params(tree, param_shardings(tree, mesh, plan.shard_vocab))
    assert events == ["read", "placed"] * len(jax.tree.leaves(placed))
    total = sum(x.nbytes for x in jax.tree.leaves(placed))
    assert all(device_bytes(placed, d) < 0.3 * total for d in mesh.devices.flat)
