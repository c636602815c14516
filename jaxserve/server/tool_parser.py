"""Parse a model's tool-call text into OpenAI `tool_calls`, whole or while streaming.

Two formats are recognised (the common ones of the Llama family and Qwen):
- Hermes / Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number, with ordinary
  text allowed before them.
- Llama 3 JSON: the whole reply is `{"name": ..., "parameters": {...}}` (optionally after
  `<|python_tag|>`), several calls separated by `;`.
Text that does not parse as a call stays content: a tool-call parser must never lose output.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

HERMES_START = "<tool_call>"
HERMES_END = "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class ParsedToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI returns it


@dataclass(frozen=True)
class ParseResult:
    content: str | None
    tool_calls: list[ParsedToolCall]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call_from_json(obj: object) -> ParsedToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        # Some models emit the arguments already serialised; keep them only if they are JSON.
        try:
            json.loads(args)
        except ValueError:
            return None
        text = args
    elif isinstance(args, dict):
        text = json.dumps(args, ensure_ascii=False)
    else:
        return None
    return ParsedToolCall(id=new_call_id(), name=obj["name"], arguments=text)


def _parse_hermes_block(block: str) -> ParsedToolCall | None:
    try:
        return _call_from_json(json.loads(block.strip()))
    except ValueError:
        return None


def _parse_llama3(text: str) -> list[ParsedToolCall] | None:
    """The whole text as `;`-separated JSON calls, or None if any part is not a call."""
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].strip()
    if not body.startswith("{"):
        return None
    decoder = json.JSONDecoder()
    calls: list[ParsedToolCall] = []
    pos = 0
    while pos < len(body):
        try:
            obj, end = decoder.raw_decode(body, pos)
        except ValueError:
            return None
        call = _call_from_json(obj)
        if call is None:
            return None
        calls.append(call)
        pos = end
        while pos < len(body) and body[pos] in " \t\r\n;":
            pos += 1
    return calls or None


def parse_tool_calls(text: str, known_names: set[str] | None = None) -> ParseResult:
    """Split a finished reply into content and tool calls. Calls naming unknown tools stay content."""

    def known(call: ParsedToolCall) -> bool:
        return known_names is None or call.name in known_names

    if HERMES_START in text:
        content_parts: list[str] = []
        calls: list[ParsedToolCall] = []
        rest = text
        while HERMES_START in rest:
            before, _, after = rest.partition(HERMES_START)
            content_parts.append(before)
            block, found_end, rest = after.partition(HERMES_END)
            call = _parse_hermes_block(block)
            if call is not None and known(call):
                calls.append(call)
            else:
                content_parts.append(HERMES_START + block + (HERMES_END if found_end else ""))
        content_parts.append(rest)
        if calls:
            content = "".join(content_parts).strip()
            return ParseResult(content=content or None, tool_calls=calls)
        return ParseResult(content=text, tool_calls=[])
    llama_calls = _parse_llama3(text)
    if llama_calls and all(known(c) for c in llama_calls):
        return ParseResult(content=None, tool_calls=llama_calls)
    return ParseResult(content=text, tool_calls=[])


@dataclass
class StreamEvent:
    """What a streaming parser releases: content text and/or finished tool calls."""

    content: str = ""
    tool_calls: list[ParsedToolCall] = field(default_factory=list)


class StreamingToolParser:
    """Feed text deltas; get back what can be shown now.

    Content is released as soon as it cannot be the start of a call: text that might begin `<tool_call>`
    is held until it resolves, and a reply whose first non-blank character is `{` (or `<|python_tag|>`)
    is held whole, because Llama 3 calls are only recognisable once complete. Each call is released in one
    delta when its closing tag (or the end of the reply) arrives.
    """

    def __init__(self, known_names: set[str] | None = None) -> None:
        self._known = known_names
        self._pending = ""  # text not yet released
        self._in_call = False
        self._decided = False
        self._hold_all = False  # Llama 3 style: decide at the end
        self.emitted_calls = 0

    def feed(self, delta: str) -> StreamEvent:
        self._pending += delta
        event = StreamEvent()
        if not self._decided:
            stripped = self._pending.lstrip()
            if not stripped or (len(stripped) < len(PYTHON_TAG) and PYTHON_TAG.startswith(stripped)):
                return event  # cannot tell yet whether this is a Llama 3 call
            self._decided = True
            self._hold_all = stripped.startswith("{") or stripped.startswith(PYTHON_TAG)
        if self._hold_all:
            return event
        self._drain(event)
        return event

    def _drain(self, event: StreamEvent) -> None:
        while True:
            if self._in_call:
                block, found, rest = self._pending.partition(HERMES_END)
                if not found:
                    return
                call = _parse_hermes_block(block)
                if call is not None and (self._known is None or call.name in self._known):
                    event.tool_calls.append(call)
                    self.emitted_calls += 1
                else:
                    event.content += HERMES_START + block + HERMES_END
                self._pending = rest
                self._in_call = False
                continue
            idx = self._pending.find(HERMES_START)
            if idx >= 0:
                event.content += self._pending[:idx]
                self._pending = self._pending[idx + len(HERMES_START):]
                self._in_call = True
                continue
            # Keep back a suffix that could still grow into `<tool_call>`.
            keep = 0
            for k in range(min(len(HERMES_START) - 1, len(self._pending)), 0, -1):
                if HERMES_START.startswith(self._pending[-k:]):
                    keep = k
                    break
            cut = len(self._pending) - keep
            event.content += self._pending[:cut]
            self._pending = self._pending[cut:]
            return

    def finish(self) -> StreamEvent:
        """The reply ended: release everything still held."""
        event = StreamEvent()
        if self._hold_all:
            result = parse_tool_calls(self._pending, self._known)
            event.content = result.content or ""
            event.tool_calls = result.tool_calls
            self.emitted_calls += len(result.tool_calls)
            # Hermes calls after a leading "{...}" reply are handled by parse_tool_calls as well.
        elif self._in_call:
            call = _parse_hermes_block(self._pending)  # a call cut short by max_tokens / stop
            if call is not None and (self._known is None or call.name in self._known):
                event.tool_calls.append(call)
                self.emitted_calls += 1
            else:
                event.content = HERMES_START + self._pending
        else:
            event.content = self._pending
        self._pending = ""
        self._in_call = False
        return event
