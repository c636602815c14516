"""Per-request sampling parameters, validated on the host before a request reaches the engine."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

MAX_TOP_LOGPROBS = 20
MAX_N = 128
# top_k, token ids and per-row counts are int32 on the device.
INT32_MAX = 2**31 - 1
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's limit; also the fixed width of SamplingBatch's bias arrays
MAX_STOP_STRINGS = 16
# `stop_token_ids` is scanned on the host for every sampled token; generous (every special token of a large
# vocabulary) yet bounded.
MAX_STOP_TOKEN_IDS = 1024
# x / repetition_penalty runs in float32 on the device: a penalty near 0 turns ordinary logits into inf (and
# the softmax into NaN), so the lower bound is a small positive number rather than "> 0".
MIN_REPETITION_PENALTY = 0.01
ConstraintKind = Literal["regex", "json_schema", "json_object"]


@dataclass(frozen=True)
class Constraint:
    """What the output must match. `spec` is a regex (kind=regex), a JSON schema as JSON text
    (kind=json_schema) or ignored (kind=json_object: any JSON object)."""

    kind: ConstraintKind
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("regex", "json_schema", "json_object"):
            raise ValueError(f"unknown constraint kind {self.kind!r}")


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    max_tokens: int | None = None  # None: until the context is full
    min_tokens: int = 0
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # <= 0 disables
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: plus the top k (k <= 20)
    no_stop_trim: bool = False  # keep the matched stop string / stop token text in the output
    constraint: Constraint | None = None
    cache_salt: str | None = None  # prefix-cache namespace: only requests with the same salt share prefixes
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's logprob plus the top k (k <= 20)

    def replace(self, **kw) -> "SamplingParams":
        return dataclasses.replace(self, **kw)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError whose message starts with the offending field's name (the server turns that word
        into the error's `param`). Bounds hold for any Python int, so nothing overflows once on the device."""

        def integer(name: str, v: object, lo: int, hi: int | None) -> None:
            if not _is_int(v) or v < lo or (hi is not None and v > hi):
                bounds = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
                raise ValueError(f"{name} must be an integer {bounds}, got {_show(v)}")

        def finite(name: str, v: object) -> None:
            # A Python int is finite however large (math.isfinite would raise OverflowError on 10**400).
            if not (_is_int(v) or (isinstance(v, float) and math.isfinite(v))):
                raise ValueError(f"{name} must be a finite number, got {_show(v)}")

        integer("n", self.n, 1, MAX_N)
        if self.max_tokens is not None:
            # No upper bound here: the context length bounds it (a huge value is a context-length error).
            # 0 only to score a prompt (prompt logprobs, nothing generated).
            integer("max_tokens", self.max_tokens, 0 if self.prompt_logprobs is not None else 1, None)
        integer("min_tokens", self.min_tokens, 0, None)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({_show(self.min_tokens)}) must not exceed max_tokens ({self.max_tokens})")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            finite(name, getattr(self, name))
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        # -1 and 0 disable top-k; anything >= the vocabulary keeps every token (also off). int32 is the
        # device dtype, so larger values are refused rather than wrapped.
        if not _is_int(self.top_k) or not -1 <= self.top_k <= INT32_MAX:
            raise ValueError(f"top_k must be -1 or 0 (off) or an integer in [1, {INT32_MAX}], got {_show(self.top_k)}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= 2.0:
            raise ValueError(
                f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, 2], got {self.repetition_penalty}"
            )
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(
                f"logit_bias may hold at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(self.logit_bias)}"
            )
        seen: set[int] = set()
        for tok, bias in self.logit_bias:
            if not _is_int(tok) or not 0 <= tok < vocab_size:
                raise ValueError(f"logit_bias token id {_show(tok)} is outside the vocabulary [0, {vocab_size})")
            if tok in seen:
                # "5" and "05" are the same token: two biases would silently add up past the [-100, 100] range.
                raise ValueError(f"logit_bias gives token id {tok} more than once")
            seen.add(tok)
            finite("logit_bias value", bias)
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        if self.seed is not None:
            # The engine derives choice i's seed as seed + i and keys threefry with it modulo 2**64.
            integer("seed", self.seed, SEED_MIN, SEED_MAX)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {_show(s)}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(
                f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}"
            )
        for t in self.stop_token_ids:
            if not _is_int(t) or not 0 <= t < vocab_size:
                raise ValueError(f"stop_token_ids entry {_show(t)} is outside the vocabulary [0, {vocab_size})")
        if self.logprobs is not None:
            integer("top_logprobs", self.logprobs, 0, MAX_TOP_LOGPROBS)
        if self.prompt_logprobs is not None:
            integer("prompt_logprobs", self.prompt_logprobs, 0, MAX_TOP_LOGPROBS)
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str) or not 0 < len(self.cache_salt) <= 256):
            raise ValueError("cache_salt must be a non-empty string of at most 256 characters")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: object) -> str:
    """repr() for an error message, shortened: a JSON integer may have thousands of digits."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"
