"""Validation at the edge (issue 11): every number a client sends that becomes a device integer, a host
integer used in arithmetic, or a float32 on the device is either refused with a 400 naming the field as the
client spelled it, or accepted and then safe all the way into a `SamplingBatch` and the jitted sampler.

The pipeline under test is the server's: parse_body -> {chat,completion,native}_sampling_params (which run
SamplingParams.validate) -> check_context -> one SamplingRow per choice (seed + i, as the engine derives
them) -> build_sampling_batch. The expected outcome of each value comes from `FieldSpec`, the bounds as
documented, not from the code under test.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxserve.constrained.tables import unconstrained_row
from jaxserve.sampling.batch import SamplingRow, build_sampling_batch
from jaxserve.sampling.params import INT32_MAX, SamplingParams
from jaxserve.sampling.penalties import PenaltyState
from jaxserve.sampling.sampler import sample
from jaxserve.server.errors import APIError
from jaxserve.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, GenerateRequest
from jaxserve.server.request_params import (
    chat_sampling_params,
    check_context,
    completion_sampling_params,
    native_sampling_params,
    parse_body,
)

VOCAB = 1000
MAX_MODEL_LEN = 512
PROMPT_TOKENS = 5
ROOM = MAX_MODEL_LEN - PROMPT_TOKENS
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
PLACEHOLDER = "__VALUE__"

# Raw JSON literals at every type's extremes. JSON has no NaN/Infinity, but Python's json and pydantic's
# parser both accept them, and 1e999 parses as inf: each must be refused, never reach the device.
INT_EXTREMES = [
    0, 1, -1, 2, 5, 16, 20, 21, 127, 128, 129, ROOM, ROOM + 1, VOCAB - 1, VOCAB,
    2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**32, 2**40, INT64_MAX, INT64_MAX + 1, INT64_MIN, INT64_MIN - 1,
    2**64, 2**70, -(2**70), 10**300, -(10**300),
]
OTHER_LITERALS = [
    "1e308", "-1e308", "1e999", "-1e999", "NaN", "Infinity", "-Infinity", "1.0", "-0.0", "0.5", "1e-320",
    "5e-324", "0.01", "0.009", "100.0", "100.5", "2.0", "-2.0", "2.5", '"NaN"', '"1"', '"inf"', "true", "false",
    "null", "[]", "{}", "9" * 400, "-" + "9" * 400,
]
LITERALS = [str(v) for v in INT_EXTREMES] + OTHER_LITERALS


@dataclass(frozen=True)
class FieldSpec:
    """One numeric field of one route: where it sits in the body, its `param`, and what it accepts."""

    route: str
    path: tuple[str, ...]  # keys into the body; "[]" = an element of a list, "{key}" = a logit_bias key
    param: str
    kind: str  # "int" | "float" | "token" | "raw_token" (any JSON integer passes parse; the vocab check is later)
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    nullable: bool = False
    extra: tuple[tuple[str, Any], ...] = ()  # other body fields the field needs (logprobs: true, ...)

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if self.kind == "key":
            return bool(re.fullmatch(r"-?[0-9]{1,20}", value)) and 0 <= int(value) < VOCAB
        if isinstance(value, bool):
            return False
        if self.kind in ("int", "token", "raw_token"):
            if not isinstance(value, int):
                return False
            if self.kind == "token":
                return 0 <= value < VOCAB
            return self.kind == "raw_token" or self.lo <= value <= self.hi
        if not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
            return False
        low_ok = value > self.lo if self.lo_open else value >= self.lo
        return low_ok and value <= self.hi


def _sampling_fields(route: str, max_tokens_hi: int, min_tokens_hi: int, nullable_floats: bool) -> list[FieldSpec]:
    f = lambda *a, **k: FieldSpec(route, *a, **k)  # noqa: E731
    return [
        f(("n",), "n", "int", 1, 128),
        f(("min_tokens",), "min_tokens", "int", 0, min_tokens_hi),
        f(("top_k",), "top_k", "int", -1, INT32_MAX, nullable=True),
        f(("seed",), "seed", "int", INT64_MIN, INT64_MAX, nullable=True),
        f(("temperature",), "temperature", "float", 0, 100, nullable=nullable_floats),
        f(("top_p",), "top_p", "float", 0, 1, lo_open=True, nullable=nullable_floats),
        f(("min_p",), "min_p", "float", 0, 1, nullable=nullable_floats),
        f(("repetition_penalty",), "repetition_penalty", "float", 0.01, 2, nullable=nullable_floats),
        f(("presence_penalty",), "presence_penalty", "float", -2, 2),
        f(("frequency_penalty",), "frequency_penalty", "float", -2, 2),
        f(("logit_bias", "7"), "logit_bias", "float", -100, 100),
        f(("logit_bias", "{key}"), "logit_bias", "key"),
        f(("stop_token_ids", "[]"), "stop_token_ids", "token"),
        f(("max_tokens",), "max_tokens", "int", 1, max_tokens_hi, nullable=True),
    ]


FIELDS: list[FieldSpec] = [
    # Chat: no max_tokens by default, so min_tokens is bounded by the context room.
    *_sampling_fields("chat", ROOM, ROOM, nullable_floats=True),
    FieldSpec("chat", ("max_completion_tokens",), "max_completion_tokens", "int", 1, ROOM, nullable=True),
    FieldSpec("chat", ("top_logprobs",), "top_logprobs", "int", 0, 20, nullable=True, extra=(("logprobs", True),)),
    # Completions: max_tokens defaults to 16, which bounds min_tokens.
    *_sampling_fields("completions", ROOM, 16, nullable_floats=True),
    FieldSpec("completions", ("logprobs",), "logprobs", "int", 0, 20, nullable=True),
    FieldSpec("completions", ("best_of",), "best_of", "int", 1, 1, nullable=True),  # only best_of == n (1)
    FieldSpec("completions", ("prompt", "[]"), "prompt", "raw_token"),
    # /generate: sampling_params.* (max_new_tokens defaults to 128, which bounds min_new_tokens).
    *[
        FieldSpec(
            "generate", ("sampling_params", *s.path), "sampling_params." + s.param, s.kind, s.lo, s.hi, s.lo_open,
            s.param == "seed",  # NativeSamplingParams: only seed is optional among these
        )
        for s in _sampling_fields("generate", ROOM, 128, nullable_floats=False)
        if s.param not in ("logit_bias", "max_tokens", "min_tokens")
    ],
    FieldSpec("generate", ("sampling_params", "max_new_tokens"), "sampling_params.max_new_tokens", "int", 1, ROOM,
              nullable=True),
    FieldSpec("generate", ("sampling_params", "min_new_tokens"), "sampling_params.min_new_tokens", "int", 0, 128),
    FieldSpec("generate", ("top_logprobs_num",), "top_logprobs_num", "int", 0, 20, extra=(("return_logprob", True),)),
    FieldSpec("generate", ("input_ids", "[]"), "input_ids", "raw_token"),
    FieldSpec("detokenize", ("tokens", "[]"), "tokens", "raw_token"),
]

BASE_BODIES: dict[str, dict[str, Any]] = {
    "chat": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    "completions": {"model": "m", "prompt": "hi"},
    "generate": {"input_ids": [1, 2, 3]},
    "detokenize": {"tokens": [1, 2]},
}


def body_with(spec: FieldSpec, literal: str) -> bytes:
    """The route's base body with `literal` (raw JSON text) at the field's place."""
    body = json.loads(json.dumps(BASE_BODIES[spec.route]))
    body.update(dict(spec.extra))
    *parents, last = spec.path
    if last == "[]":
        *parents, last = parents
    node = body
    for key in parents:
        node = node.setdefault(key, {})
    if spec.path[-1] == "[]":
        node[last] = [3, PLACEHOLDER]
    elif last == "{key}":
        # The literal is the key itself (a JSON string), with a valid bias as the value.
        node.clear()
        node[PLACEHOLDER] = 1.5
        return json.dumps(body).replace(json.dumps(PLACEHOLDER), json.dumps(literal)).encode()
    else:
        node[last] = PLACEHOLDER
    return json.dumps(body).replace(json.dumps(PLACEHOLDER), literal).encode()


def run_route(route: str, raw: bytes) -> SamplingParams | None:
    """The server's checks for one body; the params (None for /v1/detokenize) or an APIError."""
    if route == "detokenize":
        parse_body(DetokenizeRequest, raw)
        return None
    if route == "chat":
        req = parse_body(ChatCompletionRequest, raw)
        params = chat_sampling_params(req, None, VOCAB)
        max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        check_context(PROMPT_TOKENS, params.max_tokens, MAX_MODEL_LEN, min_tokens=params.min_tokens,
                      max_tokens_param=max_param)
    elif route == "completions":
        req = parse_body(CompletionRequest, raw)
        params = completion_sampling_params(req, VOCAB)
        check_context(PROMPT_TOKENS, params.max_tokens, MAX_MODEL_LEN, min_tokens=params.min_tokens)
    else:
        req = parse_body(GenerateRequest, raw)
        params = native_sampling_params(req.sampling_params, req.top_logprobs_num if req.return_logprob else None,
                                        VOCAB)
        check_context(PROMPT_TOKENS, params.max_tokens, MAX_MODEL_LEN, min_tokens=params.min_tokens,
                      max_tokens_param="sampling_params.max_new_tokens",
                      min_tokens_param="sampling_params.min_new_tokens")
    return params


def rows_for(params: SamplingParams) -> list[SamplingRow]:
    """One row per choice, seeded the way the engine seeds them (seed + i)."""
    return [
        SamplingRow(params=params, seed=(params.seed + i) if params.seed is not None else i, step=0, slot=i % 4)
        for i in range(params.n)
    ]


def check_batch(params: SamplingParams) -> None:
    """Accepted params must become a SamplingBatch without overflow and with top-k's meaning intact."""
    rows = rows_for(params)
    batch = build_sampling_batch(rows, len(rows) + 1)
    assert batch.top_k.dtype == np.int32 and batch.seed.dtype == np.uint32
    for i in range(len(rows)):
        k = int(batch.top_k[i])
        assert (0 < k < VOCAB) == (0 < params.top_k < VOCAB), (params.top_k, k)
        assert np.isfinite(batch.temperature[i]) and np.isfinite(batch.repetition_penalty[i])
        assert batch.repetition_penalty[i] > 0 and batch.top_p[i] <= 1.0


def outcome(spec: FieldSpec, literal: str) -> str | None:
    """None when the request is accepted (and its batch built), else the 400's param; asserts the envelope."""
    try:
        params = run_route(spec.route, body_with(spec, literal))
    except APIError as err:
        body = err.body()["error"]
        assert err.status_code == 400, (spec, literal, body)
        assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
        assert body["message"] and len(body["message"]) < 600, body["message"]
        return body["param"]
    if params is not None:
        check_batch(params)
    return None


def expected(spec: FieldSpec, literal: str) -> str | None:
    value = literal if spec.kind == "key" else json.loads(literal)
    return None if spec.accepts(value) else spec.param


def mismatch(spec: FieldSpec, literal: str) -> str | None:
    got, want = outcome(spec, literal), expected(spec, literal)
    if got == want:
        return None
    return f"{spec.route} {spec.param} = {literal[:40]}: got param {got!r}, expected {want!r}"


# -------------------------------------------------------------------------------------------- the table

@pytest.mark.parametrize(
    "route, fields, param",
    [
        # The report: a top_k past int32 used to pass and then overflow inside the engine step.
        ("chat", {"top_k": 1099511627776}, "top_k"),
        ("chat", {"top_k": 2**31 - 1}, None),
        ("chat", {"top_k": -2}, "top_k"),
        ("generate", {"sampling_params": {"top_k": 2**40}}, "sampling_params.top_k"),
        ("chat", {"seed": INT64_MAX, "n": 128}, None),  # seed + 127 wraps modulo 2**64, no overflow
        ("chat", {"seed": INT64_MAX + 1}, "seed"),
        ("chat", {"n": 2**70}, "n"),
        ("chat", {"max_tokens": 10**300}, "max_tokens"),  # a context-length error, not an overflow
        ("chat", {"max_completion_tokens": 2**70}, "max_completion_tokens"),
        ("chat", {"max_completion_tokens": 0}, "max_completion_tokens"),
        ("chat", {"max_completion_tokens": 5, "max_tokens": -1}, "max_tokens"),
        ("chat", {"min_tokens": 2**40}, "min_tokens"),
        ("chat", {"min_tokens": 9, "max_completion_tokens": 8}, "min_tokens"),
        ("chat", {"logprobs": True, "top_logprobs": 2**40}, "top_logprobs"),
        ("chat", {"logit_bias": {"99999999999999999999": 1}}, "logit_bias"),
        ("chat", {"logit_bias": {"9" * 400: 1}}, "logit_bias"),
        ("chat", {"logit_bias": {"5": 1, "05": 1}}, "logit_bias"),  # the same token twice
        ("chat", {"logit_bias": {" 5": 1}}, "logit_bias"),
        ("chat", {"logit_bias": {"\u0665": 1}}, "logit_bias"),  # ARABIC-INDIC DIGIT FIVE: int() takes it
        ("chat", {"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ("chat", {"stop_token_ids": [2**70]}, "stop_token_ids"),
        ("chat", {"stop_token_ids": list(range(1025))}, "stop_token_ids"),
        ("chat", {"stop_token_ids": list(range(1000))}, None),
        ("chat", {"stop": ["a"] * 17}, "stop"),
        ("chat", {"repetition_penalty": 1e-300}, "repetition_penalty"),
        ("completions", {"logprobs": 2**40}, "logprobs"),
        ("completions", {"best_of": 2**70}, "best_of"),
        ("completions", {"max_tokens": 16, "min_tokens": 17}, "min_tokens"),
        ("generate", {"sampling_params": {"max_new_tokens": 2**70}}, "sampling_params.max_new_tokens"),
        ("generate", {"sampling_params": {"min_new_tokens": 200, "max_new_tokens": None}}, None),
        ("generate", {"sampling_params": {"min_new_tokens": 600, "max_new_tokens": None}},
         "sampling_params.min_new_tokens"),
        ("generate", {"sampling_params": {"min_new_tokens": 9, "max_new_tokens": 8}}, "sampling_params.min_new_tokens"),
        ("generate", {"return_logprob": True, "top_logprobs_num": 21}, "top_logprobs_num"),
        ("generate", {"return_logprob": False, "top_logprobs_num": 2**70}, "top_logprobs_num"),
        ("generate", {"sampling_params": {"n": 0}}, "sampling_params.n"),
        ("generate", {"sampling_params": {"seed": -(2**63) - 1}}, "sampling_params.seed"),
    ],
)
def test_table(route: str, fields: dict[str, Any], param: str | None) -> None:
    raw = json.dumps({**BASE_BODIES[route], **fields}).encode()
    try:
        params = run_route(route, raw)
    except APIError as err:
        assert err.status_code == 400 and err.param == param, (err.param, err.message)
        assert err.message.startswith(param) or err.code == "context_length_exceeded", err.message
        assert len(err.message) < 400, err.message
        return
    assert param is None, f"accepted, expected a 400 naming {param}"
    if params is not None:
        check_batch(params)


def test_messages_use_the_routes_spelling() -> None:
    """The message names fields the way the client sent them, not SamplingParams' names."""
    body = {**BASE_BODIES["chat"], "min_tokens": 9, "max_completion_tokens": 8}
    with pytest.raises(APIError) as info:
        run_route("chat", json.dumps(body).encode())
    assert "max_completion_tokens (8)" in info.value.message
    body = {**BASE_BODIES["generate"], "sampling_params": {"min_new_tokens": 9, "max_new_tokens": 8}}
    with pytest.raises(APIError) as info:
        run_route("generate", json.dumps(body).encode())
    assert info.value.message.startswith("sampling_params.min_new_tokens (9)")
    assert "sampling_params.max_new_tokens (8)" in info.value.message
    body = {**BASE_BODIES["completions"], "logprobs": 21}
    with pytest.raises(APIError) as info:
        run_route("completions", json.dumps(body).encode())
    assert info.value.message.startswith("logprobs must be") and "top_logprobs" not in info.value.message


@pytest.mark.parametrize(
    "route, raw, param",
    [
        ("chat", b'{"messages": [{"role": "user", "content": "x"}], "temperature": 1e999}', "temperature"),
        ("chat", b'{"messages": [{"role": "user", "content": "x"}], "top_p": NaN}', "top_p"),
        ("chat", b'{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"3": -Infinity}}', "logit_bias"),
        ("chat", b'{"messages": [{"role": "user", "content": "x"}], "stop_token_ids": [1.5]}', "stop_token_ids"),
        ("completions", b'{"prompt": [1e3]}', "prompt"),
        ("completions", b'{"prompt": [[1], [true]]}', "prompt"),
        ("generate", b'{"input_ids": [1e308]}', "input_ids"),
        ("generate", b'{"input_ids": [1], "sampling_params": {"presence_penalty": -1e999}}',
         "sampling_params.presence_penalty"),
        ("detokenize", b'{"tokens": [NaN]}', "tokens"),
    ],
)
def test_raw_literals_name_the_field_not_pydantics_location(route: str, raw: bytes, param: str) -> None:
    with pytest.raises(APIError) as info:
        run_route(route, raw)
    assert info.value.status_code == 400 and info.value.param == param, (info.value.param, info.value.message)


def test_every_field_at_every_extreme() -> None:
    """The whole cross product, deterministic: each field of each route times each extreme literal."""
    failures = [m for spec in FIELDS for literal in LITERALS if (m := mismatch(spec, literal))]
    assert not failures, "\n".join(failures[:30])


# ------------------------------------------------------------------------------------------- hypothesis

def _literals() -> st.SearchStrategy[str]:
    ints = st.one_of(
        st.sampled_from(INT_EXTREMES),
        st.integers(-(2**80), 2**80),
        st.integers(-(2**33), 2**33),
        st.integers(-300, 1100),
    ).map(str)
    floats = st.floats(allow_nan=False, allow_infinity=False).map(repr)
    return st.one_of(ints, floats, st.sampled_from(OTHER_LITERALS))


def _keys() -> st.SearchStrategy[str]:
    return st.one_of(
        st.integers(-(2**70), 2**70).map(str),
        st.integers(-5, 1100).map(str),
        st.sampled_from([" 5", "5 ", "+5", "5_0", "05", "1e3", "5.0", "", "-0", "\u0665", "abc", "9" * 21]),
    )


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fields_property(data: st.DataObject) -> None:
    spec = data.draw(st.sampled_from(FIELDS), label="field")
    literal = data.draw(_keys() if spec.kind == "key" else _literals(), label="literal")
    assert mismatch(spec, literal) is None


@settings(max_examples=150, derandomize=True, deadline=None)
@given(
    route=st.sampled_from(["chat", "completions", "generate"]),
    values=st.lists(st.tuples(st.sampled_from(range(12)), _literals()), min_size=2, max_size=5),
)
def test_several_fields_at_once_never_escape_as_non_400(route: str, values: list[tuple[int, str]]) -> None:
    """Several extreme fields together: the outcome is a 400 naming one of them, or an accepted request
    whose batch builds (interactions such as min_tokens vs max_tokens included)."""
    specs = [s for s in FIELDS if s.route == route and s.kind in ("int", "float") and len(s.path) <= 2
             and s.path[-1] not in ("{key}", "[]")]
    chosen = {specs[i % len(specs)].path: (specs[i % len(specs)], lit) for i, lit in values}
    body = json.loads(json.dumps(BASE_BODIES[route]))
    literals = {}
    for n, (path, (spec, lit)) in enumerate(chosen.items()):
        body.update(dict(spec.extra))
        node = body
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = f"{PLACEHOLDER}{n}"
        literals[json.dumps(f"{PLACEHOLDER}{n}")] = lit
    raw = json.dumps(body)
    for placeholder, lit in literals.items():
        raw = raw.replace(placeholder, lit)
    try:
        params = run_route(route, raw.encode())
    except APIError as err:
        assert err.status_code == 400
        assert err.param in {spec.param for spec, _ in chosen.values()}, (err.param, err.message)
        return
    if params is not None:
        check_batch(params)


# ---------------------------------------------------------------------------------------- on the device

V = 64


def _accepted_extremes() -> list[SamplingParams]:
    """Every accepted extreme of every float/int sampling field, validated as the server would (vocab V)."""
    out: list[SamplingParams] = []
    values: dict[str, list[Any]] = {
        "temperature": [0.0, -0.0, 5e-324, 1e-5, 1.0001e-5, 2e-5, 100.0],
        "top_p": [5e-324, 1e-45, 1e-8, 0.5, 1.0],
        "min_p": [0.0, 5e-324, 1e-45, 0.999, 1.0],
        "repetition_penalty": [0.01, 2.0],
        "presence_penalty": [-2.0, 2.0],
        "frequency_penalty": [-2.0, 2.0],
        "top_k": [-1, 0, 1, V - 1, V, INT32_MAX],
        "seed": [INT64_MIN, -1, 0, INT64_MAX],
    }
    for name, vals in values.items():
        for v in vals:
            for temp in (0.0, 0.7, 1e-4):  # each value on greedy and sampled rows
                kw: dict[str, Any] = {"temperature": temp, "repetition_penalty": 0.01, "n": 2}
                kw[name] = v
                p = SamplingParams(**kw)
                p.validate(V)
                out.append(p)
    bias = tuple((t, 100.0 if t % 2 else -100.0) for t in range(V))
    for p in list(out[::7]):
        q = p.replace(logit_bias=bias)
        q.validate(V)
        out.append(q)
    return out


def test_accepted_extremes_sample_finite_tokens_on_device() -> None:
    """One jitted sampler step over every accepted extreme: tokens in the vocabulary, finite logprobs (a
    NaN would fail the JSON response), with penalties active (prompt tokens seen, large output counts)."""
    params = _accepted_extremes()
    rows = [r for p in params for r in rows_for(p)]
    slots = 4
    num_rows = 1 << (len(rows) - 1).bit_length()
    batch = build_sampling_batch(rows, num_rows)
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((num_rows, V)) * 30.0).astype(np.float32)
    logits[:, 5] = 80.0  # a large positive logit on a seen token: divided by repetition_penalty 0.01
    counts = np.zeros((slots, V), np.int32)
    counts[:, : V // 2] = MAX_MODEL_LEN
    prompt_mask = np.zeros((slots, V), bool)
    prompt_mask[:, ::3] = True
    state = PenaltyState(output_counts=jnp.asarray(counts), prompt_mask=jnp.asarray(prompt_mask))
    table = jnp.asarray(unconstrained_row(V, V)[None, :])
    out = sample(jnp.asarray(logits), batch, state, table, jnp.asarray([-1], jnp.int32), num_top_logprobs=20)
    tokens = np.asarray(out.tokens)[: len(rows)]
    assert ((0 <= tokens) & (tokens < V)).all()
    assert np.isfinite(np.asarray(out.logprob)[: len(rows)]).all()
    assert np.isfinite(np.asarray(out.top_logprobs)[: len(rows)]).all()
