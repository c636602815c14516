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
