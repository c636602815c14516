"""Prefix cache on vs off (issue 15), engine only (no HTTP), both engines in one process.

Two `LLMEngine`s with the same EngineConfig except `enable_prefix_cache` run the same two workloads, fed at
their arrival times while the engine is stepped:

- shared: one system prompt of --system-tokens tokens + a distinct short user turn per request, --requests
  requests arriving as a Poisson process at --rate requests/s (--arrival fixed: evenly spaced; --rate 0:
  all at once).
- multi-turn: --conversations conversations of --turns turns. Turn k's prompt is turn k-1's prompt + the
  engine's own reply to it + a new user message; a turn arrives --think-time s after the previous turn of
  its conversation finished. Conversations start at --conv-rate per second (Poisson) and interleave.

Greedy, --max-tokens output tokens per request (EOS ends a reply early), fixed seed. TTFT = arrival -> the
step that returns the request's first token; e2e = arrival -> finished. The hit rate is the engine's
prefix-cache hit tokens / looked-up prompt tokens. Greedy outputs of the two engines are compared request
by request (the multi-turn prompts include each engine's own replies, so a mismatch also changes the later
turns of that conversation: both are reported). Two hit rates: cached tokens reported per request over prompt
tokens, and the engine's counters (hit tokens / looked-up tokens, where a retried admission looks up again).

    python benchmarks/bench_prefix_cache.py [--model PATH] [--requests 64] [--system-tokens 1000] \
        [--conversations 16] [--turns 6] [--max-tokens 8] [--rate 1.0] [--max-running-requests 16]
    python benchmarks/bench_prefix_cache.py --quick   # a tiny random model, small sizes: checks the script

Prints a human-readable summary, then one JSON line last.
"""
from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import random
import tempfile
import time
from dataclasses import dataclass, field

import jaxserve  # noqa: F401  (first: without a chip it pins JAX to the CPU; see jaxserve/platforms.py)
import jax  # noqa: E402

from jaxserve.config import EngineConfig  # noqa: E402
from jaxserve.engine.engine import LLMEngine  # noqa: E402
from jaxserve.sampling.params import SamplingParams  # noqa: E402

from bench_common import WORDS, percentile  # noqa: E402  (benchmarks/ is on sys.path when a script here runs)



def text_ids(engine: LLMEngine, rng: random.Random, num_tokens: int) -> list[int]:
    """`num_tokens` token ids of random English words (exactly that many)."""
    ids: list[int] = []
    while len(ids) < num_tokens:
        words = " ".join(rng.choice(WORDS) for _ in range(num_tokens))
        ids += engine.tokenizer.encode(" " + words, add_special_tokens=False)
    return ids[:num_tokens]




def arrival_times(n: int, rate: float, kind: str, rng: random.Random) -> list[float]:
    if rate <= 0:
        return [0.0] * n
    if kind == "fixed":
        return [i / rate for i in range(n)]
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


@dataclass
class Req:
    rid: str
    prompt: list[int]
    arrival: float  # seconds after the run's start
    conv: int = -1
    turn: int = 0
    first: float | None = None
    end: float | None = None
    output: list[int] = field(default_factory=list)
    cached: int = 0


@dataclass
class Conversation:
    opener: list[int]
    user_turns: list[list[int]]  # the user messages of turns 1.. (turn 0's is the opener)


def run_workload(engine: LLMEngine, initial: list[Req], params: SamplingParams,
                 next_turn=None) -> tuple[list[Req], float]:
    """Feed `initial` at their arrival times (and the turns `next_turn(finished_req, now)` returns) while
    stepping the engine until everything has finished. Returns every request and the wall time."""
    heap = [(r.arrival, i, r) for i, r in enumerate(initial)]
    heapq.heapify(heap)
    counter = len(initial)
    live: dict[str, Req] = {}
    done: list[Req] = []
    t0 = time.perf_counter()
    while heap or live:
        now = time.perf_counter() - t0
        while heap and heap[0][0] <= now:
            _, _, r = heapq.heappop(heap)
            engine.add_request(r.rid, r.prompt, params)
            live[r.rid] = r
        if not engine.has_work():
            if heap:
                time.sleep(max(0.0, heap[0][0] - (time.perf_counter() - t0)))
            continue
        outputs = engine.step()
        now = time.perf_counter() - t0
        for out in outputs:
            r = live.get(out.request_id)
            if r is None:
                continue
            if out.error:
                raise RuntimeError(f"request {r.rid} failed: {out.error}")
            new = out.outputs[0].token_ids if out.outputs else []
            if new and r.first is None:
                r.first = now
            r.output += new
            r.cached = out.num_cached_tokens
            if out.finished:
                r.end = now
                del live[r.rid]
                done.append(r)
                if next_turn is not None:
                    nxt = next_turn(r, now)
                    if nxt is not None:
                        heapq.heappush(heap, (nxt.arrival, counter, nxt))
                        counter += 1
    return done, time.perf_counter() - t0


def summarize(engine: LLMEngine, reqs: list[Req], wall: float, stats0, computed0: int) -> dict:
    st = engine.stats()
    ttft = [r.first - r.arrival for r in reqs if r.first is not None]
    e2e = [r.end - r.arrival for r in reqs]
    q = st.num_prefix_query_tokens_total - stats0.num_prefix_query_tokens_total
    h = st.num_prefix_hit_tokens_total - stats0.num_prefix_hit_tokens_total
    prompt = sum(len(r.prompt) for r in reqs)
    return {
        "requests": len(reqs), "seconds": round(wall, 2),
        "ttft_mean_s": round(sum(ttft) / len(ttft), 3), "ttft_p50_s": round(percentile(ttft, 50), 3),
        "ttft_p99_s": round(percentile(ttft, 99), 3),
        "e2e_mean_s": round(sum(e2e) / len(e2e), 3), "e2e_p99_s": round(percentile(e2e, 99), 3),
        "prompt_tokens": prompt, "output_tokens": sum(len(r.output) for r in reqs),
        "prefill_tokens_computed": engine.num_prefill_tokens_computed - computed0,
        "cached_tokens_reported": sum(r.cached for r in reqs),
        # per request (RequestOutput.num_cached_tokens / prompt tokens); the engine's counters below count a
        # lookup again when an admission is retried in a later step
        "request_hit_rate": round(sum(r.cached for r in reqs) / prompt, 4) if prompt else 0.0,
        "requests_without_hit": sum(1 for r in reqs if r.cached == 0),
        "prefix_query_tokens": q, "prefix_hit_tokens": h, "hit_rate": round(h / q, 4) if q else 0.0,
        "evicted_pages": st.num_prefix_evicted_pages_total, "kv_pages_used_after": st.kv_pages_used,
        "kv_pages_cached_after": st.kv_pages_cached,
    }


def shared_workload(engine: LLMEngine, args, tag: str) -> tuple[list[Req], float]:
    rng = random.Random(args.seed)
    system = text_ids(engine, rng, args.system_tokens)
    arrivals = arrival_times(args.requests, args.rate, args.arrival, rng)
    reqs = [Req(f"{tag}-shared-{i}", system + text_ids(engine, rng, args.user_tokens), a)
            for i, a in enumerate(arrivals)]
    return run_workload(engine, reqs, params_of(args))


def multiturn_workload(engine: LLMEngine, args, tag: str) -> tuple[list[Req], float]:
    rng = random.Random(args.seed + 1)
    convs = [Conversation(text_ids(engine, rng, args.first_turn_tokens),
                          [text_ids(engine, rng, args.user_tokens) for _ in range(args.turns - 1)])
             for _ in range(args.conversations)]
    starts = arrival_times(args.conversations, args.conv_rate, args.arrival, rng)
    first = [Req(f"{tag}-conv{c}-turn0", convs[c].opener, starts[c], conv=c, turn=0) for c in range(len(convs))]

    def next_turn(r: Req, now: float) -> Req | None:
        if r.turn + 1 >= args.turns:
            return None
        t = r.turn + 1
        prompt = r.prompt + r.output + convs[r.conv].user_turns[t - 1]
        return Req(f"{tag}-conv{r.conv}-turn{t}", prompt, now + args.think_time, conv=r.conv, turn=t)

    return run_workload(engine, first, params_of(args), next_turn)


def params_of(args) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=0.0, seed=args.seed)


def compare(on: list[Req], off: list[Req]) -> list[dict]:
    """Requests whose greedy output differs (matched by id without the engine tag)."""
    key = lambda r: r.rid.split("-", 1)[1]  # noqa: E731
    by_off = {key(r): r for r in off}
    bad = []
    for r in on:
        o = by_off.get(key(r))
        if o is None or o.output != r.output or o.prompt != r.prompt:
            bad.append({"id": key(r), "prompt_tokens_on": len(r.prompt),
                        "prompt_tokens_off": len(o.prompt) if o else None,
                        "same_prompt": bool(o) and o.prompt == r.prompt, "cached_tokens_on": r.cached,
                        "output_on": r.output, "output_off": o.output if o else None})
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF directory or .gguf; default: the embedded SmolLM2-135M")
    ap.add_argument("--quick", action="store_true", help="tiny random model and small sizes (checks the script)")
    ap.add_argument("--requests", type=int, default=64, help="shared-system-prompt requests")
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--user-tokens", type=int, default=32, help="tokens of each user message after the first")
    ap.add_argument("--rate", type=float, default=1.0, help="shared workload arrivals per s (0: all at once)")
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--first-turn-tokens", type=int, default=64, help="tokens of a conversation's first prompt")
    ap.add_argument("--conv-rate", type=float, default=1.0, help="conversation starts per s (0: all at once)")
    ap.add_argument("--think-time", type=float, default=0.0, help="s between a reply and the next turn")
    ap.add_argument("--arrival", choices=("poisson", "fixed"), default="poisson")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--max-running-requests", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=None, help="default: the platform's (2048 on CPU)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--num-pages", type=int, default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--workloads", nargs="*", default=["shared", "multiturn"], choices=("shared", "multiturn"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    model = args.model
    if args.quick:
        from jaxserve.models.testing import make_tiny_model

        model = model or str(make_tiny_model(tempfile.mkdtemp(prefix="tiny-prefix-bench-"), "llama", seed=0))
        for name, small in (("requests", 8), ("system_tokens", 200), ("conversations", 4), ("turns", 3),
                            ("max_model_len", 512), ("max_num_batched_tokens", 64), ("num_pages", 128),
                            ("max_running_requests", 8)):
            if getattr(args, name) == ap.get_default(name):
                setattr(args, name, small)
    longest = args.first_turn_tokens + (args.turns - 1) * (args.max_tokens + args.user_tokens)
    cfg = dict(model=model, max_running_requests=args.max_running_requests, max_model_len=args.max_model_len,
               max_num_batched_tokens=args.max_num_batched_tokens, num_pages=args.num_pages, dtype=args.dtype,
               seed=args.seed)

    load = uptime_load()
    engines: dict[str, LLMEngine] = {}
    startup = {}
    for label, on in (("on", True), ("off", False)):
        t0 = time.perf_counter()
        engines[label] = eng = LLMEngine(EngineConfig(enable_prefix_cache=on, **cfg))
        load_s = time.perf_counter() - t0
        warm_s = eng.warmup()
        startup[label] = {"load_s": round(load_s, 1), "warmup_s": round(warm_s, 1)}
        print(f"cache {label}: load {load_s:.1f}s, warm-up {warm_s:.1f}s ({eng.runner.num_compiled()} programs)",
              flush=True)
    need = max(args.system_tokens + args.user_tokens, longest) + args.max_tokens
    if need > engines["on"].max_model_len:
        raise SystemExit(f"prompts + outputs need {need} tokens > max_model_len {engines['on'].max_model_len}")

    results: dict[str, dict] = {}
    mismatches: dict[str, list] = {}
    for wl in args.workloads:
        fn = shared_workload if wl == "shared" else multiturn_workload
        runs = {}
        reqs = {}
        for label in ("off", "on"):
            eng = engines[label]
            stats0, computed0 = eng.stats(), eng.num_prefill_tokens_computed
            reqs[label], wall = fn(eng, args, label)
            runs[label] = summarize(eng, reqs[label], wall, stats0, computed0)
            r = runs[label]
            print(f"{wl:10s} cache {label:3s}: {r['requests']} requests in {r['seconds']:.1f}s; TTFT mean "
                  f"{r['ttft_mean_s']:.3f}s p50 {r['ttft_p50_s']:.3f}s p99 {r['ttft_p99_s']:.3f}s; e2e mean "
                  f"{r['e2e_mean_s']:.3f}s; prefill computed {r['prefill_tokens_computed']} of "
                  f"{r['prompt_tokens']} prompt tokens; hit rate {r['request_hit_rate']:.1%} of prompt tokens "
                  f"({r['requests_without_hit']} requests without a hit; engine counters {r['hit_rate']:.1%})", flush=True)
        bad = compare(reqs["on"], reqs["off"])
        mismatches[wl] = bad
        ratio = {k: round(runs["off"][k] / runs["on"][k], 2) if runs["on"][k] else None
                 for k in ("ttft_mean_s", "ttft_p50_s", "ttft_p99_s", "seconds")}
        results[wl] = {"off": runs["off"], "on": runs["on"], "off_over_on": ratio, "output_mismatches": len(bad)}
        print(f"{wl:10s} off/on: TTFT mean x{ratio['ttft_mean_s']}, p50 x{ratio['ttft_p50_s']}, "
              f"p99 x{ratio['ttft_p99_s']}, total time x{ratio['seconds']}; greedy outputs differing: "
              f"{len(bad)} of {len(reqs['on'])}", flush=True)
        for b in bad[:20]:
            print(f"  MISMATCH {b['id']}: prompt {b['prompt_tokens_on']} tokens (off {b['prompt_tokens_off']}), "
                  f"cached {b['cached_tokens_on']}; on {b['output_on']} off {b['output_off']}", flush=True)
    goal = results.get("shared", {}).get("off_over_on", {}).get("ttft_mean_s")
    if goal is not None:
        print(f"goal (>= 3x lower mean TTFT on the shared-system-prompt workload): x{goal} "
              f"{'MET' if goal >= 3 else 'NOT MET'}", flush=True)
    summary = {
        "bench": "prefix_cache", "model": engines["on"].model_name, "dtype": engines["on"].dtype,
        "device": jax.devices()[0].device_kind, "cpus": os.cpu_count(), "machine": platform.machine(),
        "config": {k: v for k, v in vars(args).items() if k != "quick"} | {
            "quick": args.quick, "max_model_len": engines["on"].max_model_len,
            "max_num_batched_tokens": engines["on"].config.max_num_batched_tokens,
            "num_pages": engines["on"].allocator.num_usable},
        "startup": startup, "load_before": load, "load_after": uptime_load(),
        "results": results, "mismatches": {k: v[:20] for k, v in mismatches.items()},
        "goal_shared_ttft_x3": goal is not None and goal >= 3,
    }
    print(json.dumps(summary))


def uptime_load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


if __name__ == "__main__":
    main()
