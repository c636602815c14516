"""Glue between a route and `AsyncEngine.generate`: bad input surfaces before any byte is sent, a client
disconnect aborts the request at once, and every path closes the engine's iterator."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, TypeVar

from starlette.requests import Request

from jaxserve.sampling.params import SamplingParams
from jaxserve.server.errors import APIError, ClientDisconnected, bad_request
from jaxserve.server.metrics import RequestTimer, ServerMetrics

if TYPE_CHECKING:
    from jaxserve.engine.engine import AsyncEngine, RequestOutput

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Generation:
    """One engine request, already past the engine's input checks (its first output is in hand)."""

    def __init__(
        self,
        engine: "AsyncEngine",
        request_id: str,
        iterator: AsyncIterator["RequestOutput"],
        first: "RequestOutput",
        timer: RequestTimer,
    ) -> None:
        self.engine = engine
        self.request_id = request_id
        self._iterator = iterator
        self._first: "RequestOutput | None" = first
        self._timer = timer
        self._finished = False
        self._closed = False
        self._output_tokens = 0
        timer_tokens = first.num_output_tokens
        timer.on_output(time.perf_counter(), timer_tokens)
        self._output_tokens = timer_tokens
        self._finished = first.finished

    def __aiter__(self) -> "Generation":
        return self

    async def __anext__(self) -> "RequestOutput":
        if self._first is not None:
            out, self._first = self._first, None
            return out
        if self._finished:
            raise StopAsyncIteration
        out = await self._iterator.__anext__()
        self._timer.on_output(time.perf_counter(), out.num_output_tokens - self._output_tokens)
        self._output_tokens = out.num_output_tokens
        self._finished = out.finished
        return out

    async def close(self) -> None:
        """Abort if unfinished (client gone, error) and release the engine's iterator. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._finished:
            self._timer.on_finish(time.perf_counter())
        else:
            self.engine.abort(self.request_id)
        try:
            await self._iterator.aclose()
        except Exception:  # the request is already aborted; a failing close must not mask the real outcome
            logger.exception("closing the engine iterator of %s failed", self.request_id)


async def start_generation(
    engine: "AsyncEngine",
    metrics: ServerMetrics,
    prompt_ids: list[int],
    params: SamplingParams,
    request_id: str,
) -> Generation:
    """Submit and wait for the first output; the engine's ValueError (bad input) becomes a 400."""
    start = time.perf_counter()
    iterator = engine.generate(prompt_ids, params, request_id)
    try:
        first = await iterator.__anext__()
    except ValueError as exc:
        await iterator.aclose()
        raise bad_request(str(exc)) from None
    except StopAsyncIteration:
        raise APIError(500, "the engine ended the request without any output", type="server_error") from None
    except BaseException:
        engine.abort(request_id)
        await iterator.aclose()
        raise
    metrics.prompt_tokens.inc(first.num_prompt_tokens)
    return Generation(engine, request_id, iterator, first, RequestTimer(metrics, start))


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it as soon as the client disconnects (non-streaming responses)."""
    task = asyncio.ensure_future(work)

    async def wait_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watcher.cancel()
        raise
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass  # the client is gone; nobody will read the outcome
    raise ClientDisconnected()


async def merge_generations(gens: list[Generation]) -> AsyncIterator[tuple[int, "RequestOutput"]]:
    """Interleave several generations' outputs as they arrive, as (generation index, output)."""
    pending: dict[asyncio.Future, int] = {asyncio.ensure_future(g.__anext__()): i for i, g in enumerate(gens)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                try:
                    out = fut.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(gens[i].__anext__())] = i
                yield i, out
    finally:
        for fut in pending:
            fut.cancel()
