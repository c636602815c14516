"""POST /v1/chat/completions: messages -> chat template -> engine -> one response or an SSE stream."""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator

import jinja2
from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from jaxserve.sampling.params import Constraint
from jaxserve.server.errors import bad_request
from jaxserve.server.generation import Generation, start_generation, until_disconnect, usage_body
from jaxserve.server.logprobs import TokenTexts, chat_logprobs
from jaxserve.server.protocol import ChatCompletionRequest, ChatMessage, NamedToolChoice, new_id, now
from jaxserve.server.request_params import (
    chat_sampling_params,
    check_context,
    check_prompt_chars,
    parse_body,
    response_constraint,
    tool_call_constraint,
)
from jaxserve.server.state import ServerState
from jaxserve.server.streaming import SSE_DONE, sse_event, sse_response, stream_failure
from jaxserve.server.tool_parser import (
    ParsedToolCall,
    StreamingToolParser,
    new_call_id,
    parse_tool_calls,
)

if TYPE_CHECKING:
    from jaxserve.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- request -> prompt

def _content_text(message: ChatMessage, index: int) -> str | None:
    if message.content is None or isinstance(message.content, str):
        return message.content
    parts = []
    for part in message.content:
        if part.type != "text":
            raise bad_request(
                f"messages[{index}].content: part type {part.type[:40]!r} is not supported; this server "
                f"serves text-only models",
                param=f"messages.{index}.content",
            )
        if part.text is None:
            raise bad_request(f"messages[{index}].content: a text part needs `text`", param=f"messages.{index}.content")
        parts.append(part.text)
    return "".join(parts)


def _arguments_for_template(arguments: str) -> Any:
    # Chat templates (Qwen, Llama 3) serialise arguments with `tojson`: hand them the object, not its text.
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(messages):
        content = _content_text(m, i)
        if content is None and not (m.role == "assistant" and m.tool_calls):
            raise bad_request(f"messages[{i}] ({m.role}) needs content", param=f"messages.{i}.content")
        if m.role == "tool" and not m.tool_call_id:
            raise bad_request(f"messages[{i}] (tool) needs tool_call_id", param=f"messages.{i}.tool_call_id")
        # Templates know "system"; OpenAI's newer "developer" role means the same thing.
        entry: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.name:
            entry["name"] = m.name
        if m.tool_call_id:
            entry["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            entry["tool_calls"] = [
                {
                    "id": c.id or new_call_id(),
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": _arguments_for_template(c.function.arguments)},
                }
                for c in m.tool_calls
            ]
        out.append(entry)
    return out


def _prompt_chars(req: ChatCompletionRequest) -> int:
    total = 0
    for m in req.messages:
        if isinstance(m.content, str):
            total += len(m.content)
        elif m.content:
            total += sum(len(p.text or "") for p in m.content)
        for c in m.tool_calls or ():
            total += len(c.function.arguments)
    return total


@dataclass(frozen=True)
class ToolMode:
    """How the reply relates to tools: plain text, free-form calls to parse, or a constrained call."""

    parse_auto: bool = False  # tool_choice auto: parse the model's own call format
    forced_name: str | None = None  # named tool_choice: the output is this function's arguments
    required: bool = False  # tool_choice required: the output is a JSON array of calls
    names: frozenset[str] = frozenset()


def tool_mode_and_constraint(req: ChatCompletionRequest) -> tuple[ToolMode, Constraint | None]:
    constraint = response_constraint(req.response_format, req.regex, req.json_schema)
    if not req.tools:
        if req.tool_choice not in (None, "none"):
            raise bad_request("tool_choice is only allowed when tools are specified", param="tool_choice")
        return ToolMode(), constraint
    names = frozenset(t.function.name for t in req.tools)
    if len(names) != len(req.tools):
        raise bad_request("tools must have distinct function names", param="tools")
    choice = req.tool_choice or "auto"
    if choice == "none":
        return ToolMode(), constraint
    if choice == "auto":
        # A JSON constraint makes the reply a JSON document, not a call; a regex may well spell the
        # model's call format (e.g. to force a <tool_call> block), so its output is still parsed.
        parse = constraint is None or constraint.kind == "regex"
        return ToolMode(parse_auto=parse, names=names), constraint
    if constraint is not None:
        raise bad_request("tool_choice required/named cannot be combined with another output constraint", param="tool_choice")
    parallel = req.parallel_tool_calls is not False
    tool_constraint, forced = tool_call_constraint(req.tools, choice, parallel)
    if isinstance(choice, NamedToolChoice):
        return ToolMode(forced_name=forced, names=names), tool_constraint
    return ToolMode(required=True, names=names), tool_constraint


def _required_calls(text: str, names: frozenset[str]) -> list[ParsedToolCall] | None:
    try:
        calls = json.loads(text)
    except ValueError:
        return None
    if not isinstance(calls, list):
        return None
    parsed = []
    for call in calls:
        if not isinstance(call, dict) or call.get("name") not in names:
            return None
        parsed.append(
            ParsedToolCall(new_call_id(), call["name"], json.dumps(call.get("parameters", {}), ensure_ascii=False))
        )
    return parsed or None


def final_tool_calls(mode: ToolMode, text: str) -> tuple[str | None, list[ParsedToolCall]]:
    """Content and calls of a finished choice under `mode`."""
    if mode.forced_name is not None:
        try:
            json.loads(text)
        except ValueError:
            return text, []  # cut short (length/stop): show what was produced
        return None, [ParsedToolCall(new_call_id(), mode.forced_name, text)]
    if mode.required:
        calls = _required_calls(text, mode.names)
        return (None, calls) if calls else (text, [])
    if mode.parse_auto:
        result = parse_tool_calls(text, set(mode.names))
        return result.content, result.tool_calls
    return text, []


def _finish_reason(reason: str | None, has_calls: bool) -> str | None:
    return "tool_calls" if has_calls and reason == "stop" else reason


def _tool_call_json(call: ParsedToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


# ----------------------------------------------------------------------------------------------- serving

@dataclass
class _ChoiceState:
    text: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatService:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def handle(self, raw: bytes, http_request: Request) -> Response:
        req = parse_body(ChatCompletionRequest, raw)
        engine = self.state.require_engine()
        self.state.admit()
        model = self.state.resolve_model(req.model)
        mode, constraint = tool_mode_and_constraint(req)
        if req.continue_final_message and req.messages[-1].role != "assistant":
            raise bad_request("continue_final_message needs the last message to be from the assistant", param="messages")
        params = chat_sampling_params(req, constraint, engine.tokenizer.vocab_size)
        check_prompt_chars(_prompt_chars(req), engine.max_model_len, "messages")
        if len(req.messages) > engine.max_model_len:
            # Every template spends at least one token per message: this cannot fit, and rendering
            # a huge list through Jinja would be the expensive part.
            raise bad_request(
                f"{len(req.messages)} messages cannot fit the context of {engine.max_model_len} tokens",
                param="messages",
                code="context_length_exceeded",
            )
        prompt_ids = await self._render(engine, req)
        max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        check_context(len(prompt_ids), params.max_tokens, engine.max_model_len, min_tokens=params.min_tokens,
                      max_tokens_param=max_param)
        request_id = new_id("chatcmpl")
        texts = TokenTexts(engine.tokenizer, await self.state.token_bytes() if req.logprobs else None)
        gen = await start_generation(engine, self.state.metrics, prompt_ids, params, request_id,
                                     self.state.config.request_timeout_s)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return sse_response(self._stream(gen, req, mode, model, texts, include_usage))
        body = await until_disconnect(http_request, self._complete(gen, req, mode, model, texts))
        return JSONResponse(body)

    async def _render(self, engine: "AsyncEngine", req: ChatCompletionRequest) -> list[int]:
        messages = template_messages(req.messages)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        try:
            # Templates and tokenizers are CPU work: keep them off the event loop.
            return await asyncio.to_thread(
                engine.tokenizer.apply_chat_template,
                messages,
                tools=tools,
                add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
                continue_final_message=req.continue_final_message,
                chat_template_kwargs=req.chat_template_kwargs,
            )
        except (ValueError, TypeError, jinja2.TemplateError) as exc:
            raise bad_request(f"the chat template rejected the messages: {exc}", param="messages") from None

    async def _complete(
        self, gen: Generation, req: ChatCompletionRequest, mode: ToolMode, model: str, texts: TokenTexts
    ) -> dict[str, Any]:
        choices = [_ChoiceState() for _ in range(req.n)]
        last = None
        try:
            async for out in gen:
                last = out
                for c in out.outputs:
                    st = choices[c.index]
                    st.text.append(c.text)
                    if c.logprobs:
                        st.logprobs.extend(chat_logprobs(c.logprobs, texts))
                    if c.finish_reason is not None:
                        st.finish_reason, st.stop_reason = c.finish_reason, c.stop_reason
        finally:
            await gen.close()
        result = []
        for i, st in enumerate(choices):
            content, calls = final_tool_calls(mode, "".join(st.text))
            message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
            if calls:
                message["tool_calls"] = [_tool_call_json(c) for c in calls]
            result.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": {"content": st.logprobs, "refusal": None} if req.logprobs else None,
                    "finish_reason": _finish_reason(st.finish_reason, bool(calls)),
                    "matched_stop": st.stop_reason,
                }
            )
        return {
            "id": gen.request_id,
            "object": "chat.completion",
            "created": now(),
            "model": model,
            "system_fingerprint": None,
            "choices": result,
            "usage": usage_body([last]),
        }

    async def _stream(
        self,
        gen: Generation,
        req: ChatCompletionRequest,
        mode: ToolMode,
        model: str,
        texts: TokenTexts,
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        created = now()

        def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
            payload: dict[str, Any] = {
                "id": gen.request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": choices,
            }
            if include_usage:
                payload["usage"] = usage
            return sse_event(payload)

        def delta_choice(index: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None) -> dict:
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

        parsers = [StreamingToolParser(set(mode.names)) if mode.parse_auto else None for _ in range(req.n)]
        held = [[] for _ in range(req.n)]  # forced/required tool calls: the text is only known whole
        calls_sent = [0] * req.n
        last = None

        def call_deltas(index: int, calls: list[ParsedToolCall]) -> dict[str, Any]:
            items = []
            for call in calls:
                items.append({"index": calls_sent[index], **_tool_call_json(call)})
                calls_sent[index] += 1
            return {"tool_calls": items}

        try:
            for i in range(req.n):
                yield chunk([delta_choice(i, {"role": "assistant", "content": ""})])
            async for out in gen:
                last = out
                for c in out.outputs:
                    lp = {"content": chat_logprobs(c.logprobs, texts), "refusal": None} if req.logprobs and c.logprobs else None
                    parser = parsers[c.index]
                    deltas: list[dict[str, Any]] = []
                    if mode.forced_name is not None or mode.required:
                        held[c.index].append(c.text)
                    elif parser is not None:
                        ev = parser.feed(c.text)
                        if ev.content:
                            deltas.append({"content": ev.content})
                        if ev.tool_calls:
                            deltas.append(call_deltas(c.index, ev.tool_calls))
                    elif c.text:
                        deltas.append({"content": c.text})
                    if c.finish_reason is not None:
                        if parser is not None:
                            ev = parser.finish()
                            if ev.content:
                                deltas.append({"content": ev.content})
                            if ev.tool_calls:
                                deltas.append(call_deltas(c.index, ev.tool_calls))
                        elif mode.forced_name is not None or mode.required:
                            content, calls = final_tool_calls(mode, "".join(held[c.index]))
                            if calls:
                                deltas.append(call_deltas(c.index, calls))
                            elif content:
                                deltas.append({"content": content})
                    if not deltas and lp is not None:
                        deltas.append({})
                    for k, delta in enumerate(deltas):
                        yield chunk([delta_choice(c.index, delta, lp if k == 0 else None)])
                    if c.finish_reason is not None:
                        finish = _finish_reason(c.finish_reason, calls_sent[c.index] > 0)
                        yield chunk([delta_choice(c.index, {}, None, finish)])
            if include_usage:
                yield chunk([], usage_body([last]))
            yield SSE_DONE
        except Exception as exc:  # headers are sent: the error can only travel in the stream
            yield stream_failure(exc, gen.request_id)
        finally:
            await gen.close()
