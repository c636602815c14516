"""End-to-end: the real server process (`python -m jaxserve.launch`, uvicorn on a free port) with the real
engine on the tiny random model, driven with the official `openai` client and raw httpx.

The server starts once for the module (compiling its shape buckets is the slow part); every test here
shares it. The tiny model's text is meaningless, so content checks use greedy determinism, constraints
(regex / JSON schema) and counts rather than words.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from jaxserve.server.streaming import parse_sse

API_KEY = "test-key"
MODEL = "tiny-test"
MAX_MODEL_LEN = 256
START_TIMEOUT_S = 900  # precompiling on a busy 2-core machine; seconds with a warm compilation cache
USER = [{"role": "user", "content": "What is the capital of France?"}]


class ServerProcess:
    def __init__(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jaxserve.launch", *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.stdout_lines: list[str] = []
        self._ready = threading.Event()
        self.base = ""
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout_lines.append(line)
            m = re.search(r"serving .* at (http://\S+)/v1", line)
            if m:
                self.base = m.group(1)
                self._ready.set()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def launch_args(model_dir: Path, *extra: str) -> list[str]:
    # Small limits keep the set of compiled shapes (and start-up time) small.
    return [
        "--model", str(model_dir), "--port", "0", "--served-model-name", MODEL,
        "--max-model-len", str(MAX_MODEL_LEN), "--max-running-requests", "4", "--max-num-batched-tokens", "64",
        "--log-level", "warning", *extra,
    ]


class LiveServer:
    def __init__(self, proc: ServerProcess, base: str, warmup_statuses: list[int], warmup_error: dict | None) -> None:
        self.proc = proc
        self.warmup_error = warmup_error
        self.base = base
        self.warmup_statuses = warmup_statuses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory) -> LiveServer:
    """The one server of this module. A known port lets us poll /health while it warms up."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    port = free_port()
    args = launch_args(tiny_model_dir("llama"), "--api-key", API_KEY)
    args[args.index("--port") + 1] = str(port)
    proc = ServerProcess(args, log)
    base = f"http://127.0.0.1:{port}"
    statuses: list[int] = []
    warmup_error: dict | None = None
    deadline = time.monotonic() + START_TIMEOUT_S
    with httpx.Client(base_url=base, timeout=30) as http:
        while not proc.ready:
            if proc.proc.poll() is not None or time.monotonic() > deadline:
                proc.stop()
                raise RuntimeError(f"server did not start; log:\n{log.read_text()[-4000:]}")
            try:
                r = http.get("/health")
            except httpx.TransportError:
                pass
            else:
                statuses.append(r.status_code)
                if r.status_code == 503 and warmup_error is None:
                    warmup_error = r.json()["error"]
            time.sleep(0.25)
    yield LiveServer(proc, base, statuses, warmup_error)
    code = proc.stop()
    assert code == 0, f"server exited with {code}; log:\n{log.read_text()[-4000:]}"


@pytest.fixture(scope="module")
def server(live) -> str:
    return live.base


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


def assert_envelope(resp: httpx.Response, status: int | None = None) -> dict:
    if status is not None:
        assert resp.status_code == status, resp.text[:500]
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def sse_payloads(resp: httpx.Response) -> list[dict]:
    assert resp.status_code == 200, resp.text[:500]
    assert resp.headers["content-type"].startswith("text/event-stream")
    payloads = parse_sse(resp.text)
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    return [json.loads(p) for p in payloads[:-1]]


# ------------------------------------------------------------------------------------------ models, health

def test_models_health_and_unknown_model(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.body["code"] == "model_not_found"
    assert http.get("/health").json() == {"status": "ok"}
    err = assert_envelope(http.post("/v1/chat/completions", json={"model": "gpt-4", "messages": USER}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert_envelope(http.get("/v1/nothing-here"), 404)


# --------------------------------------------------------------------------------------------------- chat

def test_chat_greedy_reply_and_usage(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=8)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=8)
    assert again.choices[0].message.content == choice.message.content



def test_without_max_tokens_a_reply_may_fill_the_context(http):
    """As vLLM and OpenAI: no max_tokens (chat, or completions' default of 16 aside) means up to the context's
    room. (tests/test_schemathesis.py gives its valid bodies a small max_tokens; this is the absent case.)"""
    body = {"model": MODEL, "messages": USER, "temperature": 0, "ignore_eos": True}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text[:300]
    usage, choice = r.json()["usage"], r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert usage["prompt_tokens"] + usage["completion_tokens"] == MAX_MODEL_LEN

def test_streamed_text_equals_non_streamed(client, http):
    body = {"model": MODEL, "messages": USER, "temperature": 0, "max_tokens": 12, "ignore_eos": True}
    whole = http.post("/v1/chat/completions", json=body).json()
    events = sse_payloads(http.post("/v1/chat/completions", json={**body, "stream": True,
                                                                 "stream_options": {"include_usage": True}}))
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    finishes = [c for e in events for c in e["choices"] if c["finish_reason"] is not None]
    assert len(finishes) == 1 and finishes[0]["finish_reason"] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 12
    assert all(e["usage"] is None for e in events[:-1])
    text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    # The SDK sees the same thing.
    sdk = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=12,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in sdk if c.choices) == text


def test_n_choices_stream_interleaved_by_index(http):
    body = {"model": MODEL, "messages": USER, "temperature": 1.0, "seed": 7, "max_tokens": 5, "n": 2,
            "ignore_eos": True, "stream": True}
    events = sse_payloads(http.post("/v1/chat/completions", json=body))
    per_index: dict[int, list[dict]] = {0: [], 1: []}
    for e in events:
        assert len(e["choices"]) == 1
        per_index[e["choices"][0]["index"]].append(e["choices"][0])
    for chunks in per_index.values():
        assert chunks[0]["delta"]["role"] == "assistant"
        assert [c["finish_reason"] for c in chunks].count("length") == 1 and chunks[-1]["finish_reason"] == "length"
    whole = http.post("/v1/chat/completions", json={**body, "stream": False}).json()
    assert [c["index"] for c in whole["choices"]] == [0, 1] and whole["usage"]["completion_tokens"] == 10


def test_chat_logprobs_openai_format(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=4, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 4
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert abs(entry.top_logprobs[0].logprob - entry.logprob) < 1e-4  # greedy picks the top token
    assert "".join(e.token for e in content) == r.choices[0].message.content
    # Tokens that split a UTF-8 character: `token` shows U+FFFD, `bytes` are exact and concatenate back.
    r = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=40, logprobs=True,
                                       extra_body={"regex": "h\u00e9llo \U0001F600 world"})
    text = r.choices[0].message.content
    assert text == "h\u00e9llo \U0001F600 world" and r.choices[0].finish_reason == "stop"
    entries = r.choices[0].logprobs.content
    if entries[-1].token.startswith("<|"):  # the end token is reported too (its text is not in the content)
        entries = entries[:-1]
    assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8") == text
    assert any("\ufffd" in e.token for e in entries)  # the emoji's bytes span tokens


def test_stop_string_cuts_the_reply(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=40, stop=["wor"],
                                       extra_body={"regex": "hello world and more"})
    assert r.choices[0].message.content == "hello "
    assert r.choices[0].finish_reason == "stop"


def test_regex_json_schema_and_json_object(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=16,
                                       extra_body={"regex": "(Paris|London) is [a-z]{2,6}"})
    assert re.fullmatch("(Paris|London) is [a-z]{2,6}", r.choices[0].message.content)
    schema = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                               "capital": {"type": "boolean"}},
              "required": ["city", "capital"], "additionalProperties": False}
    r = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=40,
                                       response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    # multipleOf 3 without bounds: no device table lists its multiples, so the host matcher (llguidance) runs it.
    host_schema = {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 3}, "ok": {"type": "boolean"}},
                   "required": ["n", "ok"], "additionalProperties": False}
    r = client.chat.completions.create(model=MODEL, messages=USER, temperature=1.0, seed=3, max_tokens=60,
                                       response_format={"type": "json_schema", "json_schema": {"name": "h", "schema": host_schema}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), host_schema)
    r = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=40,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: still a prefix of an object
        assert r.choices[0].message.content.lstrip().startswith("{")


# -------------------------------------------------------------------------------------------------- tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                       "required": ["city"], "additionalProperties": False},
    },
}
TIME = {"type": "function", "function": {"name": "get_time",
                                         "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}}


def test_tool_choice_required_and_named(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER, TIME], tool_choice="required",
                                       parallel_tool_calls=False, temperature=0, max_tokens=60)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in ("get_weather", "get_time")
    if call.function.name == "get_weather":
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER, TIME],
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       temperature=0, max_tokens=60)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and r.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


HERMES_REGEX = r'Checking\. <tool_call>\{"name": "get_weather", "arguments": \{"city": "Paris"\}\}</tool_call>'


def test_tool_choice_auto_parses_hermes_calls_whole_and_streamed(client):
    # The random model cannot choose to call a tool, so a regex makes it write a Hermes-format call.
    kwargs = dict(model=MODEL, messages=USER, tools=[WEATHER], temperature=0, max_tokens=120,
                  extra_body={"regex": HERMES_REGEX})
    r = client.chat.completions.create(**kwargs)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert msg.content == "Checking."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [("get_weather", {"city": "Paris"})]
    content, calls, finishes = "", {}, []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or ():
                entry = calls.setdefault(tc.index, {"name": "", "arguments": "", "id": tc.id})
                entry["name"] += (tc.function.name or "") if tc.function else ""
                entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
            if ch.finish_reason:
                finishes.append(ch.finish_reason)
    assert content.strip() == "Checking." and finishes == ["tool_calls"]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("get_weather", {"city": "Paris"})]
    # Llama 3 style: the whole reply is a JSON call with "parameters".
    llama = client.chat.completions.create(
        model=MODEL, messages=USER, tools=[WEATHER], temperature=0, max_tokens=120,
        extra_body={"regex": r'\{"name": "get_weather", "parameters": \{"city": "Rome"\}\}'})
    assert llama.choices[0].finish_reason == "tool_calls" and llama.choices[0].message.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in llama.choices[0].message.tool_calls] == [
        ("get_weather", {"city": "Rome"})]
    # Sending the call and its result back renders through the chat template.
    follow = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=4, tools=[WEATHER],
        messages=USER + [msg.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": '{"temp": 18}'}],
    )
    assert follow.choices[0].message.content is not None


# --------------------------------------------------------------------------------------------- completions

def test_completions_prompts_echo_logprobs_and_stream(client, http):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0,
                                  logprobs=2, extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert r.object == "text_completion" and len(c.logprobs.tokens) == 5 == r.usage.completion_tokens
    assert "".join(c.logprobs.tokens) == c.text and c.logprobs.text_offset[0] == 0
    assert all(len(t) == 2 for t in c.logprobs.top_logprobs)
    multi = client.completions.create(model=MODEL, prompt=["a b c", "d e f"], max_tokens=3, n=2, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert sorted(ch.index for ch in multi.choices) == [0, 1, 2, 3] and multi.usage.completion_tokens == 12
    ids = client.completions.create(model=MODEL, prompt=[1, 2, 3, 4], max_tokens=3, temperature=0, echo=True)
    tokenized = http.post("/v1/detokenize", json={"tokens": [1, 2, 3, 4]}).json()["prompt"]
    assert ids.choices[0].text.startswith(tokenized)
    stream = http.post("/v1/completions", json={"model": MODEL, "prompt": "The capital of France is", "max_tokens": 5,
                                                "temperature": 0, "stream": True, "ignore_eos": True})
    events = sse_payloads(stream)
    assert "".join(ch["text"] for e in events for ch in e["choices"]) == c.text
    assert [ch["finish_reason"] for e in events for ch in e["choices"] if ch["finish_reason"]] == ["length"]
    err = assert_envelope(http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "suffix": "y"}), 400)
    assert err["param"] == "suffix"


def test_native_generate_tokenize_detokenize(http):
    body = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}}
    r = http.post("/generate", json=body).json()
    assert len(r["output_ids"]) == 4 and r["meta_info"]["finish_reason"]["type"] == "length"
    events = sse_payloads(http.post("/generate", json={**body, "stream": True}))
    assert events[-1]["text"] == r["text"] and events[-1]["output_ids"] == r["output_ids"]
    by_ids = http.post("/generate", json={"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}}).json()
    assert by_ids["meta_info"]["prompt_tokens"] == 3
    batch = http.post("/generate", json={"text": ["The capital of France is", "a b c"],
                                         "sampling_params": {**body["sampling_params"], "n": 2}}).json()
    assert [b["index"] for b in batch] == [0, 1, 2, 3] and batch[0]["text"] == batch[1]["text"] == r["text"]
    assert all(len(b["output_ids"]) == 4 for b in batch)
    streamed = sse_payloads(http.post("/generate", json={"input_ids": [[1, 2], [3, 4, 5]], "stream": True,
                                                         "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}}))
    last = {e["index"]: e for e in streamed}
    assert sorted(last) == [0, 1] and [last[i]["meta_info"]["prompt_tokens"] for i in (0, 1)] == [2, 3]
    assert all(e["meta_info"]["finish_reason"]["type"] == "length" for e in last.values())
    toks = http.post("/v1/tokenize", json={"prompt": "hello world", "add_special_tokens": False}).json()
    assert toks["count"] == len(toks["tokens"]) > 0 and toks["max_model_len"] == MAX_MODEL_LEN
    assert http.post("/v1/detokenize", json={"tokens": toks["tokens"]}).json()["prompt"] == "hello world"
    chat_toks = http.post("/v1/tokenize", json={"messages": USER}).json()
    assert chat_toks["count"] > toks["count"]


# ------------------------------------------------------------------------------------------------- errors

def test_error_codes_and_envelopes(server, http):
    assert_envelope(http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    err = assert_envelope(http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "temperature": "hot"}), 400)
    assert err["param"] == "temperature"
    err = assert_envelope(http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "max_tokens": 10_000}), 400)
    assert str(MAX_MODEL_LEN) in err["message"] and "10000" in err["message"] and err["code"] == "context_length_exceeded"
    err = assert_envelope(http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "regex": "(unclosed"}), 400)
    with httpx.Client(base_url=server) as anon:
        err = assert_envelope(anon.post("/v1/chat/completions", json={"model": MODEL, "messages": USER}), 401)
        assert err["code"] == "invalid_api_key"
        assert_envelope(anon.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert anon.get("/health").status_code == 200  # health and metrics need no key
    big = b'{"model": "' + b"x" * (17 * 1024 * 1024) + b'"}'
    err = assert_envelope(http.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"}), 413)
    assert err["code"] == "request_too_large"


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=USER, top_p=5)
    assert info.value.status_code == 400 and info.value.body["param"] == "top_p"


# ----------------------------------------------------------------------------------- disconnect + metrics

def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def test_client_disconnect_aborts_and_metrics_report(http):
    body = {"model": MODEL, "messages": USER, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        lines = resp.iter_lines()
        seen = 0
        for line in lines:
            if line.startswith("data: "):
                seen += 1
            if seen >= 3:
                break  # leave mid-stream: closing the connection must abort the request
    deadline = time.monotonic() + 30
    while True:
        text = http.get("/metrics").text
        if _metric(text, "jaxserve_num_requests_running") == 0 and _metric(text, "jaxserve_kv_pages_used") == 0:
            break
        assert time.monotonic() < deadline, "the disconnected request was not aborted"
        time.sleep(0.2)
    assert _metric(text, "jaxserve_kv_pages_total") > 0
    assert _metric(text, "jaxserve_time_to_first_token_seconds_count") > 0
    assert _metric(text, "jaxserve_inter_token_latency_seconds_count") > 0
    assert _metric(text, "jaxserve_generation_tokens_total") > 0
    assert _metric(text, "jaxserve_prompt_tokens_total") > 0
    assert 'jaxserve_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    # Every constraint of the suite fits the device grammar tables: none fell back to host-side advance.
    assert _metric(text, "jaxserve_constrained_host_advance_requests_total") == 0


def test_non_streaming_client_that_gives_up_aborts_its_request(server, http):
    body = {"model": MODEL, "messages": USER, "max_tokens": 200, "ignore_eos": True}
    # 200 tokens take about half a second on an idle 2-core machine: give up well before.
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=0.15) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/chat/completions", json=body)
    deadline = time.monotonic() + 5  # 200 tokens take far longer on CPU than the abort does
    while _metric(http.get("/metrics").text, "jaxserve_num_requests_running") != 0:
        assert time.monotonic() < deadline, "the abandoned request kept running"
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------------- fuzz

_INVALID_FIELDS: dict[str, list] = {
    "model": [123, ["x"], {"a": 1}, "no-such-model", True],
    "messages": [[], "hi", None, [{"role": "wizard", "content": "x"}], [{"content": "x"}], [{"role": "user", "content": 5}],
                 [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], [{"role": "user"}],
                 [{"role": "tool", "content": "x"}], [[[[["deep"]]]]], [{"role": "assistant", "content": "x"}] * 0],
    "temperature": ["hot", -1, 101, [1], {"x": 1}, -1e300],
    "top_p": [0, 1.5, -0.1, "x"],
    "max_tokens": [0, -5, 10**40, 1.5, "10", -(10**40)],
    "max_completion_tokens": [0, -1, 10**30],
    "n": [0, -1, 10**6, "2", 2.5],
    "stop": [123, [1, 2], ["x"] * 17, ["x" * 5000], {"a": "b"}],
    "seed": [10**30, "s", 1.5, -(10**30)],
    "stream": ["yes", 1, [True]],
    "logprobs": ["true", 3, {"a": 1}],
    "presence_penalty": [5, -5, "x", 1e308],
    "frequency_penalty": [3, -3.5],
    "logit_bias": [{"abc": 1}, {"1": 1000}, {"99999999": 1}, [1], {"1": "x"}],
    "response_format": [{"type": "xml"}, {"type": "json_schema"}, "json", {"type": "json_schema", "json_schema": {"name": "x"}}],
    "tools": [[{"type": "function", "function": {"name": "bad name!"}}], "x", [{"function": {}}], [{"type": "retrieval"}]],
    "tool_choice": ["sometimes", {"type": "function", "function": {"name": "missing"}}, 5],
    "top_k": ["x", 1.5],
    "min_p": [2, -1],
    "repetition_penalty": [0, 3, -1],
    "min_tokens": [-1, "1"],
    "stop_token_ids": [[-1], [10**9], "1"],
    "stream_options": [{"include_usage": "yes"}, 5],
    "chat_template_kwargs": [{"add_generation_prompt": True}, "x"],
}


def _deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


def _fuzz_bodies(seed: int = 0, count: int = 200) -> list[bytes]:
    rng = random.Random(seed)
    fixed = [
        b"", b"{", b"[]", b"null", b"42", b'"string"', b"\xff\xfe\xfd", b'{"messages": "\xc3\x28"}',
        b'{"model": "' + MODEL.encode() + b'", "messages": ' + _deep(5000) + b"}",
        _deep(100_000),
        json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * (10 * 1024 * 1024)}]}).encode(),
        json.dumps({"model": "m" * (10 * 1024 * 1024), "messages": USER}).encode(),
        json.dumps({"model": MODEL, "messages": USER, "stop": "s" * (10 * 1024 * 1024)}).encode(),
        b'{"model": "tiny-test", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e400}',
        b'{"model": "tiny-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": NaN}',
        b'{"model": "tiny-test", "messages": [{"role": "user", "content": "hi"}],}',
        json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}] * 50_000}).encode(),
    ]
    bodies = list(fixed)
    fields = sorted(_INVALID_FIELDS)
    while len(bodies) < count:
        body: dict = {"model": MODEL, "messages": USER, "max_tokens": 4}
        for name in rng.sample(fields, rng.choice([1, 1, 2, 3])):
            body[name] = rng.choice(_INVALID_FIELDS[name])
        if body.get("tool_choice") is not None and "tools" not in body and rng.random() < 0.5:
            body["tools"] = [WEATHER]
        bodies.append(json.dumps(body).encode())
    return bodies


def test_fuzz_hostile_bodies_get_4xx_envelopes_and_server_survives(client, http):
    bodies = _fuzz_bodies()
    assert len(bodies) == 200
    for i, raw in enumerate(bodies):
        resp = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert 400 <= resp.status_code < 500, f"body {i} ({raw[:120]!r}) -> {resp.status_code} {resp.text[:300]}"
        assert_envelope(resp)
    r = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason in ("length", "stop")


# ------------------------------------------------------------------------------ life cycle (runs last)

def test_warm_up_answered_503_then_ready_line_named_the_address(live, http):
    assert 503 in live.warmup_statuses, "never saw the server in its warming-up state"
    assert live.warmup_error["type"] == "server_error" and "starting" in live.warmup_error["message"]
    assert live.proc.base == live.base  # the ready line, printed only once warm, names the real address
    assert http.get("/health").status_code == 200


def test_sigterm_finishes_in_flight_request_and_exits_0(live, http):
    """Must stay the module's last test: it stops the shared server."""
    body = {"model": MODEL, "messages": USER, "max_tokens": 150, "ignore_eos": True, "stream": True}
    received = []
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                received.append(line)
                break
        live.proc.proc.send_signal(signal.SIGTERM)
        for line in lines:
            if line.startswith("data: "):
                received.append(line)
    assert received[-1] == "data: [DONE]"
    finishes = [c["finish_reason"] for line in received[:-1] for c in json.loads(line[6:])["choices"] if c["finish_reason"]]
    assert finishes in (["length"], ["abort"])
    assert live.proc.proc.wait(60) == 0
