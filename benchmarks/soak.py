"""Soak test: the real server under a long, mixed, partly hostile load; one bad request must never hurt another.

Starts `python -m jaxserve.launch` as a subprocess on 127.0.0.1 (the embedded default model, `--model PATH`,
or `--model tiny` for a tiny random model written to a temporary directory), warms it up, then runs
`--concurrency` (64) asyncio clients for `--duration-s` (600) seconds, each looping over a weighted mix of:
non-streaming and streaming chat, n > 1, constrained requests (regex, json_schema, json_object), prompts near
the context limit, clients that disconnect mid-stream, malformed bodies (bad JSON, wrong types, huge
top_k, unknown model, ...), /v1/completions with a batch of prompts, and /generate.

    python benchmarks/soak.py --model tiny --duration-s 60
    python benchmarks/soak.py                       # default model, 10 minutes

Checks (any failure -> exit status 1):
  - every well-formed request gets 200 with a valid body (a stream: valid JSON events, a finish_reason for
    every choice, `data: [DONE]` last) or an explicit error envelope (4xx, or 503 with Retry-After);
    5xx, a transport error, a hang past --request-timeout-s or a malformed body/stream is a failure;
  - every malformed request gets a 4xx with the error envelope;
  - once the load stops and the server is idle: no KV page is in use (`jaxserve_kv_pages_used` 0), no
    request is running or waiting, the server's own counters show no 5xx, and a request still succeeds;
  - the server exits 0 on SIGTERM.
Reported: requests and p50/p99 latency per kind, statuses, server RSS after warm-up vs at the end (and the
peak while loaded). A human summary first, then one JSON line last.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from bench_common import WORDS, percentile  # noqa: E402  (benchmarks/ is on sys.path when a script here runs)


SMALL_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}
REGEX = r"(yes|no|maybe)( indeed)?"

# kind -> weight in the mix
KINDS: dict[str, int] = {
    "chat": 14,
    "chat_stream": 14,
    "chat_n": 6,
    "regex": 6,
    "json_schema": 5,
    "json_object": 5,
    "long_prompt": 4,
    "disconnect": 8,
    "malformed": 14,
    "completions_batch": 8,
    "generate": 8,
    "generate_stream": 4,
}




def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Failure(Exception):
    """A response that breaks the contract (the message says how)."""


# ------------------------------------------------------------------------------------------ the server

class Server:
    def __init__(self, args: argparse.Namespace, model: str | None, log_path: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "jaxserve.launch", "--host", "127.0.0.1", "--port", str(self.port),
               "--served-model-name", "soak", "--log-level", args.log_level]
        if model is not None:
            cmd += ["--model", model]
        if args.max_model_len is not None:
            cmd += ["--max-model-len", str(args.max_model_len)]
        cmd += args.server_arg
        self.cmd = cmd
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._ready = threading.Event()
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._log.write(line)
            self._log.flush()
            if re.search(r"serving .* at (http://\S+)/v1", line):
                self._ready.set()

    def wait_ready(self, timeout: float) -> float:
        start = time.monotonic()
        with httpx.Client(base_url=self.base, timeout=10) as http:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.proc.returncode}; log:\n{self.log_tail()}")
                if time.monotonic() - start > timeout:
                    raise RuntimeError(f"the server was not ready after {timeout:.0f} s; log:\n{self.log_tail()}")
                if self._ready.is_set():
                    try:
                        if http.get("/health").status_code == 200:
                            return time.monotonic() - start
                    except httpx.TransportError:
                        pass
                time.sleep(0.25)

    def rss(self) -> int:
        try:
            return psutil.Process(self.proc.pid).memory_info().rss
        except psutil.Error:
            return 0

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


# ---------------------------------------------------------------------------------------- the clients

@dataclass
class Outcome:
    kind: str
    status: int | str  # HTTP status, or "timeout" / "transport" when none came
    latency: float
    ok: bool  # 200 with a valid body (or a malformed request answered with a 4xx)
    failure: str = ""  # non-empty: the contract was broken


@dataclass
class Context:
    args: argparse.Namespace
    model: str
    max_model_len: int
    long_ids: list[int]
    outcomes: list[Outcome] = field(default_factory=list)


def prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def check_envelope(resp: httpx.Response, body: bytes) -> None:
    """A non-200 answer must be OpenAI's error envelope; 503 must say when to retry."""
    try:
        err = json.loads(body)["error"]
        assert isinstance(err["message"], str) and isinstance(err["type"], str)
    except Exception:
        raise Failure(f"HTTP {resp.status_code} without an error envelope: {body[:200]!r}") from None
    if resp.status_code == 503 and "retry-after" not in resp.headers:
        raise Failure("503 without Retry-After")


def check_chat_body(body: dict, n: int) -> list[str]:
    choices = body.get("choices")
    if body.get("object") != "chat.completion" or not isinstance(choices, list) or len(choices) != n:
        raise Failure(f"bad chat body: {json.dumps(body)[:300]}")
    if not isinstance(body.get("usage"), dict):
        raise Failure("chat body without usage")
    texts = []
    for c in choices:
        if c.get("finish_reason") not in ("stop", "length") or not isinstance(c["message"].get("content"), str):
            raise Failure(f"bad chat choice: {json.dumps(c)[:300]}")
        texts.append(c["message"]["content"])
    return texts


def check_constrained(kind: str, text: str, finish: str) -> None:
    if finish != "stop":
        return  # cut by max_tokens: a prefix, not checked
    if kind == "regex":
        if not re.fullmatch(REGEX, text):
            raise Failure(f"regex output {text!r} does not match {REGEX}")
    elif kind in ("json_schema", "json_object"):
        try:
            value = json.loads(text)
        except ValueError:
            raise Failure(f"{kind} output is not JSON: {text[:200]!r}") from None
        if not isinstance(value, dict):
            raise Failure(f"{kind} output is not an object: {text[:200]!r}")
        if kind == "json_schema":
            if not isinstance(value.get("ok"), bool) or set(value) - {"name", "ok"}:
                raise Failure(f"json_schema output breaks the schema: {text[:200]!r}")


async def read_sse(resp: httpx.Response, *, stop_after: int | None = None) -> list[dict] | None:
    """The JSON events of a stream, which must end with [DONE]; None when we closed it after `stop_after`."""
    events: list[dict] = []
    done = False
    async for line in resp.aiter_lines():
        if not line:
            continue
        if not line.startswith("data: "):
            raise Failure(f"not an SSE data line: {line[:200]!r}")
        data = line[len("data: "):]
        if done:
            raise Failure(f"data after [DONE]: {data[:200]!r}")
        if data == "[DONE]":
            done = True
            continue
        try:
            event = json.loads(data)
        except ValueError:
            raise Failure(f"an SSE event that is not JSON: {data[:200]!r}") from None
        if "error" in event:
            raise Failure(f"error event in the stream: {data[:300]}")
        events.append(event)
        if stop_after is not None and len(events) >= stop_after:
            return None  # the caller leaves the `async with`, which closes the connection
    if not done:
        raise Failure(f"stream ended without [DONE] after {len(events)} events")
    return events


def finishes_of_stream(events: list[dict], key: str = "choices") -> dict[int, str]:
    finish: dict[int, str] = {}
    for e in events:
        for c in e.get(key) or []:
            if c.get("finish_reason") is not None:
                finish[c["index"]] = c["finish_reason"]
    return finish


def malformed_request(rng: random.Random, model: str) -> tuple[str, bytes | dict]:
    msgs = [{"role": "user", "content": "hi"}]
    cases: list[tuple[str, bytes | dict]] = [
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}'),  # truncated JSON
        ("/v1/chat/completions", b"\xff\xfe not json"),
        ("/v1/chat/completions", {"model": model, "messages": "hi"}),
        ("/v1/chat/completions", {"model": model, "messages": msgs, "max_tokens": "ten"}),
        ("/v1/chat/completions", {"model": model, "messages": msgs, "max_tokens": 8, "top_k": 1099511627776}),
        ("/v1/chat/completions", {"model": "no-such-model", "messages": msgs, "max_tokens": 8}),
        ("/v1/chat/completions", {"model": model, "messages": [], "max_tokens": 8}),
        ("/v1/chat/completions", {"model": model, "messages": msgs, "n": 0}),
        ("/v1/chat/completions", {"model": model, "messages": msgs, "max_tokens": -5}),
        ("/v1/chat/completions", {"model": model, "messages": msgs, "temperature": -1}),
        ("/v1/chat/completions", {"model": model, "messages": msgs, "regex": "(unclosed"}),
        ("/v1/chat/completions", {"model": model, "messages": [{"role": "wizard", "content": "hi"}]}),
        ("/v1/chat/completions", [1, 2, 3]),
        ("/v1/completions", {"model": model, "prompt": [[1, 2], "mixed"]}),
        ("/v1/completions", {"model": model, "prompt": [10**12], "max_tokens": 4}),
        ("/v1/completions", {"model": model, "prompt": "hi", "logprobs": 10**9}),
        ("/generate", {"text": "hi", "input_ids": [1, 2]}),
        ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": "many"}}),
        ("/generate", {"text": "hi", "sampling_params": {"top_k": 1099511627776, "max_new_tokens": 4}}),
    ]
    return rng.choice(cases)


async def one_request(client: httpx.AsyncClient, ctx: Context, kind: str, rng: random.Random) -> Outcome:
    args = ctx.args
    model = ctx.model
    max_tokens = rng.randint(args.min_tokens, args.max_tokens)
    user = [{"role": "user", "content": prompt(rng, rng.randint(3, 40))}]
    chat: dict = {"model": model, "messages": user, "max_tokens": max_tokens, "temperature": rng.choice([0, 0.7, 1.0]),
                  "seed": rng.randint(0, 2**31)}
    path = "/v1/chat/completions"
    stream = False
    n = 1
    body: bytes | dict
    if kind == "chat":
        body = chat
    elif kind in ("chat_stream", "disconnect"):
        body = {**chat, "stream": True, "stream_options": {"include_usage": True}}
        stream = True
        if kind == "disconnect":
            body["max_tokens"] = args.max_tokens  # long enough to still be running when we leave
    elif kind == "chat_n":
        n = rng.randint(2, 4)
        body = {**chat, "n": n, "temperature": 0.8}
    elif kind == "regex":
        body = {**chat, "regex": REGEX}
    elif kind == "json_schema":
        body = {**chat, "max_tokens": args.max_tokens,
                "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": SMALL_SCHEMA}}}
    elif kind == "json_object":
        body = {**chat, "max_tokens": args.max_tokens, "response_format": {"type": "json_object"}}
    elif kind == "long_prompt":
        # As many prompt tokens as fit with max_tokens, less a random margin of 0-8 tokens.
        length = ctx.max_model_len - max_tokens - rng.randint(0, 8)
        ids = (ctx.long_ids * (length // max(1, len(ctx.long_ids)) + 1))[:length]
        path = "/v1/completions"
        stream = rng.random() < 0.5
        body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    elif kind == "completions_batch":
        path = "/v1/completions"
        prompts = [prompt(rng, rng.randint(2, 20)) for _ in range(rng.randint(2, 4))]
        n = len(prompts)
        body = {"model": model, "prompt": prompts, "max_tokens": max_tokens, "temperature": 0}
    elif kind in ("generate", "generate_stream"):
        path = "/generate"
        stream = kind == "generate_stream"
        body = {"text": prompt(rng, rng.randint(3, 30)), "stream": stream,
                "sampling_params": {"max_new_tokens": max_tokens, "temperature": rng.choice([0, 0.8])}}
    elif kind == "malformed":
        path, body = malformed_request(rng, model)
    else:
        raise ValueError(kind)

    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    if args.api_key:
        headers["authorization"] = f"Bearer {args.api_key}"
    start = time.perf_counter()
    status: int | str = "transport"
    try:
        async with asyncio.timeout(args.request_timeout_s):
            async with client.stream("POST", path, content=content, headers=headers) as resp:
                status = resp.status_code
                if kind == "malformed":
                    raw = await resp.aread()
                    if not 400 <= resp.status_code < 500:
                        raise Failure(f"malformed body to {path} answered {resp.status_code}: {raw[:200]!r}")
                    check_envelope(resp, raw)
                    return Outcome(kind, status, time.perf_counter() - start, ok=True)
                if resp.status_code != 200:
                    raw = await resp.aread()
                    check_envelope(resp, raw)
                    if resp.status_code >= 500 and resp.status_code != 503:
                        raise Failure(f"HTTP {resp.status_code}: {raw[:300]!r}")
                    return Outcome(kind, status, time.perf_counter() - start, ok=False)
                if stream:
                    if "text/event-stream" not in resp.headers.get("content-type", ""):
                        raise Failure(f"a stream with content-type {resp.headers.get('content-type')}")
                    events = await read_sse(resp, stop_after=2 if kind == "disconnect" else None)
                    if events is None:  # we disconnected on purpose
                        return Outcome(kind, status, time.perf_counter() - start, ok=True)
                    if kind == "generate_stream":
                        finish = {e["index"]: e["meta_info"]["finish_reason"] for e in events
                                  if e.get("meta_info", {}).get("finish_reason")}
                    else:
                        finish = finishes_of_stream(events)
                    if sorted(finish) != list(range(n)):
                        raise Failure(f"stream finished choices {sorted(finish)}, expected {n}")
                else:
                    raw = await resp.aread()
                    try:
                        data = json.loads(raw)
                    except ValueError:
                        raise Failure(f"200 with a body that is not JSON: {raw[:200]!r}") from None
                    if path == "/v1/chat/completions":
                        texts = check_chat_body(data, n)
                        if kind in ("regex", "json_schema", "json_object"):
                            check_constrained(kind, texts[0], data["choices"][0]["finish_reason"])
                    elif path == "/v1/completions":
                        choices = data.get("choices")
                        if not isinstance(choices, list) or len(choices) != n or any(
                                c.get("finish_reason") not in ("stop", "length") or not isinstance(c.get("text"), str)
                                for c in choices):
                            raise Failure(f"bad completions body: {raw[:300]!r}")
                    else:  # /generate, one prompt
                        if not isinstance(data.get("text"), str) or not data.get("meta_info", {}).get("finish_reason"):
                            raise Failure(f"bad /generate body: {raw[:300]!r}")
        return Outcome(kind, status, time.perf_counter() - start, ok=True)
    except Failure as exc:
        return Outcome(kind, status, time.perf_counter() - start, ok=False, failure=str(exc))
    except TimeoutError:
        return Outcome(kind, "timeout", time.perf_counter() - start, ok=False,
                       failure=f"no complete answer within {args.request_timeout_s} s")
    except httpx.HTTPError as exc:
        return Outcome(kind, "transport", time.perf_counter() - start, ok=False,
                       failure=f"{type(exc).__name__}: {exc}")


async def worker(i: int, client: httpx.AsyncClient, ctx: Context, deadline: float, budget: list[int]) -> None:
    rng = random.Random(ctx.args.seed * 1000 + i)
    kinds, weights = zip(*KINDS.items())
    while time.monotonic() < deadline and budget[0] > 0:
        budget[0] -= 1
        kind = rng.choices(kinds, weights)[0]
        ctx.outcomes.append(await one_request(client, ctx, kind, rng))


def read_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


async def idle_state(client: httpx.AsyncClient, timeout: float) -> dict[str, float]:
    """The engine gauges once nothing runs or waits (or whatever they are after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        m = read_metrics((await client.get("/metrics")).text)
        idle = (m.get("jaxserve_num_requests_running") == 0 and m.get("jaxserve_num_requests_waiting") == 0
                and m.get("jaxserve_kv_pages_used") == 0)
        if idle or time.monotonic() > deadline:
            return m
        await asyncio.sleep(0.5)


async def drive(server: Server, args: argparse.Namespace) -> dict:
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency + 8)
    async with httpx.AsyncClient(base_url=server.base, timeout=httpx.Timeout(args.request_timeout_s),
                                 limits=limits, headers=headers) as client:
        card = (await client.get("/v1/models")).raise_for_status().json()["data"][0]
        max_model_len = int(card["max_model_len"])
        toks = (await client.post("/v1/tokenize", json={"prompt": prompt(random.Random(0), 400)})).raise_for_status()
        long_ids = toks.json()["tokens"]
        ctx = Context(args, card["id"], max_model_len, long_ids)

        # Warm-up: every kind once, one at a time (first constraint compilations, first shapes).
        t0 = time.monotonic()
        warm_rng = random.Random(-1)
        warm = [await one_request(client, ctx, kind, warm_rng) for kind in KINDS]
        warmup_s = time.monotonic() - t0
        warm_failures = [f"{o.kind}: {o.failure}" for o in warm if o.failure]
        idle0 = await idle_state(client, 30)
        rss_start = server.rss()

        rss_samples: list[tuple[float, int]] = [(0.0, rss_start)]
        load_start = time.monotonic()
        deadline = load_start + args.duration_s
        budget = [args.max_requests]

        async def sample_rss() -> None:
            while True:
                await asyncio.sleep(5)
                rss_samples.append((time.monotonic() - load_start, server.rss()))

        sampler = asyncio.create_task(sample_rss())
        workers = [asyncio.create_task(worker(i, client, ctx, deadline, budget)) for i in range(args.concurrency)]
        last_report = load_start
        while not all(w.done() for w in workers):
            await asyncio.sleep(1)
            if time.monotonic() - last_report >= args.progress_s:
                last_report = time.monotonic()
                bad = sum(1 for o in ctx.outcomes if o.failure)
                print(f"  t={last_report - load_start:6.0f}s  requests={len(ctx.outcomes)}  failures={bad}  "
                      f"rss={server.rss() / 2**20:.0f} MiB", file=sys.stderr, flush=True)
        for w in workers:
            await w  # propagate a bug in the client itself
        load_s = time.monotonic() - load_start
        sampler.cancel()

        idle = await idle_state(client, args.idle_timeout_s)
        rss_end = server.rss()
        final = await one_request(client, ctx, "chat", random.Random(1))
        server_5xx = sum(v for k, v in idle.items() if k.startswith("jaxserve_requests_total{")
                         and re.search(r'status="5\d\d"', k) and 'status="503"' not in k)
    return {
        "ctx": ctx, "warm_failures": warm_failures, "warmup_s": warmup_s, "idle0": idle0, "idle": idle,
        "rss_start": rss_start, "rss_end": rss_end, "rss_peak": max(r for _, r in rss_samples + [(0, rss_end)]),
        "load_s": load_s, "final": final, "server_5xx": server_5xx, "rss_samples": rss_samples,
    }


# ------------------------------------------------------------------------------------------------ main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path for the server; 'tiny': a tiny random model; default: "
                                                   "the embedded default model")
    ap.add_argument("--duration-s", type=float, default=600.0, help="how long the load runs (default 600)")
    ap.add_argument("--concurrency", type=int, default=64, help="concurrent clients (default 64)")
    ap.add_argument("--max-requests", type=int, default=10**7, help="stop after this many requests in all")
    ap.add_argument("--min-tokens", type=int, default=8, help="least max_tokens of a request (default 8)")
    ap.add_argument("--max-tokens", type=int, default=32, help="largest max_tokens of a request (default 32)")
    ap.add_argument("--request-timeout-s", type=float, default=300.0,
                    help="a request not fully answered by then counts as a hang (default 300)")
    ap.add_argument("--idle-timeout-s", type=float, default=60.0,
                    help="how long the server may take to drain after the load (default 60)")
    ap.add_argument("--start-timeout-s", type=float, default=1800.0, help="server start-up limit (default 1800)")
    ap.add_argument("--max-model-len", type=int, default=None, help="passed to the server")
    ap.add_argument("--server-arg", action="append", default=[], help="extra server flag (repeatable), "
                                                                        "e.g. --server-arg=--max-running-requests=8")
    ap.add_argument("--api-key", default=None, help="start the server with this API key and send it")
    ap.add_argument("--log-level", default="warning", help="server log level (default warning)")
    ap.add_argument("--log", default=None, help="server log file (default: a temporary file, kept on failure)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress-s", type=float, default=30.0, help="progress line to stderr every N seconds")
    args = ap.parse_args()
    if args.api_key:
        args.server_arg = [*args.server_arg, "--api-key", args.api_key]

    tmp = tempfile.TemporaryDirectory(prefix="jaxserve-soak-")
    model = args.model
    if model == "tiny":
        from jaxserve.models.testing import make_tiny_model

        model = str(make_tiny_model(Path(tmp.name) / "tiny", "llama", seed=0))
    log_path = Path(args.log) if args.log else Path(tempfile.mkstemp(prefix="jaxserve-soak-", suffix=".log")[1])

    server = Server(args, model, log_path)
    try:
        start_s = server.wait_ready(args.start_timeout_s)
        print(f"server ready in {start_s:.0f} s (pid {server.proc.pid}, {server.base}); log: {log_path}", file=sys.stderr)
        res = asyncio.run(drive(server, args))
    except BaseException:
        code = server.stop()
        print(f"server exit code {code}; log tail:\n{server.log_tail()}", file=sys.stderr)
        raise
    exit_code = server.stop()
    tmp.cleanup()

    ctx: Context = res["ctx"]
    outcomes = ctx.outcomes
    by_kind: dict[str, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        by_kind[o.kind].append(o)
    statuses = Counter(str(o.status) for o in outcomes)
    failures = [o for o in outcomes if o.failure]
    failure_kinds = Counter(f"{o.kind}: {re.sub(r'[0-9]+', 'N', o.failure)[:120]}" for o in failures)
    idle = res["idle"]
    final: Outcome = res["final"]

    checks = {
        "no_failed_requests": not failures,
        "warmup_ok": not res["warm_failures"],
        "kv_pages_returned_to_0": idle.get("jaxserve_kv_pages_used") == 0,
        "engine_idle": idle.get("jaxserve_num_requests_running") == 0 and idle.get("jaxserve_num_requests_waiting") == 0,
        "server_counted_no_5xx": res["server_5xx"] == 0,
        "alive_after_load": final.ok and not final.failure,
        "clean_exit": exit_code == 0,
    }
    kinds_report = {}
    for kind in KINDS:
        os_ = by_kind.get(kind, [])
        lat = [o.latency for o in os_ if o.ok]
        kinds_report[kind] = {
            "requests": len(os_), "ok": sum(o.ok for o in os_), "failed": sum(bool(o.failure) for o in os_),
            "statuses": dict(Counter(str(o.status) for o in os_)),
            "p50_s": round(percentile(lat, 50), 3), "p99_s": round(percentile(lat, 99), 3),
        }
    mib = 2**20
    print(f"\nsoak: {len(outcomes)} requests from {args.concurrency} clients over {res['load_s']:.0f} s "
          f"({len(outcomes) / max(res['load_s'], 1e-9):.1f} req/s); model {args.model or 'default'}, "
          f"max_model_len {ctx.max_model_len}, max_tokens {args.min_tokens}-{args.max_tokens}")
    print(f"{'kind':<18}{'requests':>9}{'ok':>7}{'failed':>7}{'p50 s':>9}{'p99 s':>9}  statuses")
    for kind, r in kinds_report.items():
        print(f"{kind:<18}{r['requests']:>9}{r['ok']:>7}{r['failed']:>7}{r['p50_s']:>9.3f}{r['p99_s']:>9.3f}  {r['statuses']}")
    print(f"statuses: {dict(statuses)}")
    print(f"server RSS: {res['rss_start'] / mib:.0f} MiB after warm-up, {res['rss_end'] / mib:.0f} MiB at the end "
          f"(peak {res['rss_peak'] / mib:.0f} MiB)")
    print(f"after the load: kv_pages_used={idle.get('jaxserve_kv_pages_used')}, running="
          f"{idle.get('jaxserve_num_requests_running')}, waiting={idle.get('jaxserve_num_requests_waiting')}, "
          f"server-counted 5xx={res['server_5xx']}; final request: {final.status} {final.failure}")
    for msg in res["warm_failures"]:
        print(f"WARM-UP FAILURE {msg}")
    for msg, count in failure_kinds.most_common(20):
        print(f"FAILURE x{count}: {msg}")
    for name, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'} {name}")
    if not all(checks.values()):
        print(f"server log: {log_path}")
    elif not args.log:
        log_path.unlink(missing_ok=True)
    summary = {
        "benchmark": "soak",
        "model": args.model or "default",
        "duration_s": round(res["load_s"], 1),
        "concurrency": args.concurrency,
        "max_model_len": ctx.max_model_len,
        "requests": len(outcomes),
        "requests_per_s": round(len(outcomes) / max(res["load_s"], 1e-9), 2),
        "failures": len(failures),
        "failure_kinds": dict(failure_kinds.most_common(20)),
        "statuses": dict(statuses),
        "kinds": kinds_report,
        "rss_start_mib": round(res["rss_start"] / mib, 1),
        "rss_end_mib": round(res["rss_end"] / mib, 1),
        "rss_peak_mib": round(res["rss_peak"] / mib, 1),
        "kv_pages_used_after": idle.get("jaxserve_kv_pages_used"),
        "server_5xx": res["server_5xx"],
        "server_exit_code": exit_code,
        "warmup_s": round(res["warmup_s"], 1),
        "checks": checks,
        "passed": all(checks.values()),
    }
    print(json.dumps(summary))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
