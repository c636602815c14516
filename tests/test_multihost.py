"""Multi-host serving simulated on one machine: two `jaxserve.launch` processes on loopback joined by
`jax.distributed` (CPU collectives over gloo), 2 fake CPU devices each, one engine at tp = 4 over all four.
Host 0 serves HTTP and schedules; host 1 follows its device operations. The answer must be the tp = 1 one.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from jaxserve.engine.offline import LLM
from test_server_e2e import free_port
from jaxserve.sampling.params import SamplingParams

ENGINE_FLAGS = ["--max-running-requests", "2", "--max-model-len", "128", "--max-num-batched-tokens", "32",
                "--num-pages", "32"]
PROMPT = [100, 2000, 345, 8000, 12, 77, 5, 901, 33]


@pytest.fixture(scope="module")
def model(tmp_path_factory, smollm2_tokenizer_dir) -> str:
    from jaxserve.models.testing import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("multihost"), "qwen2", seed=2,
                               tokenizer_dir=smollm2_tokenizer_dir, num_attention_heads=8))


def test_two_hosts_serve_a_tensor_parallel_engine(model, tmp_path):
    expected = LLM(model, max_running_requests=2, max_model_len=128, max_num_batched_tokens=32, num_pages=32).generate(
        [PROMPT], SamplingParams(max_tokens=8, temperature=0.0))[0].outputs[0]
    coordinator, port = free_port(), free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    args = [sys.executable, "-m", "jaxserve.launch", "--model", model, "--served-model-name", "tiny", "--tp-size", "4",
            "--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{coordinator}", "--port", str(port), *ENGINE_FLAGS]
    logs = [tmp_path / f"host{rank}.log" for rank in (0, 1)]
    hosts = [subprocess.Popen(args + ["--node-rank", str(rank)], env=env, stdout=open(log, "w"),
                              stderr=subprocess.STDOUT) for rank, log in zip((0, 1), logs)]
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert all(h.poll() is None for h in hosts), "\n".join(log.read_text()[-3000:] for log in logs)
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("the two-host server did not become healthy:\n" + "\n".join(l.read_text()[-3000:] for l in logs))
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 1}
        answers = [httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120) for _ in range(2)]
        for answer in answers:
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["text"] == expected.text
        # Host 0 stops on SIGTERM and tells host 1, which exits after replaying everything.
        hosts[0].send_signal(signal.SIGTERM)
        assert [h.wait(timeout=60) for h in hosts] == [0, 0], "\n".join(l.read_text()[-3000:] for l in logs)
        followed = logs[1].read_text()
        assert "host 0 stopped" in followed and "device operations followed" in followed
    finally:
        for h in hosts:
            if h.poll() is None:
                h.kill()
                h.wait()
