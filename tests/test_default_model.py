"""The embedded default model (SmolLM2-135M-Instruct from its GGUF) against transformers."""
from __future__ import annotations

import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxserve.engine.offline import LLM
from jaxserve.models.loader import load_params, resolve_model
from jaxserve.sampling.params import SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_greedy_chat_matches_transformers_and_names_paris(smollm2_tokenizer_dir):
    from transformers import AutoModelForCausalLM

    llm = LLM(None, max_running_requests=1, max_num_batched_tokens=64, max_model_len=256, quantization="none")
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


# Held-out text for the int8 quality gate (written for this test; plain prose, code and a dialogue turn).
QUALITY_TEXT = """The river town woke slowly. Fishermen pulled their boats onto the gravel while the baker, who had been
up since four, carried trays of bread to the window. Children ran past the church on their way to school, and
an old dog watched them from the steps of the post office, too tired to follow.

def mean(values):
    if not values:
        raise ValueError("mean of an empty list")
    return sum(values) / len(values)

Q: How many minutes are there in three and a half hours?
A: Three hours are 180 minutes and half an hour is 30 minutes, so three and a half hours are 210 minutes."""

# Perplexity of QUALITY_TEXT under int8 matmuls may exceed float32's by at most this fraction (measured at
# the change, AMD EPYC Zen 3, AVX2 kernel: 19.52 -> 19.85, +1.7%; docs/benchmarks.md, issue 17).
INT8_PERPLEXITY_BOUND = 0.03


@pytest.mark.slow
def test_int8_matmuls_keep_the_default_model_within_the_perplexity_bound(smollm2_tokenizer_dir):
    from pallas_kernels.int8_matmul import KernelUnavailable, load_kernel
    from jaxserve.config import cache_dir

    try:
        load_kernel(cache_dir() / "kernels")
    except KernelUnavailable as e:
        pytest.skip(f"int8 kernel unavailable: {e}")
    perplexity, answers = {}, {}
    for mode in ("none", "int8"):
        llm = LLM(None, max_running_requests=1, max_num_batched_tokens=64, max_model_len=512, quantization=mode)
        ids = llm.tokenizer.encode(QUALITY_TEXT)
        out = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))[0]
        logprobs = [lp.logprob for lp in out.prompt_logprobs[1:]]
        perplexity[mode] = float(np.exp(-np.mean(logprobs)))
        prompt = llm.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
        answers[mode] = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0))[0].outputs[0].text
    print(f"perplexity float32 {perplexity['none']:.3f}, int8 {perplexity['int8']:.3f}; answers {answers}")
    assert perplexity["int8"] <= perplexity["none"] * (1 + INT8_PERPLEXITY_BOUND)
    assert "Paris" in answers["int8"]
