"""The host-matcher path: constraints the device grammar tables cannot hold run on llguidance, per request.

Through the engine on the tiny random model (the mask does all the work): host-matched requests validate,
run beside device-path requests without changing their tokens, fail alone when their matcher fails, and
hold no pool rows once finished. Through the constraint service: which refusals fall back, and which do not.
"""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

pytest.importorskip("llguidance")

from jaxserve.constrained.host_matcher import HostGrammar, HostMatcher, HostMatcherError  # noqa: E402
from jaxserve.engine.engine import LLMEngine  # noqa: E402
from jaxserve.sampling.params import Constraint, SamplingParams  # noqa: E402

# multipleOf 3 without bounds: no DFA of ours lists the multiples; booleans and a short integer keep every
# output within the token budget even from a random model (the closing rows end the number).
MAP_SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "multipleOf": 3}, "ok": {"type": "boolean"}},
    "required": ["n", "ok"],
    "additionalProperties": False,
}
# Deterministic finite automaton of 2^16 states (a 'b' 16 symbols from the end): past the compile budget.
EXPLODING_REGEX = "[ab]*b[ab]{16}"

FORMAT_CHECKER = jsonschema.Draft202012Validator.FORMAT_CHECKER


@pytest.fixture(scope="module")
def engine(tiny_engine_config) -> LLMEngine:
    eng = LLMEngine(tiny_engine_config())
    eng.warmup()
    return eng


def run(engine: LLMEngine, requests: dict) -> dict[str, list[tuple[str, str]]]:
    texts = {rid: [""] * p.n for rid, (_, p) in requests.items()}
    reasons = {rid: [None] * p.n for rid, (_, p) in requests.items()}
    errors = {}
    for rid, (prompt, p) in requests.items():
        engine.add_request(rid, prompt, p, engine.compile_constraint(p.constraint) if p.constraint else None)
    while engine.has_work():
        for out in engine.step():
            if out.error:
                errors[out.request_id] = out.error
            for c in out.outputs:
                texts[out.request_id][c.index] += c.text
                if c.finish_reason:
                    reasons[out.request_id][c.index] = c.finish_reason
    results = {rid: list(zip(texts[rid], reasons[rid])) for rid in requests}
    results.update({rid: [("ERROR", e)] for rid, e in errors.items()})
    return results


def test_schemas_the_device_path_refuses_run_on_the_host_and_validate(engine):
    grammar = engine.compile_constraint(Constraint("json_schema", json.dumps(MAP_SCHEMA)))
    assert isinstance(grammar, HostGrammar)
    before = engine.stats()
    requests = {f"map{i}": ([7, 8, 9 + i], SamplingParams(n=3, temperature=1.0, max_tokens=80, seed=i,
                                                        constraint=Constraint("json_schema", json.dumps(MAP_SCHEMA))))
                for i in range(3)}
    results = run(engine, requests)
    for rid, choices in results.items():
        for text, reason in choices:
            assert reason == "stop", (rid, text, reason)
            value = json.loads(text)
            jsonschema.validate(value, MAP_SCHEMA, format_checker=FORMAT_CHECKER)
    stats = engine.stats()
    assert stats.num_constrained_host_matcher_total - before.num_constrained_host_matcher_total == 3
    assert stats.host_matcher_seconds_total > before.host_matcher_seconds_total
    assert engine.grammar_pool.num_references() == 0 and engine.allocator.num_used == 0


def test_host_matched_requests_leave_device_path_tokens_unchanged(engine):
    device = {f"dev{i}": ([3, 4, 5 + i], SamplingParams(temperature=1.0, max_tokens=16, seed=100 + i,
                                                       constraint=Constraint("regex", r"[a-z]{3,10}( [0-9]{1,3})?")))
              for i in range(3)}
    device["free"] = ([11, 12], SamplingParams(temperature=1.0, max_tokens=12, seed=7))
    alone = run(engine, device)
    host = {f"map{i}": ([7, 8], SamplingParams(temperature=1.0, max_tokens=80, seed=i,
                                               constraint=Constraint("json_schema", json.dumps(MAP_SCHEMA))))
            for i in range(3)}
    together = run(engine, {**device, **host})
    assert {rid: together[rid] for rid in device} == alone
    for rid in host:
        [(text, reason)] = together[rid]
        jsonschema.validate(json.loads(text), MAP_SCHEMA)


def test_a_regex_past_the_device_budget_runs_on_the_host(engine):
    constraint = Constraint("regex", EXPLODING_REGEX)
    assert isinstance(engine.compile_constraint(constraint), HostGrammar)
    results = run(engine, {"re": ([1, 2], SamplingParams(n=2, temperature=1.0, max_tokens=40, seed=3, constraint=constraint))})
    for text, reason in results["re"]:
        # A random model rarely stops on its own: the matcher allows more [ab] after every match.
        assert re.fullmatch("[ab]*", text) and len(text) >= 17, text
        if reason == "stop":
            assert re.fullmatch(EXPLODING_REGEX, text), text


def test_a_failing_host_matcher_fails_its_request_alone(engine, monkeypatch):
    host = Constraint("json_schema", json.dumps(MAP_SCHEMA))

    def consume(self, token):
        raise HostMatcherError("injected")

    monkeypatch.setattr(HostMatcher, "consume", consume)
    requests = {"bad": ([7, 8], SamplingParams(temperature=1.0, max_tokens=80, seed=1, constraint=host)),
                "ok": ([3, 4], SamplingParams(temperature=1.0, max_tokens=16, seed=2,
                                              constraint=Constraint("regex", "[a-z]{3,10}")))}
    results = run(engine, requests)
    assert results["bad"][0][0] == "ERROR" and "injected" in results["bad"][0][1]
    assert results["ok"][0][1] == "stop" and re.fullmatch("[a-z]{3,10}", results["ok"][0][0])
    assert engine.grammar_pool.num_references() == 0 and engine.allocator.num_used == 0


def test_malformed_constraints_are_not_sent_to_the_host(engine):
    with pytest.raises(ValueError, match="not valid JSON"):
        engine.compile_constraint(Constraint("json_schema", "{not json"))
    with pytest.raises(ValueError):  # a regex our parser rejects: its syntax, not its size
        engine.compile_constraint(Constraint("regex", "(ab"))


def test_host_matcher_off_keeps_the_400(tiny_engine_config):
    from jaxserve.constrained.service import ConstraintService

    eng = LLMEngine(tiny_engine_config(constraint_host_matcher=False))
    assert eng.constraints.host_tokenizer() is None
    with pytest.raises(ValueError, match="multipleOf"):
        eng.compile_constraint(Constraint("json_schema", json.dumps(MAP_SCHEMA)))
    assert isinstance(eng.constraints, ConstraintService)


def test_both_paths_refusing_names_both_reasons(engine):
    schema = {"type": "object", "propertyNames": {"pattern": "^a"}}
    with pytest.raises(ValueError) as info:
        engine.compile_constraint(Constraint("json_schema", json.dumps(schema)))
    assert "host matcher refused it too" in str(info.value)


def test_keywords_llguidance_keeps_inexactly_are_refused_on_the_host_too(engine):
    # Found by probing llguidance: it takes 0.3 as a multiple of 0.1 (jsonschema does not: binary floats) and
    # lets a name repeat in an open object (a repeated name counts once against minProperties).
    for schema, keyword in (({"type": "number", "multipleOf": 0.1}, "multipleOf"),
                            ({"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 2},
                             "minProperties")):
        with pytest.raises(ValueError, match=keyword) as info:
            engine.compile_constraint(Constraint("json_schema", json.dumps(schema)))
        assert "host matcher" in str(info.value)


def test_closing_tiers_prefer_what_ends_soonest():
    import numpy as np

    from jaxserve.constrained.host_matcher import ClosingRows

    tokens = [b'"', b"}", b"]", b",", b"a", b"ab", None]  # id 6: the end token
    closing = ClosingRows.from_vocab(tokens, (6,), 1)

    def row(ids):
        bits = np.zeros(32, dtype=bool)
        bits[list(ids)] = True
        return np.packbits(bits, bitorder="little").view(np.uint32)

    def ids(r):
        return set(np.flatnonzero(np.unpackbits(r.view(np.uint8), bitorder="little")))

    assert ids(closing.narrow(row([0, 1, 4, 5]))) == {0}  # inside a string: the quote, never `}`
    assert ids(closing.narrow(row([1, 2, 3, 4, 6]))) == {6}
    assert ids(closing.narrow(row([1, 3, 4]))) == {1}
    assert ids(closing.narrow(row([4, 5]))) == {4}
    assert ids(closing.narrow(row([5]))) == {5}  # nothing of any tier: unchanged


def test_free_strings_on_the_host_path_still_end_within_max_tokens(engine):
    # A random model favours some tokens heavily; the closing tiers must still get it out of a free string.
    schema = {"type": "object", "properties": {"note": {"type": "string"}, "tags": {"type": "array",
              "items": {"type": "string"}}, "n": {"type": "integer", "multipleOf": 3}}, "required": ["note", "tags", "n"]}
    constraint = Constraint("json_schema", json.dumps(schema))
    assert isinstance(engine.compile_constraint(constraint), HostGrammar)
    results = run(engine, {"free": ([5, 6], SamplingParams(n=6, temperature=1.0, max_tokens=100, seed=4,
                                                         constraint=constraint))})
    for text, reason in results["free"]:
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), schema)


def test_a_slow_device_compile_serves_the_host_matcher_first_then_the_device_tables(monkeypatch, engine):
    import threading
    import time

    from jaxserve.constrained import service as service_module
    from jaxserve.constrained.grammar import Grammar

    release = threading.Event()
    real = service_module.compile_constraint

    def slow(*args, **kwargs):
        release.wait(10)  # the device compile outlives the request's wait
        return real(*args, **kwargs)

    monkeypatch.setattr(service_module, "compile_constraint", slow)
    svc = engine.constraints
    monkeypatch.setattr(svc, "device_wait_s", 0.05)  # --constraint-device-wait-s 0.05
    constraint = Constraint("regex", "[a-c]{2,5}x")
    t0 = time.perf_counter()
    first = svc.compile(constraint)
    assert isinstance(first, HostGrammar) and time.perf_counter() - t0 < 2.0
    assert isinstance(svc.compile(constraint), HostGrammar)  # cached until the device compile is done
    release.set()
    deadline = time.time() + 10
    while not isinstance(grammar := svc.compile(constraint), Grammar) and time.time() < deadline:
        time.sleep(0.05)
    assert isinstance(grammar, Grammar)
    stats = svc.stats()
    assert stats.host_while_device_compiles >= 1 and stats.upgraded >= 1
    results = run(engine, {"a": ([1, 2], SamplingParams(temperature=1.0, max_tokens=12, seed=1, constraint=constraint))})
    assert results["a"][0][1] == "stop" and re.fullmatch("[a-c]{2,5}x", results["a"][0][0])


def test_a_grammar_whose_first_host_mask_explodes_is_refused(engine):
    # Past the device budget (NFA states), and llguidance's lexer needs ~0.5 s for its first mask, then fails:
    # every step of the batch would wait for it, so it is a 400 at compile time.
    with pytest.raises(ValueError, match="too complex"):
        engine.compile_constraint(Constraint("regex", "(x{1000}){1000}"))
