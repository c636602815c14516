"""POST /v1/completions: one or more raw prompts (text or token ids) -> engine -> response or SSE stream."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator

from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from jaxserve.server.errors import bad_request
from jaxserve.server.generation import Generation, merge_generations, start_generations, until_disconnect, usage_body
from jaxserve.server.logprobs import (
    TokenTexts,
    completion_logprobs,
    merge_completion_logprobs,
    prompt_completion_logprobs,
)
from jaxserve.server.protocol import CompletionRequest, new_id, now
from jaxserve.server.request_params import (
    check_context,
    check_prompt_chars,
    completion_sampling_params,
    parse_body,
)
from jaxserve.server.state import ServerState
from jaxserve.server.streaming import SSE_DONE, sse_event, sse_response, stream_failure

if TYPE_CHECKING:
    from jaxserve.engine.async_engine import AsyncEngine
    from jaxserve.engine.request import RequestOutput

logger = logging.getLogger(__name__)

# One HTTP request may batch several prompts; beyond this, clients should send separate requests.
MAX_PROMPTS_PER_REQUEST = 64


def _prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", param="prompt")
    if isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprob_parts: list[dict[str, Any]] = field(default_factory=list)
    text_len: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionService:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def handle(self, raw: bytes, http_request: Request) -> Response:
        req = parse_body(CompletionRequest, raw)
        engine = self.state.require_engine()
        self.state.admit()
        model = self.state.resolve_model(req.model)
        params = completion_sampling_params(req, engine.tokenizer.vocab_size)
        prompts = _prompt_list(req.prompt)
        if len(prompts) > MAX_PROMPTS_PER_REQUEST:
            raise bad_request(f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request", param="prompt")
        tokenized = [await self._tokenize(engine, p) for p in prompts]
        for ids in tokenized:
            check_context(len(ids), params.max_tokens, engine.max_model_len, min_tokens=params.min_tokens)
        request_id = new_id("cmpl")
        gens = await start_generations(engine, self.state.metrics, tokenized, params,
                                       [f"{request_id}-{k}" for k in range(len(tokenized))],
                                       self.state.config.request_timeout_s)
        echoes = [self._echo_text(engine, p) if req.echo else "" for p in prompts]
        texts = TokenTexts(engine.tokenizer)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return sse_response(self._stream(gens, req, request_id, model, texts, echoes, tokenized, include_usage))
        body = await until_disconnect(http_request, self._complete(gens, req, request_id, model, texts, echoes,
                                                                   tokenized))
        return JSONResponse(body)

    async def _tokenize(self, engine: "AsyncEngine", prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            check_prompt_chars(len(prompt), engine.max_model_len, "prompt")
            return await asyncio.to_thread(engine.tokenizer.encode, prompt, add_special_tokens=True)
        vocab = engine.tokenizer.vocab_size
        for t in prompt:
            if not 0 <= t < vocab:
                raise bad_request(f"prompt token id {t} is outside the vocabulary [0, {vocab})", param="prompt")
        return list(prompt)

    @staticmethod
    def _echo_text(engine: "AsyncEngine", prompt: str | list[int]) -> str:
        return prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt, skip_special_tokens=False)

    async def _complete(
        self,
        gens: list[Generation],
        req: CompletionRequest,
        request_id: str,
        model: str,
        texts: TokenTexts,
        echoes: list[str],
        prompt_ids: list[list[int]],
    ) -> dict[str, Any]:
        n = req.n
        choices = [_Choice() for _ in range(n * len(gens))]
        for k, echo in enumerate(echoes):
            for i in range(n):
                choices[k * n + i].text.append(echo)
                choices[k * n + i].text_len = len(echo)
        last: list[RequestOutput | None] = [None] * len(gens)
        try:
            async for k, out in merge_generations(gens):
                last[k] = out
                if out.prompt_logprobs is not None:  # echo + logprobs: the prompt's come first
                    part = prompt_completion_logprobs(prompt_ids[k], out.prompt_logprobs, texts)
                    for i in range(n):
                        choices[k * n + i].logprob_parts.insert(0, part)
                for c in out.outputs:
                    st = choices[k * n + c.index]
                    if c.logprobs:
                        st.logprob_parts.append(completion_logprobs(c.logprobs, texts, st.text_len))
                    st.text.append(c.text)
                    st.text_len += len(c.text)
                    if c.finish_reason is not None:
                        st.finish_reason, st.stop_reason = c.finish_reason, c.stop_reason
        finally:
            for g in gens:
                await g.close()
        return {
            "id": request_id,
            "object": "text_completion",
            "created": now(),
            "model": model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": j,
                    "text": "".join(st.text),
                    "logprobs": merge_completion_logprobs(st.logprob_parts) if req.logprobs is not None else None,
                    "finish_reason": st.finish_reason,
                    "matched_stop": st.stop_reason,
                }
                for j, st in enumerate(choices)
            ],
            "usage": usage_body(last),
        }

    async def _stream(
        self,
        gens: list[Generation],
        req: CompletionRequest,
        request_id: str,
        model: str,
        texts: TokenTexts,
        echoes: list[str],
        prompt_ids: list[list[int]],
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        created = now()
        n = req.n
        offsets = [len(echoes[j // n]) for j in range(n * len(gens))]
        last: list[RequestOutput | None] = [None] * len(gens)

        def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
            payload: dict[str, Any] = {
                "id": request_id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": choices,
            }
            if include_usage:
                payload["usage"] = usage
            return sse_event(payload)

        try:
            scored = req.echo and req.logprobs is not None  # the echo waits for the prompt's logprobs
            for j in range(n * len(gens)):
                if echoes[j // n] and not scored:
                    yield chunk([{"index": j, "text": echoes[j // n], "logprobs": None, "finish_reason": None}])
            async for k, out in merge_generations(gens):
                last[k] = out
                if out.prompt_logprobs is not None:
                    lp = prompt_completion_logprobs(prompt_ids[k], out.prompt_logprobs, texts)
                    for i in range(n):
                        yield chunk([{"index": k * n + i, "text": echoes[k], "logprobs": lp, "finish_reason": None}])
                for c in out.outputs:
                    j = k * n + c.index
                    lp = completion_logprobs(c.logprobs, texts, offsets[j]) if c.logprobs else None
                    offsets[j] += len(c.text)
                    if c.text or lp is not None:
                        yield chunk([{"index": j, "text": c.text, "logprobs": lp, "finish_reason": None}])
                    if c.finish_reason is not None:
                        yield chunk([{"index": j, "text": "", "logprobs": None, "finish_reason": c.finish_reason}])
            if include_usage:
                yield chunk([], usage_body(last))
            yield SSE_DONE
        except Exception as exc:  # headers are sent: the error can only travel in the stream
            yield stream_failure(exc, request_id)
        finally:
            for g in gens:
                await g.close()
