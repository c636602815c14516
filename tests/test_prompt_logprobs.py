"""Prompt logprobs: computed in the prefill step for the requests that ask (chunk by chunk, one such row per
step, no new compilation), equal to transformers' log-softmax of the same prompt, and served as
lm-evaluation-harness expects (`echo` + `logprobs` with `max_tokens: 0`) and as SGLang's /generate does."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from transformers import AutoModelForCausalLM

from jaxserve.engine.engine import LLMEngine
from jaxserve.sampling.params import SamplingParams

from inprocess import call, make_app, started


def hf_prompt_logprobs(path, ids: list[int]) -> np.ndarray:
    """[len(ids) - 1, V] log-softmax of the logits predicting tokens 1.. of `ids`."""
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, :-1]
    return torch.log_softmax(logits, dim=-1).numpy()


def run_all(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list]:
    outs: dict[str, list] = {rid: [] for rid in requests}
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    while engine.has_work():
        for out in engine.step():
            assert out.error is None, out.error
            outs[out.request_id].append(out)
    return outs


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_prompt_logprobs_match_transformers(family, tiny_model_dir, tiny_engine_config):
    path = tiny_model_dir(family)
    engine = LLMEngine(tiny_engine_config(family))
    engine.warmup()
    compiled = engine.runner.num_compiled()
    rng = np.random.default_rng(7)
    # 150 tokens: several prefill chunks (64-token budget); two such requests at once take turns for the
    # one prompt-logprobs row per step; a third request without them shares the steps.
    prompts = {f"p{i}": [int(t) for t in rng.integers(100, 49000, n)] for i, n in enumerate((150, 37, 90))}
    requests = {
        "p0": (prompts["p0"], SamplingParams(max_tokens=0, prompt_logprobs=5)),
        "p1": (prompts["p1"], SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=0, n=2)),
        "p2": (prompts["p2"], SamplingParams(max_tokens=4, temperature=0)),
    }
    outs = run_all(engine, requests)
    assert engine.runner.num_compiled() == compiled, "prompt logprobs compiled a new program"
    for rid in ("p0", "p1"):
        ids = prompts[rid]
        first = outs[rid][0]
        assert [o.prompt_logprobs is not None for o in outs[rid]] == [True] + [False] * (len(outs[rid]) - 1)
        got = first.prompt_logprobs
        assert len(got) == len(ids) and got[0] is None
        ref = hf_prompt_logprobs(path, ids)
        np.testing.assert_allclose([e.logprob for e in got[1:]], ref[np.arange(len(ids) - 1), ids[1:]],
                                   atol=1e-4, rtol=0)
        assert [e.token_id for e in got[1:]] == ids[1:]
        k = requests[rid][1].prompt_logprobs
        for pos, e in enumerate(got[1:]):
            assert len(e.top) == k
            if k:
                assert [t for t, _ in e.top] == list(np.argsort(-ref[pos], kind="stable")[:k])
                np.testing.assert_allclose([lp for _, lp in e.top], np.sort(ref[pos])[::-1][:k], atol=1e-4)
    p0 = outs["p0"][-1]
    assert p0.finished and p0.num_output_tokens == 0
    assert [c.finish_reason for c in p0.outputs] == ["length"]
    assert all(o.prompt_logprobs is None for o in outs["p2"])
    assert engine.allocator.num_used == 0


def test_completions_echo_logprobs_and_generate_input_logprobs(tiny_engine_config):
    """lm-evaluation-harness's loglikelihood request: echo, logprobs, max_tokens 0."""
    prompt = "The quick brown fox jumps over the lazy dog"
    with started(LLMEngine(tiny_engine_config())) as aeng:
        scored, streamed, native, refused, tokens = call(
            make_app(aeng),
            ("POST", "/v1/completions", {"prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 0,
                                         "temperature": 0}),
            ("POST", "/v1/completions", {"prompt": prompt, "echo": True, "logprobs": 0, "max_tokens": 2,
                                         "temperature": 0, "stream": True}),
            ("POST", "/generate", {"text": prompt, "return_logprob": True, "logprob_start_len": 2,
                                   "top_logprobs_num": 2, "sampling_params": {"max_new_tokens": 1, "temperature": 0}}),
            ("POST", "/v1/completions", {"prompt": prompt, "max_tokens": 0}),
            ("POST", "/v1/tokenize", {"prompt": prompt}),
        )
    tokens = tokens.json()["tokens"]
    assert scored.status_code == 200, scored.text
    choice = scored.json()["choices"][0]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(tokens)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp["token_logprobs"][1:])
    assert all(len(t) == 1 for t in lp["top_logprobs"][1:])
    assert "".join(lp["tokens"]) == prompt and lp["text_offset"][0] == 0
    assert scored.json()["usage"]["completion_tokens"] == 0
    assert streamed.status_code == 200 and '"token_logprobs":[null,' in streamed.text
    meta = native.json()["meta_info"]
    assert len(meta["input_token_logprobs"]) == len(tokens) - 2 == len(meta["input_top_logprobs"])
    assert meta["input_token_logprobs"][0][1] == tokens[2]
    assert all(len(t) == 2 for t in meta["input_top_logprobs"])
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"
