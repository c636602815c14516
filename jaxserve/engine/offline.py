"""`LLM`: offline batch generation on the same engine core, without HTTP."""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from jaxserve.config import EngineConfig
from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.request import TokenLogprob
from jaxserve.sampling.params import SamplingParams
from jaxserve.tokenizer import Tokenizer


@dataclass
class Completion:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None
    logprobs: list[TokenLogprob] | None


@dataclass
class GenerationResult:
    request_id: str
    prompt_ids: list[int]
    outputs: list[Completion]
    error: str | None = None  # the engine failed this request (its outputs end with finish_reason "error")
    # With SamplingParams.prompt_logprobs: one entry per prompt token (None for the first), as vLLM's.
    prompt_logprobs: list[TokenLogprob | None] | None = None


class LLM:
    """Offline batch generation on the same engine: `LLM(model).generate(prompts, params)`."""

    def __init__(self, model: str | None = None, *, warmup: bool = False, **engine_options) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_options))
        if warmup:
            self.engine.warmup()

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(self, prompts: list[str] | list[list[int]] | str, params: SamplingParams | list[SamplingParams] | None = None) -> list[GenerationResult]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params_list = params if isinstance(params, list) else [params or SamplingParams(max_tokens=16)] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("give one SamplingParams per prompt, or one for all")
        results: dict[str, GenerationResult] = {}
        order = []
        for prompt, p in zip(prompts, params_list):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            rid = uuid.uuid4().hex
            grammar = self.engine.compile_constraint(p.constraint) if p.constraint is not None else None
            self.engine.add_request(rid, ids, p, grammar)
            results[rid] = GenerationResult(rid, ids, [Completion(i, "", [], None, None, [] if p.logprobs is not None else None) for i in range(p.n)])
            order.append(rid)
        while self.engine.has_work():
            for out in self.engine.step():
                res = results[out.request_id]
                if out.prompt_logprobs is not None:
                    res.prompt_logprobs = out.prompt_logprobs
                if out.error is not None:
                    res.error = out.error
                    for comp in res.outputs:
                        comp.finish_reason = comp.finish_reason or "error"
                for c in out.outputs:
                    comp = res.outputs[c.index]
                    comp.text += c.text
                    comp.token_ids.extend(c.token_ids)
                    if c.logprobs:
                        comp.logprobs.extend(c.logprobs)
                    comp.finish_reason, comp.stop_reason = c.finish_reason, c.stop_reason
        return [results[r] for r in order]

    def chat(self, messages: list[dict], params: SamplingParams | None = None, **template_kwargs) -> GenerationResult:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs)
        return self.generate([ids], params)[0]
