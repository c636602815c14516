"""Constrained decoding end to end through the engine on the tiny random model: the mask does all the work."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import jsonschema
import pytest

from jaxserve.engine.engine import LLMEngine
from jaxserve.sampling.params import Constraint, SamplingParams
from test_constrained_regex import REGEXES

SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "data" / "jsonschemabench"


@pytest.fixture(scope="module")
def engine(tiny_engine_config) -> LLMEngine:
    eng = LLMEngine(tiny_engine_config())
    eng.warmup()
    return eng


def generate(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[tuple[str, str]]]:
    """(text, finish_reason) per choice of every request, all run concurrently."""
    texts = {rid: [""] * p.n for rid, (_, p) in requests.items()}
    reasons = {rid: [None] * p.n for rid, (_, p) in requests.items()}
    for rid, (prompt, p) in requests.items():
        engine.add_request(rid, prompt, p, engine.compile_constraint(p.constraint))
    while engine.has_work():
        for out in engine.step():
            for c in out.outputs:
                texts[out.request_id][c.index] += c.text
                if c.finish_reason:
                    reasons[out.request_id][c.index] = c.finish_reason
    return {rid: list(zip(texts[rid], reasons[rid])) for rid in requests}


def test_fifty_regexes_twenty_samples_each_all_match(engine):
    assert len(REGEXES) == 50
    rng = random.Random(0)
    requests = {
        f"re{i}": ([rng.randrange(100, 49000) for _ in range(rng.randint(1, 20))],
                   SamplingParams(n=20, temperature=1.0, max_tokens=24, seed=i, constraint=Constraint("regex", pattern)))
        for i, pattern in enumerate(REGEXES)
    }
    results = generate(engine, requests)
    for i, pattern in enumerate(REGEXES):
        for text, reason in results[f"re{i}"]:
            assert reason == "stop", (pattern, text, reason)
            assert re.fullmatch(pattern, text), (pattern, text)
    assert engine.allocator.num_used == 0


def test_json_schemas_from_jsonschemabench_validate(engine):
    files = sorted((SCHEMAS / "Glaiveai2K").glob("*.json"))[:15] + sorted((SCHEMAS / "Github_easy").glob("*.json"))[:15]
    requests, schemas = {}, {}
    for i, f in enumerate(files):
        schema = json.loads(f.read_text())
        try:
            constraint = Constraint("json_schema", json.dumps(schema))
            engine.compile_constraint(constraint)
        except ValueError:
            continue  # coverage is measured by benchmarks/jsonschemabench_coverage.py
        schemas[f"js{i}"] = schema
        requests[f"js{i}"] = ([1, 2, 3], SamplingParams(temperature=1.0, max_tokens=192, seed=i, constraint=constraint))
    assert len(requests) >= 20
    results = generate(engine, requests)
    for rid, [(text, reason)] in results.items():
        assert reason == "stop", (rid, text)
        jsonschema.validate(json.loads(text), schemas[rid])


def test_json_object_and_a_short_budget_still_complete(engine):
    # max_tokens far below what the model would wander through: the closing rows steer it to an end.
    requests = {"obj": ([5, 6, 7], SamplingParams(n=8, temperature=1.0, max_tokens=12, seed=1, constraint=Constraint("json_object")))}
    for text, reason in generate(engine, requests)["obj"]:
        assert reason == "stop"
        assert isinstance(json.loads(text), dict)


# Constrained rows advance their grammar state on the device, so their steps overlap host work like the
# unconstrained ones; the tokens must be exactly those of synchronous steps.
MIXED_PATTERNS = [r"(yes|no|maybe)", r"[a-z]+@[a-z]+\.(com|org)", r"-?(0|[1-9][0-9]*)(\.[0-9]+)?", r"(ab|cd)*e",
                  r'"([^"\\]|\\.)*"', r"\d{3}-\d{4}"]


def mixed_requests() -> tuple[dict[str, tuple[list[int], SamplingParams]], dict[str, str]]:
    """Constrained (regex, JSON schema, json_object with a budget that forces closing rows, n = 2) and
    unconstrained requests, all seeded at temperature 1; returns (requests, regex of each constrained one)."""
    rng = random.Random(5)
    requests, patterns = {}, {}
    for i, pattern in enumerate(MIXED_PATTERNS):
        requests[f"re{i}"] = ([rng.randrange(100, 49000) for _ in range(rng.randint(1, 30))],
                              SamplingParams(n=2 if i == 1 else 1, temperature=1.0, max_tokens=rng.randint(10, 40),
                                             seed=100 + i, constraint=Constraint("regex", pattern)))
        patterns[f"re{i}"] = pattern
    requests["obj"] = ([5, 6, 7], SamplingParams(temperature=1.0, max_tokens=14, seed=7, constraint=Constraint("json_object")))
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "y"]}}, "required": ["a", "b"]}
    requests["js"] = ([9, 8], SamplingParams(temperature=1.0, max_tokens=60, seed=8,
                                             constraint=Constraint("json_schema", json.dumps(schema))))
    for i in range(4):
        requests[f"free{i}"] = ([rng.randrange(100, 49000) for _ in range(rng.randint(1, 40))],
                                SamplingParams(temperature=1.0, max_tokens=rng.randint(5, 30), seed=200 + i))
    return requests, patterns


def run_tokens(engine: LLMEngine, requests) -> dict[str, list[tuple[list[int], str, str | None]]]:
    """(token ids, text, finish reason) per choice; requests arrive two per step, so prefills and decodes mix."""
    tokens = {rid: [[] for _ in range(p.n)] for rid, (_, p) in requests.items()}
    texts = {rid: [""] * p.n for rid, (_, p) in requests.items()}
    reasons = {rid: [None] * p.n for rid, (_, p) in requests.items()}
    queue = list(requests.items())
    steps = 0
    while queue or engine.has_work():
        for rid, (prompt, p) in queue[:2]:
            grammar = engine.compile_constraint(p.constraint) if p.constraint is not None else None
            engine.add_request(rid, prompt, p, grammar)
        queue = queue[2:]
        for out in engine.step():
            for c in out.outputs:
                tokens[out.request_id][c.index] += c.token_ids
                texts[out.request_id][c.index] += c.text
                reasons[out.request_id][c.index] = c.finish_reason or reasons[out.request_id][c.index]
        steps += 1
        assert steps < 5000, "engine made no progress"
    return {rid: list(zip(tokens[rid], texts[rid], reasons[rid])) for rid in requests}


@pytest.fixture(scope="module")
def sync_results(tiny_engine_config):
    return run_tokens(LLMEngine(tiny_engine_config(), overlap=False), mixed_requests()[0])


def check_constrained(results, requests, patterns) -> None:
    for rid, choices in results.items():
        p = requests[rid][1]
        for ids, text, reason in choices:
            assert reason is not None, (rid, text)
            if p.constraint is None:
                continue
            assert reason == "stop", (rid, text, reason)
            if rid in patterns:
                assert re.fullmatch(patterns[rid], text), (rid, patterns[rid], text)
            else:
                assert isinstance(json.loads(text), dict), (rid, text)


def test_overlapped_constrained_steps_match_synchronous_ones(engine, sync_results):
    requests, patterns = mixed_requests()
    dispatched = []  # per decode call: (constrained rows, of them reading their state from the device, step unread)
    decode_inputs = engine.runner.decode_inputs

    def spy(seqs, rows):
        constrained = [r for s, r in zip(seqs, rows) if s.grammar is not None]
        dispatched.append((len(constrained), sum(r.grammar_from_device for r in constrained), bool(engine._pending)))
        return decode_inputs(seqs, rows)

    engine.runner.decode_inputs = spy
    preemptions = engine.stats().num_preemptions_total
    try:
        results = run_tokens(engine, requests)
    finally:
        del engine.runner.decode_inputs
    assert results == sync_results
    check_constrained(results, requests, patterns)
    assert engine.stats().num_preemptions_total == preemptions  # (a recompute would be host-known)
    # Every constrained decode row took its state from the device, dispatched while the previous step was
    # still unread: the host never waited for a constrained row.
    constrained_calls = [d for d in dispatched if d[0]]
    assert len(constrained_calls) > 20
    assert all(n == from_device for n, from_device, _ in constrained_calls), constrained_calls
    assert all(unread for _, _, unread in constrained_calls)
    assert engine.stats().num_constrained_host_advance_total == 0
    assert engine.allocator.num_used == 0 and engine.grammar_pool.num_references() == 0


def test_host_advance_fallback_when_device_tables_are_full(tiny_engine_config, sync_results):
    # 4096 next-state entries hold the small regexes but not the JSON grammars: those advance on the host
    # (synchronous steps while they run), mixed in the same batches with device-advanced rows.
    engine = LLMEngine(tiny_engine_config(grammar_next_capacity=4096))
    requests, patterns = mixed_requests()
    results = run_tokens(engine, requests)
    assert results == sync_results
    check_constrained(results, requests, patterns)
    assert engine.stats().num_constrained_host_advance_total >= 2  # json_object and the schema
    pool = engine.grammar_pool
    fits = [pool.residency(engine.compile_constraint(requests[r][1].constraint)).device_advance for r in patterns]
    assert any(fits), "some regexes were meant to fit the device tables"
    assert engine.allocator.num_used == 0 and engine.grammar_pool.num_references() == 0


def test_preempted_constrained_requests_recompute_and_match_running_alone(engine):
    # 63 usable pages of 16 tokens against 8 requests of 9-11 pages each: the newest get preempted, some with
    # a token in flight, and come back with their state known on the host (recompute), then on the device.
    rng = random.Random(11)
    patterns = [MIXED_PATTERNS[i % len(MIXED_PATTERNS)] for i in range(8)]
    requests = {f"p{i}": ([rng.randrange(100, 49000) for _ in range(rng.randint(110, 150))],
                          SamplingParams(temperature=1.0, max_tokens=24, seed=300 + i, constraint=Constraint("regex", p)))
                for i, p in enumerate(patterns)}
    alone = {}
    for rid, req in requests.items():
        alone.update(run_tokens(engine, {rid: req}))
    engine.flush_prefix_cache()  # the prompts computed alone must not make the pool big enough
    before = engine.stats().num_preemptions_total
    together = run_tokens(engine, requests)
    assert engine.stats().num_preemptions_total > before, "the KV pool was meant to be too small"
    assert together == alone
    for i, (rid, choices) in enumerate(together.items()):
        [(_, text, reason)] = choices
        assert reason == "stop" and re.fullmatch(patterns[i], text), (rid, text, reason)
    # Aborts while constrained steps are in flight release every grammar reference and page.
    for rid, req in requests.items():
        engine.add_request(rid, req[0], req[1], engine.compile_constraint(req[1].constraint))
    for _ in range(12):
        engine.step()
    for rid in list(requests)[::2]:
        engine.abort(rid)
    while engine.has_work():
        engine.step()
    assert engine.allocator.num_used == 0 and engine.grammar_pool.num_references() == 0
