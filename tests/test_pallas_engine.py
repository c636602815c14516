"""The engine with the Pallas attention backend (interpret mode on CPU) matches the reference backend."""
from __future__ import annotations

import pytest

from jaxserve.config import EngineConfig
from jaxserve.engine.engine import LLMEngine
from jaxserve.sampling.params import SamplingParams

# Small limits keep the number of compiled shapes (each an interpreted kernel) low.
LIMITS = dict(max_running_requests=2, max_num_batched_tokens=32, max_model_len=64, page_size=16)
PROMPTS = [list(range(200, 237)), [777]]  # 37 tokens (3 pages, prefilled in two chunks) and 1 token


def _greedy_tokens(engine: LLMEngine) -> list[list[int]]:
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, params, None)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(PROMPTS))}
    steps = 0
    while engine.has_work():
        for out in engine.step():
            for choice in out.outputs:
                tokens[out.request_id].extend(choice.token_ids)
        steps += 1
        assert steps < 500, "engine made no progress"
    return [tokens[f"r{i}"] for i in range(len(PROMPTS))]


@pytest.mark.slow
def test_pallas_backend_greedy_tokens_match_reference(tiny_model_dir, tmp_path_factory):
    model = str(tiny_model_dir("llama"))
    results = {}
    for backend in ("reference", "pallas"):
        config = EngineConfig(model=model, attention_backend=backend, compilation_cache_dir=None, **LIMITS)
        engine = LLMEngine(config, interpret_kernels=backend == "pallas")
        assert ("pallas" in engine.runner.attention_name) == (backend == "pallas")
        results[backend] = _greedy_tokens(engine)
    assert all(len(t) == 4 for t in results["reference"])
    assert results["pallas"] == results["reference"]
