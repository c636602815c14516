"""Constraint (regex / JSON schema / any JSON object) -> TokenTable, with a thread-safe LRU cache bounded in bytes.

Compilation is CPU work of milliseconds to seconds: call it off the event loop (e.g. in a thread pool).
Every compile runs under a `CompileBudget` (wall time and memory-proportional work counters checked while
building), so a hostile constraint fails with `ConstraintTooComplex` in bounded time and memory. Bad,
unsupported or too complex constraints raise ValueError with a message meant for an HTTP 400.
"""
from __future__ import annotations

import dataclasses
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

from jaxserve.constrained.budget import BudgetMeter, CompileBudget, ConstraintTooComplex
from jaxserve.constrained.gc_pause import gc_paused
from jaxserve.constrained.json_schema import JsonSchemaOptions, json_object_regex, json_schema_to_regex
from jaxserve.constrained.regex_dfa import compile_dfa
from jaxserve.constrained.regex_parser import parse_regex
from jaxserve.constrained.token_table import TokenTable
from jaxserve.constrained.token_walk import build_token_table
from jaxserve.constrained.vocab import VocabInfo

CONSTRAINT_KINDS = ("regex", "json_schema", "json_object")


@dataclass(frozen=True)
class CompilerOptions:
    """`budget`: limits of one compile. `cache_bytes`: bound of ConstraintCompiler's cache (sum of the cached
    tables' array bytes). `max_table_states` / `max_table_pairs`: overrides of the budget's fields of the
    same name (None: the budget's value)."""

    budget: CompileBudget = CompileBudget()
    json: JsonSchemaOptions = JsonSchemaOptions()
    cache_bytes: int = 512 << 20
    max_table_states: int | None = None
    max_table_pairs: int | None = None

    def effective_budget(self) -> CompileBudget:
        overrides = {k: v for k, v in (("max_table_states", self.max_table_states),
                                       ("max_table_pairs", self.max_table_pairs)) if v is not None}
        return dataclasses.replace(self.budget, **overrides) if overrides else self.budget


def constraint_regex(kind: str, spec, options: CompilerOptions = CompilerOptions(),
                     meter: BudgetMeter | None = None) -> str:
    """The regex a constraint compiles to (the JSON kinds go through the JSON-schema converter)."""
    meter = BudgetMeter(options.effective_budget()) if meter is None else meter
    if kind == "regex":
        if not isinstance(spec, str):
            raise ValueError(f"regex must be a string, got {type(spec).__name__}")
        return spec
    if kind == "json_schema":
        return json_schema_to_regex(spec, options.json, meter)
    if kind == "json_object":
        return json_object_regex(options.json, meter)
    raise ValueError(f"unknown constraint kind {kind!r}; expected one of {CONSTRAINT_KINDS}")


def compile_constraint(kind: str, spec, vocab: VocabInfo, options: CompilerOptions = CompilerOptions(),
                       meter: BudgetMeter | None = None) -> TokenTable:
    """Compile without caching. `spec`: the regex, the JSON schema (text or dict), or ignored for json_object.
    `meter`: a running budget to charge (e.g. shared with make_grammar); default: a fresh one from `options`.

    Raises ValueError (ConstraintTooComplex past the budget)."""
    meter = BudgetMeter(options.effective_budget()) if meter is None else meter
    with gc_paused():
        try:
            regex = constraint_regex(kind, spec, options, meter)
            dfa = compile_dfa(parse_regex(regex, meter=meter), meter=meter)
            meter.require("max_table_states", dfa.num_states)
            return build_token_table(dfa, vocab, key=cache_key(kind, spec, vocab), meter=meter)
        except RecursionError:  # deep IR trees recurse in the NFA builder and the size estimate
            raise ConstraintTooComplex("nesting depth", "constraint nested too deeply") from None
        except MemoryError:  # a process memory limit hit despite the budget: still the client's constraint
            raise ConstraintTooComplex("memory", "out of memory while compiling") from None


def cache_key(kind: str, spec, vocab: VocabInfo) -> tuple:
    """(kind, spec as canonical text, vocabulary fingerprint): what identifies a compiled table."""
    if not isinstance(spec, str):
        spec = json.dumps(spec, sort_keys=True)
    return (kind, spec, vocab.fingerprint)


class ConstraintCompiler:
    """`compile(kind, spec, vocab)` with an LRU cache keyed by (kind, spec, vocabulary fingerprint), bounded by
    the tables' bytes (`options.cache_bytes`; a table larger than that is returned but not cached).

    Thread-safe; concurrent requests for the same key compile once (later callers wait for the first)."""

    def __init__(self, options: CompilerOptions = CompilerOptions()):
        self.options = options
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, TokenTable] = OrderedDict()
        self._cache_nbytes = 0
        self._in_flight: dict[tuple, threading.Event] = {}
        self.hits = 0
        self.misses = 0

    @property
    def cache_nbytes(self) -> int:
        with self._lock:
            return self._cache_nbytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)

    def compile(self, kind: str, spec, vocab: VocabInfo) -> TokenTable:
        key = cache_key(kind, spec, vocab)
        while True:
            with self._lock:
                table = self._cache.get(key)
                if table is not None:
                    self._cache.move_to_end(key)
                    self.hits += 1
                    return table
                waiter = self._in_flight.get(key)
                if waiter is None:
                    done = threading.Event()
                    self._in_flight[key] = done
                    self.misses += 1
                    break
            waiter.wait()  # another thread compiles it; then re-check the cache (or its error repeats)
        try:
            table = compile_constraint(kind, spec, vocab, self.options)
            with self._lock:
                self._insert(key, table)
            return table
        finally:
            with self._lock:
                del self._in_flight[key]
            done.set()

    def _insert(self, key: tuple, table: TokenTable) -> None:
        size = table.nbytes
        if size > self.options.cache_bytes:
            return
        self._cache[key] = table
        self._cache_nbytes += size
        while self._cache_nbytes > self.options.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cache_nbytes -= old.nbytes
