"""Regex IR -> minimal byte-level DFA.

Code point sets become UTF-8 byte-range sequences, the IR becomes a Thompson NFA over byte classes (bytes
that no transition tells apart share a class), subset construction builds the DFA, states that cannot
reach acceptance are dropped, and Moore refinement (vectorized with NumPy) minimizes it. Every stage charges
a `BudgetMeter` as it builds (states, set elements, sweep work, wall time), so hostile patterns fail fast
with `ConstraintTooComplex` (a ValueError) instead of exhausting memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxserve.constrained.budget import BudgetMeter, CompileBudget
from jaxserve.constrained.regex_parser import Alt, Chars, Node, Repeat, Seq

DEAD = -1


@dataclass(frozen=True)
class DfaLimits:
    """The DFA stage's limits for callers without a `BudgetMeter` (the other budgets keep their defaults)."""

    max_nfa_states: int = CompileBudget.max_nfa_states
    max_dfa_states: int = CompileBudget.max_dfa_states
    max_seconds: float = CompileBudget.max_seconds

    def meter(self) -> BudgetMeter:
        return BudgetMeter(CompileBudget(max_nfa_states=self.max_nfa_states, max_dfa_states=self.max_dfa_states,
                                         max_seconds=self.max_seconds))


@dataclass(frozen=True, eq=False)
class ByteDfa:
    """`transitions[s, b]` is the next state on byte b, or DEAD (-1). Every state can reach acceptance."""

    transitions: np.ndarray  # int32 [S, 256]
    accepting: np.ndarray  # bool [S]
    start: int

    @property
    def num_states(self) -> int:
        return int(self.transitions.shape[0])

    def matches(self, data: bytes) -> bool:
        s = self.start
        for b in data:
            s = int(self.transitions[s, b])
            if s == DEAD:
                return False
        return bool(self.accepting[s])


# ---------------------------------------------------------------- UTF-8 ranges

_UTF8_BOUNDS = (0x7F, 0x7FF, 0xFFFF, 0x10FFFF)


def utf8_sequences(lo: int, hi: int) -> list[tuple[tuple[int, int], ...]]:
    """Code point range -> byte-range sequences matching exactly its UTF-8 encodings."""
    out: list[tuple[tuple[int, int], ...]] = []
    stack = [(lo, hi)]
    while stack:
        lo, hi = stack.pop()
        split = False
        for bound in _UTF8_BOUNDS[:-1]:  # different encoded lengths
            if lo <= bound < hi:
                stack += [(bound + 1, hi), (lo, bound)]
                split = True
                break
        if split:
            continue
        if hi <= 0x7F:
            out.append(((lo, hi),))
            continue
        n = len(chr(lo).encode("utf-8"))
        for i in range(1, n):
            m = (1 << (6 * i)) - 1
            if lo & ~m != hi & ~m:
                if lo & m != 0:
                    stack += [((lo | m) + 1, hi), (lo, lo | m)]
                    split = True
                    break
                if hi & m != m:
                    stack += [(hi & ~m, hi), (lo, (hi & ~m) - 1)]
                    split = True
                    break
        if split:
            continue
        a, b = chr(lo).encode("utf-8"), chr(hi).encode("utf-8")
        out.append(tuple(zip(a, b)))
    return out


# ---------------------------------------------------------------- NFA

class _Nfa:
    """Thompson NFA over byte ranges: eps[s] epsilon targets, edges[s] (lo, hi, target) byte transitions."""

    def __init__(self, meter: BudgetMeter):
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple[int, int, int]]] = []
        self.meter = meter
        self.max_states = meter.budget.max_nfa_states
        self._seq_cache: dict[tuple, list] = {}

    def new(self) -> int:
        n = len(self.eps)
        if n >= self.max_states:
            self.meter.require("max_nfa_states", n + 1)
        if (n & 4095) == 0:
            self.meter.check_time("NFA construction")
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def build(self, node: Node, start: int) -> int:
        """Add `node` from `start`; returns its end state."""
        if isinstance(node, Chars):
            return self._chars(node, start)
        if isinstance(node, Seq):
            cur = start
            for item in node.items:
                cur = self.build(item, cur)
            return cur
        if isinstance(node, Alt):
            end = self.new()
            for item in node.items:
                s = self.new()
                self.eps[start].append(s)
                self.eps[self.build(item, s)].append(end)
            return end
        return self._repeat(node, start)

    def _repeat(self, node: Repeat, start: int) -> int:
        self.meter.check_time("NFA construction")
        cur = start
        for _ in range(node.min):
            cur = self.build(node.item, cur)
        if node.max is None:
            loop = self.new()
            self.eps[cur].append(loop)
            self.eps[self.build(node.item, loop)].append(loop)
            return loop
        end = self.new()
        for _ in range(node.max - node.min):
            self.eps[cur].append(end)
            cur = self.build(node.item, cur)
        self.eps[cur].append(end)
        return end

    def _chars(self, node: Chars, start: int) -> int:
        end = self.new()
        if len(node.ranges) == 1 and node.ranges[0][1] < 0x80:  # ASCII: one byte edge
            lo, hi = node.ranges[0]
            self.edges[start].append((lo, hi, end))
            return end
        seqs = self._seq_cache.get(node.ranges)
        if seqs is None:
            seqs = [s for lo, hi in node.ranges for s in utf8_sequences(lo, hi)]
            self._seq_cache[node.ranges] = seqs
        # Share prefixes of the byte sequences (a small trie) to keep the NFA small.
        trie: dict[tuple, int] = {}
        for seq in seqs:
            cur = start
            for i, (lo, hi) in enumerate(seq[:-1]):
                key = seq[: i + 1]
                nxt = trie.get(key)
                if nxt is None:
                    nxt = self.new()
                    trie[key] = nxt
                    self.edges[cur].append((lo, hi, nxt))
                cur = nxt
            lo, hi = seq[-1]
            self.edges[cur].append((lo, hi, end))
        return end


# ---------------------------------------------------------------- DFA

def _expanded_size(node: Node, cap: int) -> int:
    """Rough NFA size after expanding counted repetitions (stops counting past `cap`)."""
    if isinstance(node, Chars):
        return 1 + len(node.ranges)
    if isinstance(node, (Seq, Alt)):
        total = 1
        for item in node.items:
            total += _expanded_size(item, cap)
            if total > cap:
                return total
        return total
    copies = max(node.min, 1 if node.max is None else node.max)
    return 1 + min(_expanded_size(node.item, cap) * copies, cap + 1)


def compile_dfa(node: Node, limits: DfaLimits = DfaLimits(), meter: BudgetMeter | None = None) -> ByteDfa:
    """Minimal byte DFA of the IR. Raises ConstraintTooComplex past the meter's budget (default: `limits`)."""
    meter = limits.meter() if meter is None else meter
    cap = meter.budget.max_nfa_states
    size = _expanded_size(node, cap)
    if size > cap:  # before building anything: counted repetitions that expand past the NFA budget
        meter.require("max_nfa_states", size)
    nfa = _Nfa(meter)
    start = nfa.new()
    accept = nfa.build(node, start)
    meter.require("max_nfa_states", len(nfa.eps))
    trans, accepting, byte_class = _subset_construction(nfa, start, accept, meter)
    return _minimize(trans, accepting, byte_class, meter)


def _byte_classes(nfa: _Nfa) -> np.ndarray:
    """uint8/int [256] class id per byte: bytes share a class when no edge separates them."""
    cuts = np.zeros(257, dtype=bool)
    cuts[0] = True
    for edges in nfa.edges:
        for lo, hi, _ in edges:
            cuts[lo] = True
            cuts[hi + 1] = True
    return np.cumsum(cuts[:256]) - 1


def _subset_construction(nfa: _Nfa, start: int, accept: int, meter: BudgetMeter):
    n = len(nfa.eps)
    max_dfa_states = meter.budget.max_dfa_states
    byte_class = _byte_classes(nfa)
    num_classes = int(byte_class[-1]) + 1
    # Epsilon closures, memoized per NFA state (iterative DFS).
    closure: list[frozenset[int] | None] = [None] * n

    def close(s: int) -> frozenset[int]:
        c = closure[s]
        if c is None:
            seen = {s}
            stack = [s]
            steps = 0
            while stack:
                steps += 1
                if (steps & 8191) == 0:  # one closure can span the whole NFA
                    meter.check_time("subset construction")
                for t in nfa.eps[stack.pop()]:
                    if t not in seen:
                        seen.add(t)
                        stack.append(t)
            meter.charge("max_subset_work", len(seen))
            # Keep only states that matter for the future (byte edges or acceptance): smaller DFA keys.
            c = frozenset(t for t in seen if nfa.edges[t] or t == accept)
            meter.charge("max_subset_elements", len(c))  # memoized: held until the end
            closure[s] = c
        return c

    # Per NFA state: (first class, last class, target) edges.
    cls_edges = [[(int(byte_class[lo]), int(byte_class[hi]), t) for lo, hi, t in e] for e in nfa.edges]
    start_set = close(start)
    index = {start_set: 0}
    sets = [start_set]
    rows: list[np.ndarray] = []
    i = 0
    while i < len(sets):
        meter.check_time("subset construction")  # per DFA state: one state's sweep is bounded below
        edges = [e for s in sets[i] for e in cls_edges[s]]
        row = [DEAD] * num_classes
        # Sweep the class axis: between consecutive edge boundaries the set of targets is constant.
        points = sorted({p for clo, chi, _ in edges for p in (clo, chi + 1)})
        meter.charge("max_subset_work", len(edges) * max(len(points) - 1, 1))
        cache: dict[frozenset[int], int] = {}
        wide = len(edges) > 2048  # a wide state's sweep alone can take seconds: check the clock inside it
        for a, b in zip(points, points[1:]):
            if wide:
                meter.check_time("subset construction")
            key = frozenset(t for clo, chi, t in edges if clo <= a <= chi)
            if not key:
                continue
            j = cache.get(key)
            if j is None:
                if len(key) > 1:
                    parts = [close(t) for t in key]
                    meter.charge("max_subset_work", sum(map(len, parts)))  # the union's cost, before building it
                    target = frozenset().union(*parts)
                else:
                    target = close(next(iter(key)))
                j = index.get(target)
                if j is None:
                    if len(sets) >= max_dfa_states:
                        meter.require("max_dfa_states", len(sets) + 1)
                    meter.charge("max_subset_elements", len(target))  # held as a DFA-state key
                    j = len(sets)
                    index[target] = j
                    sets.append(target)
                cache[key] = j
            row[a:b] = [j] * (b - a)
        rows.append(row)
        i += 1
    trans_cls = np.asarray(rows, dtype=np.int32).reshape(len(rows), num_classes)
    accepting = np.fromiter((accept in s for s in sets), dtype=bool, count=len(sets))
    return trans_cls, accepting, byte_class


def _live_states(trans: np.ndarray, accepting: np.ndarray, meter: BudgetMeter) -> np.ndarray:
    """bool [S]: states from which an accepting state is reachable (backward search over unique edges)."""
    src, col = np.nonzero(trans != DEAD)
    edges = np.unique(np.stack([trans[src, col], src], axis=1), axis=0)  # (dst, src), sorted by dst
    starts = np.searchsorted(edges[:, 0], np.arange(trans.shape[0] + 1))
    live = accepting.copy()
    stack = list(np.flatnonzero(accepting))
    pops = 0
    while stack:
        pops += 1
        if (pops & 4095) == 0:
            meter.check_time("minimization")
        d = stack.pop()
        for s in edges[starts[d] : starts[d + 1], 1]:
            if not live[s]:
                live[s] = True
                stack.append(s)
    return live


def _refine(t: np.ndarray, acc: np.ndarray, meter: BudgetMeter) -> np.ndarray:
    """Moore refinement: block id per state, equal iff the states accept the same language.

    Each round hashes (own block, block of the successor on every class) to 64 bits. A row of the
    transition table is a few runs of equal targets, so the hash is a sum over runs of
    (block + 1) * (sum of the run's random class weights): O(runs) per round instead of O(classes).
    The final partition is verified exactly, so a hash collision can only cost time, never correctness."""
    n, c = t.shape
    rng = np.random.default_rng(0x5EED)
    weights = rng.integers(1, 2**63, size=c + 1, dtype=np.uint64) | np.uint64(1)
    prefix = np.zeros(c + 1, dtype=np.uint64)
    np.cumsum(weights[1:], out=prefix[1:])  # wraps modulo 2**64, which is fine for hashing
    starts = np.ones((n, c), dtype=bool)
    starts[:, 1:] = t[:, 1:] != t[:, :-1]
    run_state, run_start = np.nonzero(starts)
    run_end = np.append(run_start[1:], c)
    run_end[np.append(run_state[1:] != run_state[:-1], True)] = c  # last run of each row ends at c
    run_weight = prefix[run_end] - prefix[run_start]
    run_target = t[run_state, run_start]
    first_run = np.flatnonzero(np.append(True, run_state[1:] != run_state[:-1]))
    block = acc.astype(np.int64)
    count = len(np.unique(block))
    while True:
        meter.check_time("minimization")  # a chain-shaped DFA refines in as many rounds as it has states
        succ_block = np.where(run_target == DEAD, -1, block[np.maximum(run_target, 0)]) + 1
        h = np.add.reduceat(succ_block.astype(np.uint64) * run_weight, first_run)
        h += block.astype(np.uint64) * weights[0]
        _, new_block = np.unique(h, return_inverse=True)
        block = new_block.ravel().astype(np.int64)
        new_count = int(block.max()) + 1
        if new_count == count:
            break
        count = new_count
    reps = np.unique(block, return_index=True)[1]
    succ = np.where(t == DEAD, -1, block[np.maximum(t, 0)])
    sig = np.concatenate([block[:, None], succ], axis=1)
    if not (sig == sig[reps][block]).all():  # hash collision: redo exactly
        return _refine_exact(t, acc, meter)
    return block


def _refine_exact(t: np.ndarray, acc: np.ndarray, meter: BudgetMeter) -> np.ndarray:
    block = acc.astype(np.int64)
    count = len(np.unique(block))
    while True:
        meter.check_time("minimization")
        succ = np.where(t == DEAD, -1, block[np.maximum(t, 0)])
        _, block = np.unique(np.concatenate([block[:, None], succ], axis=1), axis=0, return_inverse=True)
        block = block.ravel().astype(np.int64)
        if int(block.max()) + 1 == count:
            return block
        count = int(block.max()) + 1


def _minimize(trans: np.ndarray, accepting: np.ndarray, byte_class: np.ndarray, meter: BudgetMeter) -> ByteDfa:
    n = trans.shape[0]
    meter.check_time("minimization")
    live = _live_states(trans, accepting, meter)
    if not live[0]:
        raise ValueError("regex matches no string")
    keep = np.flatnonzero(live)
    renum = np.full(n + 1, DEAD, dtype=np.int32)  # index n stands for DEAD
    renum[keep] = np.arange(keep.size, dtype=np.int32)
    t = renum[np.where(trans[keep] == DEAD, n, trans[keep])]
    acc = accepting[keep]
    block = _refine(t, acc, meter)
    k = int(block.max()) + 1
    reps = np.unique(block, return_index=True)[1]  # a representative state per block
    # New ids: the start state's block becomes 0, the others keep their order.
    b0 = int(block[0])
    ids = np.arange(k)
    new_id = np.where(ids == b0, 0, np.where(ids < b0, ids + 1, ids)).astype(np.int32)
    rep_t = t[reps]
    min_t = np.where(rep_t == DEAD, DEAD, new_id[block[np.maximum(rep_t, 0)]]).astype(np.int32)
    final_t = np.empty_like(min_t)
    final_acc = np.empty(k, dtype=bool)
    final_t[new_id] = min_t
    final_acc[new_id] = acc[reps]
    return ByteDfa(transitions=np.ascontiguousarray(final_t[:, byte_class]), accepting=final_acc, start=0)
