"""Regex -> byte DFA: agreement with Python `re.fullmatch`, UTF-8 expansion, errors and limits."""
import random
import re
import time

import pytest

from jaxserve.constrained.regex_dfa import DfaLimits, compile_dfa, utf8_sequences
from jaxserve.constrained.regex_parser import emit_regex, parse_regex

# 50 regexes of varied shapes: classes, alternation, counted repetition, optional groups, Unicode, escapes.
REGEXES = [
    r"a(xb)?", r"[a-z]+@[a-z]+\.(com|org)", r"\d{3}-\d{4}", r"(ab|cd)*e", r"héllo|wörld", r".{2,5}",
    r'"([^"\\]|\\.)*"', r"[A-Z][a-z]{0,6}", r"(yes|no|maybe)", r"-?(0|[1-9][0-9]*)(\.[0-9]+)?",
    r"[0-9a-f]{8}-[0-9a-f]{4}", r"(\+|-)?\d+", r"\w+", r"\s*x\s*", r"[^abc]{1,3}", r"日本語?", r"[α-ω]+",
    r"(a|b)*abb", r"(0|1(01*0)*1)*", r"x{3}|y{2,}", r"(?:[a-c]{2}){1,2}", r"\(\)\[\]\{\}", r"\.\*\+\?",
    r"\t\n\r", r"[\u00e0-\u00ff]{2}", r"\U0001F600|\U0001F64F", r"[😀-🙏]+", r"(foo)?(bar)?(baz)?",
    r"a??b+?c*?", r"[\d\s]+", r"\D\W\S", r"(?s:.)+", r"[^\n]*", r"(true|false|null)", r"\$\^",
    r"(a(b(c(d)?)?)?)?", r"[\-\]\\]+", r"colou?r", r"(ab){2,3}c{0,2}", r"[A-Za-z_][A-Za-z0-9_]*",
    r"\d+(,\d{3})*", r"(19|20)\d\d-(0[1-9]|1[0-2])", r"é+|e\u0301", r"[ab]{0,4}x", r"\x41\x42\x7e",
    r"(?:)", r"a|", r"[€£¥]\d{1,3}", r"(?:ab)?c", r"^abc$",
]
ALPHABET = list("abcdexyz019-._@\"\\ \n\tABZ()[]{}+*?$^,:éèöαω日本語😀🙏€") + ["e\u0301", "\u00ff", "ÿ"]


def _samples(rng: random.Random, n: int = 300) -> list[str]:
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 8))) for _ in range(n)]


def _positive_samples(pattern: str, rng: random.Random) -> list[str]:
    # Strings known to match: a brute-force search over short strings of the pattern's own characters.
    chars = sorted(set(re.sub(r"\\.", "", pattern)) | set("0123456789abc"))
    found = []
    for _ in range(3000):
        s = "".join(rng.choice(chars) for _ in range(rng.randint(0, 6)))
        if re.fullmatch(pattern, s):
            found.append(s)
    return found


@pytest.mark.parametrize("pattern", REGEXES)
def test_dfa_agrees_with_re_fullmatch(pattern):
    dfa = compile_dfa(parse_regex(pattern))
    rng = random.Random(pattern)
    cases = _samples(rng) + _positive_samples(pattern, rng)
    for s in cases:
        assert dfa.matches(s.encode()) == bool(re.fullmatch(pattern, s)), (pattern, s)


@pytest.mark.parametrize("pattern", REGEXES)
def test_emitted_regex_has_the_same_language(pattern):
    again = emit_regex(parse_regex(pattern))
    rng = random.Random(pattern + "emit")
    for s in _samples(rng, 200) + _positive_samples(pattern, rng):
        assert bool(re.fullmatch(again, s)) == bool(re.fullmatch(pattern, s)), (pattern, again, s)


def test_utf8_sequences_cover_exactly_the_range():
    rng = random.Random(0)
    for lo, hi in [(0, 0x10FFFF), (0x7F, 0x800), (0x7FF, 0xFFFF), (0xE000, 0x10000), (0x80, 0x80)] + [
        tuple(sorted(rng.randrange(0, 0x110000) for _ in range(2))) for _ in range(20)
    ]:
        seqs = utf8_sequences(lo, hi)
        probes = {lo, hi, lo - 1, hi + 1} | {rng.randrange(0, 0x110000) for _ in range(300)}
        for cp in probes:
            if not 0 <= cp <= 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
                continue
            enc = chr(cp).encode()
            hit = sum(len(s) == len(enc) and all(a <= b <= c for (a, c), b in zip(s, enc)) for s in seqs)
            assert hit == (1 if lo <= cp <= hi else 0), (lo, hi, hex(cp))


@pytest.mark.parametrize(
    "pattern, message",
    [
        (r"(a)\1", "backreferences"),
        (r"a(?=b)", "lookahead"),
        (r"(?<!a)b", "lookahead/lookbehind"),
        (r"a\b", "anchor"),
        (r"(?i)abc", "case-insensitive"),
        (r"a++", "possessive"),
        (r"(?>a)", "atomic"),
        (r"[a-", "invalid regex"),
        (r"[^\s\S]", "matches no string"),
    ],
)
def test_unsupported_or_invalid_regex_raises_value_error(pattern, message):
    with pytest.raises(ValueError, match=message):
        compile_dfa(parse_regex(pattern))


@pytest.mark.parametrize("pattern", [r"(a|b)*a(a|b){20}", r"((a{1,100}){1,100}){1,100}", r"(?:.{1000}){1000}"])
def test_hostile_patterns_fail_fast_with_too_complex(pattern):
    start = time.monotonic()
    with pytest.raises(ValueError, match="too complex"):
        compile_dfa(parse_regex(pattern), DfaLimits(max_dfa_states=5000, max_seconds=2.0))
    assert time.monotonic() - start < 10


def test_minimization_merges_equivalent_states():
    dfa = compile_dfa(parse_regex(r"(a|b)*abb"))
    assert dfa.num_states == 4  # the textbook minimal DFA
    assert compile_dfa(parse_regex(r"ab|cb")).num_states == 3
