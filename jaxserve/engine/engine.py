"""The engine: requests in, incremental outputs out.

`LLMEngine` is the synchronous core (add / abort / step). `AsyncEngine` (engine/async_engine.py) runs it in
its own thread and hands each request an async iterator of `RequestOutput`s; `LLM` (engine/offline.py) is
the offline batch API on the same core.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxserve.config import EngineConfig, ModelConfig, cache_dir
from jaxserve.engine.kv_cache import PageAllocator, kv_bytes_per_page, kv_cache_pages
from jaxserve.engine.prefix_cache import RadixPrefixCache
from jaxserve.engine.request import (
    CompletionOutput,
    RequestOutput,
    Sequence,
    SeqStatus,
    TokenLogprob,
)
from jaxserve.engine.errors import EngineBusy, EngineDead
from jaxserve.engine.runner import ModelRunner, PendingResult, StepResult
from jaxserve.engine.scheduler import Scheduler, SchedulerLimits
from jaxserve.constrained.grammar import Grammar
from jaxserve.constrained.host_matcher import HostGrammar, HostMatcher, host_tokenizer, llguidance_available
from jaxserve.constrained.service import ConstraintService, ConstraintServiceBusy
from jaxserve.engine import stops
from jaxserve.models.loader import load_params_deferred, resolve_model
from jaxserve.models.sharding import make_mesh, per_device_param_bytes, plan_tensor_parallel
from jaxserve.sampling.batch import SamplingRow
from jaxserve.sampling.params import SamplingParams
from jaxserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)

PLACEHOLDER = -1  # an output token sampled by a step whose result the host has not read yet
CPU_KV_BYTES_CAP = 4 << 30


@dataclass(frozen=True)
class ModelParts:
    config: ModelConfig
    params: Any  # parameter tree (host or device arrays) in the serving dtype; None = load from `path`
    tokenizer: Tokenizer
    name: str
    path: str = ""


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_pages_used: int
    kv_pages_total: int
    num_prompt_tokens_total: int
    num_generated_tokens_total: int
    num_preemptions_total: int
    # Constrained requests whose grammar did not fit the device transition tables: their rows advance on
    # the host, so steps run synchronously while they run (slower decode, same output).
    num_constrained_host_advance_total: int = 0
    # Constrained requests driven by a host matcher (constraints the device tables cannot hold), and the host
    # time their masks took (computing + advancing; steps are synchronous while one runs).
    num_constrained_host_matcher_total: int = 0
    host_matcher_seconds_total: float = 0.0
    num_failed_requests_total: int = 0  # requests the engine ended with an error (the others went on)
    num_queued: int = 0  # admitted but not producing output yet (compiling, inbox, waiting); AsyncEngine only
    num_program_sets_compiling: int = 0  # 1 while the step programs' background compilation runs (per replica)
    num_constraint_cache_hits_total: int = 0
    num_constraint_compiles_total: int = 0
    num_constraints_too_complex_total: int = 0
    kv_pages_cached: int = 0  # held only by the prefix cache (reusable, evictable)
    num_prefix_query_tokens_total: int = 0  # prompt tokens looked up in the prefix cache
    num_prefix_hit_tokens_total: int = 0  # of them, reused
    num_prefix_evicted_pages_total: int = 0


def resolve_dtype(dtype: str, platform: str) -> str:
    if dtype != "auto":
        return dtype
    # bfloat16 matmuls on XLA:CPU are several times slower than float32 (docs/benchmarks.md).
    return "float32" if platform == "cpu" else "bfloat16"


def executable_cache_path(setting: str | None) -> Path | None:
    """--executable-cache-dir: "auto" = cache_dir()/executables, a directory, or None (nothing kept)."""
    if setting is None:
        return None
    return cache_dir() / "executables" if setting == "auto" else Path(setting)


def enable_compilation_cache(setting: str | None, executable_cache: bool = False) -> None:
    """JAX's persistent compilation cache for the programs outside the executable cache. With the executable
    cache on it is turned off for the process: XLA:CPU executables that JAX's cache served serialize
    without their compiled functions ("Function ... not found" when the copy runs), so the step programs
    must be compiled afresh once to be kept, and the executable cache then serves them without tracing."""
    if executable_cache:
        from jax.experimental.compilation_cache import compilation_cache

        jax.config.update("jax_enable_compilation_cache", False)
        compilation_cache.reset_cache()  # JAX decides once per process whether the cache is used
        return
    if setting is None:
        return
    path = cache_dir() / "xla" if setting == "auto" else setting
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def engine_devices(tp_size: int, devices: "list[jax.Device] | None" = None) -> list:
    """The devices one engine runs on: `devices` (a data-parallel replica's group) or the first `tp_size`."""
    available = jax.devices() if devices is None else list(devices)
    if len(available) < tp_size:
        raise ValueError(f"tp_size {tp_size} needs {tp_size} devices; {len(available)} available "
                         f"({available[0].platform if available else 'none'})")
    return available[:tp_size]


class LLMEngine:
    """Synchronous engine core; not thread-safe (AsyncEngine serialises access on its thread)."""

    def __init__(self, config: EngineConfig, *, interpret_kernels: bool = False, overlap: bool = True,
                 parts: "ModelParts | None" = None, devices: "list[jax.Device] | None" = None) -> None:
        """parts: an already built model (config, weights, tokenizer) instead of loading `config.model`;
        benchmarks use it for random-weight models of real sizes. devices: the `tp_size` devices this engine
        runs on (None: the first `tp_size` devices; data-parallel replicas pass disjoint groups)."""
        self.config = config
        self.overlap = overlap
        # Steps in flight, per row to read: (sequence, step, row, emits a token, prompt chunk whose logprobs
        # this row computed or None).
        self._pending: list[tuple[Sequence, PendingResult, int, bool, Any]] = []
        self._failed: list[RequestOutput] = []  # requests failed since the last step's outputs
        # Test hook for fault injection: called as fault_hook(stage, request_id) with stage "add" (preparing
        # a request), "step" (building its row of a step) or "postprocess" (reading its sampled token).
        self.fault_hook: Callable[[str, str], None] | None = None
        enable_compilation_cache(config.compilation_cache_dir, executable_cache=config.executable_cache_dir is not None)
        self.mesh = make_mesh(engine_devices(config.tp_size, devices))
        platform = self.mesh.devices.flat[0].platform
        requested_len = config.max_model_len
        config = self.config = config.with_platform_defaults(platform)
        self.dtype = resolve_dtype(config.dtype, platform)
        if parts is None:
            files = resolve_model(config.model)
            parts = ModelParts(files.config, None, Tokenizer.from_dir(files.path), files.name, str(files.path))
        self.model_name = parts.name
        self.model_config: ModelConfig = parts.config
        self.tokenizer = parts.tokenizer
        cfg = self.model_config
        if requested_len is not None and requested_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len {requested_len} exceeds the model's {cfg.max_position_embeddings} positions")
        self.max_model_len = min(config.max_model_len, cfg.max_position_embeddings)
        self.end_token_ids = tuple(sorted(set(cfg.eos_token_ids) | set(self.tokenizer.eos_token_ids)))
        params = parts.params if parts.params is not None else load_params_deferred(Path(parts.path), cfg, self.dtype)
        self.tp_plan = plan_tensor_parallel(cfg, config.tp_size)
        num_pages = self._num_pages(platform, per_device_param_bytes(params, cfg, self.tp_plan))
        self.allocator = PageAllocator(num_pages)
        from jaxserve.constrained.tables import GrammarPool

        self.grammar_pool = GrammarPool(
            config.grammar_capacity_states, cfg.vocab_size, min(self.tokenizer.vocab_size, cfg.vocab_size),
            device=NamedSharding(self.mesh, PartitionSpec()), class_map_slots=config.grammar_class_map_slots,
            next_capacity=config.grammar_next_capacity,
        )
        self.runner = ModelRunner(
            cfg, params, config, dtype=self.dtype, num_pages=num_pages, max_model_len=self.max_model_len,
            end_token_ids=self.end_token_ids, grammar_tables_fn=lambda: self.grammar_pool.tables,
            interpret_kernels=interpret_kernels, mesh=self.mesh,
            executable_cache_dir=executable_cache_path(config.executable_cache_dir),
        )
        self.scheduler = Scheduler(
            SchedulerLimits(
                max_running=config.max_running_requests,
                max_prefill_tokens=config.max_num_batched_tokens,
                max_prefill_rows=self.runner.max_prefill_rows,
                max_chunk=self.runner.max_chunk,
                page_size=config.page_size,
                prefill_tokens_for_rows=self.runner.buckets.prefill_tokens_for_rows(),
            ),
            self.allocator,
            RadixPrefixCache(self.allocator, config.page_size) if config.enable_prefix_cache else None,
        )
        self._requests: dict[str, list[Sequence]] = {}
        self._seq_ids = itertools.count()
        self._rng = random.Random(config.seed)
        self.num_prompt_tokens_total = 0
        self.num_generated_tokens_total = 0
        self.num_preemptions_total = 0
        self.num_constrained_host_advance_total = 0
        self.num_constrained_host_matcher_total = 0
        self.host_matcher_seconds_total = 0.0
        self.num_failed_requests_total = 0
        self.num_prefill_tokens_computed = 0  # prompt tokens actually run through the model
        self.warmup_seconds: float | None = None
        self._programs_version = -1
        # Compiles constraints on its own bounded pool, under time and memory budgets, with a byte-bounded
        # cache (the vocabulary's token bytes are read at the first compile).
        self.constraints = ConstraintService(
            self.tokenizer.token_bytes, self.end_token_ids, cfg.vocab_size,
            max_workers=config.constraint_workers, max_pending=config.max_pending_constraints,
            host_tokenizer_fn=self._host_tokenizer_fn(), device_wait_s=config.constraint_device_wait_s,
        )
        log.info("model %s (%s, %s), %d KV pages of %d tokens, attention %s", parts.path, cfg.family,
                 self.dtype, num_pages, config.page_size, self.runner.attention_name)
        if config.tp_size > 1:
            log.info("%s; devices %s", self.tp_plan.describe(cfg), [str(d) for d in self.mesh.devices.flat])

    def _host_tokenizer_fn(self) -> Callable[[], Any] | None:
        if not self.config.constraint_host_matcher:
            return None
        if not llguidance_available():
            log.warning("llguidance is not installed: constraints the device grammar tables cannot hold get 400")
            return None
        return lambda: host_tokenizer(self.tokenizer.hf_tokenizer, self.model_config.vocab_size, self.end_token_ids)

    def _num_pages(self, platform: str, weight_bytes: int) -> int:
        """The KV pool: `num_pages` if given; on CPU what fits CPU_KV_BYTES_CAP; on an accelerator
        `kv_memory_fraction` of the device memory JAX may use holds weights + KV (SGLang's meaning; the
        AOT report sizes it the same way), capped at what max_running_requests full contexts need.
        Per device under tensor parallelism: `weight_bytes` is one device's share, each page is split by
        KV head (with the heads the plan repeats)."""
        cfg, ps = self.config, self.config.page_size
        if cfg.num_pages is not None:
            if cfg.num_pages < 2:
                raise ValueError("num_pages must be at least 2")
            return cfg.num_pages
        dtype_bytes = 4 if self.dtype == "float32" else 2
        per_page = kv_bytes_per_page(self.tp_plan.model_config, ps, dtype_bytes) // self.tp_plan.size
        full = cfg.max_running_requests * math.ceil(self.max_model_len / ps) + 1
        if platform == "cpu":
            return max(2, min(full, CPU_KV_BYTES_CAP // per_page))
        stats = self.mesh.devices.flat[0].memory_stats() or {}
        limit = stats.get("bytes_limit")
        if not limit:
            return full
        pages = kv_cache_pages(limit, weight_bytes, cfg.kv_memory_fraction, per_page, max_pages=full)
        if pages < 2:
            raise ValueError(
                f"the weights ({weight_bytes / 2**30:.1f} GiB) leave no KV cache within kv_memory_fraction "
                f"{cfg.kv_memory_fraction} of the device's {limit / 2**30:.1f} GiB; raise --kv-memory-fraction "
                f"or use tensor parallelism")
        return pages

    # -- requests --------------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Check a request; return its resolved max_tokens. ValueError names what is wrong."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        params.validate(vocab)
        room = self.max_model_len - len(prompt_ids)
        if room <= 0:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; this model's context length is {self.max_model_len}"
            )
        if params.max_tokens is not None and params.max_tokens > room:
            raise ValueError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds this "
                f"model's context length of {self.max_model_len} tokens"
            )
        needed = len(prompt_ids) + (room if params.max_tokens is None else params.max_tokens)
        capacity = self.allocator.num_usable * self.config.page_size
        if needed > capacity:
            raise ValueError(f"the request needs more KV cache ({needed} tokens) than the server holds ({capacity} tokens)")
        return params.max_tokens if params.max_tokens is not None else room

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, grammar=None) -> None:
        """`grammar`: a compiled constraint (`compile_constraint`): device tables (Grammar) or a host matcher
        (HostGrammar); None when unconstrained."""
        if request_id in self._requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        max_tokens = self.validate(prompt_ids, params)
        self._inject("add", request_id)
        if isinstance(grammar, HostGrammar):
            attach = self._attach_host_matchers(grammar, params.n, max_tokens)
            self.num_constrained_host_matcher_total += 1
        elif grammar is not None:
            attach = self._attach_grammar(request_id, grammar, params.n, max_tokens)
        else:
            attach = None
        seqs: list[Sequence] = []
        for i in range(params.n):
            seed = params.seed + i if params.seed is not None else self._rng.getrandbits(63)
            seq = Sequence(
                seq_id=next(self._seq_ids), request_id=request_id, index=i, prompt_ids=list(prompt_ids),
                params=params, seed=seed, max_tokens=max_tokens, leader=seqs[0] if seqs else None,
            )
            seq.detokenizer = self.tokenizer.detokenizer(skip_special_tokens=params.skip_special_tokens)
            if params.prompt_logprobs is not None and i == 0:  # the leader computes the shared prompt
                seq.prompt_logprobs = [None] * len(prompt_ids)
            if attach is not None:
                attach(i, seq)
            seqs.append(seq)
        self._requests[request_id] = seqs
        for s in seqs:
            self.scheduler.add(s)
        self.num_prompt_tokens_total += len(prompt_ids)

    def _attach_grammar(self, request_id: str, grammar: Grammar, n: int,
                        max_tokens: int) -> Callable[[int, Sequence], None]:
        """Make the grammar resident (one pool reference per choice, released at finish)."""
        self.check_budget(grammar, max_tokens)
        from jaxserve.constrained.tables import GrammarPoolFullError

        try:
            residency = self.grammar_pool.add(grammar)
        except GrammarPoolFullError as e:
            raise EngineBusy(f"{e}; too many large constraints are in flight, retry later") from e
        for _ in range(n - 1):
            self.grammar_pool.add(grammar)
        if not residency.device_advance:
            self.num_constrained_host_advance_total += 1
            log.info("request %s: its constraint advances on the host (device grammar tables full); "
                     "steps are synchronous while it runs", request_id)

        def attach(_: int, seq: Sequence) -> None:
            seq.grammar, seq.grammar_offset = grammar, residency.offset
            seq.grammar_on_device, seq.grammar_state = residency.device_advance, grammar.start_state

        return attach

    def _attach_host_matchers(self, grammar: HostGrammar, n: int, max_tokens: int) -> Callable[[int, Sequence], None]:
        """Per choice its own matcher and pool rows, the start mask written (all choices or none)."""
        from jaxserve.constrained.tables import GrammarPoolFullError

        offsets: list[int] = []
        matchers: list[HostMatcher] = []
        try:
            for _ in range(n):
                offsets.append(self.grammar_pool.add_host_rows())
                matchers.append(grammar.new_matcher())
                self.grammar_pool.write_host_row(offsets[-1], matchers[-1].mask_row(max_tokens, max_tokens))
        except BaseException as e:
            for offset in offsets:
                self.grammar_pool.release_host_rows(offset)
            if isinstance(e, GrammarPoolFullError):
                raise EngineBusy(f"{e}; too many constrained requests are in flight, retry later") from e
            raise

        def attach(i: int, seq: Sequence) -> None:
            seq.host_matcher, seq.grammar_offset, seq.grammar_state = matchers[i], offsets[i], 0

        return attach

    def abort(self, request_id: str) -> RequestOutput | None:
        seqs = self._requests.pop(request_id, None)
        if seqs is None:
            return None
        outs = []
        for s in seqs:
            if not s.is_finished:
                self._finish(s, "abort")
                outs.append(CompletionOutput(s.index, [], "", None, "abort", None))
        return RequestOutput(request_id, outs, len(seqs[0].prompt_ids), sum(len(s.output_ids) for s in seqs), True)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._pending)

    @staticmethod
    def check_budget(grammar: Grammar, max_tokens: int) -> None:
        if max_tokens < grammar.min_tokens_needed():
            raise ValueError(
                f"max_tokens ({max_tokens}) is too small for the constraint: its shortest output takes "
                f"{grammar.min_tokens_needed()} tokens including the end token"
            )

    def compile_constraint(self, constraint) -> Grammar:
        """Compile a Constraint into token tables (cached, thread-safe). ValueError when it is invalid or too
        complex for the compile budget; EngineBusy when too many compiles are queued."""
        try:
            return self.constraints.compile(constraint)
        except ConstraintServiceBusy as e:
            raise EngineBusy(str(e)) from None

    async def compile_constraint_async(self, constraint) -> Grammar:
        """As `compile_constraint`, on the constraint service's own threads (a cache hit answers at once)."""
        try:
            return await self.constraints.compile_async(constraint)
        except ConstraintServiceBusy as e:
            raise EngineBusy(str(e)) from None

    def stats(self) -> EngineStats:
        compiles = self.constraints.stats()
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_pages_used=self.allocator.num_used, kv_pages_total=self.allocator.num_usable,
            num_prompt_tokens_total=self.num_prompt_tokens_total,
            num_generated_tokens_total=self.num_generated_tokens_total,
            num_preemptions_total=self.num_preemptions_total,
            num_constrained_host_advance_total=self.num_constrained_host_advance_total,
            num_constrained_host_matcher_total=self.num_constrained_host_matcher_total,
            host_matcher_seconds_total=self.host_matcher_seconds_total,
            num_failed_requests_total=self.num_failed_requests_total,
            num_constraint_cache_hits_total=compiles.hits, num_constraint_compiles_total=compiles.misses,
            num_constraints_too_complex_total=compiles.too_complex,
            kv_pages_cached=self.allocator.num_cached,
            num_program_sets_compiling=int(self.runner.programs.background_running),
            **self._prefix_stats(),
        )

    def _prefix_stats(self) -> dict[str, int]:
        cache = self.scheduler.prefix_cache
        if cache is None:
            return {}
        st = cache.stats()
        return dict(num_prefix_query_tokens_total=st.num_query_tokens, num_prefix_hit_tokens_total=st.num_hit_tokens,
                    num_prefix_evicted_pages_total=st.num_evicted_pages)

    def flush_prefix_cache(self) -> int:
        """Drop every cached prefix; refused (ValueError) while requests run. Returns the pages freed."""
        if self._requests or self.has_work():
            raise ValueError("the prefix cache cannot be flushed while requests are running")
        cache = self.scheduler.prefix_cache
        return cache.flush() if cache is not None else 0

    def warmup(self, progress=None, background: bool = False) -> float:
        """Make the step programs ready (engine/programs.py); background=True: the essential ones now and the
        rest on a thread of their own while serving (the scheduler keeps to the ready buckets)."""
        self.warmup_seconds = self.runner.warmup(progress, background=background)
        self._follow_ready_programs()
        return self.warmup_seconds

    def _follow_ready_programs(self) -> None:
        """While buckets compile in the background, prefill chunks are formed only for ready prefill programs."""
        version = self.runner.programs.version
        if version == self._programs_version:
            return
        self._programs_version = version
        max_rows, tokens_for_rows = self.runner.prefill_limits()
        self.scheduler.limits = dataclasses.replace(self.scheduler.limits, max_prefill_rows=max_rows,
                                                    prefill_tokens_for_rows=tokens_for_rows)

    # -- one step --------------------------------------------------------------------------------
    def _tokens_left(self, seq: Sequence) -> int:
        """Tokens `seq` may still emit within max_tokens and the context (its placeholders count as emitted)."""
        return min(seq.max_tokens - len(seq.output_ids), self.max_model_len - seq.num_tokens)

    def _sampling_row(self, seq: Sequence, emits: bool) -> SamplingRow:
        p = seq.params
        suppress = p.ignore_eos or len(seq.output_ids) < p.min_tokens
        grammar_row, from_device, tokens_left = 0, False, 0
        if seq.is_constrained:
            # Placeholders count: their tokens are emitted (or the sequence stops and this row is dropped).
            tokens_left = self._tokens_left(seq)
            # The state after a token still in flight exists only on the device, which stored it for this
            # slot when it sampled that token (the slot cannot have changed: a sequence preempted with a
            # token in flight is not readmitted before it is read). The mask row is picked on the device.
            from_device = emits and seq.num_pending > 0
            if from_device and seq.needs_host_advance:
                raise RuntimeError("internal error: a host-advanced constrained row was scheduled with its "
                                   "previous token unread")
            grammar_row = seq.grammar_offset + seq.grammar_state  # ignored when from_device
        return SamplingRow(
            params=p, seed=seq.seed, step=len(seq.output_ids), slot=seq.slot if emits else -1,
            suppress_end=suppress, grammar_row=grammar_row, grammar_from_device=from_device,
            tokens_left=tokens_left,
        )

    def step(self) -> list[RequestOutput]:
        """Schedule and dispatch one step, then read and post-process the previous one while the device
        computes this one. Tokens of the step in flight are placeholders (-1) in `output_ids`; the next
        decode of such a sequence reads its token, and for a constrained one its grammar state, on the
        device. Only a constraint without device transition tables (they did not fit) needs its token on
        the host before its next mask row is known: while such a one runs, steps are synchronous.

        A failure that concerns one request (preparing its row, reading or post-processing its token)
        fails that request alone; the others go on. `EngineDead` means the device state was lost."""
        advanced: list[Sequence] = []
        self._follow_ready_programs()
        if self._pending and any(s.needs_host_advance for s in self.scheduler.running):
            advanced += self._resolve(self._pending)
            self._pending = []
        sched = self.scheduler.schedule()
        self.num_preemptions_total += len(sched.preempted)
        if sched.copies or sched.slot_forks:
            self.runner.apply_forks([(a, b) for a, b, _ in sched.copies], [(a, b) for a, b, _ in sched.slot_forks])
        current: list[tuple[Sequence, PendingResult, int, bool, Any]] = []
        if sched.decode:
            pending, decode = self._dispatch(self.runner.decode_inputs, self._live([(s, s, True) for s in sched.decode]))
            for i, (s, _, _) in enumerate(decode):
                s.num_computed += 1
                self._reserve(s)
                current.append((s, pending, i, True, None))
        if sched.prefill:
            emits = {id(c): c.is_last and not c.seq.output_ids for c in sched.prefill}
            pending, prefill = self._dispatch(self.runner.prefill_inputs,
                                              self._live([(c.seq, c, emits[id(c)]) for c in sched.prefill]))
            self.num_prefill_tokens_computed += sum(c.length for _, c, _ in prefill)
            for i, (s, c, _) in enumerate(prefill):
                s.num_computed += c.length
                if emits[id(c)]:
                    self._reserve(s)
                if emits[id(c)] or c.prompt_logprobs:
                    current.append((s, pending, i, emits[id(c)], c if c.prompt_logprobs else None))
        advanced += self._resolve(self._pending)
        self._pending = current
        if not self.overlap:
            advanced += self._resolve(self._pending)
            self._pending = []
        failed, self._failed = self._failed, []
        return self._collect(advanced) + failed

    def _live(self, entries: list[tuple[Sequence, Any, bool]]) -> list[tuple[Sequence, Any, SamplingRow]]:
        """(sequence, item, emits) -> (sequence, item, sampling row) for the rows whose preparation works;
        a request whose row cannot be prepared fails alone (a failed request may have had other choices
        in this batch: those are dropped too)."""
        out = []
        for seq, item, emits in entries:
            if seq.is_finished:
                continue
            try:
                self._inject("step", seq.request_id)
                out.append((seq, item, self._sampling_row(seq, emits)))
            except Exception as e:
                self._fail(seq.request_id, "preparing its step", e)
        return [e for e in out if not e[0].is_finished]

    def _dispatch(self, build: Callable[[list, list[SamplingRow]], Any], entries: list) -> tuple[Any, list]:
        """Build one step's host arrays from (sequence, item, row) entries and launch it; returns the step in
        flight and the entries it holds, in row order. When building fails, the rows that fail on their own
        are failed and the step is rebuilt without them; when the launch fails, the requests of this step
        fail, or the engine is dead if the device state went with it."""
        if not entries:
            return None, []
        items = [item for _, item, _ in entries]
        rows = [row for _, _, row in entries]
        try:
            inputs = build(items, rows)
        except Exception as batch_error:
            survivors = []
            for entry in entries:
                try:
                    build([entry[1]], [entry[2]])
                    survivors.append(entry)
                except Exception as e:
                    self._fail(entry[0].request_id, "building its step", e)
            survivors = [e for e in survivors if not e[0].is_finished]
            if len(survivors) == len(entries):  # no row is to blame on its own: the step concerns them all
                for seq, _, _ in entries:
                    self._fail(seq.request_id, "building its step", batch_error)
                return None, []
            return self._dispatch(build, survivors)
        try:
            return self.runner.dispatch(inputs, len(entries)), entries
        except Exception as e:
            if self.runner.state_lost():
                raise EngineDead(f"a step failed and took the KV cache with it: {type(e).__name__}: {e}") from e
            log.exception("dispatching a step failed; failing its %d requests", len(entries))
            for seq, _, _ in entries:
                self._fail(seq.request_id, "running its step", e)
            return None, []

    def _inject(self, stage: str, request_id: str) -> None:
        if self.fault_hook is not None:
            self.fault_hook(stage, request_id)

    def _fail(self, request_id: str, during: str, error: BaseException) -> None:
        """End a request with an error (its pages and grammar references are freed); the engine goes on."""
        seqs = self._requests.pop(request_id, None)
        if seqs is None:
            return
        log.error("request %s failed while %s: %s: %s", request_id, during, type(error).__name__, error,
                  exc_info=(type(error), error, error.__traceback__))
        for s in seqs:
            if not s.is_finished:
                self._finish(s, "error")
        self.num_failed_requests_total += 1
        message = f"the request failed in the engine while {during}: {type(error).__name__}: {error}"
        self._failed.append(RequestOutput(request_id, [], len(seqs[0].prompt_ids),
                                          sum(len(s.output_ids) for s in seqs), True, error=message))

    def fail_all(self, reason: str) -> list[RequestOutput]:
        """End every request with `reason` as its error (engine shutting down or unable to continue)."""
        for rid in list(self._requests):
            self._fail(rid, "the engine stopped", RuntimeError(reason))
        self._pending = []
        failed, self._failed = self._failed, []
        return failed

    @staticmethod
    def _reserve(seq: Sequence) -> None:
        seq.output_ids.append(PLACEHOLDER)
        seq.num_pending += 1

    def _resolve(self, entries: list[tuple[Sequence, "PendingResult", int, bool, Any]]) -> list[Sequence]:
        done = []
        for seq, pending, row, emits, prompt_chunk in entries:
            if seq.is_finished:  # finished (or aborted) while this step was in flight: discard the token
                continue
            try:
                result = pending.result()
                prompt = pending.prompt_logprobs() if prompt_chunk is not None else None
            except Exception as e:  # the device step failed: every request of that step is concerned
                if self.runner.state_lost():
                    raise EngineDead(f"a step failed on the device: {type(e).__name__}: {e}") from e
                self._fail(seq.request_id, "reading its step's result", e)
                continue
            try:
                self._inject("postprocess", seq.request_id)
                if prompt is not None:
                    self._record_prompt_logprobs(seq, prompt_chunk, *prompt)
                if emits:
                    self._append(seq, result, row)
            except Exception as e:
                self._fail(seq.request_id, "post-processing its token", e)
                continue
            if emits:
                done.append(seq)
                if seq.num_resolved == 1 and not seq.is_finished and seq.leader is None:
                    # Its prompt's KV is in the cache now (the step that computed it has been read).
                    self.scheduler.cache_prompt(seq)
        return done

    @staticmethod
    def _record_prompt_logprobs(seq: Sequence, chunk, token_lp: np.ndarray, top_ids: np.ndarray,
                                top_lps: np.ndarray) -> None:
        """Chunk position t predicted prompt token start + t + 1."""
        k = seq.params.prompt_logprobs or 0
        last = min(chunk.start + chunk.length, len(seq.prompt_ids) - 1)
        for pos in range(chunk.start, last):
            t = pos - chunk.start
            seq.prompt_logprobs[pos + 1] = TokenLogprob(
                seq.prompt_ids[pos + 1], float(token_lp[t]),
                [(int(i), float(lp)) for i, lp in zip(top_ids[t][:k], top_lps[t][:k])])

    def _append(self, seq: Sequence, res: StepResult, row: int) -> None:
        """Fill the oldest placeholder of `seq` with the token sampled in `row` and apply the stops."""
        if seq.max_tokens == 0:  # scoring the prompt only: its logprobs are in, nothing is generated
            self._finish(seq, "length")
            return
        token = int(res.tokens[row])
        idx = len(seq.output_ids) - seq.num_pending
        seq.num_pending -= 1
        if seq.is_constrained and int(res.num_allowed[row]) == 0:
            self._finish(seq, "abort", "the constraint allows no token here (grammar dead end)")
            return
        seq.output_ids[idx] = token
        self.num_generated_tokens_total += 1
        if seq.params.logprobs is not None:
            k = seq.params.logprobs
            top = [(int(t), float(lp)) for t, lp in zip(res.top_ids[row][:k], res.top_logprobs[row][:k])]
            seq.logprobs.append(TokenLogprob(token, float(res.logprob[row]), top))
        if seq.grammar is not None and token not in self.end_token_ids:
            # The device advanced its own copy already; the host's serves rows scheduled when no token is
            # in flight (prefill, recompute after preemption) and host-advanced grammars.
            seq.grammar_state = seq.grammar.next_state(seq.grammar_state, token)
        finish = stops.advance(seq, token, self.end_token_ids, self.max_model_len)
        if finish is not None:
            self._finish(seq, *finish)
        elif seq.host_matcher is not None:
            # The next step's mask: a token the matcher rejects (it cannot: it allowed it) or a limit it hits
            # fails this request alone (_resolve).
            seconds = seq.host_matcher.seconds
            seq.host_matcher.consume(token)
            tokens_left = self._tokens_left(seq)
            self.grammar_pool.write_host_row(seq.grammar_offset, seq.host_matcher.mask_row(tokens_left, seq.max_tokens))
            self.host_matcher_seconds_total += seq.host_matcher.seconds - seconds

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        if seq.num_pending:  # tokens of steps in flight after the stop are dropped
            del seq.output_ids[len(seq.output_ids) - seq.num_pending:]
            seq.num_pending = 0
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        if reason != "error":  # a failed request's KV may not be what its tokens say
            self.scheduler.cache_finished(seq)
        self.scheduler.remove(seq)
        if seq.grammar is not None:
            self.grammar_pool.release(seq.grammar)
            seq.grammar = None
        if seq.host_matcher is not None:
            self.grammar_pool.release_host_rows(seq.grammar_offset)
            seq.host_matcher = None

    def _collect(self, advanced: Iterable[Sequence]) -> list[RequestOutput]:
        by_request: dict[str, list[Sequence]] = {}
        for s in advanced:
            by_request.setdefault(s.request_id, []).append(s)
        outs = []
        for rid, seqs in by_request.items():
            all_seqs = self._requests.get(rid)
            if all_seqs is None:
                continue
            choice_outs = []
            for s in seqs:
                resolved = len(s.output_ids) - s.num_pending
                new_ids = s.output_ids[s.sent_tokens:resolved]
                lps = s.logprobs[s.sent_tokens:resolved] if s.params.logprobs is not None else None
                s.sent_tokens = resolved
                text, s.pending_emit = s.pending_emit, ""
                choice_outs.append(CompletionOutput(s.index, new_ids, text, lps, s.finish_reason, s.stop_reason))
            finished = all(s.is_finished for s in all_seqs)
            leader = all_seqs[0]
            prompt_logprobs = None
            if leader.prompt_logprobs is not None and not leader.prompt_logprobs_sent:
                prompt_logprobs, leader.prompt_logprobs_sent = leader.prompt_logprobs, True
            outs.append(RequestOutput(rid, choice_outs, len(leader.prompt_ids),
                                      sum(len(s.output_ids) for s in all_seqs), finished,
                                      num_cached_tokens=leader.num_cached_tokens, prompt_logprobs=prompt_logprobs))
            if finished:
                del self._requests[rid]
        return outs
