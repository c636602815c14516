"""JSON schema -> regex: every string the regex admits validates (random walks through the token tables,
checked with `jsonschema`), and unsupported features are rejected naming the keyword."""
import json
import re
import zlib

import jsonschema
import numpy as np
import pytest

from jaxserve.constrained.compiler import compile_constraint
from jaxserve.constrained.json_schema import (
    JsonSchemaOptions,
    int_range,
    json_object_regex,
    json_schema_to_regex,
)
from jaxserve.constrained.token_table import distance_to_accept, sample_walk
from jaxserve.constrained.vocab import VocabInfo

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b\"c"]}, "maxItems": 3},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
SCHEMAS = [
    PERSON,
    {"type": "string", "pattern": r"^[A-Z]{2}-\d{3}$"},
    {"type": "string", "pattern": "ab"},  # search semantics: generated strings contain "ab"
    {"type": "string", "format": "date"},
    {"type": "string", "format": "time"},
    {"type": "string", "format": "date-time"},
    {"type": "string", "format": "uuid"},
    {"type": "string", "format": "uri"},
    {"type": "string", "format": "ipv4"},
    {"type": "number", "minimum": -2.5, "exclusiveMaximum": 10},
    {"type": "integer", "exclusiveMinimum": -7, "maximum": 1000},
    {"type": "number"},
    {"enum": [1, "x", None, True, {"k": [1, 2]}]},
    {"const": "fixed\u00e9\n"},
    {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "integer", "minimum": 5}]},
    {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "boolean"}}]},
    {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
               {"properties": {"b": {"type": "null"}}, "required": ["b"]}]},
    {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"},
                                                         "next": {"$ref": "#/$defs/node"}}, "required": ["v"]}},
     "$ref": "#/$defs/node"},
    {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False, "minItems": 1},
    {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4, "uniqueItems": False},
    {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    {"type": "object", "additionalProperties": {"type": "integer"}},
    {"type": "object"},
    {"type": ["string", "null"], "maxLength": 2},
    {"type": "object", "properties": {"o1": {"type": "boolean"}, "o2": {"type": "boolean"},
                                      "r": {"type": "string", "pattern": "^x+$"}}, "required": ["r"]},
    {"type": "string", "pattern": "^[a-z]+$", "minLength": 2, "maxLength": 5},
    {"oneOf": [{"type": "object", "properties": {"kind": {"const": "a"}, "x": {"type": "integer"}}, "required": ["kind"]},
               {"type": "object", "properties": {"kind": {"enum": ["b", "c"]}}, "required": ["kind"]}]},
    True,
]


@pytest.fixture(scope="module")
def vocab(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    return VocabInfo.from_tokenizer(hf, eos_token_ids=[hf.eos_token_id])


@pytest.mark.parametrize("schema", SCHEMAS, ids=[f"schema{i}" for i in range(len(SCHEMAS))])
def test_generated_json_validates(schema, vocab):
    table = compile_constraint("json_schema", json.dumps(schema), vocab)
    rng = np.random.default_rng(zlib.crc32(json.dumps(schema).encode()))
    dist = distance_to_accept(table)
    for _ in range(15):
        tokens, finished = sample_walk(table, rng, max_tokens=300, finish_after=40, distances=dist)
        assert finished
        text = b"".join(vocab.tokens[t] for t in tokens).decode("utf-8")
        jsonschema.validate(json.loads(text), schema)
        if schema == {"type": "string", "pattern": "ab"}:
            assert "ab" in json.loads(text)


def test_json_object_is_any_object_with_bounded_nesting(vocab):
    table = compile_constraint("json_object", "", vocab)
    rng = np.random.default_rng(0)
    dist = distance_to_accept(table)
    for _ in range(10):
        tokens, finished = sample_walk(table, rng, max_tokens=300, finish_after=60, distances=dist)
        assert finished
        assert isinstance(json.loads(b"".join(vocab.tokens[t] for t in tokens).decode()), dict)
    rx = json_object_regex(JsonSchemaOptions(max_nesting=1))
    assert re.fullmatch(rx, '{"a":[1,"x",null],"b":{"c":true}}')
    assert not re.fullmatch(rx, '{"a":[[1]]}')  # deeper than max_nesting


def test_properties_in_schema_order_and_required_present():
    rx = json_schema_to_regex(PERSON)
    assert re.fullmatch(rx, '{"name":"Al","age":30}')
    assert re.fullmatch(rx, '{"name":"Al","age":30,"tags":["a","b\\"c"]}')
    assert not re.fullmatch(rx, '{"age":30,"name":"Al"}')  # schema order
    assert not re.fullmatch(rx, '{"name":"Al"}')  # required missing
    assert not re.fullmatch(rx, '{"name":"Al","age":30,"x":1}')  # additionalProperties false
    assert not re.fullmatch(rx, '{"name":"","age":30}')  # minLength


def test_string_escapes_including_unicode_escapes():
    rx = json_schema_to_regex({"type": "string"})
    for ok in [r'"a\"b"', r'"\\"', r'"\u00e9\n\t"', '"日本"']:
        assert re.fullmatch(rx, ok), ok
    for bad in ['"a"b"', '"\\x"', '"\\ud800"', '"\n"']:  # raw quote, bad escape, lone surrogate, control
        assert not re.fullmatch(rx, bad), bad
    # maxLength counts code points: an escape is one character.
    rx2 = json_schema_to_regex({"type": "string", "maxLength": 2})
    assert re.fullmatch(rx2, r'"\u00e9\n"') and not re.fullmatch(rx2, '"abc"')


def test_whitespace_option():
    rx = json_schema_to_regex(PERSON, JsonSchemaOptions(whitespace="[ ]?"))
    assert re.fullmatch(rx, '{ "name" : "Al" , "age" : 3 }')
    assert re.fullmatch(rx, '{"name":"Al","age":3}')


@pytest.mark.parametrize("lo, hi", [(0, 0), (1, 100), (-5, 5), (None, -3), (17, None), (-120, -7), (123, 4567)])
def test_int_range_is_exact(lo, hi):
    rx = int_range(lo, hi)
    for v in range(-300, 5000):
        assert bool(re.fullmatch(rx, str(v))) == ((lo is None or v >= lo) and (hi is None or v <= hi)), v
    assert not re.fullmatch(rx, "-0") and not re.fullmatch(rx, "007")


@pytest.mark.parametrize(
    "schema, keyword",
    [
        ({"not": {"type": "string"}}, "not"),
        ({"type": "object", "properties": {"a": {"type": "string"}}, "if": {"properties": {"a": {"minLength": 2}}},
          "then": {"required": ["b"]}}, "if"),
        ({"type": "integer", "multipleOf": 3}, "multipleOf"),
        ({"type": "number", "multipleOf": 0.1}, "multipleOf"),
        ({"type": "object", "patternProperties": {"(?<=a": {}}}, "patternProperties"),
        ({"type": "object", "minProperties": 2}, "minProperties"),
        ({"anyOf": [{"type": "object"}], "dependencies": {"a": ["b"]}}, "dependencies"),
        ({"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 3}]}, "oneOf"),
        ({"type": "string", "format": "date", "pattern": "^2"}, "format"),
        ({"type": "string", "pattern": "(a)\\1"}, "pattern"),
        ({"$ref": "http://example.com/schema"}, "$ref"),
        ({"type": "array", "items": {"type": "integer"}, "minItems": 2, "uniqueItems": True}, "uniqueItems"),
    ],
)
def test_unsupported_features_name_the_keyword(schema, keyword):
    with pytest.raises(ValueError, match=re.escape(keyword)):
        json_schema_to_regex(schema)


def test_bad_input_is_a_value_error():
    with pytest.raises(ValueError, match="not valid JSON"):
        json_schema_to_regex("{not json")
    with pytest.raises(ValueError, match="must be an object"):
        json_schema_to_regex("[1, 2]")
    with pytest.raises(ValueError, match="admits no value"):
        json_schema_to_regex({"type": "integer", "minimum": 5, "maximum": 1})


def test_recursion_is_bounded():
    schema = {"$defs": {"t": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/t"}}}}},
              "$ref": "#/$defs/t"}
    rx = json_schema_to_regex(schema, JsonSchemaOptions(max_ref_depth=2))
    assert re.fullmatch(rx, '{"kids":[{"kids":[]}]}')
    assert not re.fullmatch(rx, '{"kids":[{"kids":[{"kids":[]}]}]}')


def test_anchor_refs_are_rejected_not_misresolved():
    schema = {"definitions": {"n": {"id": "#n", "type": "integer"}}, "properties": {"a": {"$ref": "#n"}},
              "required": ["a"]}
    with pytest.raises(ValueError, match=r"\$ref"):
        json_schema_to_regex(schema)
