"""Independent oracle: our allowed-token masks equal llguidance's at every step of random walks.

200 regexes: 50 hand-written (syntax that Python `re` and llguidance's Rust regexes read alike) and 150 that
our JSON-schema converter produces from JSONSchemaBench schemas. llguidance runs the regex as a lexeme with
forcing off; special tokens are set aside (ours never allow them except EOS, compared separately)."""
import json
import pathlib

import numpy as np
import pytest

llguidance = pytest.importorskip("llguidance")
import llguidance.hf  # noqa: E402

from jaxserve.constrained.compiler import compile_constraint  # noqa: E402
from jaxserve.constrained.json_schema import json_schema_to_regex  # noqa: E402
from jaxserve.constrained.vocab import VocabInfo  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "jsonschemabench"
HAND_WRITTEN = [
    r"a(xb)?", r"[a-z]+@[a-z]+\.(com|org)", r"[0-9]{3}-[0-9]{4}", r"(ab|cd)*e", r"héllo|wörld", r".{2,5}",
    r'"([^"\\]|\\.)*"', r"[A-Z][a-z]{0,6}", r"(yes|no|maybe)", r"-?(0|[1-9][0-9]*)(\.[0-9]+)?",
    r"[0-9a-f]{8}-[0-9a-f]{4}", r"(\+|-)?[0-9]+", r" *x *", r"[^abc]{1,3}", r"日本語?", r"[α-ω]+",
    r"(a|b)*abb", r"(0|1(01*0)*1)*", r"x{3}|y{2,}", r"(?:[a-c]{2}){1,2}", r"\(\)\[\]\{\}", r"\.\*\+\?",
    r"\t\n\r", r"[\u00e0-\u00ff]{2}", r"\U0001F600|\U0001F64F", r"[😀-🙏]+", r"(foo)?(bar)?(baz)?",
    r"a??b+?c*?", r"[0-9 ]+", r"(?s:.)+", r"[^\n]*", r"(true|false|null)", r"\$\^", r"(a(b(c(d)?)?)?)?",
    r"[\-\]\\]+", r"colou?r", r"(ab){2,3}c{0,2}", r"[A-Za-z_][A-Za-z0-9_]*", r"[0-9]+(,[0-9]{3})*",
    r"(19|20)[0-9][0-9]-(0[1-9]|1[0-2])", r"é+|e\u0301", r"[ab]{0,4}x", r"\x41\x42\x7e", r"[€£¥][0-9]{1,3}",
    r"The (quick|slow) brown fox", r"\{\"a\":[0-9]{1,3}\}", r"[^\"]{0,12}\"", r"(\r\n|\n)+end",
    r"[a-zA-Z0-9 ,.!?]{1,40}", r"ab|abc|abcd",
]
NUM_SCHEMA_REGEXES = 150
WALKS = 2
STEPS = 24


@pytest.fixture(scope="module")
def tokenizers(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    eos = hf.eos_token_id
    return llguidance.hf.from_tokenizer(hf, eos_token=eos), VocabInfo.from_tokenizer(hf, eos_token_ids=[eos])


@pytest.fixture(scope="module")
def schema_regexes():
    """150 converter outputs from the benchmark schemas: every 7th file that converts (modest sizes)."""
    out = []
    for subset, quota in (("Glaiveai2K", 55), ("Github_easy", 55), ("Github_trivial", 40)):
        taken = 0
        for f in sorted((DATA / subset).glob("*.json"))[::7]:
            try:
                rx = json_schema_to_regex(f.read_text())
            except ValueError:
                continue
            if len(rx) <= 2500:
                out.append((f.name, rx))
                taken += 1
            if taken == quota:
                break
    assert len(out) == NUM_SCHEMA_REGEXES
    return out


def _bits(words: np.ndarray, n: int) -> np.ndarray:
    return np.unpackbits(np.ascontiguousarray(words).view(np.uint8), bitorder="little")[:n].astype(bool)


def _compare_walks(regex: str, tokenizers, seed: int) -> None:
    ll_tok, vocab = tokenizers
    table = compile_constraint("regex", regex, vocab)
    text_ids = np.array([b is not None for b in vocab.tokens])
    eos = vocab.eos_token_ids[0]
    grammar = '%llguidance {"no_forcing": true}\nstart: /' + llguidance.regex_to_lark(regex, "") + "/\n"
    rng = np.random.default_rng(seed)
    for _ in range(WALKS):
        matcher = llguidance.LLMatcher(ll_tok, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        state = table.start_state
        for step in range(STEPS):
            theirs = _bits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint32), vocab.vocab_size)
            ours = _bits(table.mask[state], vocab.vocab_size)
            diff = np.flatnonzero((theirs != ours) & text_ids)
            assert diff.size == 0, (
                f"{regex!r} step {step}: masks differ on {diff.size} tokens, e.g. "
                + ", ".join(f"{t}={vocab.tokens[t]!r} ours={ours[t]}" for t in diff[:5])
            )
            assert ours[eos] == bool(table.accepting[state]) == theirs[eos]
            choices = np.flatnonzero(ours & text_ids)
            if choices.size == 0:
                break
            token = int(rng.choice(choices))
            assert matcher.consume_token(token), matcher.get_error()
            state = table.next_state(state, token)


@pytest.mark.parametrize("regex", HAND_WRITTEN)
def test_masks_equal_llguidance_hand_written(regex, tokenizers):
    _compare_walks(regex, tokenizers, seed=len(regex))


@pytest.mark.slow
@pytest.mark.parametrize("index", range(NUM_SCHEMA_REGEXES))
def test_masks_equal_llguidance_schema_regexes(index, tokenizers, schema_regexes):
    name, regex = schema_regexes[index]
    _compare_walks(regex, tokenizers, seed=index)


def test_oracle_set_has_200_regexes():
    assert len(HAND_WRITTEN) == 50 and len(HAND_WRITTEN) + NUM_SCHEMA_REGEXES == 200
