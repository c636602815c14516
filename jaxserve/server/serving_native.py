"""SGLang's native POST /generate, plus /v1/tokenize and /v1/detokenize."""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, AsyncIterator

from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from jaxserve.server.errors import bad_request
from jaxserve.server.generation import Generation, merge_generations, start_generations, until_disconnect
from jaxserve.server.protocol import DetokenizeRequest, GenerateRequest, TokenizeRequest, new_id
from jaxserve.server.request_params import (
    check_context,
    check_prompt_chars,
    native_sampling_params,
    parse_body,
)
from jaxserve.server.serving_chat import template_messages
from jaxserve.server.serving_completions import MAX_PROMPTS_PER_REQUEST
from jaxserve.server.state import ServerState
from jaxserve.server.streaming import SSE_DONE, sse_event, sse_response, stream_failure

if TYPE_CHECKING:
    from jaxserve.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)


def _check_ids(ids: list[int], vocab: int, param: str) -> None:
    for t in ids:
        if not 0 <= t < vocab:
            raise bad_request(f"token id {t} is outside the vocabulary [0, {vocab})", param=param)


class _NativeChoice:
    def __init__(self, prompt_ids: list[int], logprob_start_len: int = -1, with_top: bool = False) -> None:
        self.prompt_ids = prompt_ids
        self.logprob_start_len = logprob_start_len
        self.with_top = with_top
        self.text = ""
        self.ids: list[int] = []
        self.logprobs: list[list[Any]] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        # With return_logprob and logprob_start_len >= 0: SGLang's input_token_logprobs / input_top_logprobs.
        self.input_logprobs: list[list[Any]] | None = None
        self.input_top_logprobs: list[list[list[Any]] | None] | None = None

    def set_input_logprobs(self, entries: list[Any]) -> None:
        """From the engine's prompt logprobs (None at position 0, which nothing predicts)."""
        kept = list(enumerate(entries))[self.logprob_start_len:]
        self.input_logprobs = [[e.logprob if e is not None else None, self.prompt_ids[pos], None] for pos, e in kept]
        if self.with_top:
            self.input_top_logprobs = [[[lp, tid, None] for tid, lp in e.top] if e is not None else None
                                       for _, e in kept]

    def meta(self, rid: str, prompt_tokens: int, cached_tokens: int, with_logprobs: bool) -> dict[str, Any]:
        finish: dict[str, Any] | None = None
        if self.finish_reason == "length":
            finish = {"type": "length", "length": len(self.ids)}
        elif self.finish_reason is not None:
            finish = {"type": self.finish_reason, "matched": self.stop_reason}
        meta = {
            "id": rid,
            "finish_reason": finish,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(self.ids),
            "cached_tokens": cached_tokens,
        }
        if with_logprobs:
            meta["output_token_logprobs"] = self.logprobs
        if self.input_logprobs is not None:
            meta["input_token_logprobs"] = self.input_logprobs
            if self.input_top_logprobs is not None:
                meta["input_top_logprobs"] = self.input_top_logprobs
        return meta


class NativeService:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def generate(self, raw: bytes, http_request: Request) -> Response:
        req = parse_body(GenerateRequest, raw)
        engine = self.state.require_engine()
        self.state.admit()
        if (req.text is None) == (req.input_ids is None):
            raise bad_request("give exactly one of text or input_ids", param="text")
        logprobs = req.top_logprobs_num if req.return_logprob else None
        prompt_logprobs = logprobs if req.logprob_start_len >= 0 else None
        params = native_sampling_params(req.sampling_params, logprobs, engine.tokenizer.vocab_size, prompt_logprobs)
        prompts, batched = self._prompts(req)
        if len(prompts) > MAX_PROMPTS_PER_REQUEST:
            raise bad_request(f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request", param="text")
        token_lists = []
        for prompt in prompts:
            if isinstance(prompt, str):
                check_prompt_chars(len(prompt), engine.max_model_len, "text")
                ids = await asyncio.to_thread(engine.tokenizer.encode, prompt, add_special_tokens=True)
            else:
                ids = list(prompt)
                _check_ids(ids, engine.tokenizer.vocab_size, "input_ids")
            check_context(len(ids), params.max_tokens, engine.max_model_len, min_tokens=params.min_tokens,
                          max_tokens_param="sampling_params.max_new_tokens",
                          min_tokens_param="sampling_params.min_new_tokens")
            token_lists.append(ids)
        rid = req.rid or new_id("gen")
        gen_ids = [f"{rid}-{k}" if batched else rid for k in range(len(token_lists))]
        gens = await start_generations(engine, self.state.metrics, token_lists, params, gen_ids,
                                       self.state.config.request_timeout_s)
        choices = [[_NativeChoice(ids, req.logprob_start_len, req.top_logprobs_num > 0) for _ in range(params.n)]
                   for ids in token_lists]
        if req.stream:
            return sse_response(self._stream(gens, choices, req.return_logprob))
        bodies = await until_disconnect(http_request, self._complete(gens, choices, req.return_logprob))
        return JSONResponse(bodies if batched or params.n > 1 else bodies[0])

    @staticmethod
    def _prompts(req: GenerateRequest) -> tuple[list[str | list[int]], bool]:
        """The prompts and whether the request is a batch (a list of texts or of token-id lists)."""
        if req.text is not None:
            if isinstance(req.text, list):
                if not req.text:
                    raise bad_request("text must not be an empty list", param="text")
                return list(req.text), True
            return [req.text], False
        ids = req.input_ids or []
        if ids and isinstance(ids[0], list):
            return list(ids), True  # type: ignore[arg-type]
        return [ids], False  # type: ignore[list-item]

    @staticmethod
    def _apply(choices: list[_NativeChoice], out: Any) -> list[int]:
        if out.prompt_logprobs is not None:
            for st in choices:
                st.set_input_logprobs(out.prompt_logprobs)
        touched = []
        for c in out.outputs:
            st = choices[c.index]
            st.text += c.text
            st.ids.extend(c.token_ids)
            for lp in c.logprobs or ():
                st.logprobs.append([lp.logprob, lp.token_id, None])
            if c.finish_reason is not None:
                st.finish_reason, st.stop_reason = c.finish_reason, c.stop_reason
            touched.append(c.index)
        return touched

    @staticmethod
    def _body(st: _NativeChoice, index: int, rid: str, out: Any, with_lp: bool) -> dict[str, Any]:
        """One choice's response object; `out` is the generation's latest RequestOutput (for the usage)."""
        meta = st.meta(rid, out.num_prompt_tokens, out.num_cached_tokens, with_lp)
        return {"index": index, "text": st.text, "output_ids": st.ids, "meta_info": meta}

    async def _complete(self, gens: list[Generation], choices: list[list[_NativeChoice]], with_lp: bool) -> list[dict]:
        last: list[Any] = [None] * len(gens)
        try:
            async for k, out in merge_generations(gens):
                last[k] = out
                self._apply(choices[k], out)
        finally:
            for g in gens:
                await g.close()
        n = len(choices[0])
        return [
            self._body(st, k * n + i, gens[k].request_id, last[k], with_lp)
            for k in range(len(gens))
            for i, st in enumerate(choices[k])
        ]

    async def _stream(
        self, gens: list[Generation], choices: list[list[_NativeChoice]], with_lp: bool
    ) -> AsyncIterator[bytes]:
        # SGLang streams the cumulative state of a choice in each event; `index` = prompt * n + choice.
        n = len(choices[0])
        try:
            async for k, out in merge_generations(gens):
                for i in self._apply(choices[k], out):
                    body = self._body(choices[k][i], k * n + i, gens[k].request_id, out, with_lp)
                    yield sse_event(body)
            yield SSE_DONE
        except Exception as exc:  # headers are sent: the error can only travel in the stream
            yield stream_failure(exc, gens[0].request_id)
        finally:
            for g in gens:
                await g.close()

    async def tokenize(self, raw: bytes) -> Response:
        req = parse_body(TokenizeRequest, raw)
        engine = self.state.require_engine()
        if req.model is not None:
            self.state.resolve_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt or messages", param="prompt")
        if req.prompt is not None:
            check_prompt_chars(len(req.prompt), engine.max_model_len, "prompt")
            ids = await asyncio.to_thread(engine.tokenizer.encode, req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            messages = template_messages(req.messages or [])
            check_prompt_chars(sum(len(m["content"]) for m in messages), engine.max_model_len, "messages")
            try:
                ids = await asyncio.to_thread(
                    engine.tokenizer.apply_chat_template, messages, add_generation_prompt=req.add_generation_prompt
                )
            except ValueError as exc:
                raise bad_request(f"the chat template rejected the messages: {exc}", param="messages") from None
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len})

    async def detokenize(self, raw: bytes) -> Response:
        req = parse_body(DetokenizeRequest, raw)
        engine = self.state.require_engine()
        if req.model is not None:
            self.state.resolve_model(req.model)
        _check_ids(req.tokens, engine.tokenizer.vocab_size, "tokens")
        if len(req.tokens) > engine.max_model_len * 4:
            raise bad_request(f"at most {engine.max_model_len * 4} tokens per request", param="tokens")
        text = await asyncio.to_thread(engine.tokenizer.decode, req.tokens, skip_special_tokens=False)
        return JSONResponse({"prompt": text})
