"""Start-up of the real launcher on the default model: time to "serving at" and to the first answered request.

Three starts, each in a fresh `JAXSERVE_CACHE` so nothing of the machine's own cache helps:
  fresh  only the default model's wheel is there (the GGUF is extracted and converted, every program compiled)
  cold   the converted model is there, no compiled program (the README's first start after the download)
  warm   the cache the cold start left (executables loaded, nothing traced or compiled)
For each: seconds to the "serving at" line, seconds to the first answered chat completion (sent as soon as
that line appears), the programs made ready before serving (compiled / loaded, from the "ready in" log
line) and, after the first answer, seconds until the background compilation finished. The last stdout line
is JSON.

  python benchmarks/bench_startup.py [--starts fresh,cold,warm] [--extra-args "..."]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import machine  # noqa: E402

READY = re.compile(r"ready in ([\d.]+) s: (\d+) programs \((\d+) compiled, (\d+) loaded")
SERVING = re.compile(r"serving .* at (http://\S+)/v1")


def start_once(cache: Path, extra: list[str], timeout_s: float) -> dict:
    env = {**os.environ, "JAXSERVE_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "jaxserve.launch", "--port", "0", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: dict = {}
    lines: list[str] = []
    serving = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            for key, marker in (("loading_s", "jaxserve.startup: loading the model"),
                                ("model_loaded_s", "jaxserve.startup: model loaded"),
                                ("ready_s", "jaxserve.startup: ready in")):
                if marker in line and key not in out:
                    out[key] = round(time.perf_counter() - t0, 2)
            m = READY.search(line)
            if m:
                out.update(ready_programs=int(m.group(2)), compiled=int(m.group(3)), loaded=int(m.group(4)))
            if "background compilation done" in line:
                out["background_done_s"] = round(time.perf_counter() - t0, 2)
            m = SERVING.search(line)
            if m and not serving.is_set():
                out["serving_s"] = round(time.perf_counter() - t0, 2)
                out["base"] = m.group(1)
                serving.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not serving.wait(timeout_s):
            raise RuntimeError("no 'serving at' line:\n" + "".join(lines[-30:]))
        base = out.pop("base")
        model = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
        body = {"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 16, "temperature": 0}
        r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=timeout_s)
        r.raise_for_status()
        out["first_answer_s"] = round(time.perf_counter() - t0, 2)
        out["answer"] = r.json()["choices"][0]["message"]["content"]
        deadline = time.perf_counter() + timeout_s
        while "background_done_s" not in out and time.perf_counter() < deadline and proc.poll() is None:
            if any("compile the rest" in l or "compile in the background" in l for l in lines):
                time.sleep(0.2)
            else:
                break
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--starts", default="fresh,cold,warm")
    ap.add_argument("--extra-args", default="", help="more launcher flags, e.g. '--max-running-requests 64'")
    ap.add_argument("--timeout-s", type=float, default=900)
    args = ap.parse_args()
    from jaxserve.config import cache_dir
    from jaxserve.models.default import default_model_path

    converted = default_model_path()  # this machine's cache: the wheel and the conversion, made once
    source = cache_dir()
    extra = args.extra_args.split()
    results = {}
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    try:
        for name in args.starts.split(","):
            cache = work / ("warm" if name == "warm" else name)
            if name == "warm":
                if not (work / "cold").exists():
                    raise SystemExit("the warm start reuses the cold start's cache: list cold before warm")
                shutil.copytree(work / "cold", cache, symlinks=True)  # the GGUF stays a link (its conversion key)
            else:
                (cache / "wheels").mkdir(parents=True)
                for wheel in (source / "wheels").glob("*.whl"):
                    shutil.copy(wheel, cache / "wheels" / wheel.name)
                if name == "cold":  # the GGUF and its conversion, as the first start left them
                    (cache / "models").mkdir()
                    for item in (source / "models").iterdir():
                        if item.suffix == ".gguf":  # a link: the conversion is keyed by the file's real path
                            (cache / "models" / item.name).symlink_to(item.resolve())
                        elif item == converted:
                            shutil.copytree(item, cache / "models" / item.name)
            t0 = time.time()
            results[name] = start_once(cache, extra, args.timeout_s)
            print(f"{name}: {results[name]} ({time.time() - t0:.0f} s in all)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"benchmark": "startup", "extra_args": extra, "results": results, "machine": machine()}))


if __name__ == "__main__":
    main()
