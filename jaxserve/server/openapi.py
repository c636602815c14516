"""The OpenAPI document served at `/openapi.json`.

The routes read raw bodies (`read_body` enforces the size limit before parsing, and the services parse
strictly with `model_validate_json`), so FastAPI's generated document knows nothing about their request
bodies. `install_openapi` replaces `app.openapi` with one that starts from FastAPI's document (paths,
methods, path parameters) and adds what the handlers actually accept and answer: each POST route's body
schema from the pydantic models in `protocol.py`, the JSON and SSE success responses, and OpenAI's error
envelope for the 4xx/5xx answers. Clients (and schemathesis in the tests) can read it.
"""
from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from jaxserve.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    GenerateRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)

_REF = "#/components/schemas/{model}"

# POST route -> (request model, JSON success model or None for a free-form object, streams SSE?)
_BODIES: dict[str, tuple[type[BaseModel], type[BaseModel] | None, bool]] = {
    "/v1/chat/completions": (ChatCompletionRequest, ChatCompletionResponse, True),
    "/v1/completions": (CompletionRequest, CompletionResponse, True),
    "/generate": (GenerateRequest, None, True),
    "/v1/tokenize": (TokenizeRequest, None, False),
    "/v1/detokenize": (DetokenizeRequest, None, False),
}

_USER = [{"role": "user", "content": "What is the capital of France?"}]

# Request examples (the `examples` of each body; schemathesis sends them in its explicit-examples phase).
_EXAMPLES: dict[str, dict[str, dict[str, Any]]] = {
    "/v1/chat/completions": {
        "basic": {"messages": _USER, "max_tokens": 8},
        "streaming": {"messages": _USER, "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}},
        "regex": {"messages": _USER, "max_tokens": 8, "regex": "(yes|no)", "n": 2, "temperature": 0.7, "seed": 1},
        "json_schema": {
            "messages": _USER, "max_tokens": 32,
            "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
                "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}}},
        },
        "json_object": {"messages": _USER, "max_tokens": 16, "response_format": {"type": "json_object"}},
    },
    "/v1/completions": {
        "batch": {"prompt": ["Once upon a time", "The capital of France is"], "max_tokens": 8, "temperature": 0},
        "streaming": {"prompt": "Hello", "max_tokens": 8, "stream": True, "logprobs": 2},
    },
    "/generate": {
        "text": {"text": "Hello", "sampling_params": {"max_new_tokens": 8, "temperature": 0}},
        "input_ids": {"input_ids": [[1, 2, 3]], "sampling_params": {"max_new_tokens": 4}, "return_logprob": True},
    },
    "/v1/tokenize": {"prompt": {"prompt": "Hello world"}, "messages": {"messages": _USER}},
    "/v1/detokenize": {"tokens": {"tokens": [1, 2, 3]}},
}

_GET_RESPONSES: dict[str, type[BaseModel]] = {"/v1/models": ModelList, "/v1/models/{model_id}": ModelCard}

_ERROR_SCHEMA: dict[str, Any] = {
    "title": "ErrorResponse",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_ERRORS_POST = {
    "400": "Invalid request (malformed JSON, wrong types, values out of range, unsatisfiable constraint)",
    "401": "Missing or wrong API key (when the server has one)",
    "404": "Unknown model",
    "413": "Request body larger than the server's limit",
    "503": "Starting up or overloaded; retry after the Retry-After header's seconds",
}
_ERRORS_GET = {"401": _ERRORS_POST["401"], "404": _ERRORS_POST["404"], "503": _ERRORS_POST["503"]}


def _add_schema(components: dict[str, Any], model: type[BaseModel], mode: str) -> dict[str, Any]:
    """Put `model` (and every model it refers to) into `components`; returns a $ref to it."""
    schema = model.model_json_schema(ref_template=_REF, mode=mode)  # type: ignore[arg-type]
    for name, sub in schema.pop("$defs", {}).items():
        components.setdefault(name, sub)
    components.setdefault(model.__name__, schema)
    return {"$ref": _REF.format(model=model.__name__)}


def _error_responses(errors: dict[str, str]) -> dict[str, Any]:
    ref = {"$ref": _REF.format(model="ErrorResponse")}
    out: dict[str, Any] = {}
    for status, description in errors.items():
        resp: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": ref}}}
        if status == "503":
            resp["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
        out[status] = resp
    return out


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """The full document for `app` (no caching; `install_openapi` caches it on the app)."""
    doc = get_openapi(
        title=app.title,
        version=app.version,
        description="OpenAI-compatible LLM inference server (plus SGLang's native /generate).",
        routes=app.routes,
    )
    components: dict[str, Any] = doc.setdefault("components", {}).setdefault("schemas", {})
    components["ErrorResponse"] = copy.deepcopy(_ERROR_SCHEMA)
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            if not isinstance(op, dict):
                continue
            # FastAPI's 422 never reaches a client: install_error_handlers turns it into a 400 envelope.
            op.get("responses", {}).pop("422", None)
            if method == "post" and path in _BODIES:
                request_model, response_model, streams = _BODIES[path]
                op["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {
                        "schema": _add_schema(components, request_model, "validation"),
                        "examples": {name: {"value": value} for name, value in _EXAMPLES.get(path, {}).items()},
                    }},
                }
                ok: dict[str, Any] = {
                    "application/json": {
                        "schema": _add_schema(components, response_model, "serialization")
                        if response_model is not None
                        else {"type": ["object", "array"]}
                    }
                }
                if streams:
                    ok["text/event-stream"] = {"schema": {"type": "string"}}
                op["responses"] = {
                    "200": {
                        "description": "The result; with `stream: true`, server-sent events ending in `data: [DONE]`",
                        "content": ok,
                    },
                    **_error_responses(_ERRORS_POST),
                }
            elif method == "get" and path in _GET_RESPONSES:
                schema = _add_schema(components, _GET_RESPONSES[path], "serialization")
                op["responses"] = {
                    "200": {"description": "OK", "content": {"application/json": {"schema": schema}}},
                    **_error_responses(_ERRORS_GET),
                }
            elif method == "get" and path == "/health":
                op["responses"] = {
                    "200": {"description": "The engine is warm and serving", "content": {"application/json": {
                        "schema": {"type": "object", "properties": {"status": {"type": "string"}}}}}},
                    **_error_responses({"503": "Starting up or the engine failed"}),
                }
            elif method == "get" and path == "/metrics":
                op["responses"] = {"200": {"description": "Prometheus text format",
                                           "content": {"text/plain": {"schema": {"type": "string"}}}}}
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return doc


def install_openapi(app: FastAPI) -> None:
    """Serve `build_openapi(app)` from `app.openapi_url` (built once, on the first request for it)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
