"""One bad request never hurts another: faults injected while preparing, stepping or post-processing one
request fail that request alone, and the others produce exactly the tokens they produce without it. When
the engine cannot continue (device state lost, thread dead, step stuck) it says so and nobody hangs."""
from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.errors import EngineBusy, EngineDead, RequestFailed
from jaxserve.sampling.params import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_engine_config) -> LLMEngine:
    eng = LLMEngine(tiny_engine_config())
    eng.warmup()
    return eng


@pytest.fixture(autouse=True)
def clean_hooks(engine):
    yield
    engine.fault_hook = None
    engine.runner.__dict__.pop("decode_inputs", None)
    engine.runner.__dict__.pop("prefill_inputs", None)
    engine.runner.__dict__.pop("dispatch", None)
    assert not engine.has_work()


def workload() -> dict[str, tuple[list[int], SamplingParams]]:
    rng = random.Random(5)
    reqs = {}
    for i in range(5):
        params = SamplingParams(max_tokens=10, temperature=0.0 if i % 2 else 20.0, seed=i, n=1 + (i == 3))
        reqs[f"r{i}"] = ([rng.randrange(100, 49000) for _ in range(rng.randint(3, 90))], params)
    return reqs


def run(engine: LLMEngine, requests) -> tuple[dict[str, list[list[int]]], dict[str, str]]:
    """Step until every request ends; (tokens per choice of the successful ones, error per failed one)."""
    tokens = {rid: [[] for _ in range(p.n)] for rid, (_, p) in requests.items()}
    errors: dict[str, str] = {}
    for rid, (ids, params) in requests.items():
        try:
            engine.add_request(rid, ids, params)
        except Exception as e:  # noqa: BLE001 - an injected "add" fault
            errors[rid] = f"add: {e}"
    done = set(errors)
    for _ in range(10_000):
        if len(done) == len(requests):
            break
        for out in engine.step():
            if out.error is not None:
                errors[out.request_id] = out.error
                assert out.finished
            for c in out.outputs:
                tokens[out.request_id][c.index].extend(c.token_ids)
            if out.finished:
                done.add(out.request_id)
    assert len(done) == len(requests), "engine made no progress"
    while engine.has_work():  # the step in flight when the last request finished
        assert engine.step() == []
    assert engine.allocator.num_used == 0, "pages leaked"
    return {rid: t for rid, t in tokens.items() if rid not in errors}, errors


def fault_at(stage: str, victim: str, after_calls: int = 0):
    """A fault hook that raises for `victim` at `stage`, from its (after_calls+1)-th call on."""
    calls = {"n": 0}

    def hook(at: str, request_id: str) -> None:
        if at == stage and request_id == victim:
            calls["n"] += 1
            if calls["n"] > after_calls:
                raise RuntimeError(f"injected {stage} fault")

    return hook


@pytest.fixture(scope="module")
def reference(engine):
    tokens, errors = run(engine, workload())
    assert not errors
    return tokens


@pytest.mark.parametrize("stage,after", [("add", 0), ("step", 0), ("step", 4), ("postprocess", 0),
                                         ("postprocess", 3)])
@pytest.mark.parametrize("victim", ["r1", "r3"])  # r3 has n=2: both choices go
def test_a_fault_fails_only_its_request(engine, reference, stage, after, victim):
    engine.fault_hook = fault_at(stage, victim, after)
    tokens, errors = run(engine, workload())
    assert set(errors) == {victim}
    assert "injected" in errors[victim]
    assert tokens == {rid: t for rid, t in reference.items() if rid != victim}


def test_a_row_that_breaks_the_batch_build_is_isolated(engine, reference):
    """A host-side failure building a step's arrays (e.g. a value the sampling batch cannot hold) is traced
    to the row that fails on its own; the step is rebuilt without it."""
    def breaks_on_r2(original):
        def build(items, rows):
            seqs = [getattr(item, "seq", item) for item in items]  # decode rows or prefill chunks
            if any(s.request_id == "r2" and len(s.output_ids) >= 3 for s in seqs):
                raise OverflowError("Python int too large to convert to C int")
            return original(items, rows)
        return build

    engine.runner.decode_inputs = breaks_on_r2(engine.runner.decode_inputs)
    engine.runner.prefill_inputs = breaks_on_r2(engine.runner.prefill_inputs)
    tokens, errors = run(engine, workload())
    assert set(errors) == {"r2"} and "OverflowError" in errors["r2"]
    assert tokens == {rid: t for rid, t in reference.items() if rid != "r2"}


def test_a_failed_launch_with_state_intact_fails_that_step_only(engine, reference):
    original = engine.runner.dispatch
    calls = {"n": 0}

    def dispatch(inputs, n):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device said no")
        return original(inputs, n)

    engine.runner.dispatch = dispatch
    tokens, errors = run(engine, workload())
    assert errors and all("device said no" in e for e in errors.values())
    # The requests outside the failed step are untouched.
    assert tokens == {rid: t for rid, t in reference.items() if rid not in errors}
    engine.runner.__dict__.pop("dispatch")
    again, errors = run(engine, workload())
    assert not errors and again == reference


def test_lost_device_state_is_reported_as_dead(tiny_engine_config):
    from jaxserve.engine.errors import EngineDead as Dead

    eng = LLMEngine(tiny_engine_config())
    original = eng.runner.dispatch

    def dispatch(inputs, n):
        eng.runner.cache.k.delete()  # what a failed call that consumed its donated cache leaves behind
        raise RuntimeError("XLA runtime error")

    eng.runner.dispatch = dispatch
    eng.add_request("x", [5, 6, 7], SamplingParams(max_tokens=4))
    with pytest.raises(Dead, match="KV cache"):
        eng.step()
    del original


# ---------------------------------------------------------------------------------- the async engine

def collect(aeng: AsyncEngine, rid: str, ids: list[int], params: SamplingParams):
    async def go():
        toks = []
        async for out in aeng.generate(ids, params, rid):
            for c in out.outputs:
                toks.extend(c.token_ids)
        return toks
    return go()


def test_async_engine_isolates_a_faulty_request_and_keeps_serving(engine, reference):
    async def main():
        aeng = AsyncEngine(engine)
        await aeng.start()
        try:
            engine.fault_hook = fault_at("postprocess", "r1", 2)
            reqs = workload()
            results = await asyncio.gather(*(collect(aeng, rid, *req) for rid, req in reqs.items()
                                             if reqs[rid][1].n == 1), return_exceptions=True)
            by_id = dict(zip([r for r in reqs if reqs[r][1].n == 1], results))
            assert isinstance(by_id.pop("r1"), RequestFailed)
            for rid, toks in by_id.items():
                assert toks == reference[rid][0]
            engine.fault_hook = fault_at("add", "r0")
            with pytest.raises(RequestFailed, match="injected add fault"):
                await collect(aeng, "r0", *reqs["r0"])
            assert await collect(aeng, "r2", *reqs["r2"]) == reference["r2"][0]
            assert aeng.dead_reason is None
        finally:
            await aeng.shutdown()

    asyncio.run(main())


def test_admission_counts_requests_not_yet_running(tiny_engine_config):
    eng = LLMEngine(tiny_engine_config(max_queued_requests=2))

    async def main():
        aeng = AsyncEngine(eng)
        aeng.ready = True  # no engine thread: nothing leaves the queue
        gens = [aeng.generate([5, 6], SamplingParams(max_tokens=2), f"q{i}") for i in range(3)]
        tasks = [asyncio.ensure_future(g.__anext__()) for g in gens[:2]]
        await asyncio.sleep(0.05)
        assert aeng.num_queued == 2
        with pytest.raises(EngineBusy, match="2 requests are already queued"):
            await gens[2].__anext__()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert aeng.num_queued == 0

    asyncio.run(main())


def test_a_dead_engine_thread_is_noticed_and_nobody_hangs(tiny_engine_config):
    eng = LLMEngine(tiny_engine_config())

    class ThreadKiller(BaseException):
        pass

    def step():
        raise ThreadKiller("simulated crash outside any request")

    eng.step = step
    eng.warmup = lambda progress=None, background=False: 0.0  # the step is replaced: nothing to compile

    async def main():
        aeng = AsyncEngine(eng, watchdog_interval_s=0.05)
        await aeng.start()
        try:
            t0 = time.monotonic()
            with pytest.raises(EngineDead, match="ThreadKiller"):
                await asyncio.wait_for(collect(aeng, "d1", [5, 6, 7], SamplingParams(max_tokens=4)), 10)
            assert time.monotonic() - t0 < 5
            assert "ThreadKiller" in aeng.dead_reason
            with pytest.raises(EngineDead):
                await collect(aeng, "d2", [5], SamplingParams(max_tokens=1))
        finally:
            await aeng.shutdown()

    asyncio.run(main())


def test_a_stuck_step_is_noticed_by_the_watchdog(tiny_engine_config):
    eng = LLMEngine(tiny_engine_config())
    release = threading.Event()

    def step():
        release.wait(20)
        return []

    eng.step = step
    eng.warmup = lambda progress=None, background=False: 0.0

    async def main():
        aeng = AsyncEngine(eng, stuck_step_timeout_s=0.3, watchdog_interval_s=0.05)
        await aeng.start()
        try:
            with pytest.raises(EngineDead, match="has not returned"):
                await asyncio.wait_for(collect(aeng, "s1", [5, 6, 7], SamplingParams(max_tokens=4)), 10)
        finally:
            release.set()
            await aeng.shutdown()

    asyncio.run(main())
