"""Token id -> exact bytes, and the vocabulary trie the token-table compiler walks.

Byte-level BPE (GPT-2 byte map) and sentencepiece (`▁` -> space, `<0xNN>` byte fallback) vocabularies are
read from the Hugging Face `tokenizers` JSON. Special/control tokens map to None: they never match text.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=1)
def _gpt2_unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100 onwards."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _decoder_types(decoder: dict | None) -> list[dict]:
    if not decoder:
        return []
    if decoder.get("type") == "Sequence":
        return [d for sub in decoder.get("decoders", []) for d in _decoder_types(sub)]
    return [decoder]


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # transformers fast tokenizer or tokenizers.Tokenizer
    to_str = getattr(backend, "to_str", None)
    if to_str is None:
        raise ValueError(f"unsupported tokenizer {type(tokenizer).__name__}: need a fast (Rust) tokenizer")
    return json.loads(to_str())


def token_bytes(tokenizer) -> list[bytes | None]:
    """Exact bytes of every token id (index = id) of a Hugging Face fast tokenizer; None for special tokens."""
    spec = _tokenizer_json(tokenizer)
    model = spec["model"]
    if model["type"] in ("BPE", "WordPiece", "WordLevel"):
        pieces = dict(model["vocab"])
    elif model["type"] == "Unigram":
        pieces = {p[0]: i for i, p in enumerate(model["vocab"])}
    else:
        raise ValueError(f"unsupported tokenizer model {model['type']}")
    if model["type"] == "WordPiece":
        raise ValueError("WordPiece tokenizers are not supported for constrained decoding")
    decoders = _decoder_types(spec.get("decoder"))
    kinds = {d.get("type") for d in decoders}
    pre = spec.get("pre_tokenizer") or {}
    pre_kinds = {p.get("type") for p in pre.get("pretokenizers", [pre])}
    byte_level = "ByteLevel" in kinds or "ByteLevel" in pre_kinds
    byte_fallback = "ByteFallback" in kinds or bool(model.get("byte_fallback"))
    metaspace = "Metaspace" in kinds or "Metaspace" in pre_kinds or any(
        d.get("type") == "Replace" and d.get("pattern", {}).get("String") == "▁" for d in decoders
    )
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    size = max([*pieces.values(), *added.keys()], default=-1) + 1
    out: list[bytes | None] = [None] * size
    byte_map = _gpt2_unicode_to_byte() if byte_level else None
    for piece, tid in pieces.items():
        out[tid] = _piece_bytes(piece, byte_map, byte_fallback, metaspace)
    for tid, a in added.items():
        # Added tokens are matched literally on text (not through the byte map); special ones never match.
        out[tid] = None if a.get("special", False) else (a["content"].encode("utf-8") or None)
    return out


def _piece_bytes(piece: str, byte_map: dict[str, int] | None, byte_fallback: bool, metaspace: bool) -> bytes | None:
    if byte_map is not None:
        try:
            return bytes(byte_map[c] for c in piece) or None
        except KeyError:
            return None  # not a byte-level piece (control token stored in the model vocab)
    if byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    if metaspace:
        piece = piece.replace("▁", " ")
    if piece.startswith("<") and piece.endswith(">") and piece in ("<s>", "</s>", "<unk>", "<pad>"):
        return None
    return piece.encode("utf-8") or None


# ---------------------------------------------------------------- trie


@dataclass(frozen=True, eq=False)
class TrieLevel:
    """Nodes at depth d (prefixes of d bytes), sorted by (parent, byte) so siblings are contiguous."""

    byte: np.ndarray  # uint8 [n]: last byte of the prefix
    child_start: np.ndarray  # int64 [n]: first child at depth d + 1
    child_count: np.ndarray  # int64 [n]
    end_string: np.ndarray  # int64 [n]: index of the unique token string ending here, or -1
    subtree_lo: np.ndarray  # int64 [n]: the strings with this prefix are [subtree_lo, subtree_hi)
    subtree_hi: np.ndarray
    below_bytes: np.ndarray  # uint64 [n, 4]: 256-bit set of the bytes after this prefix in its subtree
    below_depth: np.ndarray  # int64 [n]: most bytes after this prefix in any string of its subtree


@dataclass(frozen=True, eq=False)
class VocabTrie:
    levels: tuple[TrieLevel, ...]  # levels[0] is depth 1
    string_token_ptr: np.ndarray  # int64 [U + 1]: CSR unique string -> token ids
    string_token_ids: np.ndarray  # int32
    string_lengths: np.ndarray  # int64 [U]
    string_bytes: np.ndarray  # uint8 [U, max_len], zero padded
    string_byte_sets: np.ndarray  # uint64 [U, 4]: 256-bit set of the bytes in each string


def build_trie(tokens: list[bytes | None]) -> VocabTrie:
    valid = [(b, i) for i, b in enumerate(tokens) if b]
    valid.sort()
    uniq: list[bytes] = []
    ptr = [0]
    ids: list[int] = []
    for b, i in valid:
        if not uniq or uniq[-1] != b:
            if uniq:
                ptr.append(len(ids))
            uniq.append(b)
        ids.append(i)
    ptr.append(len(ids))
    lens = np.fromiter(map(len, uniq), dtype=np.int64, count=len(uniq))
    max_len = int(lens.max()) if lens.size else 0
    mat = np.zeros((len(uniq), max_len), dtype=np.uint8)
    flat = np.frombuffer(b"".join(uniq), dtype=np.uint8)
    rows = np.repeat(np.arange(len(uniq)), lens)
    cols = np.arange(flat.size) - np.repeat(np.cumsum(lens) - lens, lens)
    mat[rows, cols] = flat
    node = np.zeros(len(uniq), dtype=np.int64)  # node of each string at the previous depth (root = 0)
    raw = []
    for d in range(1, max_len + 1):
        alive = np.flatnonzero(lens >= d)  # sorted order of strings is kept, so equal prefixes are adjacent
        parent = node[alive]
        byte = mat[alive, d - 1]
        new = np.ones(alive.size, dtype=bool)
        new[1:] = (parent[1:] != parent[:-1]) | (byte[1:] != byte[:-1])
        nid = np.cumsum(new) - 1
        n = int(nid[-1]) + 1
        end_string = np.full(n, -1, dtype=np.int64)
        ends = lens[alive] == d
        end_string[nid[ends]] = alive[ends]
        first = np.flatnonzero(new)
        last = np.append(first[1:], alive.size) - 1
        raw.append((parent[new], byte[new], end_string, alive[first], alive[last] + 1))
        node[alive] = nid
    levels: list[TrieLevel] = []
    below_next = np.zeros((0, 4), dtype=np.uint64)
    for d in range(len(raw) - 1, -1, -1):  # bottom-up, so the children's byte sets are known
        _parent, byte, end_string, sub_lo, sub_hi = raw[d]
        n = byte.size
        below = np.zeros((n, 4), dtype=np.uint64)
        if d + 1 < len(raw):
            child_parent, child_byte = raw[d + 1][0], raw[d + 1][1]
            start = np.searchsorted(child_parent, np.arange(n), side="left")
            stop = np.searchsorted(child_parent, np.arange(n), side="right")
            contrib = below_next.copy()
            contrib[np.arange(child_byte.size), child_byte >> 6] |= np.left_shift(
                np.uint64(1), (child_byte & 63).astype(np.uint64))
            has = stop > start
            below[has] = np.bitwise_or.reduceat(contrib, start[has], axis=0)
        else:
            start = stop = np.zeros(n, dtype=np.int64)
        # Longest string in [lo, hi): maximum.reduceat over interleaved (lo, hi) bounds, even results.
        padded = np.append(lens, 0)
        longest = np.maximum.reduceat(padded, np.stack([sub_lo, sub_hi], axis=1).ravel())[::2]
        levels.append(TrieLevel(byte=byte, child_start=start.astype(np.int64),
                                child_count=(stop - start).astype(np.int64), end_string=end_string,
                                subtree_lo=sub_lo, subtree_hi=sub_hi, below_bytes=below,
                                below_depth=longest - (d + 1)))
        below_next = below
    levels.reverse()
    onehot = np.zeros((len(uniq), 256), dtype=bool)
    onehot[rows, flat] = True
    byte_sets = np.packbits(onehot, axis=1, bitorder="little").view(np.uint64)
    return VocabTrie(tuple(levels), np.asarray(ptr, dtype=np.int64), np.asarray(ids, dtype=np.int32), lens,
                     mat, byte_sets)


@dataclass(frozen=True, eq=False)
class VocabInfo:
    """Everything the compiler needs about a model's vocabulary.

    `vocab_size`: tokenizer size (ids with bytes or special); `vocab_width`: the model's logit width
    (>= vocab_size; the ids in between are padding and never allowed); `eos_token_ids`: every end token."""

    tokens: tuple[bytes | None, ...]
    vocab_width: int
    eos_token_ids: tuple[int, ...]
    fingerprint: str
    trie: VocabTrie = field(repr=False)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @staticmethod
    def from_token_bytes(tokens: list[bytes | None], *, eos_token_ids: tuple[int, ...] | list[int],
                         vocab_width: int | None = None) -> "VocabInfo":
        width = len(tokens) if vocab_width is None else vocab_width
        if width < len(tokens):
            raise ValueError(f"vocab_width {width} is smaller than the tokenizer's {len(tokens)} tokens")
        eos = tuple(sorted({int(e) for e in eos_token_ids}))
        if not eos:
            raise ValueError("at least one EOS token id is needed")
        if any(not 0 <= e < len(tokens) for e in eos):
            raise ValueError(f"EOS ids {eos} outside the vocabulary of {len(tokens)}")
        h = hashlib.sha256()
        for b in tokens:
            h.update(b"\x00" if b is None else len(b).to_bytes(2, "little") + b)
        h.update(repr((width, eos)).encode())
        return VocabInfo(tuple(tokens), width, eos, h.hexdigest()[:32], build_trie(list(tokens)))

    @staticmethod
    def from_tokenizer(tokenizer, *, eos_token_ids=None, vocab_width: int | None = None) -> "VocabInfo":
        """From a HF fast tokenizer; EOS ids default to the tokenizer's eos token."""
        if eos_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            if eos is None:
                raise ValueError("the tokenizer has no eos_token_id; pass eos_token_ids")
            eos_token_ids = [eos]
        return VocabInfo.from_token_bytes(token_bytes(tokenizer), eos_token_ids=eos_token_ids,
                                          vocab_width=vocab_width)
