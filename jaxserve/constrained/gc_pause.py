"""Pause Python's cyclic garbage collector while a constraint compiles.

A compile allocates hundreds of thousands of small lists, tuples and sets (NFA edges, DFA-state sets, the
token walk). Each allocation burst triggers collections, and the older generations are walked over the
whole process heap (the tokenizer, the vocabulary, the server's modules), so with the collector on a large
compile ran 2.7x slower (big_enum_long_strings, the default model's vocabulary: 4.8 s vs 1.8 s), and a
compile's time budget could be spent in collections. A compile's structures hold no reference cycles and
its memory is bounded by its budget, so nothing is lost by collecting after it instead of during it.

The collector is process-wide and compiles run on several threads at once, so pauses are counted: the
collector comes back on when the last paused compile ends, and only if it was on when the first began.
Other threads' cyclic garbage waits meanwhile; so that back-to-back overlapping compiles cannot keep it
waiting for long, a compile that ends while others still run collects once the collector has been off for
`MAX_PAUSE_S`.
"""
from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
import time
from contextlib import contextmanager

MAX_PAUSE_S = 10.0


class _GcPauses:
    """Counts the compiles that want the collector off (the one process-wide collector needs one counter)."""

    def __init__(self, max_pause_s: float = MAX_PAUSE_S, clock=time.monotonic) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._was_enabled = False
        self._since = 0.0
        self._max_pause_s = max_pause_s
        self._clock = clock

    @contextmanager
    def paused(self) -> Iterator[None]:
        with self._lock:
            if self._active == 0:
                self._was_enabled = gc.isenabled()
                self._since = self._clock()
                gc.disable()
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0:
                    if self._was_enabled:
                        gc.enable()
                elif self._was_enabled and self._clock() - self._since > self._max_pause_s:
                    gc.collect()  # others still compile: catch up on what waited, then stay paused
                    self._since = self._clock()


_PAUSES = _GcPauses()


def gc_paused():
    """Context manager: the cyclic collector is off inside (re-entrant and thread-safe)."""
    return _PAUSES.paused()
