"""ConstraintService: constraint -> Grammar for the engine, with a byte-bounded cache and its own thread pool.

Why a service: a compile takes milliseconds to seconds of CPU, and a hostile one runs until its budget
stops it, so compiles must neither block the event loop, nor starve tokenization on asyncio's default
executor, nor make a cache hit wait behind them. Hence:
  - no lock is held while compiling (the lock guards only the cache, the in-flight map and the counters);
  - a miss runs on the service's own bounded ThreadPoolExecutor; past `max_pending` distinct compiles
    queued or running, new misses get `ConstraintServiceBusy` (HTTP 503 + Retry-After, not the client's fault);
  - concurrent requests for one constraint share one compile (one Future per key);
  - one `BudgetMeter` covers the whole compile, table and grammar, so the deadline bounds both;
  - the cache holds Grammars up to `cache_bytes` of their arrays, least recently used evicted first.
"""
from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from jaxserve.constrained.budget import BudgetMeter, ConstraintTooComplex
from jaxserve.constrained.compiler import CompilerOptions, cache_key, compile_constraint
from jaxserve.constrained.grammar import Grammar, make_grammar
from jaxserve.constrained.host_matcher import ClosingRows, HostGrammar, compile_host_grammar
from jaxserve.constrained.json_schema import UnsupportedSchema
from jaxserve.constrained.vocab import VocabInfo
from jaxserve.sampling.params import Constraint


class ConstraintServiceBusy(RuntimeError):
    """Too many compiles queued or running: retry later (not a ValueError: the constraint may be fine)."""

    def __init__(self, pending: int, retry_after_s: float = 1.0):
        super().__init__(f"constraint compiler busy: {pending} compiles queued or running; retry later")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class ConstraintServiceStats:
    hits: int  # answered from the cache
    misses: int  # compiles started (a request joining another's compile of the same key counts as neither)
    too_complex: int  # compiles that ended in ConstraintTooComplex
    host_matched: int  # compiles the host matcher took (the device path refused, or was still compiling)
    host_while_device_compiles: int  # of those: the device compile outlived device_wait_s and went on
    upgraded: int  # cached host grammars replaced by their finished device compile
    invalid: int  # compiles that ended in another ValueError (bad or unsupported constraint)
    busy: int  # requests refused with ConstraintServiceBusy
    in_flight: int  # distinct compiles queued or running now
    cached: int  # grammars in the cache
    cache_bytes: int  # their bytes


def constraint_key(constraint: Constraint) -> tuple:
    """Cache key of a constraint (one vocabulary per service, so the vocabulary is not part of it)."""
    spec = constraint.spec
    if not isinstance(spec, str):
        spec = json.dumps(spec, sort_keys=True)
    return (constraint.kind, "" if constraint.kind == "json_object" else spec)


class ConstraintService:
    """Thread-safe constraint -> Grammar compiler with a byte-bounded cache.

    `token_bytes_fn`: returns the vocabulary's bytes per token id (None for special tokens); called once, at
    the first miss. `end_token_ids`, `vocab_width`: as for VocabInfo. `options.budget` limits each compile.
    `max_workers`: threads of the service's pool (compile_async). `max_pending`: distinct compiles queued or
    running beyond which a new miss raises ConstraintServiceBusy. `cache_bytes`: bound of the grammar cache
    (sum of `Grammar.nbytes`; a grammar bigger than this is returned but not cached). `host_tokenizer_fn`:
    builds the host matcher's tokenizer (None: no host path). `device_wait_s`: with a host path, how long a
    request waits for the device compile before the host matcher takes it (None: until the device path
    answers; see `_compile`)."""

    def __init__(self, token_bytes_fn: Callable[[], Sequence[bytes | None]], end_token_ids: tuple[int, ...],
                 vocab_width: int, options: CompilerOptions = CompilerOptions(), max_workers: int = 2,
                 max_pending: int = 64, cache_bytes: int = 1 << 30,
                 host_tokenizer_fn: Callable[[], Any] | None = None, device_wait_s: float | None = None):
        if max_workers < 1 or max_pending < 1 or cache_bytes < 0:
            raise ValueError("max_workers and max_pending must be >= 1, cache_bytes >= 0")
        self.options = options
        self.max_pending = max_pending
        self.cache_bytes_limit = cache_bytes
        self._token_bytes_fn = token_bytes_fn
        self._end_token_ids = tuple(int(e) for e in end_token_ids)
        self._vocab_width = int(vocab_width)
        self._vocab: VocabInfo | None = None
        # The host matcher's tokenizer (llguidance), built at its first use; None: no host path.
        self._host_tokenizer_fn = host_tokenizer_fn
        self._host_tokenizer: Any = None
        self._closing_rows: ClosingRows | None = None
        self._vocab_lock = threading.Lock()  # held only while the vocabulary is built, never for a cache hit
        self._lock = threading.Lock()  # cache, in-flight map and counters; never held during a compile
        self._cache: OrderedDict[tuple, Grammar] = OrderedDict()
        self._cache_nbytes = 0
        self._in_flight: dict[tuple, Future] = {}
        self._hits = self._misses = self._too_complex = self._invalid = self._busy = self._host = 0
        self._early_host = self._upgraded = self._background = 0
        self._hosted_early: set[tuple] = set()  # keys whose request took the host matcher while the device compiled
        self.device_wait_s = device_wait_s
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="constraint-compile")
        # Device compiles when a host path can take a request that waited `device_wait_s` for one.
        self._device_executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="constraint-device")

    # ------------------------------------------------------------ public API

    def compile(self, constraint: Constraint) -> Grammar:
        """Blocking compile (cached). Raises ValueError (ConstraintTooComplex past the budget) for a bad
        constraint, ConstraintServiceBusy when max_pending compiles are already queued or running."""
        key = constraint_key(constraint)
        grammar, fut, owner = self._lookup(key, lambda: Future())
        if grammar is not None:
            return grammar
        if owner:
            fut.set_running_or_notify_cancel()
            try:
                fut.set_result(self._build(key, constraint))
            except BaseException as e:  # the waiters get the same error; nothing is cached
                fut.set_exception(e)
        return fut.result()

    async def compile_async(self, constraint: Constraint) -> Grammar:
        """Like `compile`, for the event loop: hits are answered inline, misses run on the service's own pool
        (never asyncio's default executor). Cancelling the caller does not cancel a compile others may share."""
        key = constraint_key(constraint)
        grammar, fut, _ = self._lookup(key, lambda: self._executor.submit(self._build, key, constraint))
        if grammar is not None:
            return grammar
        return await asyncio.shield(asyncio.wrap_future(fut))

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def stats(self) -> ConstraintServiceStats:
        with self._lock:
            return ConstraintServiceStats(hits=self._hits, misses=self._misses, too_complex=self._too_complex, host_matched=self._host,
                                          host_while_device_compiles=self._early_host, upgraded=self._upgraded,
                                          invalid=self._invalid, busy=self._busy, in_flight=len(self._in_flight),
                                          cached=len(self._cache), cache_bytes=self._cache_nbytes)

    def vocab(self) -> VocabInfo:
        """The vocabulary, built at the first call (others wait for it; cache hits never call this)."""
        vocab = self._vocab
        if vocab is None:
            with self._vocab_lock:
                if self._vocab is None:
                    self._vocab = VocabInfo.from_token_bytes(self._token_bytes_fn(), eos_token_ids=self._end_token_ids,
                                                             vocab_width=self._vocab_width)
                vocab = self._vocab
        return vocab

    def close(self) -> None:
        """Stop the pool; queued compiles are cancelled (their waiters get CancelledError)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._device_executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ internals

    def _lookup(self, key: tuple, start: Callable[[], Future]) -> tuple[Grammar | None, Future | None, bool]:
        """(cached grammar, None, False) on a hit; else (None, future of the key's compile, started here?).
        `start` makes the future of a new compile (called under the lock: it must not block)."""
        with self._lock:
            grammar = self._cache.get(key)
            if grammar is not None:
                self._cache.move_to_end(key)
                self._hits += 1
                return grammar, None, False
            fut = self._in_flight.get(key)
            if fut is not None:
                return None, fut, False
            if len(self._in_flight) >= self.max_pending:
                self._busy += 1
                raise ConstraintServiceBusy(len(self._in_flight))
            self._misses += 1
            fut = start()
            self._in_flight[key] = fut
        # Safety net: a compile cancelled before it ran (pool shut down) must not stay "in flight" forever.
        fut.add_done_callback(lambda f: self._forget(key, f))
        return None, fut, True

    def _forget(self, key: tuple, fut: Future) -> None:
        with self._lock:
            if self._in_flight.get(key) is fut:
                del self._in_flight[key]

    def host_tokenizer(self) -> Any:
        """The host matcher's tokenizer, built at the first call (None when there is no host path)."""
        if self._host_tokenizer_fn is None:
            return None
        with self._vocab_lock:
            if self._host_tokenizer is None:
                self._host_tokenizer = self._host_tokenizer_fn()
            return self._host_tokenizer

    def _host_closing(self, vocab: VocabInfo) -> ClosingRows:
        with self._vocab_lock:
            if self._closing_rows is None:
                self._closing_rows = ClosingRows.from_vocab(vocab.tokens, vocab.eos_token_ids,
                                                            -(-self._vocab_width // 32))
            return self._closing_rows

    def _compile_device(self, constraint: Constraint, vocab: VocabInfo) -> Grammar:
        meter = BudgetMeter(self.options.effective_budget())
        table = compile_constraint(constraint.kind, constraint.spec, vocab, self.options, meter)
        return make_grammar(table, meter)

    def _compile_host(self, constraint: Constraint, vocab: VocabInfo) -> HostGrammar:
        grammar = compile_host_grammar(
            constraint.kind, constraint.spec, self.host_tokenizer(), cache_key(constraint.kind, constraint.spec, vocab),
            self._host_closing(vocab), BudgetMeter(self.options.effective_budget()))
        with self._lock:
            self._host += 1
        return grammar

    def _compile(self, key: tuple, constraint: Constraint) -> Grammar | HostGrammar:
        """The device path; where it refuses a valid constraint it cannot express (or one past its budget),
        the host matcher under a budget of its own. When both refuse, the device path's error stands (with
        the host matcher's reason).

        With a host path, the request waits at most `device_wait_s` for the device compile: past that the
        host matcher takes this request while the device compile goes on in the background and, when it
        succeeds, replaces the cached host grammar, so later requests with this constraint get the device
        path. At most `max_pending` such background compiles at once (past that, requests wait for theirs)."""
        vocab = self.vocab()  # outside the budget: a one-time cost of the server, not of the constraint
        hosted = self._host_tokenizer_fn is not None and constraint.kind in ("json_schema", "regex")
        with self._lock:
            early = hosted and self.device_wait_s is not None and self._background < self.max_pending
            if early:
                self._background += 1
        if not early:
            try:
                return self._compile_device(constraint, vocab)
            except ValueError as device_error:
                return self._fallback(constraint, vocab, device_error)
        device = self._device_executor.submit(self._compile_device, constraint, vocab)
        device.add_done_callback(lambda f: self._device_done(key, f))
        try:
            return device.result(timeout=self.device_wait_s)
        except FutureTimeout:
            pass
        except ValueError as device_error:
            return self._fallback(constraint, vocab, device_error)
        try:
            grammar = self._compile_host(constraint, vocab)
        except ValueError:
            try:  # the host matcher cannot take it: the device path's answer, however long (budgeted)
                return device.result()
            except ValueError as device_error:
                return self._fallback(constraint, vocab, device_error)
        with self._lock:
            if device.done() and not device.cancelled() and device.exception() is None:
                return device.result()  # finished while the host matcher built: the device path after all
            self._hosted_early.add(key)  # from here, _device_done replaces the cached host grammar
            self._early_host += 1
        return grammar

    def _device_done(self, key: tuple, device: Future) -> None:
        """A device compile that may have outlived its request: a success replaces the cached host grammar."""
        grammar = None if device.cancelled() or device.exception() is not None else device.result()
        with self._lock:
            self._background -= 1
            if key not in self._hosted_early:
                return  # its request waited for it (or it failed before the host matcher took over)
            self._hosted_early.discard(key)
            if grammar is not None:
                # The request may still be caching its host grammar: `_insert` never lets that replace these.
                self._insert(key, grammar)
                self._upgraded += 1

    def _fallback(self, constraint: Constraint, vocab: VocabInfo, device_error: ValueError) -> HostGrammar:
        eligible = isinstance(device_error, ConstraintTooComplex) or (
            constraint.kind == "json_schema" and isinstance(device_error, UnsupportedSchema))
        if not eligible or self._host_tokenizer_fn is None:
            raise device_error
        try:
            return self._compile_host(constraint, vocab)
        except ValueError as host_error:
            device_error.args = (f"{device_error}; the host matcher refused it too: {str(host_error)[:300]}",)
            raise device_error from host_error

    def _build(self, key: tuple, constraint: Constraint) -> Grammar | HostGrammar:
        try:
            grammar = self._compile(key, constraint)
        except ConstraintTooComplex:
            with self._lock:
                self._too_complex += 1
                self._in_flight.pop(key, None)
            raise
        except ValueError:
            with self._lock:
                self._invalid += 1
                self._in_flight.pop(key, None)
            raise
        except BaseException:
            with self._lock:
                self._in_flight.pop(key, None)
            raise
        with self._lock:  # cache it and leave the in-flight map in one step: no window for a second compile
            self._insert(key, grammar)
            self._in_flight.pop(key, None)
        return grammar

    def _insert(self, key: tuple, grammar: Grammar | HostGrammar) -> None:
        old = self._cache.get(key)
        if isinstance(grammar, HostGrammar) and isinstance(old, Grammar):
            return  # its device compile finished first: later requests get the device path
        if old is not None:
            self._cache_nbytes -= self._cache.pop(key).nbytes
        size = grammar.nbytes
        if size > self.cache_bytes_limit:
            return
        self._cache[key] = grammar
        self._cache_nbytes += size
        while self._cache_nbytes > self.cache_bytes_limit:
            _, old = self._cache.popitem(last=False)
            self._cache_nbytes -= old.nbytes
