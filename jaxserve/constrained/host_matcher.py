"""Host-side matcher for constraints the device tables cannot hold, backed by llguidance.

The device path (one minimal DFA per constraint, its masks and transitions resident on the accelerator) is
the fast path, but a flat DFA cannot express some JSON-schema keywords (patternProperties, if/then/else,
min/maxProperties, ...) and explodes on large or deeply nested schemas. For those, llguidance (an Earley
parser over lazily built lexer automata; exact for every schema it accepts) computes each step's allowed
tokens on the host. The engine gives every such sequence its own mask row in the device pool and rewrites
it after each token (engine.py), so the jitted sampler is the same for both paths.

llguidance is an optional dependency here: without it the host path is off and the device path's error
stands. A matcher never raises on grammar errors, it enters an error state; `HostMatcher` turns that into
`HostMatcherError` so the engine fails that request alone.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxserve.constrained.budget import BudgetMeter, ConstraintTooComplex


# A host-matched request's steps are synchronous for the whole batch: one mask slower than this stalls every
# request, so a grammar whose first mask is slower is refused and a request whose later mask is slower fails.
MAX_STEP_SECONDS = 0.1


class HostMatcherError(RuntimeError):
    """The matcher rejected a token or hit one of its per-step limits (the request fails alone)."""


def llguidance_available() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


def host_tokenizer(hf_tokenizer: Any, vocab_width: int, end_token_ids: tuple[int, ...]) -> Any:
    """llguidance's tokenizer for a fast HF tokenizer: `vocab_width` ids (the model's logit width, so its
    bitmask rows have the device pool's width) and every engine end token as an EOS llguidance allows once
    the constraint is complete. ~1 s: build it once per engine."""
    import llguidance.hf

    return llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_width, eos_token=list(end_token_ids))


def _limits() -> Any:
    """llguidance's parser limits: its defaults bound the work of each step (lexer fuel ~15 ms, Earley items),
    the lexer's states (memory) and the grammar's size; verbose errors would echo the whole schema."""
    import llguidance

    return llguidance.LLParserLimits(verbose_errors=False)


@dataclass(frozen=True, eq=False)
class ClosingRows:
    """Token sets that steer a host-matched output to an end when its token budget runs low (the device path
    has exact closing rows from its DFA's distances; llguidance has no distance to acceptance). Tiers, first
    match wins: the end tokens; a one-byte `"` (closes a string, or opens one that the next `"` closes); `}`
    or `]`; `,`; any one-byte token (the slowest way through a lexeme that must go on). Only the first tier
    the mask allows is kept, so a model that favours `}` inside a string cannot stay there. Packed uint32 rows
    of the pool's width."""

    tiers: tuple[np.ndarray, ...]

    @staticmethod
    def from_vocab(tokens: "list[bytes | None] | tuple[bytes | None, ...]", end_token_ids: tuple[int, ...],
                   words_per_row: int) -> "ClosingRows":
        groups = (None, (b'"',), (b"}", b"]"), (b",",), "single")
        bits = np.zeros((len(groups), words_per_row * 32), dtype=bool)
        bits[0, list(end_token_ids)] = True
        for i, b in enumerate(tokens):
            if b is None or len(b) != 1:
                continue
            bits[4, i] = True
            for tier in (1, 2, 3):
                bits[tier, i] |= b in groups[tier]
        return ClosingRows(tuple(np.packbits(row, bitorder="little").view(np.uint32) for row in bits))

    def narrow(self, row: np.ndarray) -> np.ndarray:
        """`row` cut to the first tier it allows (unchanged when it allows none: never empty)."""
        for tier in self.tiers:
            narrowed = row & tier
            if narrowed.any():
                return narrowed
        return row

    @property
    def words_per_row(self) -> int:
        return int(self.tiers[0].size)


def closing_margin(max_tokens: int) -> int:
    """Tokens left at which a host-matched sequence starts closing: a third of its budget, at least 64 (a
    nested object's required members can take that many forced tokens after the closing starts)."""
    return max(64, max_tokens // 3)


@dataclass(frozen=True, eq=False)
class HostGrammar:
    """A constraint compiled by llguidance. `key`: what identifies it (as `TokenTable.key`); `template`: a
    fresh matcher that is never advanced, copied for each sequence (copying skips the grammar build);
    `closing`: the vocabulary's closing rows (shared by every host grammar of a service)."""

    key: tuple
    grammar: str
    template: Any
    words_per_row: int
    compile_seconds: float
    closing: ClosingRows

    @property
    def nbytes(self) -> int:
        return len(self.grammar)  # the matcher's lexer and parser state are not visible from Python

    def min_tokens_needed(self) -> int:
        return 1  # unknown without a distance table: a request may end by max_tokens (finish_reason "length")

    def new_matcher(self) -> "HostMatcher":
        return HostMatcher(self.template.deep_copy(), self.words_per_row, self.closing)


class HostMatcher:
    """One sequence's matcher: `mask_row(tokens_left, max_tokens)` packs the allowed tokens as the device
    pool's uint32 rows (narrowed by the closing rows once the budget runs low), `consume(token)` advances
    it. Not thread-safe (the engine's thread owns it)."""

    __slots__ = ("_matcher", "_words", "_closing", "seconds")

    def __init__(self, matcher: Any, words_per_row: int, closing: ClosingRows):
        self._matcher = matcher
        self._words = words_per_row
        self._closing = closing
        self.seconds = 0.0  # host time spent computing masks and advancing, for the metrics

    def mask_row(self, tokens_left: int, max_tokens: int) -> np.ndarray:
        """The next token's mask for a sequence that may still emit `tokens_left` of its `max_tokens`."""
        row = self._allowed()
        if tokens_left <= closing_margin(max_tokens):
            row = self._closing.narrow(row)
        return row

    def _allowed(self) -> np.ndarray:
        t0 = time.perf_counter()
        raw = self._matcher.compute_bitmask()
        self._check("computing its next-token mask")
        took = time.perf_counter() - t0
        if took > MAX_STEP_SECONDS:
            self.seconds += took
            raise HostMatcherError(f"the host matcher's mask took {took * 1e3:.0f} ms, over its "
                                   f"{MAX_STEP_SECONDS * 1e3:.0f} ms limit (the batch waits for it)")
        row = np.frombuffer(raw, dtype=np.uint32)
        # llguidance rounds its rows up by a word when the vocabulary is a multiple of 32; ids past the
        # model's logits do not exist, so a bit there would be a mismatch of vocabularies.
        if row.size < self._words or row[self._words:].any():
            raise HostMatcherError(f"host matcher mask covers {row.size * 32} ids, the device pool rows "
                                   f"{self._words * 32}")
        row = row[: self._words]
        self.seconds += time.perf_counter() - t0
        return row

    def consume(self, token: int) -> None:
        t0 = time.perf_counter()
        ok = self._matcher.consume_token(int(token))
        self.seconds += time.perf_counter() - t0
        if not ok:
            self._check(f"consuming token {token}")
            raise HostMatcherError(f"the host matcher rejected token {token}")

    def is_accepting(self) -> bool:
        return bool(self._matcher.is_accepting())

    def _check(self, doing: str) -> None:
        if self._matcher.is_error():
            raise HostMatcherError(f"host matcher failed while {doing}: {self._matcher.get_error()}")


def _inexact_for_llguidance(schema: Any) -> str | None:
    """Keywords llguidance accepts but does not keep exactly as `jsonschema` checks them (found by random
    walks over JSONSchemaBench and by probing): what is wrong, or None. Anywhere in the schema."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        step = node.get("multipleOf")
        if isinstance(step, float):
            # jsonschema divides by a float step in binary floating point: it refuses 0.3 for 0.1 (llguidance
            # allows it) and raises on an integer past ~10^308 (llguidance's integers are unbounded).
            return f"unsupported keyword 'multipleOf' with the float step {step}"
        open_names = node.get("patternProperties") or node.get("additionalProperties", True) is not False
        if isinstance(node.get("minProperties"), int) and node["minProperties"] > 1 and open_names:
            # llguidance lets a name repeat; a repeated name counts once, so fewer properties than required.
            return "unsupported keyword 'minProperties' above 1 where undeclared names are allowed"
        stack.extend(v for k, v in node.items() if k not in ("enum", "const", "examples", "default"))
    return None


def compile_host_grammar(kind: str, spec: Any, tokenizer: Any, key: tuple, closing: ClosingRows,
                         meter: BudgetMeter) -> HostGrammar:
    """llguidance grammar for a regex or JSON schema (compact JSON, as the device path emits), built and
    checked against `tokenizer`. ValueError with llguidance's reason when it refuses; ConstraintTooComplex
    when the build ran past the meter's deadline (llguidance's own limits bound the build itself)."""
    import llguidance

    t0 = time.perf_counter()
    if kind == "json_schema":
        schema = json.loads(spec) if isinstance(spec, (str, bytes)) else spec
        inexact = _inexact_for_llguidance(schema)
        if inexact:
            raise ValueError(f"host matcher: {inexact}")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": False, "lenient": False})
        except ValueError as e:
            raise ValueError(f"host matcher: {e}") from None
    elif kind == "regex":
        grammar = llguidance.LLMatcher.grammar_from_regex(spec)
    else:
        raise ValueError(f"the host matcher does not take {kind!r} constraints")
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=_limits())
    if matcher.is_error():
        raise ValueError(f"host matcher: {matcher.get_error()}")
    # The first mask, on a copy: a grammar whose lexer explodes shows it here, before any request runs it.
    probe = matcher.deep_copy()
    t_step = time.perf_counter()
    probe.compute_bitmask()
    step_s = time.perf_counter() - t_step
    if probe.is_error():
        raise ValueError(f"host matcher: {probe.get_error()}")
    if step_s > MAX_STEP_SECONDS:
        raise ConstraintTooComplex("host matcher step", f"its first mask took {step_s * 1e3:.0f} ms > "
                                   f"{MAX_STEP_SECONDS * 1e3:.0f} ms")
    meter.check_time("the host matcher's grammar build")
    elapsed = time.perf_counter() - t0
    return HostGrammar(key=key, grammar=grammar, template=matcher, words_per_row=closing.words_per_row,
                       compile_seconds=elapsed, closing=closing)



def sample_host_walk(grammar: HostGrammar, end_token_ids: tuple[int, ...], rng: np.random.Generator, *,
                     max_tokens: int = 400) -> tuple[list[int], bool]:
    """A stand-in for a random model on the host path, as the engine drives it: uniform over the allowed
    tokens, the closing rows once the budget runs low. Returns (token ids without the end token, ended)."""
    matcher = grammar.new_matcher()
    ends = set(end_token_ids)
    out: list[int] = []
    for step in range(max_tokens):
        row = matcher.mask_row(max_tokens - step, max_tokens)
        allowed = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))
        if allowed.size == 0:
            raise HostMatcherError("the host matcher allows no token")
        token = int(rng.choice(allowed))
        if token in ends:
            return out, True
        matcher.consume(token)
        out.append(token)
    return out, False
