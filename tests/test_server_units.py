"""Unit tests of the server's pure parts: request -> SamplingParams, error envelopes, SSE framing, tool-call
parsing (whole and streamed), the launch config. The end-to-end tests with the real engine are in
test_server_e2e.py."""
from __future__ import annotations

import json

import pytest

from jaxserve.sampling.params import Constraint
from jaxserve.server.errors import APIError
from jaxserve.server.protocol import ChatCompletionRequest, CompletionRequest
from jaxserve.server.request_params import (
    chat_sampling_params,
    check_context,
    completion_sampling_params,
    parse_body,
    response_constraint,
    tool_call_constraint,
)
from jaxserve.server.serving_chat import ToolMode, final_tool_calls, template_messages, tool_mode_and_constraint
from jaxserve.server.streaming import parse_sse, sse_event
from jaxserve.server.tool_parser import StreamingToolParser, parse_tool_calls

VOCAB = 1000
MSGS = [{"role": "user", "content": "hi"}]


def chat(**fields) -> ChatCompletionRequest:
    return parse_body(ChatCompletionRequest, json.dumps({"model": "m", "messages": MSGS, **fields}).encode())


def api_error(fn, *args, **kw) -> APIError:
    with pytest.raises(APIError) as info:
        fn(*args, **kw)
    return info.value


# ------------------------------------------------------------------------------------ request conversion

def test_chat_fields_map_to_sampling_params():
    req = chat(
        temperature=0.5, top_p=0.9, max_completion_tokens=7, max_tokens=99, n=2, stop="END", seed=3,
        presence_penalty=0.5, frequency_penalty=-0.5, logit_bias={"12": 5}, logprobs=True, top_logprobs=3,
        top_k=40, min_p=0.1, repetition_penalty=1.1, min_tokens=2, stop_token_ids=[5], ignore_eos=True,
        skip_special_tokens=False, no_stop_trim=True,
    )
    p = chat_sampling_params(req, None, VOCAB)
    assert (p.temperature, p.top_p, p.max_tokens, p.n, p.stop, p.seed) == (0.5, 0.9, 7, 2, ("END",), 3)
    assert (p.presence_penalty, p.frequency_penalty, p.logit_bias) == (0.5, -0.5, ((12, 5.0),))
    assert (p.logprobs, p.top_k, p.min_p, p.repetition_penalty, p.min_tokens) == (3, 40, 0.1, 1.1, 2)
    assert (p.stop_token_ids, p.ignore_eos, p.skip_special_tokens, p.no_stop_trim) == ((5,), True, False, True)


def test_chat_defaults_are_openai_defaults():
    p = chat_sampling_params(chat(), None, VOCAB)
    assert (p.temperature, p.top_p, p.max_tokens, p.n, p.logprobs, p.top_k) == (1.0, 1.0, None, 1, None, -1)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"999999": 1}}, "logit_bias"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"stop": ["x" * 5000]}, "stop"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_bad_sampling_values_are_400_naming_the_field(fields, param):
    err = api_error(chat_sampling_params, chat(**fields), None, VOCAB)
    assert err.status_code == 400 and param in (err.param or "") + err.message


@pytest.mark.parametrize(
    "body, param",
    [
        (b"{", None),
        (b"", None),
        (b"[1, 2]", None),
        (b"\xff\xfe\x00", None),
        (json.dumps({"messages": MSGS, "temperature": "hot"}).encode(), "temperature"),
        (json.dumps({"messages": MSGS, "stream": "yes"}).encode(), "stream"),
        (json.dumps({"messages": []}).encode(), "messages"),
        (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), "messages.0.role"),
        (json.dumps({"messages": MSGS, "seed": 2**70}).encode(), "seed"),
    ],
)
def test_malformed_bodies_are_400_with_envelope(body, param):
    err = api_error(parse_body, ChatCompletionRequest, body)
    assert err.status_code == 400
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}
    assert err.param == param


def test_response_format_regex_and_json_schema_map_to_constraints():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    req = chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert response_constraint(req.response_format, None, None) == Constraint("json_schema", json.dumps(schema))
    req = chat(response_format={"type": "json_object"})
    assert response_constraint(req.response_format, None, None) == Constraint("json_object")
    assert response_constraint(chat(response_format={"type": "text"}).response_format, None, None) is None
    assert response_constraint(None, "[a-z]+", None) == Constraint("regex", "[a-z]+")
    err = api_error(response_constraint, req.response_format, "[a-z]+", None)
    assert "only one output constraint" in err.message
    assert api_error(response_constraint, None, None, "{not json").param == "json_schema"


def test_tool_choice_required_and_named_build_call_schemas():
    req = chat(
        tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}},
            {"type": "function", "function": {"name": "g"}},
        ],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    mode, constraint = tool_mode_and_constraint(req)
    schema = json.loads(constraint.spec)
    assert mode.required and schema["type"] == "array" and schema["maxItems"] == 1
    assert [c["properties"]["name"]["enum"] for c in schema["items"]["anyOf"]] == [["f"], ["g"]]
    content, calls = final_tool_calls(mode, '[{"name": "f", "parameters": {"x": 1}}]')
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"x": 1})]

    named, spec = tool_call_constraint(req.tools, chat(tools=[t.model_dump() for t in req.tools],
                                                         tool_choice={"type": "function", "function": {"name": "f"}}).tool_choice, True)
    assert spec == "f" and json.loads(named.spec)["properties"] == {"x": {"type": "integer"}}
    content, calls = final_tool_calls(ToolMode(forced_name="f"), '{"x": 2}')
    assert content is None and calls[0].name == "f" and calls[0].arguments == '{"x": 2}'


def test_tool_choice_errors():
    assert "only allowed when tools" in api_error(tool_mode_and_constraint, chat(tool_choice="required")).message
    tools = [{"type": "function", "function": {"name": "f"}}]
    err = api_error(tool_mode_and_constraint, chat(tools=tools, tool_choice={"type": "function", "function": {"name": "zz"}}))
    assert err.param == "tool_choice"


def test_completion_request_rules():
    def comp(**fields):
        return parse_body(CompletionRequest, json.dumps({"model": "m", "prompt": "hi", **fields}).encode())

    assert completion_sampling_params(comp(), VOCAB).max_tokens == 16
    assert completion_sampling_params(comp(logprobs=2), VOCAB).logprobs == 2
    assert api_error(completion_sampling_params, comp(suffix="x"), VOCAB).param == "suffix"
    scored = completion_sampling_params(comp(echo=True, logprobs=1, max_tokens=0), VOCAB)
    assert (scored.prompt_logprobs, scored.logprobs, scored.max_tokens) == (1, 1, 0)
    assert completion_sampling_params(comp(echo=True), VOCAB).prompt_logprobs is None
    assert api_error(completion_sampling_params, comp(max_tokens=0), VOCAB).param == "max_tokens"
    assert api_error(completion_sampling_params, comp(best_of=3), VOCAB).param == "best_of"


def test_context_check_reports_the_numbers():
    err = api_error(check_context, 100, 50, 128)
    assert "128" in err.message and "150" in err.message and err.code == "context_length_exceeded"
    assert api_error(check_context, 128, None, 128).status_code == 400
    check_context(100, 28, 128)


def test_template_messages_join_parts_and_map_developer_and_tool_calls():
    req = chat(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ])
    out = template_messages(req.messages)
    assert out[0] == {"role": "system", "content": "be brief"}
    assert out[1]["content"] == "ab"
    assert out[2]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert out[3]["tool_call_id"] == "c1"
    image = chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert "not supported" in api_error(template_messages, image.messages).message
    assert api_error(template_messages, chat(messages=[{"role": "user"}]).messages).status_code == 400


# ------------------------------------------------------------------------------------------- SSE framing

def test_sse_event_framing_round_trips():
    body = (sse_event({"a": "line\nbreak", "b": "é"}) + b"data: [DONE]\n\n").decode()
    payloads = parse_sse(body)
    assert json.loads(payloads[0]) == {"a": "line\nbreak", "b": "é"} and payloads[1] == "[DONE]"
    with pytest.raises(ValueError):
        parse_sse("data: x\n")
    with pytest.raises(ValueError):
        parse_sse("event: x\n\n")


# --------------------------------------------------------------------------------------------- tool calls

HERMES = 'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' \
         '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'


def test_hermes_calls_parse_with_leading_content():
    result = parse_tool_calls(HERMES, {"get_weather", "get_time"})
    assert result.content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in result.tool_calls] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert len({c.id for c in result.tool_calls}) == 2


def test_llama3_json_calls_parse():
    text = '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}'
    result = parse_tool_calls(text)
    assert result.content is None and [c.name for c in result.tool_calls] == ["a", "b"]
    assert parse_tool_calls('{"name": "a", "parameters": {"x": 1}}').tool_calls[0].arguments == '{"x": 1}'


@pytest.mark.parametrize(
    "text",
    ['{"answer": 42}', "plain text", '<tool_call>{"name": "x", "arguments": {}}</tool_call>', "<tool_call>{broken</tool_call>"],
)
def test_text_that_is_not_a_known_call_stays_content(text):
    result = parse_tool_calls(text, {"get_weather"})
    assert result.tool_calls == [] and result.content == text


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_streaming_parser_matches_whole_parse(step):
    parser = StreamingToolParser({"get_weather", "get_time"})
    content, calls = "", []
    for i in range(0, len(HERMES), step):
        ev = parser.feed(HERMES[i:i + step])
        content += ev.content
        calls += ev.tool_calls
        assert "<tool" not in content  # tags never leak into content
    ev = parser.finish()
    content += ev.content
    calls += ev.tool_calls
    assert content.strip() == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "get_time"]


def test_streaming_parser_holds_llama3_until_the_end_and_releases_plain_text():
    parser = StreamingToolParser({"a"})
    assert parser.feed('{"name": "a", ').content == ""
    assert parser.feed('"parameters": {"x": 1}}').content == ""
    ev = parser.finish()
    assert ev.content == "" and ev.tool_calls[0].name == "a"
    plain = StreamingToolParser({"a"})
    assert plain.feed("Hello <").content == "Hello "  # "<" may start a tag: held
    assert plain.feed("b>").content == "<b>"
    assert plain.finish().content == ""
    not_a_call = StreamingToolParser({"a"})
    not_a_call.feed('{"answer": 1}')
    assert not_a_call.finish().content == '{"answer": 1}'


# ------------------------------------------------------------------------------------------ error shapes

def test_api_error_envelope_shape():
    body = APIError(404, "nope", code="model_not_found", param="model").body()
    assert body == {"error": {"message": "nope", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}


# ------------------------------------------------------------------------------------ admission / models

class _AdmissionOnlyEngine:
    """Just enough of AsyncEngine for ServerState's admission, health and naming rules."""

    model_name = "served"
    dead_reason = None
    draining = False

    def __init__(self, queued: int, limit: int = 3) -> None:
        self.queued = queued
        self.limit = limit

    def check_admission(self) -> None:
        from jaxserve.engine.errors import EngineBusy, EngineDead

        if self.dead_reason is not None:
            raise EngineDead(self.dead_reason)
        if self.queued >= self.limit:
            raise EngineBusy(f"the server is overloaded: {self.limit} requests are already queued; retry later")


def test_admission_503_when_queue_full_dead_and_while_starting():
    from jaxserve.config import EngineConfig, ServerConfig
    from jaxserve.server.state import ServerState

    state = ServerState(ServerConfig(engine=EngineConfig(max_queued_requests=3)))
    err = api_error(state.admit)
    assert err.status_code == 503 and "starting" in err.message and err.headers == {"Retry-After": "1"}
    assert state.health() == "starting"
    state.engine = _AdmissionOnlyEngine(queued=2)
    state.admit()
    assert state.health() is None
    state.engine.queued = 3
    err = api_error(state.admit)
    assert err.status_code == 503 and "3 requests are already queued" in err.message
    assert err.headers == {"Retry-After": "1"}
    state.engine.dead_reason = "the engine thread died"
    err = api_error(state.admit)
    assert err.status_code == 503 and err.code == "engine_unavailable" and "thread died" in err.message
    assert "thread died" in state.health()
    state.engine = _AdmissionOnlyEngine(queued=0)
    assert state.resolve_model(None) == "served" and state.resolve_model("served") == "served"
    assert api_error(state.resolve_model, "other").status_code == 404
    state.startup_error = "boom"
    state.engine = None
    assert "failed to start: boom" in api_error(state.require_engine).message
