"""Glue between a route and `AsyncEngine.generate`: bad input surfaces before any byte is sent, a client
disconnect aborts the request at once, and every path closes the engine's iterator."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Iterable, TypeVar

from starlette.requests import Request

from jaxserve.sampling.params import SamplingParams
from jaxserve.server.errors import APIError, ClientDisconnected, engine_error
from jaxserve.server.metrics import RequestTimer, ServerMetrics

if TYPE_CHECKING:
    from jaxserve.engine.async_engine import AsyncEngine
    from jaxserve.engine.request import RequestOutput

logger = logging.getLogger(__name__)
T = TypeVar("T")


def usage_body(last_outputs: "Iterable[RequestOutput | None]") -> dict[str, Any]:
    """OpenAI's `usage` over the latest output of each generation of one HTTP request."""
    outs = [o for o in last_outputs if o is not None]
    prompt = sum(o.num_prompt_tokens for o in outs)
    completion = sum(o.num_output_tokens for o in outs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outs)},
    }


def timed_out(seconds: float) -> APIError:
    return APIError(504, f"the request did not finish within the server's request timeout of {seconds:g} s",
                    type="server_error", code="request_timeout")


class Generation:
    """One engine request, already past the engine's input checks (its first output is in hand).
    Iterating it raises `APIError` for whatever ends it early (engine errors, the request deadline)."""

    def __init__(
        self,
        engine: "AsyncEngine",
        request_id: str,
        iterator: AsyncIterator["RequestOutput"],
        first: "RequestOutput",
        timer: RequestTimer,
        deadline: float | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.engine = engine
        self.request_id = request_id
        self._iterator = iterator
        self._first: "RequestOutput | None" = first
        self._timer = timer
        self._deadline = deadline  # loop.time() by which the request must finish
        self._timeout_s = timeout_s
        self._closed = False
        timer.on_output(time.perf_counter(), first.num_output_tokens)
        self._output_tokens = first.num_output_tokens
        self._finished = first.finished

    def __aiter__(self) -> "Generation":
        return self

    async def __anext__(self) -> "RequestOutput":
        if self._first is not None:
            out, self._first = self._first, None
            return out
        if self._finished:
            raise StopAsyncIteration
        out = await _next_output(self._iterator, self._deadline, self._timeout_s)
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


async def _next_output(iterator: AsyncIterator["RequestOutput"], deadline: float | None,
                       timeout_s: float | None) -> "RequestOutput":
    """The engine's next output, with its exceptions (and the deadline) as APIErrors."""
    try:
        if deadline is None:
            return await iterator.__anext__()
        remaining = deadline - asyncio.get_running_loop().time()
        return await asyncio.wait_for(iterator.__anext__(), max(remaining, 0.0))
    except asyncio.TimeoutError:
        raise timed_out(timeout_s or 0.0) from None
    except StopAsyncIteration:
        raise
    except Exception as exc:
        err = engine_error(exc)
        if err is None:
            raise
        raise err from None


async def start_generation(
    engine: "AsyncEngine",
    metrics: ServerMetrics,
    prompt_ids: list[int],
    params: SamplingParams,
    request_id: str,
    timeout_s: float | None = None,
) -> Generation:
    """Submit and wait for the first output; the engine's errors become their HTTP statuses (bad input 400,
    busy 503, failed 500, past `timeout_s` 504)."""
    start = time.perf_counter()
    deadline = asyncio.get_running_loop().time() + timeout_s if timeout_s is not None else None
    iterator = engine.generate(prompt_ids, params, request_id)
    try:
        first = await _next_output(iterator, deadline, timeout_s)
    except StopAsyncIteration:
        raise APIError(500, "the engine ended the request without any output", type="server_error") from None
    except BaseException:
        engine.abort(request_id)
        await iterator.aclose()
        raise
    metrics.prompt_tokens.inc(first.num_prompt_tokens)
    return Generation(engine, request_id, iterator, first, RequestTimer(metrics, start), deadline, timeout_s)


async def start_generations(
    engine: "AsyncEngine",
    metrics: ServerMetrics,
    prompts: list[list[int]],
    params: SamplingParams,
    request_ids: list[str],
    timeout_s: float | None = None,
) -> list[Generation]:
    """Submit a batch of prompts at once (K prompts cost one time-to-first-token, not K); when any fails,
    the others are closed and the first failure is raised."""
    results = await asyncio.gather(
        *(start_generation(engine, metrics, ids, params, rid, timeout_s) for ids, rid in zip(prompts, request_ids)),
        return_exceptions=True,
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        for r in results:
            if isinstance(r, Generation):
                await r.close()
        raise failures[0]
    return list(results)  # type: ignore[arg-type]


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
