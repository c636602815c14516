"""One regression test per JSON-schema keyword the device path learned (issue 14), each on schemas that
exercise it: enumerate the shortest outputs the compiled automaton accepts, generate random token walks,
validate all of them with `jsonschema` (formats asserted), and check that near-miss instances (valid JSON
that breaks exactly this keyword) are rejected by the automaton, so their tokens are masked out."""
from __future__ import annotations

import json
import re
from collections import deque

import jsonschema
import numpy as np
import pytest

from jaxserve.constrained.compiler import compile_constraint
from jaxserve.constrained.json_schema import json_schema_to_regex
from jaxserve.constrained.regex_dfa import DEAD, compile_dfa
from jaxserve.constrained.regex_parser import parse_regex
from jaxserve.constrained.token_table import sample_walk
from jaxserve.constrained.vocab import VocabInfo

DRAFT7 = "http://json-schema.org/draft-07/schema#"
# RFC 1123 host names (jsonschema checks "hostname" only with the optional `fqdn` package installed).
HOSTNAME = re.compile(r"(?=.{1,253}$)[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*")

# keyword -> [(schema, near misses: compact JSON texts that violate the schema only through that keyword)]
CASES: dict[str, list[tuple[dict, list[str]]]] = {
    "patternProperties": [
        ({"type": "object", "patternProperties": {"^[a-z]{1,4}$": {"type": "boolean"}},
          "additionalProperties": False},
         ['{"a":1}', '{"ABC":true}', '{"toolong":true}', '{"a":null}']),
        ({"type": "object", "properties": {"x_id": {"type": "integer"}}, "required": ["x_id"],
          "patternProperties": {"_id$": {"minimum": 0}}},
         ['{"x_id":-1}', '{"x_id":-20}']),
        ({"type": "object", "patternProperties": {"^s_": {"type": "string", "maxLength": 2},
                                                   "^n_": {"type": "integer"}}, "additionalProperties": False},
         ['{"s_a":"abc"}', '{"n_a":"x"}', '{"q":1}']),
    ],
    "minProperties": [
        ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "null"}, "c": {"type": "boolean"}},
          "minProperties": 2},
         ["{}", '{"a":1}', '{"c":true}']),
        ({"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 1}, ["{}"]),
    ],
    "maxProperties": [
        ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "null"}, "c": {"type": "boolean"}},
          "maxProperties": 1},
         ['{"a":1,"b":null}', '{"a":1,"b":null,"c":true}']),
        ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "null"}, "c": {"type": "boolean"},
                                           "d": {"type": "null"}}, "required": ["a"], "minProperties": 2,
          "maxProperties": 3},
         ['{"a":1}', '{"a":1,"b":null,"c":true,"d":null}']),
    ],
    "dependentRequired": [
        ({"type": "object", "properties": {"card": {"type": "integer"}, "address": {"type": "string", "maxLength": 3},
                                           "zip": {"enum": ["a", "b"]}},
          "dependentRequired": {"card": ["address"], "address": ["zip"]}},
         ['{"card":1}', '{"card":1,"address":"x"}', '{"address":"x"}']),
    ],
    "dependencies": [
        # `dependencies` is draft 7's (2020-12 split it in two): jsonschema checks it under that draft.
        ({"$schema": DRAFT7, "type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "boolean"}},
          "dependencies": {"a": ["b"]}},
         ['{"a":true}', '{"a":false}']),
        ({"$schema": DRAFT7, "type": "object", "properties": {"kind": {"enum": ["x", "y"]}, "n": {"type": "integer"}},
          "dependencies": {"kind": {"properties": {"n": {"maximum": 3}}, "required": ["n"]}}},
         ['{"kind":"x"}', '{"kind":"y","n":4}']),
    ],
    "dependentSchemas": [
        ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
          "dependentSchemas": {"a": {"properties": {"b": {"minimum": 10}}, "required": ["b"]}}},
         ['{"a":1}', '{"a":1,"b":9}']),
    ],
    "if/then/else": [
        ({"type": "object", "properties": {"country": {"enum": ["US", "CA", "FR"]}, "zip": {"type": "string", "maxLength": 6},
                                           "postal": {"type": "string", "maxLength": 6}},
          "required": ["country"],
          "if": {"properties": {"country": {"const": "US"}}},
          "then": {"required": ["zip"]}, "else": {"required": ["postal"]}},
         ['{"country":"US"}', '{"country":"FR","zip":"1"}', '{"country":"CA"}']),
        ({"type": "object", "properties": {"on": {"type": "boolean"}, "level": {"type": "integer"}},
          "if": {"properties": {"on": {"const": True}}, "required": ["on"]},
          "then": {"properties": {"level": {"minimum": 1}}, "required": ["level"]},
          "else": {"properties": {"level": {"maximum": 0}}}},
         ['{"on":true}', '{"on":true,"level":0}', '{"on":false,"level":3}', '{"level":5}']),
    ],
    "multipleOf": [
        ({"type": "integer", "multipleOf": 5}, ["7", "-12", "51"]),
        ({"type": "integer", "multipleOf": 3, "minimum": 0, "maximum": 30}, ["4", "-3", "33"]),
        ({"type": "number", "multipleOf": 4, "minimum": 0}, ["2", "-4", "4.5", "102"]),
        # A float step: jsonschema checks it in floating point, so the multiples stop at 15 digits.
        ({"type": "integer", "multipleOf": 5.0}, ["7", "-12"]),
    ],
    "format": [
        ({"type": "string", "format": "hostname"}, ['"-bad"', '"a..b"', '""']),
        ({"type": "string", "format": "ipv6"}, ['"1:2"', '"12345::"', '"g::1"']),
        ({"type": "string", "format": "date", "maxLength": 10}, ['"2024-02-30"', '"2024-1-01"']),
        ({"type": "string", "format": "not-a-standard-format", "maxLength": 2}, ['"abc"']),
    ],
    "pattern+length": [
        ({"type": "string", "pattern": "^[A-Z][a-z]*$", "minLength": 3, "maxLength": 5},
         ['"Ab"', '"Abcdef"', '"abc"']),
        ({"type": "string", "pattern": "^id-[0-9]+$", "maxLength": 6}, ['"id-1234"', '"id-"']),
    ],
    "minLength": [
        ({"type": "string", "minLength": 40, "maxLength": 41}, ['"' + "a" * 39 + '"', '"' + "a" * 42 + '"']),
    ],
    "oneOf": [
        ({"oneOf": [
            {"type": "object", "properties": {"circle": {"type": "integer"}}, "required": ["circle"],
             "additionalProperties": False},
            {"type": "object", "properties": {"square": {"type": "integer"}}, "required": ["square"],
             "additionalProperties": False}]},
         ['{"circle":1,"square":2}', "{}"]),
        ({"oneOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]},
         ["{}"]),
    ],
}
PARAMS = [(kw, i, schema, misses) for kw, cases in CASES.items() for i, (schema, misses) in enumerate(cases)]
FORMAT_CHECKER = jsonschema.Draft202012Validator.FORMAT_CHECKER


@pytest.fixture(scope="module")
def vocab(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    return VocabInfo.from_tokenizer(tok, eos_token_ids=[tok.eos_token_id])


def shortest_accepted(dfa, limit: int = 200, max_len: int = 120) -> list[bytes]:
    """Breadth-first: the shortest printable-ASCII texts the automaton accepts (per state, one byte for
    each distinct next state, so every branch of the automaton is reached without enumerating bytes)."""
    out: list[bytes] = []
    queue = deque([(dfa.start, b"")])
    seen = {}
    while queue and len(out) < limit:
        state, text = queue.popleft()
        if dfa.accepting[state]:
            out.append(text)
        if len(text) >= max_len:
            continue
        by_next: dict[int, int] = {}
        for b in range(0x20, 0x7F):
            nxt = int(dfa.transitions[state, b])
            if nxt != DEAD and nxt not in by_next:
                by_next[nxt] = b
        for nxt, b in by_next.items():
            # Revisit a state only a few times: enough for counted repetitions, bounded for loops.
            if seen.get(nxt, 0) < 8:
                seen[nxt] = seen.get(nxt, 0) + 1
                queue.append((nxt, text + bytes([b])))
    return out


def validate(schema, text: str) -> None:
    value = json.loads(text)
    jsonschema.validators.validator_for(schema)(schema, format_checker=FORMAT_CHECKER).validate(value)
    if schema.get("format") == "hostname" and not HOSTNAME.fullmatch(value):
        raise jsonschema.ValidationError(f"{value!r} is not a hostname")


@pytest.mark.parametrize("keyword, index, schema, near_misses", PARAMS, ids=[f"{kw}-{i}" for kw, i, _, _ in PARAMS])
def test_keyword_outputs_validate_and_near_misses_are_masked(keyword, index, schema, near_misses, vocab):
    regex = json_schema_to_regex(schema)
    dfa = compile_dfa(parse_regex(regex))
    texts = shortest_accepted(dfa)
    assert texts, "the automaton accepts nothing"
    for text in texts:  # enumerate
        validate(schema, text.decode())
    table = compile_constraint("json_schema", json.dumps(schema), vocab)
    rng = np.random.default_rng(index)
    for _ in range(20):  # generate
        tokens, finished = sample_walk(table, rng, max_tokens=300, finish_after=60)
        assert finished
        validate(schema, b"".join(vocab.tokens[t] for t in tokens).decode())
    for miss in near_misses:  # near misses: invalid by jsonschema, and no path through the automaton
        with pytest.raises(jsonschema.ValidationError):
            validate(schema, miss)
        assert not dfa.matches(miss.encode()), miss


def test_unknown_formats_constrain_nothing_but_known_ones_are_exact():
    # JSON Schema: an unknown format is an annotation; a defined one we cannot generate is refused.
    assert json_schema_to_regex({"type": "string", "format": "x-color"}) == json_schema_to_regex({"type": "string"})
    with pytest.raises(ValueError, match="format"):
        json_schema_to_regex({"type": "string", "format": "email", "maxLength": 20})


def test_a_float_multiple_of_keeps_integers_within_floating_point():
    regex = json_schema_to_regex({"type": "integer", "multipleOf": 5.0})
    assert re.fullmatch(regex, "5" + "0" * 14) and not re.fullmatch(regex, "5" + "0" * 15)
