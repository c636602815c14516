"""Load generator for any OpenAI-compatible server: streams chat (or legacy completion) requests with
fixed-seed synthetic prompts and reports output tok/s, TTFT and inter-token latency percentiles.

    python benchmarks/bench_serving.py --base-url http://127.0.0.1:30000/v1 --num-prompts 64 \
        --input-len 128 --output-len 64 --concurrency 8

The last stdout line is one JSON object. Token counts come from the server's `usage` (stream_options
include_usage) when it sends one, else from the number of content chunks.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field

import httpx

from bench_common import WORDS, percentile  # noqa: E402  (benchmarks/ is on sys.path when a script here runs)



@dataclass
class Result:
    ok: bool
    ttft: float = math.nan
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    latency: float = 0.0
    error: str = ""


def make_prompts(n: int, input_len: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(input_len)) for _ in range(n)]




async def one_request(client: httpx.AsyncClient, args: argparse.Namespace, model: str, prompt: str) -> Result:
    body: dict = {"model": model, "max_tokens": args.output_len, "temperature": args.temperature, "stream": True,
                  "stream_options": {"include_usage": True}}
    if args.endpoint == "chat":
        path = "/chat/completions"
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        path = "/completions"
        body["prompt"] = prompt
    if args.ignore_eos:
        body["ignore_eos"] = True  # SGLang/vLLM/jaxserve extension: fixed output lengths
    start = time.perf_counter()
    last = None
    res = Result(ok=False)
    chunks = 0
    try:
        async with client.stream("POST", args.base_url.rstrip("/") + path, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                res.error = f"HTTP {resp.status_code}: {text[:200]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    res.error = str(event["error"])[:200]
                    return res
                if event.get("usage"):
                    res.output_tokens = event["usage"].get("completion_tokens", 0)
                    res.prompt_tokens = event["usage"].get("prompt_tokens", 0)
                for choice in event.get("choices", []):
                    delta = choice.get("delta", {}).get("content") if args.endpoint == "chat" else choice.get("text")
                    if delta:
                        now = time.perf_counter()
                        if last is None:
                            res.ttft = now - start
                        else:
                            res.itls.append(now - last)
                        last = now
                        chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        return res
    res.latency = time.perf_counter() - start
    res.output_tokens = res.output_tokens or chunks
    res.ok = last is not None
    if not res.ok:
        res.error = "no content received"
    return res


async def run(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(args.timeout), limits=limits) as client:
        model = args.model
        if model is None:
            try:
                r = await client.get(args.base_url.rstrip("/") + "/models")
                r.raise_for_status()
                model = r.json()["data"][0]["id"]
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
                raise SystemExit(f"cannot list models at {args.base_url}/models ({exc}); pass --model") from None
        prompts = make_prompts(args.num_prompts, args.input_len, args.seed)
        if args.warmup:
            await one_request(client, args, model, prompts[0])
        sem = asyncio.Semaphore(args.concurrency)
        rng = random.Random(args.seed + 1)

        async def guarded(p: str) -> Result:
            async with sem:
                return await one_request(client, args, model, p)

        start = time.perf_counter()
        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(guarded(p)))
            if math.isfinite(args.request_rate):
                await asyncio.sleep(rng.expovariate(args.request_rate))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    itls = [x for r in ok for x in r.itls]
    ttfts = [r.ttft for r in ok]
    out_tokens = sum(r.output_tokens for r in ok)
    errors = [r.error for r in results if not r.ok]
    return {
        "base_url": args.base_url,
        "model": model,
        "endpoint": args.endpoint,
        "num_prompts": args.num_prompts,
        "completed": len(ok),
        "failed": len(errors),
        "first_error": errors[0] if errors else None,
        "concurrency": args.concurrency,
        "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
        "input_len": args.input_len,
        "output_len": args.output_len,
        "mean_prompt_tokens": round(sum(r.prompt_tokens for r in ok) / len(ok), 1) if ok else None,
        "wall_s": round(wall, 3),
        "request_throughput": round(len(ok) / wall, 3),
        "output_tok_s": round(out_tokens / wall, 2),
        "total_output_tokens": out_tokens,
        "ttft_p50_ms": round(percentile(ttfts, 50) * 1e3, 2),
        "ttft_p99_ms": round(percentile(ttfts, 99) * 1e3, 2),
        "itl_p50_ms": round(percentile(itls, 50) * 1e3, 2),
        "itl_p99_ms": round(percentile(itls, 99) * 1e3, 2),
        "latency_p50_s": round(percentile([r.latency for r in ok], 50), 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:30000/v1")
    p.add_argument("--model", default=None, help="default: the first id of GET /models")
    p.add_argument("--api-key", default=None)
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128, help="prompt length in words (~tokens)")
    p.add_argument("--output-len", type=int, default=64, help="max_tokens per request")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at most")
    p.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (inf: all at once)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (SGLang/vLLM extension) for fixed lengths")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    if args.num_prompts < 1 or args.concurrency < 1 or args.input_len < 1 or args.output_len < 1:
        p.error("--num-prompts, --concurrency, --input-len and --output-len must be positive")
    summary = asyncio.run(run(args))
    print(json.dumps(summary))
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
