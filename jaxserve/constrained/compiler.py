"""Constraint (regex / JSON schema / any JSON object) -> TokenTable, with a thread-safe LRU cache.

Compilation is CPU work of milliseconds to seconds: call it off the event loop (e.g. in a thread pool).
Bad or unsupported constraints raise ValueError with a message meant for an HTTP 400.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from jaxserve.constrained.json_schema import JsonSchemaOptions, json_object_regex, json_schema_to_regex
from jaxserve.constrained.regex_dfa import DfaLimits, compile_dfa
from jaxserve.constrained.regex_parser import parse_regex
from jaxserve.constrained.token_table import TokenTable
from jaxserve.constrained.token_walk import DEFAULT_MAX_PAIRS, build_token_table
from jaxserve.constrained.vocab import VocabInfo

CONSTRAINT_KINDS = ("regex", "json_schema", "json_object")


@dataclass(frozen=True)
class CompilerOptions:
    limits: DfaLimits = DfaLimits()
    json: JsonSchemaOptions = JsonSchemaOptions()
    cache_entries: int = 256
    max_table_states: int = 8192  # rows one grammar may take in the device pool
    max_table_pairs: int = DEFAULT_MAX_PAIRS


def constraint_regex(kind: str, spec: str, options: CompilerOptions = CompilerOptions()) -> str:
    """The regex a constraint compiles to (the JSON kinds go through the JSON-schema converter)."""
    if kind == "regex":
        return spec
    if kind == "json_schema":
        return json_schema_to_regex(spec, options.json)
    if kind == "json_object":
        return json_object_regex(options.json)
    raise ValueError(f"unknown constraint kind {kind!r}; expected one of {CONSTRAINT_KINDS}")


def compile_constraint(kind: str, spec: str, vocab: VocabInfo,
                       options: CompilerOptions = CompilerOptions()) -> TokenTable:
    """Compile without caching. `spec`: the regex, the JSON schema (text or dict), or ignored for json_object."""
    regex = constraint_regex(kind, spec, options)
    dfa = compile_dfa(parse_regex(regex), options.limits)
    if dfa.num_states > options.max_table_states:
        raise ValueError(f"constraint too complex: {dfa.num_states} automaton states "
                         f"(limit {options.max_table_states})")
    return build_token_table(dfa, vocab, key=_cache_key(kind, spec, vocab), max_pairs=options.max_table_pairs)


def _cache_key(kind: str, spec, vocab: VocabInfo) -> tuple:
    if not isinstance(spec, str):
        import json

        spec = json.dumps(spec, sort_keys=True)
    return (kind, spec, vocab.fingerprint)


class ConstraintCompiler:
    """`compile(kind, spec, vocab)` with an LRU cache keyed by (kind, spec, vocabulary fingerprint).

    Thread-safe; concurrent requests for the same key compile once (later callers wait for the first)."""

    def __init__(self, options: CompilerOptions = CompilerOptions()):
        self.options = options
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, TokenTable] = OrderedDict()
        self._in_flight: dict[tuple, threading.Event] = {}
        self.hits = 0
        self.misses = 0

    def compile(self, kind: str, spec, vocab: VocabInfo) -> TokenTable:
        key = _cache_key(kind, spec, vocab)
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
                self._cache[key] = table
                while len(self._cache) > self.options.cache_entries:
                    self._cache.popitem(last=False)
            return table
        finally:
            with self._lock:
                del self._in_flight[key]
            done.set()
