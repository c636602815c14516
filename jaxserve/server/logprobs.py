"""Engine `TokenLogprob`s -> OpenAI's logprobs objects (chat: `content` list; completions: parallel lists)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Protocol, Sequence

if TYPE_CHECKING:
    from jaxserve.engine.request import TokenLogprob

# JSON has no -inf; OpenAI-compatible servers report an impossible token with this floor instead.
LOGPROB_FLOOR = -9999.0


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


class TokenTexts:
    """Token id -> its text (special tokens included), cached per response, and its exact bytes.

    A byte-level token may hold part of a UTF-8 character: its text then shows U+FFFD, while `bytes`
    (from the tokenizer's token -> bytes table, when given) carries the real bytes, as OpenAI's do.
    """

    def __init__(self, tokenizer: _Decoder, token_bytes: Sequence[bytes | None] | None = None) -> None:
        self._tokenizer = tokenizer
        self._token_bytes = token_bytes
        self._cache: dict[int, str] = {}

    def bytes_of(self, token_id: int) -> list[int]:
        exact = self._token_bytes[token_id] if self._token_bytes is not None and token_id < len(self._token_bytes) else None
        return list(exact if exact is not None else self(token_id).encode("utf-8"))

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text


def chat_logprobs(entries: list["TokenLogprob"], texts: TokenTexts) -> list[dict[str, Any]]:
    out = []
    for entry in entries:
        token = texts(entry.token_id)
        out.append(
            {
                "token": token,
                "logprob": _finite(entry.logprob),
                "bytes": texts.bytes_of(entry.token_id),
                "top_logprobs": [
                    {"token": texts(tid), "logprob": _finite(lp), "bytes": texts.bytes_of(tid)}
                    for tid, lp in entry.top
                ],
            }
        )
    return out


def completion_logprobs(entries: list["TokenLogprob"], texts: TokenTexts, text_offset: int) -> dict[str, Any]:
    """One fragment of the completions format; `text_offset` is where the first token starts in the text."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    offset = text_offset
    for entry in entries:
        token = texts(entry.token_id)
        tokens.append(token)
        token_logprobs.append(_finite(entry.logprob))
        top: dict[str, float] = {}
        for tid, lp in entry.top:
            top.setdefault(texts(tid), _finite(lp))
        tops.append(top)
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def merge_completion_logprobs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for part in parts:
        for key in merged:
            merged[key].extend(part[key])
    return merged


def prompt_completion_logprobs(prompt_ids: list[int], entries: Sequence["TokenLogprob | None"],
                               texts: TokenTexts) -> dict[str, Any]:
    """The echoed prompt's fragment of the completions format: the first token has no logprob (null), as
    OpenAI reports it; offsets count from the start of the echoed text."""
    first = texts(prompt_ids[0])
    head = {"tokens": [first], "token_logprobs": [None], "top_logprobs": [None], "text_offset": [0]}
    rest = completion_logprobs([e for e in entries[1:] if e is not None], texts, len(first))
    return merge_completion_logprobs([head, rest])
