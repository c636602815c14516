"""The tokenizer wrapper: encode/decode, chat templates, EOS ids, token bytes, and the incremental detokenizer
(on the default model's byte-level BPE and on a small sentencepiece vocabulary with byte fallback)."""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxserve.tokenizer import IncrementalDetokenizer, Tokenizer

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_tokenizer_dir)


def copy_tokenizer(src: Path, dst: Path, **config_changes) -> Path:
    """A copy of a tokenizer directory with some tokenizer_config.json keys changed (None removes a key)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


# --------------------------------------------------------------------------------------------------------------
# Basics on the default model
# --------------------------------------------------------------------------------------------------------------


def test_properties(tok):
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1
    assert tok.eos_token_ids == (2,)  # <|im_end|>
    assert tok.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]
    # every control token of the vocabulary, not only bos/eos/unk/pad
    assert tok.all_special_ids == tuple(range(17))
    assert tok.has_chat_template


@pytest.mark.parametrize("text", [
    "Hello world", "日本語のテキスト", "emoji 😀👍🏽🇫🇷", "def f(x):\n\treturn x  # ok\n", "   spaces   \n\n",
    "don't stop", "0123456789", "é ñ ß Ω ∑", "",
])
def test_encode_decode_roundtrip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text


def test_special_tokens_in_text(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_encode_rejects_non_text(tok):
    with pytest.raises(ValueError, match="str"):
        tok.encode(["not", "text"])  # type: ignore[arg-type]


def test_eos_ids_from_generation_config(tmp_path, smollm2_tokenizer_dir):
    d = copy_tokenizer(smollm2_tokenizer_dir, tmp_path / "tok")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    assert Tokenizer.from_dir(d).eos_token_ids == (0, 2)  # generation_config order, tokenizer's eos not repeated


def test_from_dir_without_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer"):
        Tokenizer.from_dir(tmp_path)


def test_loads_without_torch(smollm2_tokenizer_dir):
    """The server must run without torch: load and use the tokenizer with torch made unimportable."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from jaxserve.tokenizer import Tokenizer\n"
        f"t = Tokenizer.from_dir({str(smollm2_tokenizer_dir)!r})\n"
        "ids = t.apply_chat_template([{'role': 'user', 'content': 'hi'}])\n"
        "assert t.decode(ids, skip_special_tokens=False).endswith('<|im_start|>assistant\\n')\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_token_bytes(tok):
    table = tok.token_bytes()
    assert len(table) == tok.vocab_size
    assert all(table[i] is None for i in tok.all_special_ids)
    for text in ("Hello", " world", "\n", "é"):
        ids = tok.encode(text, add_special_tokens=False)
        assert b"".join(table[i] for i in ids) == text.encode()
    # a token holding part of a multi-byte character has those raw bytes
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1 and b"".join(table[i] for i in ids) == "😀".encode()


# --------------------------------------------------------------------------------------------------------------
# Chat template
# --------------------------------------------------------------------------------------------------------------


def test_chat_template_ids(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    ids = tok.apply_chat_template(messages)
    assert ids == tok.encode(tok.render_chat_template(messages), add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    without_prompt = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert ids[: len(without_prompt)] == without_prompt and len(ids) > len(without_prompt)


def test_chat_content_parts_are_joined(tok):
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    as_text = [{"role": "user", "content": "Hello there"}]
    assert tok.apply_chat_template(as_parts) == tok.apply_chat_template(as_text)
    with pytest.raises(ValueError, match="image_url"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_chat_bad_requests(tok):
    with pytest.raises(ValueError, match="empty"):
        tok.apply_chat_template([])
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"content": "no role"}])
    with pytest.raises(ValueError, match="both"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], continue_final_message=True)
    with pytest.raises(ValueError, match="tools"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template_kwargs={"tools": []})


def test_continue_final_message(tok):
    messages = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi, I am"}]
    text = tok.decode(
        tok.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True),
        skip_special_tokens=False,
    )
    assert text.endswith("<|im_start|>assistant\nHi, I am")


def test_no_chat_template(tmp_path, smollm2_tokenizer_dir):
    t = Tokenizer.from_dir(copy_tokenizer(smollm2_tokenizer_dir, tmp_path / "tok", chat_template=None))
    assert not t.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        t.apply_chat_template([{"role": "user", "content": "hi"}])


def test_tools_and_template_kwargs_reach_the_template(tmp_path, smollm2_tokenizer_dir):
    template = (
        "{% if tools %}TOOLS:{% for t in tools %}{{ t['function']['name'] }};{% endfor %}\n{% endif %}"
        "{% if flavor is defined %}FLAVOR:{{ flavor }}\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        "{% if messages[-1]['role'] == 'bad' %}{{ raise_exception('bad role') }}{% endif %}"
    )
    t = Tokenizer.from_dir(copy_tokenizer(smollm2_tokenizer_dir, tmp_path / "tok", chat_template=template))
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    text = t.render_chat_template([{"role": "user", "content": "hi"}], tools=tools,
                                  chat_template_kwargs={"flavor": "mint"})
    # HF renders with trim_blocks: the newline right after a block tag is dropped
    assert text.startswith("TOOLS:get_weather;add;FLAVOR:mint\n<|im_start|>user\nhi")
    with pytest.raises(ValueError, match="bad role"):
        t.apply_chat_template([{"role": "bad", "content": "x"}])


# --------------------------------------------------------------------------------------------------------------
# Incremental detokenizer
# --------------------------------------------------------------------------------------------------------------


def stream(tok: Tokenizer, ids: list[int], rng: random.Random, skip_special_tokens: bool = True) -> list[str]:
    detok = tok.detokenizer(skip_special_tokens=skip_special_tokens)
    deltas, i = [], 0
    while i < len(ids):
        n = rng.randrange(1, 4)
        deltas.append(detok.push(ids[i:i + n]))
        i += n
    deltas.append(detok.flush())
    return deltas


def test_detokenizer_holds_back_split_multibyte_characters(tok):
    text = "A😀B 日本語 👍🏽!"
    ids = tok.encode(text, add_special_tokens=False)
    detok = tok.detokenizer()
    deltas = [detok.push([i]) for i in ids]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # some token ended inside a character and was held back
    assert detok.flush() == ""
    assert isinstance(detok, IncrementalDetokenizer) and detok.token_ids == ids


def test_detokenizer_matches_full_decode_on_random_streams(tok):
    rng = random.Random(0)
    text_ids = tok.encode("Hi 😀😀 世界 — déjà vu\n\tcode()  ", add_special_tokens=False)
    for trial in range(150):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        if trial % 3 == 0:  # real text around random and special tokens
            ids = text_ids + ids + [rng.randrange(17)] + text_ids
        for skip in (True, False):
            assert "".join(stream(tok, ids, rng, skip)) == tok.decode(ids, skip_special_tokens=skip), (ids, skip)


def test_detokenizer_window_stays_small(tok, monkeypatch):
    """O(new tokens) per step: each decode covers a short window, not the whole output."""
    ids = tok.encode(" ".join(["The quick brown fox jumps over the lazy dog. 日本 😀"] * 40), add_special_tokens=False)
    lengths: list[int] = []
    original = Tokenizer.decode

    def spy(self, token_ids, skip_special_tokens=True):
        token_ids = list(token_ids)
        lengths.append(len(token_ids))
        return original(self, token_ids, skip_special_tokens)

    monkeypatch.setattr(Tokenizer, "decode", spy)
    detok = tok.detokenizer()
    out = "".join(detok.push([i]) for i in ids)
    monkeypatch.undo()
    assert out == tok.decode(ids)
    assert len(ids) > 400 and max(lengths) <= 8


def test_detokenizer_flush_releases_incomplete_tail(tok):
    ids = tok.encode("ok 😀", add_special_tokens=False)
    detok = tok.detokenizer()
    pushed = detok.push(ids[:-1])  # the emoji's last byte is missing
    assert "\ufffd" not in pushed
    tail = detok.flush()
    assert pushed + tail == tok.decode(ids[:-1])


# -- a sentencepiece vocabulary with byte fallback (Llama/Mistral style) --------------------------------------


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory) -> Tokenizer:
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    merges = [("▁", "h"), ("▁h", "e"), ("l", "l"), ("▁he", "ll"), ("▁hell", "o"), ("▁", "w"), ("o", "r"),
              ("▁w", "or"), ("l", "d"), ("▁wor", "ld"), ("日", "本")]
    for piece in ["▁", "h", "e", "l", "o", "w", "r", "d", "日", "本"] + [a + b for a, b in merges]:
        vocab.setdefault(piece, len(vocab))
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    rust.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    rust.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    rust.add_special_tokens(["<unk>", "<s>", "</s>"])
    d = tmp_path_factory.mktemp("sp-tok")
    rust.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    }))
    return Tokenizer.from_dir(d)


def test_sentencepiece_byte_fallback_streaming(sp_tok):
    text = "hello 日本 😀 world ñ"
    ids = sp_tok.encode(text, add_special_tokens=False)
    tokens = sp_tok.convert_ids_to_tokens(ids)
    assert tokens[0] == "▁hello" and "<0xF0>" in tokens and "日本" in tokens  # emoji via byte fallback
    assert sp_tok.decode(ids) == text
    detok = sp_tok.detokenizer()
    deltas = [detok.push([i]) for i in ids]
    assert deltas[-1] == ""  # "ñ" is a run of byte tokens: held until a non-byte token or the end
    deltas.append(detok.flush())
    assert "".join(deltas) == text and all("\ufffd" not in d for d in deltas)
    assert deltas[:4] == ["hello", " ", "日本", " "]  # leading-space handling stays right mid-stream
    assert deltas[-1] == "ñ"
    rng = random.Random(1)
    for _ in range(100):
        ids = [rng.randrange(sp_tok.vocab_size) for _ in range(rng.randrange(1, 25))]
        for skip in (True, False):
            assert "".join(stream(sp_tok, ids, rng, skip)) == sp_tok.decode(ids, skip_special_tokens=skip), ids
