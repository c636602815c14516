"""Rebuild a model's tokenizer from GGUF metadata as a `tokenizers` JSON, with no torch and no transformers.

GGUF stores the vocabulary, merges (or sentencepiece scores), token types and special ids under llama.cpp's
keys. `tokenizer.ggml.model` says which algorithm: `gpt2` is byte-level BPE, split first by the regexes
llama.cpp uses for the file's `tokenizer.ggml.pre`; `llama` is sentencepiece-style BPE with byte fallback.
Control tokens become special added tokens and user-defined ones plain added tokens, matched whole as
llama.cpp does.
"""
from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jaxserve.models.gguf import GGUFFile

logger = logging.getLogger(__name__)

# llama.cpp token types (`enum llama_token_type`).
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED, _TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split regexes, as llama.cpp applies them per `tokenizer.ggml.pre` (llama-vocab.cpp).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# `tokenizer.ggml.pre` -> (digits split one by one first?, split regex, BPE ignore_merges)
_PRE_TOKENIZERS: dict[str, tuple[bool, str, bool]] = {
    **{pre: (False, _GPT2_SPLIT, False) for pre in ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais")},
    **{pre: (True, _GPT2_SPLIT, False) for pre in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")},
    **{pre: (False, _LLAMA3_SPLIT, True) for pre in ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe")},
    **{pre: (False, _QWEN2_SPLIT, False) for pre in ("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2")},
    "qwen35": (False, _QWEN35_SPLIT, False),
    "tekken": (False, _TEKKEN_SPLIT, False),
    **{pre: (False, _GPT4O_SPLIT, False) for pre in ("gpt-4o", "llama4")},
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet byte-level BPE vocabularies are spelled in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[list[str]]:
    """Sentencepiece vocabularies in GGUF often carry no merges: every split of a token into two vocabulary
    tokens is a merge, ranked by the score of the token it makes (higher merges first)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for token, index in vocab.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[index], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [[left, right] for _, _, _, left, right in ranked]


def tokenizer_json(gf: GGUFFile) -> dict[str, Any]:
    """A `tokenizers` JSON description of the GGUF's tokenizer (byte-level BPE or sentencepiece-style BPE)."""
    meta = gf.metadata
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{gf.path}: GGUF has no tokenizer (tokenizer.ggml.tokens missing)")
    tokens = [str(t) for t in tokens]
    token_types = [int(t) for t in meta.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens)]
    if len(token_types) != len(tokens):
        raise ValueError(f"{gf.path}: {len(token_types)} token types for {len(tokens)} tokens")
    if model == "gpt2":
        return _byte_level_tokenizer(gf, tokens, token_types)
    if model == "llama":
        return _sentencepiece_tokenizer(gf, tokens, token_types)
    raise ValueError(f"{gf.path}: unsupported tokenizer model {model!r} (supported: gpt2, llama)")


def _added_tokens(tokens: list[str], token_types: list[int], extra_special: set[int]) -> list[dict[str, Any]]:
    """Control and user-defined tokens are matched whole in the text, like llama.cpp does."""
    added = []
    for index, (token, token_type) in enumerate(zip(tokens, token_types)):
        special = token_type == _TOKEN_CONTROL or index in extra_special
        if special or token_type == _TOKEN_USER_DEFINED:
            added.append({
                "id": index, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": special,
            })
    return added


def _unique_vocab(gf: GGUFFile, spelled: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for index, token in enumerate(spelled):
        if token in vocab:
            # tokenizers needs unique strings; llama.cpp itself also maps the text to one id.
            logger.warning("%s: token %r appears at ids %d and %d; keeping %d", gf.path, token, vocab[token], index, vocab[token])
            continue
        vocab[token] = index
    return vocab


def _post_processor(gf: GGUFFile, tokens: list[str], add_bos: bool, add_eos: bool) -> dict[str, Any] | None:
    bos_id, eos_id = gf.metadata.get("tokenizer.ggml.bos_token_id"), gf.metadata.get("tokenizer.ggml.eos_token_id")
    if add_bos and bos_id is None:
        raise ValueError(f"{gf.path}: add_bos_token is set but there is no bos_token_id")
    if add_eos and eos_id is None:
        raise ValueError(f"{gf.path}: add_eos_token is set but there is no eos_token_id")
    if not (add_bos or add_eos):
        return None
    prefix = [{"SpecialToken": {"id": tokens[bos_id], "type_id": 0}}] if add_bos else []
    suffix = [{"SpecialToken": {"id": tokens[eos_id], "type_id": 0}}] if add_eos else []

    def seq(name: str, type_id: int) -> list[dict[str, Any]]:
        return [{"Sequence": {"id": name, "type_id": type_id}}]

    specials = {}
    for token_id in ([bos_id] if add_bos else []) + ([eos_id] if add_eos else []):
        specials[tokens[token_id]] = {"id": tokens[token_id], "ids": [int(token_id)], "tokens": [tokens[token_id]]}
    return {
        "type": "TemplateProcessing",
        "single": prefix + seq("A", 0) + suffix,
        "pair": prefix + seq("A", 0) + suffix + prefix + seq("B", 1) + suffix,
        "special_tokens": specials,
    }


def _bpe_model(vocab: dict[str, int], merges: list[list[str]], **options: Any) -> dict[str, Any]:
    model = {
        "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
        "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
        "vocab": vocab, "merges": merges,
    }
    model.update(options)
    return model


def _split_merges(gf: GGUFFile, merges: list[str]) -> list[list[str]]:
    pairs = []
    for merge in merges:
        parts = str(merge).split(" ")
        if len(parts) != 2:
            raise ValueError(f"{gf.path}: malformed merge {merge!r}")
        pairs.append(parts)
    return pairs


def _special_ids(gf: GGUFFile) -> set[int]:
    """Ids to mark special even if the file types them as normal tokens. Not the pad id: some files
    point it at an ordinary word, which must keep matching text and decoding."""
    keys = ("bos_token_id", "eos_token_id", "unknown_token_id", "eot_token_id", "eom_token_id")
    return {int(gf.metadata[f"tokenizer.ggml.{k}"]) for k in keys if gf.metadata.get(f"tokenizer.ggml.{k}") is not None}


def _byte_level_tokenizer(gf: GGUFFile, tokens: list[str], token_types: list[int]) -> dict[str, Any]:
    pre = str(gf.metadata.get("tokenizer.ggml.pre", "default"))
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"{gf.path}: unknown pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: {sorted(_PRE_TOKENIZERS)}"
        )
    split_digits, split_regex, ignore_merges = _PRE_TOKENIZERS[pre]
    byte_chars = _bytes_to_unicode()
    alphabet = set(byte_chars.values())
    # Regular tokens are spelled in the byte alphabet; a few files store some raw, so re-spell those.
    # Added tokens stay raw: they are matched against the text itself.
    spelled = [
        t if token_type in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED) or set(t) <= alphabet
        else "".join(byte_chars[b] for b in t.encode("utf-8"))
        for t, token_type in zip(tokens, token_types)
    ]
    merges = _split_merges(gf, gf.metadata.get("tokenizer.ggml.merges") or [])
    if not merges:
        raise ValueError(f"{gf.path}: byte-level BPE tokenizer without merges (tokenizer.ggml.merges)")
    pre_steps: list[dict[str, Any]] = []
    if split_digits:
        pre_steps.append({"type": "Digits", "individual_digits": True})
    pre_steps.append({"type": "Split", "pattern": {"Regex": split_regex}, "behavior": "Isolated", "invert": False})
    pre_steps.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False})
    add_bos = bool(gf.metadata.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(gf.metadata.get("tokenizer.ggml.add_eos_token", False))
    post = _post_processor(gf, tokens, add_bos, add_eos) or {
        "type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True,
    }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _added_tokens(spelled, token_types, _special_ids(gf)),
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre_steps},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": _bpe_model(_unique_vocab(gf, spelled), merges, ignore_merges=ignore_merges),
    }


def _sentencepiece_tokenizer(gf: GGUFFile, tokens: list[str], token_types: list[int]) -> dict[str, Any]:
    meta = gf.metadata
    merges_raw = meta.get("tokenizer.ggml.merges")
    if merges_raw:
        merges = _split_merges(gf, merges_raw)
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if not scores or len(scores) != len(tokens):
            raise ValueError(f"{gf.path}: sentencepiece tokenizer has neither merges nor one score per token")
        merges = _merges_from_scores(tokens, [float(s) for s in scores])
    add_prefix_space = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    decoders: list[dict[str, Any]] = [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if add_prefix_space:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    # Older files lack the flag; llama.cpp adds BOS to sentencepiece vocabularies unless told otherwise.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _added_tokens(tokens, token_types, _special_ids(gf)),
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Metaspace", "replacement": "\u2581",
            "prepend_scheme": "first" if add_prefix_space else "never", "split": False,
        },
        "post_processor": _post_processor(gf, tokens, add_bos, add_eos),
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": _bpe_model(
            _unique_vocab(gf, tokens), merges, fuse_unk=True, byte_fallback=True,
            unk_token=tokens[int(unk_id)] if unk_id is not None else None,
        ),
    }


def tokenizer_files(gf: GGUFFile) -> dict[str, dict[str, Any]]:
    """`tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` contents."""
    from tokenizers import Tokenizer as RustTokenizer

    tok_json = tokenizer_json(gf)
    # Fail here, with the file's name, rather than later in the loader.
    try:
        RustTokenizer.from_str(json.dumps(tok_json))
    except Exception as exc:
        raise ValueError(f"{gf.path}: the tokenizer rebuilt from the GGUF metadata is invalid: {exc}") from exc
    meta = gf.metadata
    tokens = meta["tokenizer.ggml.tokens"]

    def token_at(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return str(tokens[int(index)]) if index is not None else None

    special_map = {
        name: token
        for name, token in (
            ("bos_token", token_at("bos_token_id")),
            ("eos_token", token_at("eos_token_id")),
            ("unk_token", token_at("unknown_token_id")),
            ("pad_token", token_at("padding_token_id")),
        )
        if token is not None
    }
    is_sentencepiece = meta.get("tokenizer.ggml.model") == "llama"
    config: dict[str, Any] = {
        # The generic fast tokenizer loads tokenizer.json exactly as written (no rebuilding from vocab files).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", is_sentencepiece)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(gf.arch_value("context_length", 2048)),
        **special_map,
    }
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = str(template)
    return {
        "tokenizer.json": tok_json,
        "tokenizer_config.json": config,
        "special_tokens_map.json": special_map,
    }
