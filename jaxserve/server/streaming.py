"""Server-Sent Events framing, OpenAI style: `data: <json>\\n\\n` per event, `data: [DONE]\\n\\n` last."""
from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator

from fastapi.responses import StreamingResponse

from jaxserve.server.errors import APIError

logger = logging.getLogger(__name__)

SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(payload: dict[str, Any]) -> bytes:
    # Compact separators and ensure_ascii=False: what OpenAI sends; JSON never holds a raw newline.
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


def sse_response(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


def stream_failure(exc: Exception, request_id: str) -> bytes:
    """The end of a stream that failed after its headers were sent: the error envelope as a last event,
    then [DONE]. An APIError (engine error, timeout) carries its own message; anything else is a bug."""
    if not isinstance(exc, APIError):
        logger.exception("generation %s failed mid-stream", request_id)
        exc = APIError(500, f"generation failed: {type(exc).__name__}", type="server_error")
    return sse_event(exc.body()) + SSE_DONE


def parse_sse(body: str) -> list[str]:
    """Split an SSE body into its `data:` payloads (used by tests and the benchmark's sanity checks).

    Raises ValueError on anything that is not a well-formed OpenAI event stream.
    """
    if not body.endswith("\n\n"):
        raise ValueError("SSE stream does not end with a blank line")
    payloads = []
    for block in body[:-2].split("\n\n"):
        if not block.startswith("data: ") or "\n" in block:
            raise ValueError(f"malformed SSE event: {block[:80]!r}")
        payloads.append(block[len("data: "):])
    return payloads
