"""Prefix caching over KV pages: the radix tree and the allocator's hold accounting, cache on vs off giving
identical greedy outputs under heavy prefix overlap with evictions, and the server's `cached_tokens`."""
from __future__ import annotations

import random

import pytest

from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.kv_cache import PageAllocator
from jaxserve.engine.prefix_cache import RadixPrefixCache
from jaxserve.sampling.params import SamplingParams

from inprocess import call, make_app, started

PS = 4


def seq_pages(alloc: PageAllocator, n: int) -> list[int]:
    return alloc.allocate(n)


def test_allocator_hold_accounting():
    alloc = PageAllocator(10)
    pages = alloc.allocate(3)
    alloc.hold(pages[0])
    assert (alloc.num_used, alloc.num_cached, alloc.num_free) == (3, 0, 6)
    alloc.free(pages)
    assert (alloc.num_used, alloc.num_cached, alloc.num_free) == (0, 1, 8)
    alloc.share([pages[0]])  # a later prompt reuses the cached page
    assert (alloc.num_used, alloc.num_cached) == (1, 0)
    alloc.free([pages[0]])
    alloc.unhold(pages[0])
    assert (alloc.num_used, alloc.num_cached, alloc.num_free) == (0, 0, 9)
    with pytest.raises(RuntimeError):
        alloc.hold(pages[0])  # nobody refers to it: it is free, not a page to cache


def test_match_insert_and_lru_eviction():
    alloc = PageAllocator(20)
    cache = RadixPrefixCache(alloc, PS)
    a = list(range(100, 113))  # 13 tokens: 3 full pages
    pa = alloc.allocate(4)
    cache.insert(a, pa)
    alloc.free(pa)
    assert alloc.num_cached == 3 and alloc.num_free == 16  # the partial 4th page went back at once
    # At least one token is left to compute: 12 tokens match 2 pages, 13 match 3.
    assert cache.match(a[:12]) == pa[:2]
    assert cache.match(a) == pa[:3]
    assert cache.match([1] + a[1:]) == []
    assert cache.match(a, salt="tenant-b") == []  # salts never share
    b = a[:8] + [7, 7, 7, 7, 7]  # shares two pages with a, then diverges
    pb = list(pa[:2]) + alloc.allocate(2)
    alloc.share(pa[:2])
    cache.insert(b, pb)
    alloc.free(pb)
    assert cache.match(b) == pb[:3]
    cache.match(a)  # a's branch is now the most recently used
    assert cache.evict(1) == 1
    assert cache.match(b) == pb[:2] and cache.match(a) == pa[:3]  # b's own leaf went first
    in_use = cache.match(a)
    alloc.share(in_use)  # a running sequence refers to a's pages: they cannot be evicted
    assert cache.evict(10) == 0
    alloc.free(in_use)
    assert cache.flush() == 3 and alloc.num_free == alloc.num_usable


@pytest.fixture(scope="module")
def engines(tiny_engine_config):
    on = LLMEngine(tiny_engine_config())
    off = LLMEngine(tiny_engine_config(enable_prefix_cache=False))
    assert off.scheduler.prefix_cache is None
    return on, off


def overlapping_workload(seed: int, count: int) -> list[tuple[int, list[int], SamplingParams]]:
    """(arrival step, prompt, params): few shared system prefixes, repeated conversations, exact repeats."""
    rng = random.Random(seed)
    systems = [[rng.randrange(100, 49000) for _ in range(n)] for n in (33, 70, 129)]
    history: list[list[int]] = []
    out = []
    for i in range(count):
        r = rng.random()
        if history and r < 0.2:
            prompt = list(rng.choice(history))  # exact repeat
        elif history and r < 0.5:
            prompt = rng.choice(history) + [rng.randrange(100, 49000) for _ in range(rng.randint(1, 40))]
        else:
            prompt = rng.choice(systems) + [rng.randrange(100, 49000) for _ in range(rng.randint(1, 60))]
        prompt = prompt[:400]
        history.append(prompt)
        params = SamplingParams(max_tokens=rng.randint(1, 12), temperature=0, n=2 if i % 17 == 0 else 1)
        out.append((rng.randint(0, 3 * count), prompt, params))
    return out


def run(engine: LLMEngine, workload) -> dict[str, list[list[int]]]:
    tokens = {f"w{i}": [[] for _ in range(p.n)] for i, (_, _, p) in enumerate(workload)}
    pending = sorted(range(len(workload)), key=lambda i: workload[i][0])
    done = 0
    step = 0
    while done < len(workload):
        while pending and workload[pending[0]][0] <= step:
            i = pending.pop(0)
            engine.add_request(f"w{i}", workload[i][1], workload[i][2])
        for out in engine.step():
            assert out.error is None
            for c in out.outputs:
                tokens[out.request_id][c.index].extend(c.token_ids)
            done += out.finished
        step += 1
        assert step < 100_000
    while engine.has_work():
        engine.step()
    return tokens


def test_cache_on_and_off_give_identical_greedy_outputs_with_evictions(engines):
    on, off = engines
    workload = overlapping_workload(seed=3, count=100)
    with_cache = run(on, workload)
    stats = on.stats()
    assert with_cache == run(off, workload)
    assert stats.num_prefix_hit_tokens_total > 0.3 * stats.num_prefix_query_tokens_total
    assert stats.num_prefix_evicted_pages_total > 0, "the pool was meant to be small enough to evict"
    # Idle: no request holds a page; the cache gives every page back when flushed.
    assert on.allocator.num_used == 0 and off.allocator.num_used == 0
    assert on.allocator.num_free + on.allocator.num_cached == on.allocator.num_usable
    on.flush_prefix_cache()
    assert on.allocator.num_free == on.allocator.num_usable and off.allocator.num_free == off.allocator.num_usable


def test_a_repeated_prompt_reuses_all_but_its_last_page(engines):
    on, _ = engines
    prompt = list(range(1000, 1000 + 77))
    run(on, [(0, prompt, SamplingParams(max_tokens=3, temperature=0))])
    on.add_request("again", prompt, SamplingParams(max_tokens=3, temperature=0))
    outs = []
    while on.has_work():
        outs += on.step()
    ps = on.config.page_size
    assert outs[-1].num_cached_tokens == (len(prompt) - 1) // ps * ps >= len(prompt) - ps
    with pytest.raises(ValueError):
        on.add_request("busy", prompt, SamplingParams(max_tokens=1))
        on.flush_prefix_cache()
    while on.has_work():
        on.step()
    on.flush_prefix_cache()


# ---------------------------------------------------------------------------------------------- server

def test_server_reports_cached_tokens_and_flushes(tiny_engine_config):
    from jaxserve.server.streaming import parse_sse

    system = {"role": "system", "content": "You are a helpful assistant. " * 12}
    body = {"messages": [system, {"role": "user", "content": "Hi there"}], "max_tokens": 4, "temperature": 0}
    chat = ("POST", "/v1/chat/completions", body)
    completion = ("POST", "/v1/completions", {"prompt": "Once upon a time " * 10, "max_tokens": 2, "temperature": 0})
    with started(LLMEngine(tiny_engine_config())) as aeng:
        app = make_app(aeng)
        (first,) = call(app, chat)
        (second,) = call(app, chat)
        streamed, salted = call(
            app, ("POST", "/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}),
            ("POST", "/v1/chat/completions", {**body, "cache_salt": "other"}))
        call(app, completion)
        (completion2,) = call(app, completion)
        (flushed,) = call(app, ("POST", "/flush_cache", None))
        after, metrics = call(app, chat, ("GET", "/metrics", None))
    first, second, salted, after = (r.json()["usage"] for r in (first, second, salted, after))
    ps = aeng.engine.config.page_size
    assert second["prompt_tokens"] == first["prompt_tokens"] > 3 * ps
    assert second["prompt_tokens_details"]["cached_tokens"] >= second["prompt_tokens"] - ps
    usage = [p for p in parse_sse(streamed.text)[:-1] if '"usage":{' in p][-1]
    assert f'"cached_tokens":{second["prompt_tokens_details"]["cached_tokens"]}' in usage
    assert salted["prompt_tokens_details"]["cached_tokens"] == 0
    usage = completion2.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"] - ps
    assert flushed.status_code == 200 and flushed.json()["freed_pages"] > 0
    assert after["prompt_tokens_details"]["cached_tokens"] == 0
    hits = [line for line in metrics.text.splitlines() if line.startswith("jaxserve_prefix_cache_hit_tokens_total ")]
    assert hits and float(hits[0].split()[1]) > 0


def test_admission_prefers_cached_prefixes_within_a_bounded_wait():
    import time

    from jaxserve.engine.request import Sequence
    from jaxserve.engine.scheduler import Scheduler, SchedulerLimits

    alloc = PageAllocator(32)
    cache = RadixPrefixCache(alloc, PS)
    limits = SchedulerLimits(max_running=4, max_prefill_tokens=64, max_prefill_rows=4, max_chunk=64, page_size=PS,
                             max_prefix_wait_s=0.5)
    sched = Scheduler(limits, alloc, cache)
    shared = list(range(200, 212))
    pages = alloc.allocate(3)
    cache.insert(shared, pages)
    alloc.free(pages)

    def seq(i: int, prompt: list[int], **params) -> Sequence:
        return Sequence(seq_id=i, request_id=f"s{i}", index=0, prompt_ids=prompt,
                        params=SamplingParams(max_tokens=1, **params), seed=0, max_tokens=1)

    cold, warm, penalised = seq(0, [9] * 13), seq(1, shared + [5]), seq(2, shared + [6], repetition_penalty=1.1)
    for s in (cold, penalised, warm):
        sched.add(s)
    assert sched._admission_order() == [warm, cold, penalised]  # a penalised prompt is computed in full anyway
    cold.arrival = time.monotonic() - 1.0  # waited past the bound: FCFS again, ahead of everyone
    assert sched._admission_order() == [cold, warm, penalised]
    step = sched.schedule()
    assert [c.seq for c in step.prefill][:2] == [cold, warm]
    assert warm.num_cached_tokens == 12 and warm.num_computed == 12


def test_a_running_requests_prompt_is_reused_before_it_finishes(engines):
    on, _ = engines
    on.flush_prefix_cache()
    shared = list(range(3000, 3000 + 100))
    on.add_request("long", shared + [7], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    before = on.stats()
    outs = []
    while not any(o.outputs and o.outputs[0].token_ids for o in outs):
        outs += on.step()
    on.add_request("later", shared + [8], SamplingParams(max_tokens=2, temperature=0))
    later = []
    while on.has_work():
        later += [o for o in on.step() if o.request_id == "later"]
    ps = on.config.page_size
    assert later[-1].num_cached_tokens == len(shared) // ps * ps  # "long" was still generating
    stats = on.stats()
    # Each admitted prompt counts once in the hit statistics.
    assert stats.num_prefix_query_tokens_total - before.num_prefix_query_tokens_total == 2 * (len(shared) + 1)
