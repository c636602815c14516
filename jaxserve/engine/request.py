"""A request's state inside the engine: one `Sequence` per choice (n > 1 gives n sequences)."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from jaxserve.sampling.params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class CompletionOutput:
    """One choice's progress in one engine step."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass
class RequestOutput:
    request_id: str
    outputs: list[CompletionOutput]
    num_prompt_tokens: int
    num_output_tokens: int
    finished: bool
    error: str | None = None  # set when the engine failed this request (it is finished, with no more output)
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with the first output, when asked for


@dataclass(eq=False)
class Sequence:
    """One sampled continuation of a prompt. Its KV lives in `pages`; `num_computed` tokens of
    `prompt_ids + output_ids` are in the cache."""

    seq_id: int
    request_id: str
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    max_tokens: int  # resolved against the context length
    arrival: float = field(default_factory=time.monotonic)
    status: SeqStatus = SeqStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    slot: int = -1  # row of the penalty state while running
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    detokenizer: Any = None
    text: str = ""  # text emitted so far (stop strings cut)
    pending_text: str = ""  # detokenized text held back because it may start a stop string
    pending_emit: str = ""  # text ready to be reported in the next output
    sent_tokens: int = 0  # output tokens already reported
    num_pending: int = 0  # trailing output_ids that are placeholders of steps in flight
    logprobs: list[TokenLogprob] = field(default_factory=list)
    grammar: Any = None  # the constraint's compiled Grammar, None when unconstrained
    grammar_offset: int = 0  # first row of this grammar in the device mask pool
    grammar_state: int = 0  # DFA state after the last resolved token (relative to the grammar)
    grammar_on_device: bool = False  # the device advances the state (its transition tables fit the pool)
    # A constraint the device tables cannot hold: this sequence's own host matcher (constrained/host_matcher.py)
    # rewrites its mask row (grammar_offset, state always 0) after every token.
    host_matcher: Any = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens reused from the prefix cache at (first) admission
    # Asked for (params.prompt_logprobs): per prompt position, the logprob of its token given the ones
    # before (None at position 0), filled chunk by chunk; reported once, with the request's first output.
    prompt_logprobs: "list[TokenLogprob | None] | None" = None
    prompt_logprobs_sent: bool = False
    # n > 1: the first choice (leader) computes the prompt; the others share its pages.
    leader: "Sequence | None" = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def is_constrained(self) -> bool:
        return self.grammar is not None or self.host_matcher is not None

    @property
    def needs_host_advance(self) -> bool:
        """Its next mask row is known only once the host has read its last token (steps run synchronously)."""
        return self.host_matcher is not None or (self.grammar is not None and not self.grammar_on_device)

    @property
    def num_resolved(self) -> int:
        return len(self.output_ids) - self.num_pending

    @property
    def in_prefill(self) -> bool:
        """True while tokens other than the last sampled one are missing from the cache."""
        return self.num_computed < self.num_tokens - (1 if self.output_ids else 0)

    def pages_needed(self, num_tokens: int, page_size: int) -> int:
        return -(-num_tokens // page_size) - len(self.pages)
