"""Schemathesis against the live server's own /openapi.json: generated (valid and invalid) requests to every
route must never get a 5xx, and the server must still be healthy afterwards.

The server is test_server_e2e's (the real `python -m jaxserve.launch` on the tiny random model, with an API
key); its fixture is imported, so a session that runs both modules shares the module-scoped start-up cost
only through the persistent compilation cache. The served document is honest about the limits (none on
max_tokens); this test bounds the generated sizes (max_tokens, n, ...) in its own copy so a run stays short
on a 2-core CPU. Generation is deterministic (derandomized, no database, no shrinking): the document's request
examples, the coverage phase's boundary cases built on them, then MAX_EXAMPLES fuzzed bodies per operation;
about 1,800 requests, 2 minutes on dev-cpu.
"""
from __future__ import annotations

import copy
import time
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode

from test_server_e2e import API_KEY, live  # noqa: F401  (`live` is the module's server fixture)

MAX_EXAMPLES = 50
REQUEST_TIMEOUT_S = 120

# property name -> (least, largest) generated value in positive mode (negative mode still tries outside):
# small sizes keep generations short; the lower bounds are the server's own rules, so that more valid cases
# get past validation to the engine instead of all stopping at a 400 for max_tokens=0.
_BOUNDS = {
    "max_tokens": (1, 8),
    "max_completion_tokens": (1, 8),
    "max_new_tokens": (1, 8),
    "min_tokens": (0, 4),
    "min_new_tokens": (0, 4),
    "n": (1, 2),
    "best_of": (1, 2),
    "top_logprobs": (0, 3),
    "top_logprobs_num": (0, 3),
    "logprobs": (0, 3),
}


def _bound_integers(schema: Any, least: int, largest: int) -> None:
    """Bound every integer alternative of one property's schema to [least, largest]."""
    if isinstance(schema, dict):
        if schema.get("type") == "integer":
            schema["minimum"] = max(schema.get("minimum", least), least)
            schema["maximum"] = min(schema.get("maximum", largest), largest)
        for key in ("anyOf", "oneOf"):
            for sub in schema.get(key, []):
                _bound_integers(sub, least, largest)


def bounded(doc: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    for component in doc["components"]["schemas"].values():
        for name, prop in component.get("properties", {}).items():
            if name in _BOUNDS:
                _bound_integers(prop, *_BOUNDS[name])
    return doc


@pytest.fixture(scope="module")
def api_schema(live):  # noqa: F811
    headers = {"Authorization": f"Bearer {API_KEY}"}
    raw = httpx.get(live.base + "/openapi.json", timeout=30).raise_for_status().json()
    # Every request route has a body schema (the routes parse raw bodies, so FastAPI alone would not say).
    for path in ("/v1/chat/completions", "/v1/completions", "/generate", "/v1/tokenize", "/v1/detokenize"):
        assert "requestBody" in raw["paths"][path]["post"], path
    schema = schemathesis.openapi.from_dict(bounded(raw))
    schema.config.update(base_url=live.base, headers=headers, request_timeout=REQUEST_TIMEOUT_S)
    schema.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
        max_examples=MAX_EXAMPLES,
        deterministic=True,
        no_shrink=True,
        database="none",
    )
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


def integral_floats_to_int(value: Any) -> Any:
    """JSON Schema counts 0.0 as an integer; the server parses strictly (pydantic strict mode), so 0.0 where an
    int belongs is a 400. Valid cases send such numbers as ints, so they get past parsing to the engine."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, dict):
        return {k: integral_floats_to_int(v) for k, v in value.items()}
    if isinstance(value, list):
        return [integral_floats_to_int(v) for v in value]
    return value


def bounded_length(body: dict[str, Any]) -> dict[str, Any]:
    """A chat body without max_tokens may run to the end of the context (~0.6 s here): 125 of ~630 valid chat
    bodies did, 80 s of the run, all on the same path. They get the bounded maximum; the absent case has its
    own test (test_server_e2e.test_without_max_tokens_a_reply_may_fill_the_context)."""
    if "messages" in body and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        return {**body, "max_tokens": _BOUNDS["max_tokens"][1]}
    return body


@schema.parametrize()
def test_no_server_errors(case):
    if case.meta is not None and case.meta.generation.mode == GenerationMode.POSITIVE and isinstance(case.body, dict):
        case.body = bounded_length(integral_floats_to_int(case.body))
    case.call_and_validate(checks=[not_a_server_error])


def test_alive_afterwards(live):  # noqa: F811
    """Runs after the generated requests (file order): the server still serves health and a generation."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=live.base, headers=headers, timeout=REQUEST_TIMEOUT_S) as http:
        assert http.get("/health").status_code == 200
        r = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text[:500]
        assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
        deadline = time.monotonic() + 10  # the last request's pages are freed by the engine thread
        while True:
            used = [line for line in http.get("/metrics").text.splitlines() if line.startswith("jaxserve_kv_pages_used ")]
            if used == ["jaxserve_kv_pages_used 0.0"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert used == ["jaxserve_kv_pages_used 0.0"], used
