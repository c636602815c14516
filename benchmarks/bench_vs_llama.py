"""jaxserve against llama.cpp's `llama-server` on the same machine, one after the other, same prompts.

Starts `python -m jaxserve.launch` with its default flags (the embedded SmolLM2-135M-Instruct), runs
`bench_serving.py` at each concurrency, stops it; then, when `--llama-server PATH` is given, starts
llama-server on the same GGUF (the file the default model is converted from) with `--parallel` slots equal to
the highest concurrency and `--threads` the machine's cores, runs the same, stops it, and prints the ratios.
Streaming completions, fixed-seed prompts, max_tokens fixed and EOS ignored (both servers take
`ignore_eos`), a warm-up request first. Prints a JSON line last.

    python benchmarks/bench_vs_llama.py --llama-server /path/to/llama-server [--concurrency 1 8 32]

llama-server: llama-cpp-python's sdist on the package index vendors llama.cpp; in its vendor/llama.cpp,
`cmake -B build -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON && cmake --build build --target llama-server -j`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_serving  # noqa: E402
from bench_common import machine  # noqa: E402


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> float:
    """Seconds until GET url answers 200 (the server is serving)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready after {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_levels(base_url: str, args: argparse.Namespace, model: str) -> list[dict]:
    out = []
    for c in args.concurrency:
        ns = argparse.Namespace(
            base_url=base_url, model=model, api_key=None, endpoint="completions",
            num_prompts=max(c * args.rounds, 4), input_len=args.input_len, output_len=args.output_len,
            concurrency=c, request_rate=float("inf"), temperature=0.0, ignore_eos=True, warmup=True,
            seed=args.seed, timeout=1800.0)
        r = asyncio.run(bench_serving.run(ns))
        print(f"  c{c}: {r['output_tok_s']} tok/s, TTFT p50 {r['ttft_p50_ms']} ms, ITL p50 {r['itl_p50_ms']} ms "
              f"p99 {r['itl_p99_ms']} ms, {r['completed']}/{r['num_prompts']} ok", flush=True)
        if r["failed"]:
            raise SystemExit(f"{r['failed']} requests failed: {r['first_error']}")
        out.append(r)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-server", default=None, help="llama-server binary (none: jaxserve alone)")
    ap.add_argument("--gguf", default=None, help="GGUF for llama-server (default: the embedded default model's)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=2, help="prompts per level = rounds x concurrency")
    ap.add_argument("--input-len", type=int, default=48, help="prompt words (~60 tokens)")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jaxserve-args", default="", help="extra flags for jaxserve.launch (default: none)")
    ap.add_argument("--skip-jaxserve", action="store_true")
    args = ap.parse_args()

    results: dict[str, dict] = {}
    if not args.skip_jaxserve:
        port = 30100
        cmd = [sys.executable, "-m", "jaxserve.launch", "--port", str(port), *args.jaxserve_args.split()]
        print("jaxserve:", " ".join(cmd), flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            ready = wait_ready(f"http://127.0.0.1:{port}/health", proc, 900)
            # Measure the server at its speed: after the background compilation of its other step programs.
            t0 = time.perf_counter()
            while "jaxserve_programs_compiling 0.0" not in httpx.get(f"http://127.0.0.1:{port}/metrics").text:
                if time.perf_counter() - t0 > 1800:
                    raise SystemExit("background compilation still running after 30 min")
                time.sleep(1.0)
            print(f"  serving after {ready:.0f} s, background compilation done {time.perf_counter() - t0:.0f} s later",
                  flush=True)
            model = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
            results["jaxserve"] = {"ready_s": round(ready, 1), "levels": run_levels(f"http://127.0.0.1:{port}/v1", args, model)}
        finally:
            stop(proc)
    if args.llama_server:
        gguf = args.gguf
        if gguf is None:
            from jaxserve.models.default import default_gguf_path

            gguf = str(default_gguf_path())
        port = 30101
        slots = max(args.concurrency)
        # Context per slot: the prompt, the output and the chat-free completion's few extra tokens.
        ctx = slots * (args.input_len * 2 + args.output_len + 64)
        cmd = [args.llama_server, "-m", gguf, "--port", str(port), "--parallel", str(slots), "--threads",
               str(args.threads), "--ctx-size", str(ctx), "--cont-batching", "--no-webui"]
        print("llama-server:", " ".join(cmd), flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            ready = wait_ready(f"http://127.0.0.1:{port}/health", proc, 300)
            results["llama_server"] = {"ready_s": round(ready, 1),
                                       "levels": run_levels(f"http://127.0.0.1:{port}/v1", args, "default")}
        finally:
            stop(proc)
    ratios = {}
    if "jaxserve" in results and "llama_server" in results:
        for ours, theirs in zip(results["jaxserve"]["levels"], results["llama_server"]["levels"]):
            c = ours["concurrency"]
            ratios[f"c{c}"] = {"tok_s": round(ours["output_tok_s"] / theirs["output_tok_s"], 3),
                               "ttft_p50_ms": [theirs["ttft_p50_ms"], ours["ttft_p50_ms"]],
                               "itl_p50_ms": [theirs["itl_p50_ms"], ours["itl_p50_ms"]]}
            print(f"c{c}: jaxserve / llama-server = {ratios[f'c{c}']['tok_s']}x, TTFT p50 llama {theirs['ttft_p50_ms']} "
                  f"ms / jaxserve {ours['ttft_p50_ms']} ms", flush=True)
    print(json.dumps({"bench": "vs_llama", "machine": machine(), "input_len": args.input_len,
                      "output_len": args.output_len, "results": results, "ratios": ratios}))


if __name__ == "__main__":
    main()
