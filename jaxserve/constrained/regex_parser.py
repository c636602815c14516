"""Python regex syntax -> a small regular-expression IR over Unicode code points.

The standard library's parser (`re._parser`) does the syntax; this module lowers its tree to four node
kinds (`Chars`, `Seq`, `Alt`, `Repeat`) with fully expanded character sets, rejecting what a finite
automaton cannot express (backreferences, lookaround, word boundaries, conditionals). `emit_regex` turns
the IR back into regex text that both Python `re` and Rust-style engines (llguidance) read the same way.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from jaxserve.constrained.budget import BudgetMeter, ConstraintTooComplex

try:  # Python >= 3.11
    import re._constants as sre_c
    import re._parser as sre_parse
except ImportError:  # pragma: no cover
    import sre_constants as sre_c  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

MAX_CODEPOINT = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)
Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Chars:
    """One code point from sorted, disjoint, non-adjacent inclusive ranges (empty: matches nothing)."""

    ranges: Ranges


@dataclass(frozen=True)
class Seq:
    items: tuple["Node", ...]


@dataclass(frozen=True)
class Alt:
    items: tuple["Node", ...]


@dataclass(frozen=True)
class Repeat:
    item: "Node"
    min: int
    max: int | None  # None: unbounded


Node = Chars | Seq | Alt | Repeat
EMPTY = Seq(())


# ---------------------------------------------------------------- code point sets

def normalize_ranges(ranges) -> Ranges:
    """Sort and merge ranges; drop surrogates (not encodable as UTF-8 text)."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if lo > hi:
            continue
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return subtract_ranges(tuple((a, b) for a, b in out), (SURROGATES,))


def subtract_ranges(ranges: Ranges, remove: Ranges) -> Ranges:
    out = []
    for lo, hi in ranges:
        pieces = [(lo, hi)]
        for rlo, rhi in remove:
            nxt = []
            for a, b in pieces:
                if rhi < a or rlo > b:
                    nxt.append((a, b))
                    continue
                if a < rlo:
                    nxt.append((a, rlo - 1))
                if b > rhi:
                    nxt.append((rhi + 1, b))
            pieces = nxt
        out.extend(pieces)
    return tuple(out)


def complement_ranges(ranges: Ranges) -> Ranges:
    out, prev = [], 0
    for lo, hi in ranges:
        if lo > prev:
            out.append((prev, lo - 1))
        prev = hi + 1
    if prev <= MAX_CODEPOINT:
        out.append((prev, MAX_CODEPOINT))
    return normalize_ranges(out)


@lru_cache(maxsize=None)
def _category_ranges(pattern: str) -> Ranges:
    """Code point ranges matched by a one-character class under Python's Unicode semantics."""
    text = "".join(map(chr, range(SURROGATES[0]))) + "".join(map(chr, range(SURROGATES[1] + 1, MAX_CODEPOINT + 1)))
    ranges = []
    for m in re.finditer(pattern + "+", text):
        lo, hi = ord(m.group()[0]), ord(m.group()[-1])
        ranges.append((lo, hi))
    return normalize_ranges(ranges)


_ASCII_CATEGORIES: dict[str, Ranges] = {
    "DIGIT": ((0x30, 0x39),),
    "SPACE": ((0x09, 0x0D), (0x20, 0x20)),
    "WORD": ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)),
}


def category_ranges(name: str, ascii_only: bool) -> Ranges:
    """\\d \\s \\w and negations. `ascii_only`: the re.ASCII meaning (for \\D etc. a superset of the Unicode
    meaning, so subset mode below never uses it for negations)."""
    negate = name.startswith("NOT_")
    base = name[4:] if negate else name
    if base not in _ASCII_CATEGORIES:
        raise ValueError(f"unsupported regex character category {name}")
    if ascii_only:
        ranges = normalize_ranges(_ASCII_CATEGORIES[base])
    else:
        # Python's \d \s \w are Unicode-aware for str patterns; derive the sets from `re` itself.
        # The text scan splits at gaps, so runs of consecutive code points become ranges.
        ranges = _category_ranges({"DIGIT": r"\d", "SPACE": r"\s", "WORD": r"\w"}[base])
    return complement_ranges(ranges) if negate else ranges


# ---------------------------------------------------------------- sre tree -> IR

_UNSUPPORTED = {
    "GROUPREF": "backreferences",
    "GROUPREF_EXISTS": "conditional groups (?(...))",
    "ASSERT": "lookahead/lookbehind assertions",
    "ASSERT_NOT": "negative lookahead/lookbehind assertions",
    "ATOMIC_GROUP": "atomic groups (?>...)",
    "POSSESSIVE_REPEAT": "possessive quantifiers",
}


def parse_regex(pattern: str, *, search: bool = False, subset_classes: bool = False,
                max_nodes: int = 200_000, meter: BudgetMeter | None = None) -> Node:
    """Parse a Python regex. Default: the whole text must match (re.fullmatch). `search=True`: the pattern
    may match anywhere unless anchored with ^ / $ (re.search, as JSON Schema `pattern` is defined).
    `subset_classes`: \\d \\w \\s match only their ASCII members (the negations keep the full Unicode
    meaning), so the language is a subset of Python's: right for generating values a validator accepts.

    Raises ValueError for syntax errors and for features a DFA cannot express, ConstraintTooComplex past
    `max_nodes` or the `meter`'s budget (its max_ir_nodes replaces max_nodes; the text length is checked
    first because the standard parser cannot be interrupted)."""
    if not isinstance(pattern, str):
        raise ValueError(f"regex must be a string, got {type(pattern).__name__}")
    if meter is not None:
        meter.require("max_regex_chars", len(pattern))
        meter.check_time("regex parsing")
        max_nodes = meter.budget.max_ir_nodes
    try:
        tree = sre_parse.parse(pattern, 0)
    except (re.error, OverflowError, RecursionError) as e:
        raise ValueError(f"invalid regex {_clip(pattern)!r}: {e}") from None
    try:
        return _lower(tree, search, subset_classes, max_nodes, meter)
    except RecursionError:
        raise ConstraintTooComplex("nesting depth", "regex groups nested too deeply") from None


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _lower(tree, search: bool, subset_classes: bool, max_nodes: int,
           meter: BudgetMeter | None) -> Node:
    flags = tree.state.flags
    if flags & re.IGNORECASE:
        raise ValueError("regex flag (?i) (case-insensitive) is not supported")
    if flags & re.MULTILINE:
        raise ValueError("regex flag (?m) (multiline) is not supported")
    ctx = _Ctx(dotall=bool(flags & re.DOTALL), ascii_only=bool(flags & re.ASCII), max_nodes=max_nodes,
               subset_classes=subset_classes, meter=meter)
    items = list(tree)
    branches = _top_branches(items)
    nodes = []
    for branch in branches:
        start_anchored, end_anchored, body = _strip_anchors(branch)
        node = ctx.seq(body)
        if search:
            anything = Repeat(Chars(normalize_ranges([(0, MAX_CODEPOINT)])), 0, None)
            node = Seq(((EMPTY if start_anchored else anything), node, (EMPTY if end_anchored else anything)))
        nodes.append(node)
    return nodes[0] if len(nodes) == 1 else Alt(tuple(nodes))


def _top_branches(items: list) -> list[list]:
    if len(items) == 1 and items[0][0] is sre_c.BRANCH:
        return [list(b) for b in items[0][1][1]]
    return [items]


def _strip_anchors(items: list) -> tuple[bool, bool, list]:
    start = end = False
    while items and items[0][0] is sre_c.AT and items[0][1] in (sre_c.AT_BEGINNING, sre_c.AT_BEGINNING_STRING):
        items, start = items[1:], True
    while items and items[-1][0] is sre_c.AT and items[-1][1] in (sre_c.AT_END, sre_c.AT_END_STRING):
        items, end = items[:-1], True
    return start, end, items


@dataclass
class _Ctx:
    dotall: bool
    ascii_only: bool
    max_nodes: int
    subset_classes: bool = False
    meter: BudgetMeter | None = None
    nodes: int = 0

    def category(self, name: str, negated_context: bool) -> Ranges:
        # In subset mode a positive shorthand is narrowed to ASCII unless it sits under a negation.
        narrow = self.ascii_only or (self.subset_classes and not negated_context and not name.startswith("NOT_"))
        return category_ranges(name, narrow)

    def count(self, n: int = 1) -> None:
        self.nodes += n
        if self.nodes > self.max_nodes:
            raise ConstraintTooComplex("ir nodes", f"more than {self.max_nodes} regex elements")
        if self.meter is not None and (self.nodes & 4095) == 0:
            self.meter.check_time("regex parsing")

    def seq(self, items) -> Node:
        parts = tuple(self.node(op, av) for op, av in items)
        return parts[0] if len(parts) == 1 else Seq(parts)

    def node(self, op, av) -> Node:
        self.count()
        name = str(op)
        if name in _UNSUPPORTED:
            raise ValueError(f"unsupported regex feature: {_UNSUPPORTED[name]}")
        if op is sre_c.LITERAL:
            if SURROGATES[0] <= av <= SURROGATES[1]:
                return Chars(())
            return Chars(((av, av),))
        if op is sre_c.NOT_LITERAL:
            return Chars(complement_ranges(normalize_ranges([(av, av)])))
        if op is sre_c.ANY:
            return Chars(normalize_ranges([(0, MAX_CODEPOINT)] if self.dotall else [(0, 9), (11, MAX_CODEPOINT)]))
        if op is sre_c.IN:
            return Chars(self.charset(av))
        if op is sre_c.BRANCH:
            return Alt(tuple(self.seq(b) for b in av[1]))
        if op is sre_c.SUBPATTERN:
            _group, add_flags, del_flags, sub = av
            if (add_flags | del_flags) & (re.IGNORECASE | re.MULTILINE):
                raise ValueError("scoped regex flags (?i:...) / (?m:...) are not supported")
            saved = (self.dotall, self.ascii_only)
            if add_flags & re.DOTALL:
                self.dotall = True
            if del_flags & re.DOTALL:
                self.dotall = False
            if add_flags & re.ASCII:
                self.ascii_only = True
            try:
                return self.seq(sub)
            finally:
                self.dotall, self.ascii_only = saved
        if op in (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT):
            lo, hi, sub = av
            # Laziness changes which match is found, not which strings match: same language.
            return Repeat(self.seq(sub), int(lo), None if hi is sre_c.MAXREPEAT else int(hi))
        if op is sre_c.AT:
            raise ValueError(f"unsupported regex anchor {av}: only ^ / $ at the start / end of the pattern")
        if op is sre_c.CATEGORY:
            return Chars(self.category(str(av).removeprefix("CATEGORY_"), negated_context=False))
        raise ValueError(f"unsupported regex construct {name}")

    def charset(self, items) -> Ranges:
        negate = any(op is sre_c.NEGATE for op, _ in items)
        ranges: list[tuple[int, int]] = []
        for op, av in items:
            if op is sre_c.NEGATE:
                negate = True
            elif op is sre_c.LITERAL:
                ranges.append((av, av))
            elif op is sre_c.RANGE:
                ranges.append((av[0], av[1]))
            elif op is sre_c.CATEGORY:
                ranges.extend(self.category(str(av).removeprefix("CATEGORY_"), negated_context=negate))
            else:
                raise ValueError(f"unsupported item {op} in a regex character class")
        merged = normalize_ranges(ranges)
        return complement_ranges(merged) if negate else merged


# ---------------------------------------------------------------- IR transforms and emission

def restrict_chars(node: Node, forbidden: Ranges) -> Node:
    """The same IR with `forbidden` code points removed from every character set."""
    if isinstance(node, Chars):
        return Chars(subtract_ranges(node.ranges, forbidden))
    if isinstance(node, Seq):
        return Seq(tuple(restrict_chars(n, forbidden) for n in node.items))
    if isinstance(node, Alt):
        return Alt(tuple(restrict_chars(n, forbidden) for n in node.items))
    return Repeat(restrict_chars(node.item, forbidden), node.min, node.max)


_META = set(r".^$*+?{}[]|()\/")
_CLASS_META = set(r"[]\^-&~|")


def _emit_cp(cp: int, in_class: bool) -> str:
    ch = chr(cp)
    if 0x20 < cp < 0x7F:
        if ch in (_CLASS_META if in_class else _META):
            return "\\" + ch
        return ch
    if cp == 0x20:
        return " "
    if cp <= 0xFF:
        return f"\\x{cp:02x}"
    if cp <= 0xFFFF:
        return f"\\u{cp:04x}"
    return f"\\U{cp:08x}"


def emit_chars(ranges: Ranges) -> str:
    if not ranges:
        return "[^\\x00-\\U0010ffff]"  # matches nothing
    if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
        return _emit_cp(ranges[0][0], in_class=False)
    parts = []
    for lo, hi in ranges:
        parts.append(_emit_cp(lo, True) if lo == hi else f"{_emit_cp(lo, True)}-{_emit_cp(hi, True)}")
    return "[" + "".join(parts) + "]"


def emit_regex(node: Node) -> str:
    """IR -> regex text with the same meaning under Python `re.fullmatch` and Rust-regex-style engines."""
    if isinstance(node, Chars):
        return emit_chars(node.ranges)
    if isinstance(node, Seq):
        return "".join(_emit_atom(n) if isinstance(n, Alt) else emit_regex(n) for n in node.items)
    if isinstance(node, Alt):
        return "|".join(emit_regex(n) for n in node.items)
    inner = _emit_atom(node.item)
    if (node.min, node.max) == (0, None):
        return inner + "*"
    if (node.min, node.max) == (1, None):
        return inner + "+"
    if (node.min, node.max) == (0, 1):
        return inner + "?"
    if node.max is None:
        return f"{inner}{{{node.min},}}"
    if node.min == node.max:
        return f"{inner}{{{node.min}}}"
    return f"{inner}{{{node.min},{node.max}}}"


def _emit_atom(node: Node) -> str:
    if isinstance(node, Chars):
        return emit_chars(node.ranges)
    return "(?:" + emit_regex(node) + ")"
