"""`AsyncEngine`: an `LLMEngine` on its own thread, with admission control, a watchdog and per-request
error delivery; the asyncio side only enqueues and awaits outputs."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
import uuid
from typing import AsyncIterator

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.engine.engine import EngineStats, LLMEngine
from jaxserve.engine.errors import EngineBusy, EngineDead, RequestFailed
from jaxserve.engine.request import RequestOutput
from jaxserve.sampling.params import SamplingParams
from jaxserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)


BACKGROUND_COMPILE_GRACE_S = 120.0  # how long shutdown waits for the program compiling in the background


class AsyncEngine:
    """Runs an `LLMEngine` on its own thread; the asyncio side only enqueues and awaits outputs.

    Admission counts every request submitted but not yet producing output (compiling its constraint, in
    the inbox, waiting, prefilling). A watchdog thread notices a dead or stuck engine thread; from then on
    `dead_reason` says why, every waiting client gets `EngineDead` at once and new requests are refused."""

    def __init__(self, engine: LLMEngine, *, stuck_step_timeout_s: float | None = None,
                 watchdog_interval_s: float = 1.0) -> None:
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._not_started: set[str] = set()
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._stopping = threading.Event()
        self._step_started: float | None = None  # monotonic start of the step running now
        self.stuck_step_timeout_s = (engine.config.stuck_step_timeout_s if stuck_step_timeout_s is None
                                     else stuck_step_timeout_s)
        self.watchdog_interval_s = watchdog_interval_s
        self.dead_reason: str | None = None
        self.draining = False  # shutting down: no new requests
        self._closing_reason: str | None = None  # set by fail_all: requests not yet in the engine are refused
        self.ready = False

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncEngine":
        return cls(LLMEngine(config))

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def model_config(self) -> ModelConfig:
        return self.engine.model_config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def program_sets(self) -> list:
        """The compiled-program sets of the engine(s) behind this one (start-up reporting, shutdown)."""
        return [self.engine.runner.programs]

    def stats(self) -> EngineStats:
        return dataclasses.replace(self.engine.stats(), num_queued=len(self._not_started))

    @property
    def num_queued(self) -> int:
        """Requests admitted but not yet producing output."""
        return len(self._not_started)

    @property
    def num_active(self) -> int:
        """Requests admitted and not yet finished (queued or running)."""
        return len(set(self._streams) | self._not_started)

    def check_admission(self) -> None:
        """Raise EngineDead / EngineBusy when a new request cannot be taken now."""
        if self.dead_reason is not None:
            raise EngineDead(self.dead_reason)
        if self.draining:
            raise EngineBusy("the server is shutting down and takes no new requests")
        if not self.ready:
            raise EngineBusy("the engine is not started")
        limit = self.engine.config.max_queued_requests
        if len(self._not_started) >= limit:
            raise EngineBusy(f"the server is overloaded: {limit} requests are already queued; retry later")

    async def start(self, progress=None) -> None:
        """Make the step programs ready (the essential ones; the rest compile in the background when the config
        says so), then start the engine thread and its watchdog."""
        if self._thread is not None:
            return
        await asyncio.to_thread(self.engine.warmup, progress, self.engine.config.compile_in_background)
        self._thread = threading.Thread(target=self._loop, name="jaxserve-engine", daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(target=self._watch, name="jaxserve-engine-watchdog", daemon=True)
        self._watchdog.start()
        self.ready = True

    async def shutdown(self) -> None:
        self._stopping.set()
        # No new background compile starts; the one in flight is let finish (a process that exits while XLA
        # compiles on another thread aborts in C++).
        programs = self.engine.runner.programs
        programs.stop_background()
        await asyncio.to_thread(programs.wait_background, BACKGROUND_COMPILE_GRACE_S)
        self._inbox.put(("wake",))
        if self._thread is not None:
            # A dead engine's thread may be stuck in a step that never returns: do not wait long for it.
            await asyncio.to_thread(self._thread.join, 1.0 if self.dead_reason else 30.0)
        self._thread = None
        if self.dead_reason is None:
            self.engine.runner.save_bucket_use()  # the next start compiles what this traffic used first
        for rid in list(self._streams):
            self._deliver(rid, EngineBusy("the server is shutting down"))
        self._streams.clear()
        self.ready = False

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    async def flush_prefix_cache(self) -> int:
        """Drop the cached prefixes (on the engine thread); ValueError while requests run."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        self._inbox.put(("flush", loop, done))
        return await done

    def fail_all(self, reason: str) -> None:
        """Answer every request in the engine with EngineBusy(reason) (graceful shutdown ran out of time)."""
        self._closing_reason = reason
        self._inbox.put(("fail_all", reason))

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        self.check_admission()
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams or request_id in self._not_started:
            raise ValueError(f"duplicate request id {request_id!r}")
        max_tokens = self.engine.validate(prompt_ids, params)
        self._not_started.add(request_id)
        finished = False
        try:
            grammar = None
            if params.constraint is not None:
                grammar = await self.engine.compile_constraint_async(params.constraint)
                self.engine.check_budget(grammar, max_tokens)
            loop = asyncio.get_running_loop()
            q: asyncio.Queue = asyncio.Queue()
            self._streams[request_id] = (loop, q)
            if self.dead_reason is not None:  # died while this request compiled: nobody would answer it
                raise EngineDead(self.dead_reason)
            if self._closing_reason is not None:  # the drain answered everyone while this one compiled
                raise EngineBusy(self._closing_reason)
            self._inbox.put(("add", request_id, list(prompt_ids), params, grammar))
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine has already dropped it
                    raise item
                self._not_started.discard(request_id)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._not_started.discard(request_id)
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    # -- engine thread -----------------------------------------------------------------------------
    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, q = stream
            if isinstance(item, RequestOutput) and item.error is not None:
                item = RequestFailed(item.error)
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the client's event loop is closed: nobody is waiting
                pass

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "add":
            _, rid, ids, params, grammar = msg
            try:
                self.engine.add_request(rid, ids, params, grammar)
            except (ValueError, EngineBusy) as e:
                self._deliver(rid, e)
            except Exception as e:  # a bug or an injected fault while preparing: this request alone fails
                log.exception("adding request %s failed", rid)
                self.engine.abort(rid)
                self._deliver(rid, RequestFailed(f"the request failed in the engine while being added: "
                                                 f"{type(e).__name__}: {e}"))
        elif kind == "abort":
            self.engine.abort(msg[1])
        elif kind == "flush":
            _, loop, done = msg
            try:
                result = self.engine.flush_prefix_cache()
            except ValueError as e:
                loop.call_soon_threadsafe(done.set_exception, e)
            else:
                loop.call_soon_threadsafe(done.set_result, result)
        elif kind == "fail_all":
            for out in self.engine.fail_all(msg[1]):
                self._deliver(out.request_id, EngineBusy(msg[1]))

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # noqa: BLE001 - whatever ends the thread must be reported
            log.exception("the engine thread died")
            self._die(f"the engine thread died: {type(e).__name__}: {e}")

    def _serve(self) -> None:
        while not self._stopping.is_set() and self.dead_reason is None:
            try:
                block = not self.engine.has_work()
                while True:
                    msg = self._inbox.get(block=block, timeout=0.5 if block else None)
                    self._handle(msg)
                    block = False
            except queue.Empty:
                pass
            if self._stopping.is_set() or self.dead_reason is not None:
                break
            if not self.engine.has_work():
                continue
            self._step_started = time.monotonic()
            try:
                outputs = self.engine.step()
            except EngineDead as e:
                log.exception("the engine cannot continue")
                self._die(str(e))
                return
            except Exception as e:  # a bug outside any one request's work: the step's requests all fail
                log.exception("engine step failed")
                outputs = self.engine.fail_all(f"an engine step failed: {type(e).__name__}: {e}")
                if self.engine.runner.state_lost() or self.engine.allocator.num_used:
                    self._die(f"an engine step failed and left the engine inconsistent: {type(e).__name__}: {e}")
                    return
            finally:
                self._step_started = None
            for out in outputs:
                self._deliver(out.request_id, out)
        for rid in list(self.engine._requests):
            out = self.engine.abort(rid)
            if out is not None:
                self._deliver(rid, out)

    def _watch(self) -> None:
        while not self._stopping.wait(self.watchdog_interval_s):
            thread = self._thread
            if thread is not None and not thread.is_alive():
                self._die("the engine thread exited unexpectedly")
                return
            started = self._step_started
            if started is not None and time.monotonic() - started > self.stuck_step_timeout_s:
                self._die(f"an engine step has not returned for more than {self.stuck_step_timeout_s:g} s")
                return

    def _die(self, reason: str) -> None:
        """The engine cannot serve any more: say so to every waiting client and to /health."""
        if self.dead_reason is None:
            self.dead_reason = reason
            log.error("engine is dead: %s", reason)
        for rid in list(self._streams):
            self._deliver(rid, EngineDead(reason))
