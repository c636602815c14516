"""The one place text meets token ids: encoding, decoding, chat templates and streaming detokenization.

Wraps a Hugging Face fast tokenizer loaded from a model directory (as written by the HF hub or by
`jaxserve.models.gguf.convert_gguf`). Only the `tokenizers`-backed path of transformers is used, which
does not need torch.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

_REPLACEMENT_CHAR = "\ufffd"
_BYTE_FALLBACK_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


def _message_content_text(content: Any, index: int) -> Any:
    """OpenAI content may be a list of parts; templates expect one string, so text parts are joined."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping) and part.get("type") == "text":
            texts.append(str(part.get("text", "")))
        else:
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ValueError(f"messages[{index}].content: unsupported content part of type {kind!r} (only text)")
    return "".join(texts)


class Tokenizer:
    """A model's tokenizer: ids <-> text, chat template, EOS ids, and per-token bytes for constrained decoding."""

    def __init__(self, hf_tokenizer: Any, eos_token_ids: Sequence[int] = ()) -> None:
        if not getattr(hf_tokenizer, "is_fast", False):
            raise ValueError(f"need a fast (tokenizers-backed) tokenizer, got {type(hf_tokenizer).__name__}")
        self._hf = hf_tokenizer
        eos = list(dict.fromkeys([*map(int, eos_token_ids), *_as_id_list(hf_tokenizer.eos_token_id)]))
        self._eos_token_ids = tuple(eos)
        added = hf_tokenizer.backend_tokenizer.get_added_tokens_decoder()
        special = {int(i) for i in hf_tokenizer.all_special_ids}
        special.update(int(i) for i, token in added.items() if token.special)
        self._all_special_ids = tuple(sorted(special))
        self._byte_fallback_ids = self._find_byte_fallback_ids(hf_tokenizer)

    @staticmethod
    def _find_byte_fallback_ids(hf_tokenizer: Any) -> frozenset[int]:
        """Ids of sentencepiece `<0xNN>` byte tokens, when the vocabulary decodes them by byte fallback."""
        if not getattr(hf_tokenizer.backend_tokenizer.model, "byte_fallback", False):
            return frozenset()
        vocab = hf_tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
        return frozenset(i for token, i in vocab.items() if _BYTE_FALLBACK_TOKEN.fullmatch(token))

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> "Tokenizer":
        """Load the tokenizer of an HF model directory; EOS ids come from generation_config.json too."""
        from transformers import AutoTokenizer

        path = Path(path)
        if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise ValueError(f"{path} has no tokenizer (tokenizer.json / tokenizer_config.json missing)")
        try:
            hf = AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:
            raise ValueError(f"cannot load the tokenizer in {path}: {exc}") from exc
        eos: list[int] = []
        generation_config = path / "generation_config.json"
        if generation_config.is_file():
            eos = _as_id_list(json.loads(generation_config.read_text(encoding="utf-8")).get("eos_token_id"))
        return cls(hf, eos)

    # -- properties ------------------------------------------------------------------------------------------

    @property
    def hf_tokenizer(self) -> Any:
        return self._hf

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (what the model's logits must cover)."""
        return len(self._hf)

    @property
    def bos_token_id(self) -> int | None:
        return self._hf.bos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self._hf.pad_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: generation_config's eos ids first, then the tokenizer's."""
        return self._eos_token_ids

    @property
    def all_special_ids(self) -> tuple[int, ...]:
        """bos/eos/unk/pad and every added token marked special (control tokens such as <|im_start|>)."""
        return self._all_special_ids

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._hf, "chat_template", None))

    # -- text <-> ids ----------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text to encode must be a str, got {type(text).__name__}")
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return list(self._hf.convert_ids_to_tokens(list(ids)))

    def token_bytes(self) -> list[bytes | None]:
        """Exact bytes of each token id (None for special tokens), for the constrained-decoding tables."""
        from jaxserve.constrained.vocab import token_bytes

        return token_bytes(self._hf)

    # -- chat ------------------------------------------------------------------------------------------------

    def render_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt text the chat template makes of OpenAI-shaped messages."""
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use the completions endpoint with a raw prompt")
        if not messages:
            raise ValueError("messages must not be empty")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
        normalized = []
        for index, message in enumerate(messages):
            if not isinstance(message, Mapping) or "role" not in message:
                raise ValueError(f"messages[{index}] must be an object with a 'role'")
            message = dict(message)
            if "content" in message:
                message["content"] = _message_content_text(message["content"], index)
            normalized.append(message)
        extra = dict(chat_template_kwargs or {})
        reserved = {"messages", "tools", "add_generation_prompt", "continue_final_message", "tokenize"} & extra.keys()
        if reserved:
            raise ValueError(f"chat_template_kwargs must not set {sorted(reserved)}")
        try:
            text = self._hf.apply_chat_template(
                normalized,
                tools=list(tools) if tools else None,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=False,
                **extra,
            )
        except ValueError:
            raise
        except Exception as exc:  # jinja2 errors from the template itself (e.g. raise_exception on bad roles)
            raise ValueError(f"chat template failed: {exc}") from exc
        return str(text)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """Prompt token ids for a chat. The template writes the special tokens itself, so none are added."""
        text = self.render_chat_template(
            messages, tools, add_generation_prompt, continue_final_message, chat_template_kwargs
        )
        return self.encode(text, add_special_tokens=False)

    # -- streaming -------------------------------------------------------------------------------------------

    def is_byte_fallback_token(self, token_id: int) -> bool:
        return token_id in self._byte_fallback_ids

    def detokenizer(self, skip_special_tokens: bool = True) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, skip_special_tokens)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas, one call per step, in O(new tokens) per call.

    Decoding a token alone is wrong for byte-level and sentencepiece vocabularies (a character's bytes may
    span tokens; leading-space rules depend on the previous token), so each step decodes a short window:
    the tokens from `prefix_offset` (already emitted, kept as context) through the new ones, and emits what
    the window's text adds beyond its context. Text ending in an unfinished UTF-8 sequence (U+FFFD) is held
    back until the next token completes it. With sentencepiece byte fallback, a run of `<0xNN>` tokens is
    decoded as a whole (an invalid run turns into one U+FFFD per byte, even its valid start), so a run is
    never split: text is held while the window ends in a byte token. The deltas concatenate to
    `decode(all ids)`; call `flush()` at the end to release text held back.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: emitted tokens kept as decoding context
        self._read_offset = 0  # tokens before this have been emitted as text

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special_tokens)

    def push(self, token_ids: Iterable[int]) -> str:
        """Add new tokens; return the newly completed text ('' while a character is still incomplete)."""
        self._ids.extend(int(t) for t in token_ids)
        if len(self._ids) == self._read_offset or self._tokenizer.is_byte_fallback_token(self._ids[-1]):
            return ""
        context = self._decode(self._prefix_offset, self._read_offset)
        text = self._decode(self._prefix_offset)
        if len(text) <= len(context) or text.endswith(_REPLACEMENT_CHAR) or not text.startswith(context):
            # Nothing new yet, or an unfinished multi-byte character at the end: wait for more tokens.
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text[len(context):]

    def flush(self) -> str:
        """Release any held-back text (an incomplete byte sequence at the end of the stream)."""
        if len(self._ids) == self._read_offset:
            return ""
        context = self._decode(self._prefix_offset, self._read_offset)
        text = self._decode(self._prefix_offset)
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text[len(context):] if text.startswith(context) else text
