"""Hard budgets for one constraint compile: wall time plus work counters proportional to memory.

A hostile schema or regex can make any stage blow up (exponential regex text from optional properties,
huge NFAs from counted repetition, subset construction holding 10^9 set elements, tables of states x
vocabulary). Python threads cannot be killed, so every stage checks a shared `BudgetMeter` while it
builds (inner loops every few thousand iterations), not after: a compile finishes or fails with
`ConstraintTooComplex` within about `max_seconds` (+ ~0.2 s) and its extra memory stays bounded.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields


class ConstraintTooComplex(ValueError):
    """The constraint exceeds a compile budget. A ValueError so servers answer HTTP 400; the message starts
    with "constraint too complex:" and names the budget."""

    def __init__(self, budget: str, detail: str):
        super().__init__(f"constraint too complex: {budget} budget exceeded ({detail})")
        self.budget = budget


@dataclass(frozen=True)
class CompileBudget:
    """Limits of one compile. The defaults keep the extra peak memory of a compile near 0.5 GB (see the
    per-field notes) and its wall time under ~4 s on a 2-core machine, while compiling nearly everything in
    JSONSchemaBench (Github_easy, Glaiveai2K) that compiled without budgets."""

    max_seconds: float = 3.5  # wall clock for the whole compile (schema -> table -> grammar)
    # JSON schema -> regex: cumulative characters of every regex fragment built (bounds converter memory
    # and time, ~1 byte each) and the length of any one fragment (the regex parser takes ~2-5 us a char).
    max_schema_work_chars: int = 30_000_000
    max_regex_chars: int = 400_000
    max_ir_nodes: int = 200_000  # regex IR nodes after expanding nothing (parser work)
    max_nfa_states: int = 400_000  # Thompson NFA states (~250 bytes each with their edge lists)
    # Subset construction: NFA-state references held in DFA-state sets and epsilon closures (~40 bytes each
    # as frozenset entries), plus the transition sweep's (edge x boundary) visits, which are time.
    max_subset_elements: int = 4_000_000
    max_subset_work: int = 200_000_000
    max_dfa_states: int = 20_000  # before minimization
    max_table_states: int = 8192  # minimal DFA states: rows one grammar takes in the device pool
    max_walk_items: int = 12_000_000  # live (state, trie node) triples of the token walk, ~24 bytes each
    max_table_pairs: int = 8_000_000  # allowed (state, token) pairs, ~50 bytes each while building
    max_table_bytes: int = 256 << 20  # token table + grammar arrays (masks, closing masks, class table)

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"CompileBudget.{f.name} must be positive")


class BudgetMeter:
    """Running counters of one compile against a `CompileBudget`. Not thread-safe: one per compile."""

    __slots__ = ("budget", "deadline", "used", "_clock")

    def __init__(self, budget: CompileBudget = CompileBudget(), clock=time.monotonic):
        self.budget = budget
        self._clock = clock
        self.deadline = clock() + budget.max_seconds
        self.used: dict[str, int] = {}

    def check_time(self, stage: str) -> None:
        if self._clock() > self.deadline:
            raise ConstraintTooComplex("compile time", f"more than {self.budget.max_seconds:g} s, during {stage}")

    def charge(self, counter: str, amount: int) -> None:
        """Add `amount` to `counter` (a CompileBudget field name) and raise once over its limit."""
        total = self.used.get(counter, 0) + int(amount)
        self.used[counter] = total
        limit = getattr(self.budget, counter)
        if total > limit:
            raise ConstraintTooComplex(counter.removeprefix("max_").replace("_", " "),
                                       f"{total} > {limit}")

    def require(self, counter: str, value: int) -> None:
        """Raise when a size (not a cumulative count) is over its limit; records the largest seen."""
        value = int(value)
        self.used[counter] = max(self.used.get(counter, 0), value)
        limit = getattr(self.budget, counter)
        if value > limit:
            raise ConstraintTooComplex(counter.removeprefix("max_").replace("_", " "), f"{value} > {limit}")

