"""The embedded default model (SmolLM2-135M-Instruct from its GGUF) against transformers."""
from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")

from jaxserve.engine.offline import LLM
from jaxserve.models.loader import load_params, resolve_model
from jaxserve.sampling.params import SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_greedy_chat_matches_transformers_and_names_paris(smollm2_tokenizer_dir):
    from transformers import AutoModelForCausalLM

    llm = LLM(None, max_running_requests=1, max_num_batched_tokens=64, max_model_len=256)
    prompt = llm.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    ours = llm.generate([prompt], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0].outputs[0]

    hf = AutoModelForCausalLM.from_pretrained(smollm2_tokenizer_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert ours.token_ids == ref[0, len(prompt):].tolist()
    assert "Paris" in ours.text


@pytest.mark.slow
def test_second_load_of_the_default_model_is_fast(smollm2_tokenizer_dir):
    t0 = time.perf_counter()
    files = resolve_model(None)  # converted once already (the fixture); now only the cache is read
    load_params(files.path, files.config, "float32")
    seconds = time.perf_counter() - t0
    print(f"second load of the default model: {seconds:.2f} s")
    assert seconds < 10
