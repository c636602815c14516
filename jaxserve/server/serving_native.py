"""SGLang's native POST /generate, plus /v1/tokenize and /v1/detokenize."""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, AsyncIterator

from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from jaxserve.server.errors import APIError, bad_request
from jaxserve.server.generation import Generation, start_generation, until_disconnect
from jaxserve.server.protocol import DetokenizeRequest, GenerateRequest, TokenizeRequest, new_id
from jaxserve.server.request_params import (
    check_context,
    check_prompt_chars,
    native_sampling_params,
    parse_body,
)
from jaxserve.server.serving_chat import template_messages
from jaxserve.server.state import ServerState
from jaxserve.server.streaming import SSE_DONE, sse_event, sse_response

if TYPE_CHECKING:
    from jaxserve.engine.engine import AsyncEngine

logger = logging.getLogger(__name__)


def _check_ids(ids: list[int], vocab: int, param: str) -> None:
    for t in ids:
        if not 0 <= t < vocab:
            raise bad_request(f"token id {t} is outside the vocabulary [0, {vocab})", param=param)


class _NativeChoice:
    def __init__(self) -> None:
        self.text = ""
        self.ids: list[int] = []
        self.logprobs: list[list[Any]] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    def meta(self, rid: str, prompt_tokens: int, with_logprobs: bool) -> dict[str, Any]:
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
        }
        if with_logprobs:
            meta["output_token_logprobs"] = self.logprobs
        return meta


class NativeService:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def generate(self, raw: bytes, http_request: Request) -> Response:
        req = parse_body(GenerateRequest, raw)
        engine = self.state.require_engine()
        if (req.text is None) == (req.input_ids is None):
            raise bad_request("give exactly one of text or input_ids", param="text")
        logprobs = req.top_logprobs_num if req.return_logprob else None
        params = native_sampling_params(req.sampling_params, logprobs, engine.tokenizer.vocab_size)
        if req.text is not None:
            check_prompt_chars(len(req.text), engine.max_model_len, "text")
            ids = await asyncio.to_thread(engine.tokenizer.encode, req.text, add_special_tokens=True)
        else:
            ids = list(req.input_ids or [])
            _check_ids(ids, engine.tokenizer.vocab_size, "input_ids")
        check_context(len(ids), params.max_tokens, engine.max_model_len)
        self.state.admit()
        rid = req.rid or new_id("gen")
        gen = await start_generation(engine, self.state.metrics, ids, params, rid)
        choices = [_NativeChoice() for _ in range(params.n)]
        if req.stream:
            return sse_response(self._stream(gen, choices, req.return_logprob))
        body = await until_disconnect(http_request, self._complete(gen, choices, req.return_logprob))
        return JSONResponse(body)

    @staticmethod
    def _apply(choices: list[_NativeChoice], out: Any) -> list[int]:
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

    def _body(self, st: _NativeChoice, index: int, rid: str, prompt_tokens: int, with_lp: bool) -> dict[str, Any]:
        return {"index": index, "text": st.text, "output_ids": st.ids, "meta_info": st.meta(rid, prompt_tokens, with_lp)}

    async def _complete(self, gen: Generation, choices: list[_NativeChoice], with_lp: bool) -> Any:
        prompt_tokens = 0
        try:
            async for out in gen:
                prompt_tokens = out.num_prompt_tokens
                self._apply(choices, out)
        finally:
            await gen.close()
        bodies = [self._body(st, i, gen.request_id, prompt_tokens, with_lp) for i, st in enumerate(choices)]
        return bodies[0] if len(bodies) == 1 else bodies

    async def _stream(self, gen: Generation, choices: list[_NativeChoice], with_lp: bool) -> AsyncIterator[bytes]:
        # SGLang streams the cumulative state of a choice in each event.
        try:
            async for out in gen:
                for i in self._apply(choices, out):
                    yield sse_event(self._body(choices[i], i, gen.request_id, out.num_prompt_tokens, with_lp))
            yield SSE_DONE
        except Exception as exc:  # headers are sent: the error can only travel in the stream
            logger.exception("generation %s failed mid-stream", gen.request_id)
            yield sse_event(APIError(500, f"generation failed: {type(exc).__name__}", type="server_error").body())
            yield SSE_DONE
        finally:
            await gen.close()

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
