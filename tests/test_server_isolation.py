"""The server side of isolation, in process (the ASGI app over a real tiny engine): an engine failure of one
request is a 500 (or a final error event) for that client alone, a dead engine turns /health 503 and
answers everyone, a full queue is a 503 with Retry-After, the request deadline is a 504, and a batch of
prompts enters the engine at once. The process-level drain on SIGTERM is tested at the end with a real
server."""
from __future__ import annotations

import json
import signal
import time

import httpx
import pytest

from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.engine.engine import LLMEngine
from jaxserve.server.streaming import parse_sse

from inprocess import call, make_app, started

USER = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def engine(tiny_engine_config) -> AsyncEngine:
    with started(LLMEngine(tiny_engine_config())) as aeng:
        yield aeng


@pytest.fixture(autouse=True)
def no_faults(engine):
    yield
    engine.engine.fault_hook = None


def chat(**fields) -> tuple[str, str, dict]:
    return ("POST", "/v1/chat/completions", {"messages": USER, "max_tokens": 8, "temperature": 0, **fields})


def fail_request(engine: AsyncEngine, marker_seed: int, stage: str = "postprocess", after: int = 2) -> None:
    """Inject a fault for the engine request whose sampling seed is `marker_seed`."""
    calls = {"n": 0}
    inner = engine.engine

    def hook(at: str, request_id: str) -> None:
        seqs = inner._requests.get(request_id) or []
        if at == stage and seqs and seqs[0].params.seed == marker_seed:
            calls["n"] += 1
            if calls["n"] > after:
                raise RuntimeError("injected fault")

    inner.fault_hook = hook


def test_an_engine_failure_is_a_500_for_that_client_only(engine):
    app = make_app(engine)
    expected = call(app, chat(seed=1), chat(seed=2, stream=True))
    fail_request(engine, marker_seed=666)
    bad, good, good_stream = call(app, chat(seed=666), chat(seed=1), chat(seed=2, stream=True))
    assert bad.status_code == 500, bad.text
    err = bad.json()["error"]
    assert err["code"] == "request_failed" and "injected fault" in err["message"] and err["type"] == "server_error"
    assert good.status_code == 200
    assert good.json()["choices"][0]["message"] == expected[0].json()["choices"][0]["message"]
    texts = ["".join(c["choices"][0]["delta"].get("content") or "" for c in map(json.loads, parse_sse(r.text)[:-1])
                     if c["choices"]) for r in (expected[1], good_stream)]
    assert texts[0] == texts[1]
    (metrics,) = call(app, ("GET", "/metrics", None))
    failed = [line for line in metrics.text.splitlines() if line.startswith("jaxserve_failed_requests_total ")]
    assert failed and float(failed[0].split()[1]) >= 1


def test_a_stream_failing_midway_ends_with_an_error_event(engine):
    app = make_app(engine)
    fail_request(engine, marker_seed=667, after=3)
    (resp,) = call(app, chat(seed=667, stream=True, max_tokens=20))
    assert resp.status_code == 200
    payloads = parse_sse(resp.text)
    assert payloads[-1] == "[DONE]"
    last = json.loads(payloads[-2])
    assert last["error"]["code"] == "request_failed" and "injected fault" in last["error"]["message"]
    assert any(json.loads(p).get("choices") for p in payloads[:-2])  # it had streamed tokens before


def test_a_queue_full_of_admitted_requests_is_a_503_with_retry_after(engine):
    app = make_app(engine)
    engine._not_started |= {f"fake-{i}" for i in range(engine.engine.config.max_queued_requests)}
    try:
        (resp,) = call(app, chat())
    finally:
        engine._not_started = {r for r in engine._not_started if not r.startswith("fake-")}
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    assert "already queued" in resp.json()["error"]["message"]
    (resp,) = call(app, chat())
    assert resp.status_code == 200


def test_the_request_deadline_is_a_504_and_frees_the_request(engine):
    app = make_app(engine, request_timeout_s=0.2)
    t0 = time.monotonic()
    plain, streamed = call(app, chat(max_tokens=400, ignore_eos=True),
                           chat(max_tokens=400, ignore_eos=True, stream=True))
    assert time.monotonic() - t0 < 60
    assert plain.status_code == 504 and plain.json()["error"]["code"] == "request_timeout"
    if streamed.status_code == 200:  # the first token came in time: the deadline ends the stream
        payloads = parse_sse(streamed.text)
        assert payloads[-1] == "[DONE]" and json.loads(payloads[-2])["error"]["code"] == "request_timeout"
    else:
        assert streamed.status_code == 504
    for _ in range(200):
        if not engine.engine.has_work():
            break
        time.sleep(0.05)
    assert engine.engine.allocator.num_used == 0


def test_batched_prompts_enter_the_engine_together(engine):
    """K prompts of one /v1/completions (or /generate) request are submitted at once, not one after
    another's first token: every one is added before the engine has produced any token for them."""
    app = make_app(engine)
    inner = engine.engine
    added_at: dict[str, int] = {}

    def hook(at: str, request_id: str) -> None:
        if at == "add":
            added_at[request_id] = inner.num_generated_tokens_total

    inner.fault_hook = hook
    start = inner.num_generated_tokens_total
    prompts = ["one", "two", "three", "four"]
    (resp,) = call(app, ("POST", "/v1/completions", {"prompt": prompts, "max_tokens": 6, "temperature": 0}))
    assert resp.status_code == 200 and len(resp.json()["choices"]) == 4
    assert len(added_at) == 4
    assert max(added_at.values()) - start < 4, added_at  # at most a token of one prompt before the last add
    added_at.clear()
    (resp,) = call(app, ("POST", "/generate", {"text": prompts, "sampling_params": {"max_new_tokens": 6}}))
    assert resp.status_code == 200 and len(resp.json()) == 4 and len(added_at) == 4


def test_a_dead_engine_turns_health_503_and_answers_everyone(tiny_engine_config):
    inner = LLMEngine(tiny_engine_config())
    inner.warmup = lambda progress=None, background=False: 0.0  # never steps for real
    with started(inner, watchdog_interval_s=0.05) as aeng:
        app = make_app(aeng)
        (health,) = call(app, ("GET", "/health", None))
        assert health.status_code == 200

        class Crash(BaseException):
            pass

        def step():
            raise Crash("simulated engine crash")

        inner.step = step
        waiting, streamed = call(app, chat(), chat(stream=True))
        for resp in (waiting, streamed):  # a stream's headers wait for its first output: a plain 503
            assert resp.status_code == 503 and "Crash" in resp.json()["error"]["message"], resp.text
        health, refused = call(app, ("GET", "/health", None), chat())
        assert health.status_code == 503 and "Crash" in health.json()["reason"]
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"


# ------------------------------------------------------------------------------- the real process: drain
def test_sigterm_past_the_grace_period_answers_streams_and_exits_0(tiny_model_dir, tmp_path):
    from test_server_e2e import MODEL, ServerProcess, launch_args

    proc = ServerProcess(launch_args(tiny_model_dir("llama"), "--graceful-shutdown-timeout-s", "0"),
                         tmp_path / "server.log")
    try:
        deadline = time.monotonic() + 900
        while not proc.ready:
            assert proc.proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.25)
        body = {"model": MODEL, "messages": USER, "max_tokens": 200, "ignore_eos": True, "stream": True}
        received = []
        with httpx.Client(base_url=proc.base, timeout=120) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                assert resp.status_code == 200, resp.read()
                lines = resp.iter_lines()
                for line in lines:
                    if line.startswith("data: "):
                        received.append(line)
                        break
                t0 = time.monotonic()
                proc.proc.send_signal(signal.SIGTERM)
                for line in lines:
                    if line.startswith("data: "):
                        received.append(line)
        assert received[-1] == "data: [DONE]"
        last = json.loads(received[-2][6:])
        assert "error" in last and "shutting down" in last["error"]["message"], received[-3:]
        assert proc.proc.wait(60) == 0
        assert time.monotonic() - t0 < 30
    finally:
        proc.stop()
