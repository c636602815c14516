"""Continuous batching: which sequences decode and which prompt chunks prefill in the next step.

Every step decodes all running sequences that have finished their prompt and adds prefill chunks under
the token budget (chunked prefill), so a long prompt never starves the decodes. Admission needs free
pages; when decoding runs out of pages the newest running sequence is preempted (its pages freed, the
sequence requeued at the front for recompute), so nothing is lost and nothing deadlocks.
"""
from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field

from jaxserve.engine.kv_cache import PageAllocator
from jaxserve.engine.prefix_cache import RadixPrefixCache
from jaxserve.engine.request import Sequence, SeqStatus


@dataclass(frozen=True)
class PrefillChunk:
    seq: Sequence
    start: int  # first position of the chunk
    length: int
    first: bool = False  # the first chunk computed since the sequence took its slot: reset the slot's penalties
    prompt_logprobs: bool = False  # compute the logprobs of the prompt tokens this chunk predicts

    @property
    def is_last(self) -> bool:
        return self.start + self.length >= self.seq.num_tokens - (1 if self.seq.output_ids else 0)


@dataclass
class ScheduledStep:
    decode: list[Sequence] = field(default_factory=list)
    prefill: list[PrefillChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # n > 1 prompt sharing, applied on the device before the step: (src page, dst page, seq) copies and
    # (src slot, dst slot, seq) penalty-state forks.
    copies: list[tuple[int, int, Sequence]] = field(default_factory=list)
    slot_forks: list[tuple[int, int, Sequence]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


@dataclass(frozen=True)
class SchedulerLimits:
    max_running: int
    max_prefill_tokens: int  # per step
    max_prefill_rows: int
    max_chunk: int  # longest chunk of one row in one step
    page_size: int
    # rows -> the longest chunk a prefill call with that many rows can hold (the runner's shape buckets)
    prefill_tokens_for_rows: tuple[int, ...] = ()
    # With a prefix cache, admission prefers (among the first `prefix_lookahead` waiting requests) those
    # with the longest cached prefix: their prefill is shorter and their pages are not evicted meanwhile.
    # A request waiting longer than `max_prefix_wait_s` (or one preempted before) is admitted in FCFS order.
    prefix_lookahead: int = 32
    max_prefix_wait_s: float = 2.0

    def chunk_cap(self, rows: int) -> int:
        if not self.prefill_tokens_for_rows:
            return self.max_chunk
        if rows > len(self.prefill_tokens_for_rows):
            return 0
        return min(self.max_chunk, self.prefill_tokens_for_rows[rows - 1])


class Scheduler:
    def __init__(self, limits: SchedulerLimits, allocator: PageAllocator,
                 prefix_cache: RadixPrefixCache | None = None) -> None:
        self.limits = limits
        self.allocator = allocator
        self.prefix_cache = prefix_cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the newest
        self._free_slots = list(range(limits.max_running - 1, -1, -1))

    # -- queue management --------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is (finished or aborted) and return its pages and slot."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.pages:
            self.allocator.free(seq.pages)
            seq.pages = []
        if seq.slot >= 0:
            self._free_slots.append(seq.slot)
            seq.slot = -1
        seq.num_computed = 0

    def _preempt(self, seq: Sequence, out: ScheduledStep) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    # -- one step --------------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep:
        out = ScheduledStep()
        ps = self.limits.page_size

        # 1. Decode rows: each needs room for one more token. Out of pages -> preempt the newest.
        # A sequence whose last budgeted token is already in flight needs no further step.
        decode_candidates = [s for s in self.running if not s.in_prefill and len(s.output_ids) < s.max_tokens]
        for seq in decode_candidates:
            if seq not in self.running:  # preempted below as a victim
                continue
            need = seq.pages_needed(seq.num_tokens, ps)
            while not self._room(need):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq not in self.running:
                continue
            if need > 0:
                seq.pages.extend(self.allocator.allocate(need))
            out.decode.append(seq)

        # 2. Prefill chunks: running sequences in the middle of their prompt first, then admissions.
        # At most one row per step computes prompt logprobs (the step has one such row).
        budget = self.limits.max_prefill_tokens
        blocked = False  # a running prompt could not get pages
        for seq in [s for s in self.running if s.in_prefill]:
            if budget <= 0 or len(out.prefill) >= self.limits.max_prefill_rows:
                break
            if self._needs_prompt_logprobs(seq) and any(c.prompt_logprobs for c in out.prefill):
                continue
            chunk = self._chunk(seq, budget, self._cap(out))
            if chunk is None:
                blocked = True
                continue
            out.prefill.append(self._with_prompt_logprobs(chunk))
            budget -= chunk.length
        for seq in self._admission_order():
            if budget <= 0 or len(out.prefill) >= self.limits.max_prefill_rows or len(self.running) >= self.limits.max_running:
                break
            if seq.num_pending:
                continue  # preempted while its last token was in flight: recompute once it is known
            if self._needs_prompt_logprobs(seq) and any(c.prompt_logprobs for c in out.prefill):
                break  # FCFS: it goes first next step
            leader = seq.leader
            if leader is not None and not seq.output_ids and leader.status is not SeqStatus.FINISHED:
                if leader.status is SeqStatus.WAITING or leader.in_prefill:
                    continue  # wait for the leader to compute the shared prompt
            slot = self._free_slots.pop()
            seq.slot = slot
            reused = None
            if leader is not None and leader.status is SeqStatus.RUNNING and not seq.output_ids:
                self._fork_prompt(seq, leader, out)
            elif self._may_reuse_prefix(seq):
                reused = self._reuse_prefix(seq)
            forked = bool(out.slot_forks) and out.slot_forks[-1][2] is seq
            chunk = self._chunk(seq, budget, self._cap(out))
            if chunk is None:
                self._release(seq)
                out.copies = [c for c in out.copies if c[2] is not seq]
                out.slot_forks = [f for f in out.slot_forks if f[2] is not seq]
                break  # FCFS: do not let later requests overtake the head of the queue
            self.waiting.remove(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            if reused is not None:
                self.prefix_cache.record(len(seq.prompt_ids), reused)
            out.prefill.append(self._with_prompt_logprobs(dataclasses.replace(chunk, first=not forked)))
            budget -= chunk.length
        if out.empty and blocked and len(self.running) > 1:
            # Every running sequence is stuck mid-prompt waiting for pages: free the newest one's.
            self._preempt(self.running[-1], out)
            return self._merge(out, self.schedule())
        return out

    @staticmethod
    def _merge(first: ScheduledStep, second: ScheduledStep) -> ScheduledStep:
        second.preempted = first.preempted + second.preempted
        second.copies = first.copies + second.copies
        second.slot_forks = first.slot_forks + second.slot_forks
        return second

    def _fork_prompt(self, seq: Sequence, leader: Sequence, out: ScheduledStep) -> None:
        """n > 1: take the leader's prompt KV instead of recomputing it. Full pages are shared (reference
        counted, never written again: they hold only prompt positions); the partial page is copied on the
        device. The last prompt token is recomputed as a 1-token chunk so the follower samples its own
        first token from the same logits."""
        shared = len(seq.prompt_ids) - 1
        if shared <= 0:
            return
        ps = self.limits.page_size
        full, partial = divmod(shared, ps)
        if partial and not self._room(1):
            return
        seq.pages = list(leader.pages[:full])
        self.allocator.share(seq.pages)
        if partial:
            (page,) = self.allocator.allocate(1)
            out.copies.append((leader.pages[full], page, seq))
            seq.pages.append(page)
        seq.num_computed = shared
        out.slot_forks.append((leader.slot, seq.slot, seq))

    def _admission_order(self) -> list[Sequence]:
        """FCFS, except that with a prefix cache the longest cached prefixes go first within a bounded
        look-ahead; overdue and preempted requests keep their FCFS place ahead of that."""
        waiting = list(self.waiting)
        if self.prefix_cache is None or len(waiting) < 2:
            return waiting
        oldest = time.monotonic() - self.limits.max_prefix_wait_s
        overdue = [s for s in waiting if s.arrival < oldest or s.num_preemptions]
        others = [s for s in waiting if not (s.arrival < oldest or s.num_preemptions)]
        head, tail = others[:self.limits.prefix_lookahead], others[self.limits.prefix_lookahead:]
        def reusable(seq: Sequence) -> int:
            return self.prefix_cache.cached_tokens(seq.prompt_ids, seq.params.cache_salt) \
                if self._may_reuse_prefix(seq) else 0

        head.sort(key=lambda s: -reusable(s))  # stable: FCFS among equals
        return overdue + head + tail

    def _may_reuse_prefix(self, seq: Sequence) -> bool:
        # Repetition penalties need every prompt token in the slot's penalty state, prompt logprobs every
        # prompt position's logits: those prompts are computed in full.
        return (self.prefix_cache is not None and seq.params.repetition_penalty == 1.0
                and seq.params.prompt_logprobs is None)

    @staticmethod
    def _needs_prompt_logprobs(seq: Sequence) -> bool:
        return seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent

    def _with_prompt_logprobs(self, chunk: PrefillChunk) -> PrefillChunk:
        """Mark a chunk that predicts prompt tokens of a sequence asking for their logprobs."""
        if self._needs_prompt_logprobs(chunk.seq) and chunk.start < len(chunk.seq.prompt_ids) - 1:
            return dataclasses.replace(chunk, prompt_logprobs=True)
        return chunk

    def _room(self, pages: int) -> bool:
        """Whether `pages` pages are free, evicting cached prefixes nobody uses if that is what it takes."""
        short = pages - self.allocator.num_free
        if short > 0 and self.prefix_cache is not None:
            self.prefix_cache.evict(short)
        return pages <= self.allocator.num_free

    def _reuse_prefix(self, seq: Sequence) -> int:
        """Start a newly admitted sequence after the longest cached prefix of its prompt; returns the tokens
        reused."""
        pages = self.prefix_cache.match(seq.prompt_ids, seq.params.cache_salt)
        reused = len(pages) * self.limits.page_size
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = reused
        if pages:
            self.allocator.share(pages)
            seq.pages = list(pages)
            seq.num_computed = reused
        return reused

    def cache_prompt(self, seq: Sequence) -> None:
        """Offer a prompt's full pages to the prefix cache as soon as its KV is computed (its first token is
        read), so requests arriving while it still generates reuse it."""
        if self.prefix_cache is not None and seq.pages:
            self.prefix_cache.insert(seq.prompt_ids, seq.pages, seq.params.cache_salt)

    def cache_finished(self, seq: Sequence) -> None:
        """Offer a finished sequence's computed full pages to the prefix cache (before it releases them)."""
        if self.prefix_cache is None or not seq.pages:
            return
        known = seq.num_tokens - seq.num_pending  # placeholders of steps in flight are not known tokens
        self.prefix_cache.insert(seq.token_ids[:min(seq.num_computed, known)], seq.pages, seq.params.cache_salt)

    def _cap(self, out: ScheduledStep) -> int:
        """Longest chunk one more prefill row may have so that the rows still fit a compiled shape."""
        cap = self.limits.chunk_cap(len(out.prefill) + 1)
        if any(c.length > cap for c in out.prefill):
            return 0
        return cap

    def _chunk(self, seq: Sequence, budget: int, cap: int) -> PrefillChunk | None:
        """The next prompt chunk of `seq` within `budget` and `cap`, with its pages allocated; None if
        nothing fits."""
        target = seq.num_tokens - (1 if seq.output_ids else 0)
        length = min(target - seq.num_computed, budget, cap)
        if length <= 0:
            return None
        need = seq.pages_needed(seq.num_computed + length, self.limits.page_size)
        if not self._room(need):
            # Shrink the chunk to the pages that are free rather than stall the prompt.
            have = len(seq.pages) + self.allocator.num_free
            length = min(length, have * self.limits.page_size - seq.num_computed)
            if length <= 0:
                return None
            need = seq.pages_needed(seq.num_computed + length, self.limits.page_size)
        if need > 0:
            seq.pages.extend(self.allocator.allocate(need))
        return PrefillChunk(seq, seq.num_computed, length)
