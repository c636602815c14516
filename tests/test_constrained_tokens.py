"""Token tables with the SmolLM2 vocabulary: random walks produce matching text, EOS only where accepting,
padding and special tokens never allowed, forced tokens, the compiler cache, token_bytes, and the token
classes the device advances grammar states with."""
import re
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

from jaxserve.constrained.compiler import ConstraintCompiler, compile_constraint
from jaxserve.constrained.grammar import token_classes, token_classes_exact
from jaxserve.constrained.token_table import distance_to_accept, sample_walk
from jaxserve.constrained.vocab import VocabInfo, token_bytes

from test_constrained_regex import REGEXES

VOCAB_WIDTH = 49216  # the model's logit width: 64 padding ids beyond the tokenizer


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def vocab(hf_tokenizer):
    eos = sorted({hf_tokenizer.eos_token_id, hf_tokenizer.convert_tokens_to_ids("<|endoftext|>")})
    return VocabInfo.from_tokenizer(hf_tokenizer, eos_token_ids=eos, vocab_width=VOCAB_WIDTH)


def test_token_bytes_of_byte_level_bpe(hf_tokenizer):
    tb = token_bytes(hf_tokenizer)
    assert len(tb) == 49152
    specials = set(hf_tokenizer.all_special_ids)
    assert all(tb[i] is None for i in specials)
    for i in range(0, len(tb), 97):
        if tb[i] is None:
            continue
        text = hf_tokenizer.decode([i])
        if "\ufffd" not in text:  # a token that is part of a UTF-8 character decodes to U+FFFD
            assert tb[i] == text.encode(), i
    # Multi-token text: the concatenated bytes are the UTF-8 text.
    ids = hf_tokenizer.encode(" héllo wörld 日本 {\"a\": 1}\n\t😀", add_special_tokens=False)
    assert b"".join(tb[i] for i in ids).decode() == " héllo wörld 日本 {\"a\": 1}\n\t😀"


def test_token_bytes_of_sentencepiece_with_byte_fallback():
    from tokenizers import Tokenizer, decoders, models

    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("<0x0A>", 0.0), ("<0xC3>", 0.0), ("▁hello", -1.0),
             ("▁", -2.0), ("wor", -3.0), ("ld", -3.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<s>", "</s>"])
    tb = token_bytes(tok)
    assert tb[3] == b"\n" and tb[4] == b"\xc3" and tb[5] == b" hello" and tb[6] == b" " and tb[7] == b"wor"
    assert tb[1] is None and tb[2] is None and tb[0] is None


@pytest.mark.parametrize("pattern", REGEXES)
def test_random_walks_fullmatch(pattern, vocab):
    table = compile_constraint("regex", pattern, vocab)
    rng = np.random.default_rng(zlib.crc32(pattern.encode()))
    dist = distance_to_accept(table)
    for _ in range(20):
        tokens, finished = sample_walk(table, rng, max_tokens=200, finish_after=30, distances=dist)
        assert finished, pattern
        text = b"".join(vocab.tokens[t] for t in tokens).decode("utf-8")
        assert re.fullmatch(pattern, text), (pattern, text)


def test_table_invariants(vocab):
    table = compile_constraint("regex", r"(ab|a)c?", vocab)
    bits = np.unpackbits(table.mask.view(np.uint8), axis=1, bitorder="little")[:, :VOCAB_WIDTH].astype(bool)
    assert table.mask.dtype == np.uint32 and table.mask.shape[1] == VOCAB_WIDTH // 32
    assert not bits[:, vocab.vocab_size:].any()  # padding ids
    specials = [i for i, b in enumerate(vocab.tokens) if b is None and i not in vocab.eos_token_ids]
    assert not bits[:, specials].any()
    for eos in vocab.eos_token_ids:
        assert (bits[:, eos] == table.accepting).all()
    # CSR agrees with the mask and with next_state.
    for s in range(table.num_states):
        lo, hi = table.indptr[s], table.indptr[s + 1]
        toks = table.next_tokens[lo:hi]
        assert set(toks.tolist()) == set(np.flatnonzero(bits[s]).tolist()) - (
            set(vocab.eos_token_ids) if table.accepting[s] else set())
        for t, nxt in zip(toks[:50], table.next_states[lo:hi][:50]):
            assert table.next_state(s, int(t)) == nxt
    with pytest.raises(ValueError, match="not allowed"):
        table.next_state(table.start_state, vocab.tokens.index(b"z"))


def test_forced_and_finished_states(vocab):
    table = compile_constraint("regex", r"\{\}", vocab)
    s = table.start_state
    # "{}" is a single token in SmolLM2, but "{" is allowed too: not forced at the start.
    assert table.forced_token[s] == -1
    after_brace = table.next_state(s, vocab.tokens.index(b"{"))
    assert table.forced_token[after_brace] == vocab.tokens.index(b"}")
    end = table.next_state(after_brace, vocab.tokens.index(b"}"))
    assert table.finished[end] and table.accepting[end]
    assert table.forced_token[end] == -1  # two EOS ids are allowed there


def test_compiler_cache_is_shared_and_thread_safe(vocab):
    compiler = ConstraintCompiler()
    results = []
    threads = [threading.Thread(target=lambda: results.append(compiler.compile("regex", "[a-c]{2}x", vocab)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(r is results[0] for r in results)
    assert compiler.misses == 1 and compiler.hits == 3
    with pytest.raises(ValueError, match="backreferences"):
        compiler.compile("regex", r"(a)\1", vocab)
    with pytest.raises(ValueError, match="unknown constraint kind"):
        compiler.compile("grammar", "x", vocab)


def test_vocab_info_validates_its_input():
    with pytest.raises(ValueError, match="vocab_width"):
        VocabInfo.from_token_bytes([b"a", b"b"], eos_token_ids=[0], vocab_width=1)
    with pytest.raises(ValueError, match="EOS"):
        VocabInfo.from_token_bytes([b"a", b"b"], eos_token_ids=[5])


def test_size_limits_raise_too_complex(vocab):
    from jaxserve.constrained.compiler import CompilerOptions

    with pytest.raises(ValueError, match="too complex"):
        compile_constraint("regex", "[a-z]{40}", vocab, CompilerOptions(max_table_states=20))
    with pytest.raises(ValueError, match="too complex"):
        compile_constraint("regex", "[^\"]*", vocab, CompilerOptions(max_table_pairs=1000))


SCHEMA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "jsonschemabench" / "Github_easy"


def check_classes_reproduce_table(table, token_class, next_by_class, rng) -> None:
    """Every transition of the CSR, exactly: each edge is its class's entry, and each state allows as many
    tokens through its classes as the CSR lists (so no class entry adds a token). Plus random lookups
    against `TokenTable.next_state`, which walks the token's bytes through the byte DFA instead."""
    assert token_class.shape == (table.vocab_width,) and token_class.dtype == np.int32
    assert next_by_class.shape[0] == table.num_states and next_by_class.dtype == np.int32
    src = np.repeat(np.arange(table.num_states), np.diff(table.indptr))
    np.testing.assert_array_equal(next_by_class[src, token_class[table.next_tokens]], table.next_states)
    class_size = np.bincount(token_class, minlength=next_by_class.shape[1])
    allowed_via_classes = (next_by_class >= 0).astype(np.int64) @ class_size
    np.testing.assert_array_equal(allowed_via_classes, np.diff(table.indptr))
    assert (next_by_class[:, token_class[list(table.eos_token_ids)]] == -1).all()  # end tokens never advance
    for state in rng.integers(0, table.num_states, size=min(table.num_states, 8)):
        for token in rng.integers(0, table.vocab_width, size=300):
            want = -1
            if table.is_allowed(state, token) and token not in table.eos_token_ids:
                want = table.next_state(state, token)
            assert next_by_class[state, token_class[token]] == want, (state, token)


def schema_tables(vocab, count: int):
    tables = []
    for f in sorted(SCHEMA_DIR.glob("*.json")):
        try:
            tables.append(compile_constraint("json_schema", f.read_text(), vocab))
        except ValueError:
            continue  # unsupported schema features: coverage is another test's business
        if len(tables) == count:
            return tables
    return tables


def test_token_classes_reproduce_every_transition(vocab):
    rng = np.random.default_rng(3)
    tables = [compile_constraint("regex", p, vocab) for p in REGEXES]
    tables += [compile_constraint("json_object", "", vocab)] + schema_tables(vocab, 6)
    for table in tables:
        token_class, next_by_class = token_classes(table)
        check_classes_reproduce_table(table, token_class, next_by_class, rng)
        # Far fewer classes than tokens: what makes the dense [S, C] table fit on the device.
        assert next_by_class.shape[1] < 1000


def test_exact_token_classes_give_the_same_partition(vocab):
    rng = np.random.default_rng(4)
    for pattern in [r"[a-z]+@[a-z]+\.(com|org)", r"(true|false|null)", r"\d+(,\d{3})*"]:
        table = compile_constraint("regex", pattern, vocab)
        hashed, nbc_hashed = token_classes(table)
        exact, nbc_exact = token_classes_exact(table)
        check_classes_reproduce_table(table, exact, nbc_exact, rng)
        # Same partition (labels may differ): the pairs (hashed, exact) are a bijection.
        pairs = np.unique(np.stack([hashed, exact]), axis=1)
        assert pairs.shape[1] == nbc_hashed.shape[1] == nbc_exact.shape[1]
