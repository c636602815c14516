"""The model runner: owns the weights, the paged KV cache, the penalty state and every jitted function.

One jitted step (model forward + sampler) serves prefill and decode; its shapes come from a small set of
buckets (rows x tokens x pages per row) that are all compiled at start-up, so serving never compiles.
The cache and the penalty state are donated, so they are updated in place.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxserve.config import EngineConfig, ModelConfig, cache_dir
from jaxserve.constrained.tables import GrammarTables
from jaxserve.engine.attention import PagedCacheOps, PagedMeta, select_attention
from jaxserve.engine.host_memory import keep_freed_memory_in_heap
from jaxserve.engine.kv_cache import PagedKVCache, init_paged_cache
from jaxserve.engine.matmul_plan import plan_matmuls
from jaxserve.engine.programs import BuildEvent, ExecutableCache, ProgramSet, ProgramSpec, abstract
from jaxserve.engine.scheduler import PrefillChunk
from jaxserve.engine.request import Sequence
from jaxserve.models.forward import make_forward
from jaxserve.models.llama import fuse_projections, quantize_int8, unstack_layers
from jaxserve.models.sharding import (
    ShardedCacheOps, adapt_params, cache_spec, make_mesh, param_shardings, place_params, plan_tensor_parallel,
    sharded_lookup,
)
from jaxserve.sampling.batch import SamplingBatch, SamplingRow, build_sampling_batch
from jaxserve.sampling.params import MAX_TOP_LOGPROBS
from jaxserve.sampling.penalties import PenaltyState, add_prompt_tokens, init_penalty_state, reset_slots
from jaxserve.sampling.sampler import SampleOutput, sample_with_grammar

log = logging.getLogger(__name__)

NUM_TOP_LOGPROBS = 20
MIN_RECORDED_STEPS = 2000  # recorded steps before unused buckets are dropped from the background compile


def _pow2_upto(limit: int, start: int = 1) -> list[int]:
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    out.append(limit)
    return sorted(set(out))


@dataclass(frozen=True)
class Buckets:
    decode_rows: tuple[int, ...]
    sample_rows: tuple[int, ...]  # the sampler compiles per row count only: a few coarse buckets
    page_widths: tuple[int, ...]  # pages per row of decode steps
    prefill_shapes: tuple[tuple[int, int], ...]  # (rows, tokens per row)
    prefill_widths: tuple[int, ...]  # pages per row of prefill steps

    @classmethod
    def make(cls, max_running: int, max_pages_per_row: int, prefill_budget: int, max_chunk: int,
             short_prefill_width: bool = False, one_decode_width: bool = False,
             small_samplers: bool = False) -> "Buckets":
        """`short_prefill_width`: prefill steps get a short page-table width (the smallest decode width) besides
        the full one, for attention backends whose cost grows with the width (the XLA formulations attend over
        every page-table slot; the kernels skip the pages past each row's length, so for them one full width
        suffices). Only two widths: prefill programs are the slowest to compile, and on CPU every one of them
        is paid at start-up. `one_decode_width`: decode steps too get the full width only (the CPU kernel's
        cost does not depend on it at all), a third of the programs to compile. `small_samplers`: sampler
        buckets of 1, 2 and 4 rows too (on the CPU a sampler row costs ~0.7 ms: padding one stream to 8 rows
        was a quarter of its time per token)."""
        widths = _pow2_upto(max_pages_per_row, start=min(16, max_pages_per_row))
        if one_decode_width:
            widths = [max_pages_per_row]
        prefill_widths = [max_pages_per_row]
        if short_prefill_width:
            prefill_widths = sorted({widths[0], max_pages_per_row})
        # Prefill shapes: per chunk length t (x2 ladder), one shape that fills the token budget with rows of t
        # tokens, plus a single-row shape for t >= 64 (a lone prompt then pays for at most 2x its length, and
        # two 128-token prompts share one 256-token step instead of taking two); the shortest chunks also get
        # x4 row steps, so a few short prompts do not pay for a full budget.
        token_sizes = _pow2_upto(max_chunk, start=min(16, max_chunk))
        shapes = set()
        for t in token_sizes:
            full_rows = max(1, min(max(prefill_budget, t) // t, max_running))
            shapes.add((full_rows, t))
            if t >= 64 or t == max_chunk:
                shapes.add((1, t))
            if t == token_sizes[0]:
                shapes.update((r, t) for r in (1, 4, 16, 64) if r < full_rows)
        shapes = sorted(shapes, key=lambda s: (s[1], s[0]))
        max_rows = max(max_running, max(r for r, _ in shapes))
        # The sampler makes several full-vocabulary passes per row, so padding 32 rows to 64 costs as much as
        # the extra compile of a 32-row bucket: a x2 ladder from 8 rows (from 1 with small_samplers).
        ladder = (1, 2, 4) * small_samplers + (8, 16, 32, 64, 128, 256)
        sample_rows = sorted({min(r, max_rows) for r in ladder} | {max_rows})
        return cls(tuple(_pow2_upto(max_running)), tuple(sample_rows), tuple(widths), tuple(shapes),
                   tuple(prefill_widths))

    def matmul_row_counts(self) -> list[int]:
        """The rows a step's matmuls multiply (rows x tokens), per forward bucket: what the matmul plan is
        decided for."""
        return sorted(set(self.decode_rows) | {r * t for r, t in self.prefill_shapes})

    def decode_shape(self, rows: int, pages: int) -> tuple[int, int]:
        return _first_at_least(self.decode_rows, rows), _first_at_least(self.page_widths, pages)

    def prefill_shape(self, rows: int, tokens: int, pages: int) -> tuple[int, int, int]:
        fitting = [s for s in self.prefill_shapes if s[0] >= rows and s[1] >= tokens]
        if not fitting:
            raise ValueError(f"no prefill bucket holds {rows} rows of {tokens} tokens")
        r, t = min(fitting, key=lambda s: (s[0] * s[1], s[1]))
        return r, t, _first_at_least(self.prefill_widths, pages)

    def prefill_tokens_for_rows(self) -> tuple[int, ...]:
        """Entry r-1: the longest chunk a prefill call of r rows can hold."""
        max_rows = max(r for r, _ in self.prefill_shapes)
        return tuple(max(t for r, t in self.prefill_shapes if r >= rows) for rows in range(1, max_rows + 1))


def _first_at_least(options: Seq[int], n: int) -> int:
    for o in options:
        if o >= n:
            return o
    raise ValueError(f"{n} exceeds the largest bucket {options[-1]}")


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class StepInputs:
    tokens: jax.Array  # [B, T]
    positions: jax.Array  # [B, T]
    meta: PagedMeta
    logits_index: jax.Array  # [B]
    sampling: SamplingBatch
    # Penalty bookkeeping of prefill chunks: slot to reset (-1 none), the row's slot for prompt tokens
    # (-1 none), how many chunk tokens are prompt tokens and how many are earlier outputs (recompute).
    reset_slot: jax.Array  # [B]
    chunk_slot: jax.Array  # [B]
    chunk_prompt_len: jax.Array  # [B]
    chunk_len: jax.Array  # [B]
    # Decode rows whose input token was sampled by the previous, still unread step: the slot whose entry
    # of the device-side `last_tokens` holds it (-1: the token in `tokens` is known on the host).
    token_slot: jax.Array  # [B]
    # Prompt logprobs (at most one row per step): the row (-1: none) and, per position t of its chunk, the
    # token whose logprob position t predicts (the prompt token at position + 1).
    logprob_row: jax.Array  # [] int32
    logprob_targets: jax.Array  # [T]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PromptLogprobs:
    """Log-probabilities at every position of one prefill row: of the next prompt token, and the top K."""

    token_logprob: jax.Array  # f32 [T]
    top_ids: jax.Array  # i32 [T, K]
    top_logprobs: jax.Array  # f32 [T, K]


def _prompt_logprobs(head_logits, params, hidden: jax.Array, targets: jax.Array) -> PromptLogprobs:
    logprobs = jax.nn.log_softmax(head_logits(params, hidden), axis=-1)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, MAX_TOP_LOGPROBS)
    token = jnp.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]
    return PromptLogprobs(token, top_ids.astype(jnp.int32), top_logprobs)


def _no_prompt_logprobs(hidden: jax.Array, targets: jax.Array) -> PromptLogprobs:
    t = targets.shape[0]
    return PromptLogprobs(jnp.zeros(t, jnp.float32), jnp.zeros((t, MAX_TOP_LOGPROBS), jnp.int32),
                          jnp.zeros((t, MAX_TOP_LOGPROBS), jnp.float32))


def _forward_step(forward, sample_rows: int, params, cache, penalty: PenaltyState, last_tokens, inp: StepInputs):
    """Model forward over the batch plus the penalty bookkeeping of prefill chunks -> logits padded to
    the sampler's row bucket [sample_rows, V]."""
    from_device = last_tokens[jnp.maximum(inp.token_slot, 0)][:, None]
    tokens = jnp.where(inp.token_slot[:, None] >= 0, from_device, inp.tokens)
    logits, cache, row_hidden = forward(params, tokens, inp.positions, cache, inp.meta, inp.logits_index,
                                        inp.logprob_row)
    # Only a step with a prompt-logprobs row pays for the LM head over its positions (XLA runs one branch).
    # Decode programs (one token per row) never carry one, and leave the branch out: under tensor parallelism
    # XLA:TPU gives it its own copy of the LM head shard in another layout (a 251 MiB temporary at 8B, tp 4).
    if inp.tokens.shape[1] == 1:
        prompt = _no_prompt_logprobs(row_hidden, inp.logprob_targets)
    else:
        prompt = jax.lax.cond(inp.logprob_row >= 0, partial(_prompt_logprobs, forward.head_logits, params),
                              _no_prompt_logprobs, row_hidden, inp.logprob_targets)
    logits = jnp.pad(logits, ((0, sample_rows - logits.shape[0]), (0, 0)))
    penalty = reset_slots(penalty, inp.reset_slot)
    penalty = add_prompt_tokens(penalty, inp.chunk_slot, inp.tokens, inp.chunk_prompt_len)
    # Earlier outputs recomputed after a preemption count as generated tokens again.
    t = jnp.arange(inp.tokens.shape[1])[None, :]
    is_output = (t >= inp.chunk_prompt_len[:, None]) & (t < inp.chunk_len[:, None]) & (inp.chunk_slot[:, None] >= 0)
    rows = jnp.where(is_output, inp.chunk_slot[:, None], penalty.num_slots)
    penalty = PenaltyState(
        output_counts=penalty.output_counts.at[rows, inp.tokens].add(1, mode="drop"),
        prompt_mask=penalty.prompt_mask,
    )
    return logits, cache, penalty, prompt


def _sample_step(logits, sampling: SamplingBatch, penalty: PenaltyState, grammar: GrammarTables, end_ids,
                 last_tokens, grammar_state):
    out, grammar_state = sample_with_grammar(logits, sampling, penalty, grammar, end_ids, grammar_state,
                                             num_top_logprobs=NUM_TOP_LOGPROBS)
    slots = jnp.where(sampling.slot >= 0, sampling.slot, last_tokens.shape[0])
    return out, last_tokens.at[slots].set(out.tokens, mode="drop"), grammar_state


def _copy_pages(cache: PagedKVCache, src: jax.Array, dst: jax.Array) -> PagedKVCache:
    return PagedKVCache(cache.k.at[:, :, dst].set(cache.k[:, :, src]), cache.v.at[:, :, dst].set(cache.v[:, :, src]))


def _fork_slots(penalty: PenaltyState, src: jax.Array, dst: jax.Array) -> PenaltyState:
    """Give slot dst the prompt tokens of slot src and no generated tokens (n > 1 followers)."""
    idx = jnp.where(dst < 0, penalty.num_slots, dst)
    return PenaltyState(
        output_counts=penalty.output_counts.at[idx].set(0, mode="drop"),
        prompt_mask=penalty.prompt_mask.at[idx].set(penalty.prompt_mask[jnp.maximum(src, 0)], mode="drop"),
    )


def jit_forward(forward, replicated: NamedSharding, cache_sharding: NamedSharding) -> Any:
    """The forward step of `forward` (one per matmul precision), jitted as `jit_programs` describes."""
    rep, kv = replicated, cache_sharding
    return jax.jit(partial(_forward_step, forward), static_argnums=(0,), donate_argnums=(2, 3),
                   out_shardings=(rep, PagedKVCache(kv, kv), rep, rep))


def jit_programs(forward, replicated: NamedSharding, cache_sharding: NamedSharding) -> tuple[Any, Any, Any, Any]:
    """The runner's four jitted programs (forward step, sampler, page copy, slot fork); `jaxserve.aot` compiles
    the same ones. The state they return keeps fixed shardings (the cache split by KV head, everything else
    replicated over the engine's mesh): equal input shardings on the next call, so no program is traced twice
    (XLA would otherwise pick equivalent but unequal shardings for the outputs). The logits are gathered for
    the sampler, which works over the whole vocabulary."""
    rep, kv = replicated, cache_sharding
    fwd = jit_forward(forward, replicated, cache_sharding)
    sample = jax.jit(_sample_step, donate_argnums=(2, 5, 6), out_shardings=rep)
    copy_pages = jax.jit(_copy_pages, donate_argnums=(0,), out_shardings=PagedKVCache(kv, kv))
    fork_slots = jax.jit(_fork_slots, donate_argnums=(0,), out_shardings=rep)
    return fwd, sample, copy_pages, fork_slots


@dataclass
class StepResult:
    tokens: np.ndarray  # [rows]
    logprob: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    num_allowed: np.ndarray


class ModelRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        params: dict[str, Any],
        engine_config: EngineConfig,
        *,
        dtype: str,
        num_pages: int,
        max_model_len: int,
        end_token_ids: Seq[int],
        grammar_tables_fn,
        interpret_kernels: bool = False,
        mesh: Mesh | None = None,
        executable_cache_dir: "Path | None" = None,
    ) -> None:
        """`model_config` and `params` as loaded (host, device or `Deferred` arrays); `mesh`: the devices of
        this engine along the `tensor` axis (None: the default device alone). The runner splits the model over
        them (models/sharding.py) and uses the plan's config (KV heads repeated when fewer than the shards,
        query heads padded when their groups do not split)."""
        self.mesh = mesh if mesh is not None else make_mesh(jax.devices()[:1])
        self.tp = tp = self.mesh.size
        self.plan = plan_tensor_parallel(model_config, tp)
        params = adapt_params(params, model_config, self.plan)
        model_config = self.plan.model_config
        self.cfg = model_config
        self.ecfg = engine_config
        self.dtype = dtype
        self.page_size = engine_config.page_size
        self.num_pages = num_pages
        self.max_model_len = max_model_len
        self.max_pages_per_row = math.ceil(max_model_len / self.page_size)
        self.platform = self.mesh.devices.flat[0].platform
        if self.platform == "cpu" and engine_config.host_malloc_tuning:
            keep_freed_memory_in_heap()
        attend, self.attention_name = select_attention(
            engine_config.attention_backend, self.platform, interpret=interpret_kernels,
            build_dir=cache_dir() / "kernels",
        )
        cache_ops = PagedCacheOps(attend, model_config.head_dim**-0.5, model_config.sliding_window)
        if tp > 1:
            cache_ops = ShardedCacheOps(cache_ops, self.mesh)
        loop = engine_config.layer_loop
        self.scan_layers = loop == "scan" or (loop == "auto" and self.platform != "cpu")
        if not self.scan_layers:
            params = unstack_layers(params, model_config.num_layers)
        params = fuse_projections(params, groups=tp)
        max_chunk = min(engine_config.max_num_batched_tokens, max_model_len)
        self.max_chunk = max_chunk
        self.buckets = Buckets.make(
            engine_config.max_running_requests, self.max_pages_per_row, engine_config.max_num_batched_tokens, max_chunk,
            short_prefill_width=self.attention_name in ("xla", "reference"),
            one_decode_width=self.attention_name == "cpu", small_samplers=self.platform == "cpu",
        )
        # float32 or int8 matmuls, per step row count (engine/matmul_plan.py); int8 steps read packed weights.
        self.matmul_plan = plan_matmuls(engine_config.quantization, self.platform, model_config,
                                        self.buckets.matmul_row_counts(), tp, cache_dir())
        log.info("%s", self.matmul_plan.reason)
        if self.matmul_plan.uses_int8:
            every_step = set(self.matmul_plan.int8_rows) >= set(self.buckets.matmul_row_counts())
            params = quantize_int8(params, model_config, keep_float=not every_step)
        make = partial(make_forward, model_config, dtype, cache_ops, scan_layers=self.scan_layers,
                       fused_projections=True, shard_groups=tp, embed_lookup=sharded_lookup(self.mesh, self.plan))
        forward = make()
        # Two programs per step: the forward is compiled per (rows, tokens, pages) bucket, the sampler only
        # per row count, so compile time grows with the bucket grid far more slowly. Both are dispatched
        # asynchronously; the logits never leave the device.
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        cache_sharding = NamedSharding(self.mesh, cache_spec())
        self._forward, self._sample, self._copy_pages, self._fork_slots = jit_programs(
            forward, self.replicated, cache_sharding)
        self._forward_int8 = (jit_forward(make(int8=True), self.replicated, cache_sharding)
                              if self.matmul_plan.uses_int8 else None)
        self.params = place_params(params, param_shardings(params, self.mesh, self.plan.shard_vocab))
        del params
        kv_dtype = jnp.float32 if dtype == "float32" else jnp.bfloat16
        self.cache = init_paged_cache(model_config, num_pages, self.page_size, kv_dtype, sharding=cache_sharding)
        R = engine_config.max_running_requests
        on_mesh = partial(jax.jit, out_shardings=self.replicated)  # created in place on this engine's devices
        self.penalty = on_mesh(partial(init_penalty_state, R, model_config.vocab_size))()
        # The latest sampled token of each running slot, kept on the device so the next step can be
        # dispatched before the host has read this one (host work overlaps device work).
        self.last_tokens = on_mesh(partial(jnp.zeros, R, jnp.int32))()
        # Likewise the grammar state (normal pool row, 0 = none) after each slot's latest token: a
        # constrained row whose previous token is in flight takes its state from here.
        self.grammar_state = on_mesh(partial(jnp.zeros, R, jnp.int32))()
        self.end_ids = jax.device_put(np.array(list(end_token_ids) or [-1], np.int32), self.replicated)
        self._grammar_tables_fn = grammar_tables_fn  # () -> the grammar pool's current GrammarTables
        self.max_prefill_rows = max(r for r, _ in self.buckets.prefill_shapes)
        # Multi-host serving (engine/multihost.py): host 0 publishes each device operation before launching it.
        self.mirror: Any = None
        # Ready executables by bucket, kept on disk across starts (engine/programs.py). Not across hosts: each
        # host of a multi-host engine compiles its own (a serialized executable is one process's).
        if jax.process_count() > 1:
            executable_cache_dir = None
        self._state_abstract = self._abstract_state()
        context = repr((model_config, dtype, self.attention_name, self.scan_layers, self.page_size, tp))
        self.programs = ProgramSet(ExecutableCache(executable_cache_dir, context, list(self.mesh.devices.flat)))
        self.essential_count = 0
        self.warmed_up = False  # before `warmup`, every step compiles its own bucket on first use
        self.bucket_use: dict[tuple[int, ...], int] = {}  # forward steps per bucket (save_bucket_use)

    # -- compilation ---------------------------------------------------------------------------
    def num_compiled(self) -> int:
        """Programs ready to run (compiled here or loaded from the executable cache)."""
        return len(self.programs)

    def _abstract_state(self) -> tuple:
        return abstract((self.params, self.cache, self.penalty, self.last_tokens))

    def program_specs(self) -> list[ProgramSpec]:
        """Every program serving may call, the ones a first request needs first (`essential_count` of them):
        decode at the most rows and the widest page table (holds any decode step), prefill of one row at the
        longest chunk and the widest table (holds any prefill chunk), their samplers and the page copy / slot
        fork; then, smallest first, the buckets that make small batches cheap."""
        b, state = self.buckets, self._state_abstract
        params, cache, penalty, last_tokens = state
        grammar = abstract(self._grammar_tables_fn())
        end_ids, grammar_state = abstract(self.end_ids), abstract(self.grammar_state)
        width = self.ecfg.max_running_requests
        idx = jax.ShapeDtypeStruct((width,), np.int32)

        def forward(rows: int, tokens: int, pages: int) -> ProgramSpec:
            inp = abstract(self._empty_inputs(rows, tokens, pages))
            int8 = self.matmul_plan.int8_for(rows * tokens)
            return ProgramSpec("forward", (rows, tokens, pages), self._forward_int8 if int8 else self._forward,
                               (self._sample_rows(rows),), (params, cache, penalty, last_tokens, inp),
                               variant="int8" if int8 else "")

        def sampler(rows: int) -> ProgramSpec:
            logits = jax.ShapeDtypeStruct((rows, self.cfg.vocab_size), np.float32, sharding=self.replicated)
            sampling = abstract(build_sampling_batch([], rows))
            return ProgramSpec("sample", (rows,), self._sample, (),
                               (logits, sampling, penalty, grammar, end_ids, last_tokens, grammar_state))

        decode = [(r, 1, w) for r in b.decode_rows for w in b.page_widths]
        prefill = [(r, t, w) for r, t in b.prefill_shapes for w in b.prefill_widths]
        first = [(b.decode_rows[-1], 1, b.page_widths[-1]), (1, self.max_chunk, b.prefill_widths[-1])]
        if first[1] not in prefill:  # a single-row shape at the longest chunk always exists (Buckets.make)
            first[1] = max(prefill, key=lambda s: (s[1], -s[0], s[2]))
        essential = [forward(*s) for s in first]
        samplers = sorted({self._sample_rows(s[0]) for s in first})
        essential += [sampler(r) for r in samplers]
        essential += [ProgramSpec("copy_pages", (width,), self._copy_pages, (), (cache, idx, idx)),
                      ProgramSpec("fork_slots", (width,), self._fork_slots, (), (penalty, idx, idx))]
        rest_samplers = [sampler(r) for r in b.sample_rows if r not in samplers]
        rest = sorted((s for s in decode + prefill if s not in first), key=lambda s: (s[0] * s[1], s[2], s[0]))
        # Samplers first: a forward bucket is usable only once the sampler of its row count is ready.
        self.essential_count = len(essential)
        return essential + rest_samplers + [forward(*s) for s in rest]

    def warmup(self, progress: Callable[[BuildEvent], None] | None = None, background: bool = False) -> float:
        """Make the programs ready (loaded from the executable cache or compiled); returns seconds taken.
        background=True: only the essential ones now (any step can run, padded), the rest on a thread of
        their own while serving goes on (`programs.background_running`)."""
        t0 = time.perf_counter()
        specs = self.program_specs()
        self.warmed_up = True
        workers = self.ecfg.compile_workers or max(1, min(4, os.cpu_count() or 1))
        if background:
            self.programs.build_all(specs[:self.essential_count], progress, workers=workers)
            # While serving, one thread: the steps need the other cores.
            self.programs.start_background(self._by_recorded_use(specs[self.essential_count:]), progress)
        else:
            self.programs.build_all(specs, progress, workers=workers)
        return time.perf_counter() - t0

    def _by_recorded_use(self, specs: list[ProgramSpec]) -> list[ProgramSpec]:
        """The background builds in order of the traffic earlier runs recorded (`save_bucket_use`): most used
        first; forward buckets no step used in at least MIN_RECORDED_STEPS recorded steps are dropped (a step
        that would have used one takes a larger ready bucket). Without a record: smallest first."""
        recorded = self.programs.cache.read_use()
        steps = sum(recorded.values())
        if steps < MIN_RECORDED_STEPS:
            return specs
        used = [s for s in specs if s.kind != "forward" or recorded.get(repr(s.shape), 0) > 0]
        dropped = len(specs) - len(used)
        if dropped:
            log.info("%d forward buckets were never used in %d recorded steps: not compiled", dropped, steps)
        return sorted(used, key=lambda s: (s.kind == "forward", -recorded.get(repr(s.shape), 0)))

    def save_bucket_use(self) -> None:
        """Add this run's forward-bucket use to the record the next start orders its compiles by."""
        self.programs.cache.add_use({repr(shape): n for shape, n in self.bucket_use.items()})
        self.bucket_use.clear()

    def _program(self, kind: str, shape: tuple[int, ...]) -> Any:
        """The ready executable; a step whose bucket is not ready compiles it here (the scheduler and the
        shape choice below keep serving on ready buckets, so this is a fallback, logged and counted)."""
        compiled = self.programs.get(kind, shape)
        if compiled is not None:
            return compiled
        for spec in self.program_specs():
            if spec.kind == kind and spec.shape == shape:
                if self.warmed_up:
                    log.warning("compiling %s %s while serving (not ready yet)", kind, shape)
                    self.programs.compiled_while_serving += 1
                return self.programs.build(spec)[0]
        raise RuntimeError(f"internal error: no {kind} program of shape {shape}")

    def apply_forks(self, copies: list[tuple[int, int]], slot_forks: list[tuple[int, int]]) -> None:
        """Copy KV pages and fork penalty slots on the device (fixed width: padded no-ops)."""
        if self.mirror is not None:
            self.mirror("forks", copies, slot_forks)
        width = self.ecfg.max_running_requests
        for start in range(0, max(len(copies), 1), width):
            part = copies[start:start + width]
            src = np.zeros(width, np.int32)
            dst = np.zeros(width, np.int32)  # padding copies the null page onto itself
            for i, (a, b) in enumerate(part):
                src[i], dst[i] = a, b
            self.cache = self._program("copy_pages", (width,))(self.cache, src, dst)
        for start in range(0, max(len(slot_forks), 1), width):
            part = slot_forks[start:start + width]
            src = np.zeros(width, np.int32)
            dst = np.full(width, -1, np.int32)
            for i, (a, b) in enumerate(part):
                src[i], dst[i] = a, b
            self.penalty = self._program("fork_slots", (width,))(self.penalty, src, dst)

    def _run(self, inp: StepInputs) -> tuple[SampleOutput, PromptLogprobs]:
        if self.mirror is not None:
            self.mirror("run", inp)
        rows, tokens = inp.tokens.shape
        sample_rows = inp.sampling.temperature.shape[0]  # built at the sampler's row bucket
        shape = (rows, tokens, inp.meta.page_table.shape[1])
        forward = self._program("forward", shape)
        self.bucket_use[shape] = self.bucket_use.get(shape, 0) + 1
        sample = self._program("sample", (sample_rows,))
        # Each donated buffer is replaced as soon as its successor exists, so a failure in a later call
        # leaves the runner with valid state whenever that is still possible (see `state_lost`).
        logits, self.cache, penalty, prompt = forward(self.params, self.cache, self.penalty, self.last_tokens, inp)
        out, self.last_tokens, self.grammar_state = sample(
            logits, inp.sampling, penalty, self._grammar_tables_fn(), self.end_ids, self.last_tokens, self.grammar_state
        )
        self.penalty = out.penalty
        return out, prompt

    def run_mirrored(self, inp: StepInputs) -> None:
        """A follower host's copy of host 0's step (engine/multihost.py): the same program on its shards.
        Waiting for it bounds how far this host's dispatch queue runs ahead."""
        out, _ = self._run(inp)
        out.tokens.block_until_ready()

    def state_lost(self) -> bool:
        """True when a failed call consumed a donated buffer (KV cache, penalty state, last tokens) without
        producing its successor: the engine cannot go on without losing every running request."""
        leaves = jax.tree.leaves((self.cache, self.penalty, self.last_tokens, self.grammar_state))
        return any(x.is_deleted() for x in leaves)

    # -- building inputs -------------------------------------------------------------------------
    def _usable(self, rows: int) -> bool:
        return self.programs.get("sample", (self._sample_rows(rows),)) is not None

    def _ready_bucket(self, exact: tuple[int, int, int], holds: Callable[[tuple[int, int, int]], bool],
                      cost: Callable[[tuple[int, int, int]], Any]) -> tuple[int, int, int]:
        """A step's forward bucket: its own when ready, else the cheapest ready one that holds it (the rest are
        still compiling in the background)."""
        if not self.warmed_up or (self.programs.get("forward", exact) is not None and self._usable(exact[0])):
            return exact
        ready = [s for s in self.programs.ready_shapes("forward") if holds(s) and self._usable(s[0])]
        return min(ready, key=cost) if ready else exact

    def _decode_shape(self, rows: int, pages: int) -> tuple[int, int]:
        r, w = self.buckets.decode_shape(rows, pages)
        r, _, w = self._ready_bucket((r, 1, w), lambda s: s[1] == 1 and s[0] >= rows and s[2] >= pages,
                                     lambda s: (s[0] * s[2], s[0]))
        return r, w

    def _prefill_shape(self, rows: int, tokens: int, pages: int) -> tuple[int, int, int]:
        return self._ready_bucket(self.buckets.prefill_shape(rows, tokens, pages),
                                  lambda s: s[1] > 1 and s[0] >= rows and s[1] >= tokens and s[2] >= pages,
                                  lambda s: (s[0] * s[1], s[2]))

    def prefill_limits(self) -> tuple[int, tuple[int, ...]]:
        """(most rows, longest chunk per row count) of the prefill steps the ready programs hold at the widest
        page table: what the scheduler may form while buckets still compile (all of them once ready)."""
        widest = self.buckets.prefill_widths[-1]
        ready = [(r, t) for r, t, w in self.programs.ready_shapes("forward")
                 if t > 1 and w == widest and self._usable(r)]
        if not self.warmed_up or not ready:
            return self.max_prefill_rows, self.buckets.prefill_tokens_for_rows()
        max_rows = max(r for r, _ in ready)
        return max_rows, tuple(max(t for r, t in ready if r >= k) for k in range(1, max_rows + 1))

    def _sample_rows(self, rows: int) -> int:
        """The sampler's row bucket for a batch of `rows` (the sampling batch is built at this size)."""
        return _first_at_least(self.buckets.sample_rows, rows)

    def _empty_inputs(self, rows: int, tokens: int, pages: int) -> StepInputs:
        zeros = np.zeros((rows, tokens), np.int32)
        return self._inputs(
            tokens=zeros, positions=zeros, page_table=np.zeros((rows, pages), np.int32),
            seq_lens=np.zeros(rows, np.int32), q_start=np.zeros(rows, np.int32), slot_page=zeros, slot_offset=zeros,
            sampling=build_sampling_batch([], self._sample_rows(rows)),
        )

    @staticmethod
    def _inputs(*, tokens: np.ndarray, positions: np.ndarray, page_table: np.ndarray, seq_lens: np.ndarray,
                q_start: np.ndarray, slot_page: np.ndarray, slot_offset: np.ndarray, sampling: SamplingBatch,
                logits_index: np.ndarray | None = None, reset_slot: np.ndarray | None = None,
                chunk_slot: np.ndarray | None = None, chunk_prompt_len: np.ndarray | None = None,
                chunk_len: np.ndarray | None = None, token_slot: np.ndarray | None = None,
                logprob_row: int = -1, logprob_targets: np.ndarray | None = None) -> StepInputs:
        """Step inputs by name; the optional per-row arrays default to "nothing to do" for every row."""
        rows = tokens.shape[0]

        def or_fill(a: np.ndarray | None, value: int) -> np.ndarray:
            return np.full(rows, value, np.int32) if a is None else a

        return StepInputs(
            tokens=tokens, positions=positions,
            meta=PagedMeta(page_table=page_table, seq_lens=seq_lens, q_start=q_start,
                           slot_page=slot_page, slot_offset=slot_offset),
            logits_index=or_fill(logits_index, 0), sampling=sampling, reset_slot=or_fill(reset_slot, -1),
            chunk_slot=or_fill(chunk_slot, -1), chunk_prompt_len=or_fill(chunk_prompt_len, 0),
            chunk_len=or_fill(chunk_len, 0), token_slot=or_fill(token_slot, -1),
            logprob_row=np.array(logprob_row, np.int32),
            logprob_targets=np.zeros(tokens.shape[1], np.int32) if logprob_targets is None else logprob_targets,
        )

    def _fill_slots(self, seq: Sequence, start: int, length: int, slot_page: np.ndarray, slot_offset: np.ndarray, row: int) -> None:
        pos = np.arange(start, start + length)
        pages = np.asarray(seq.pages, np.int32)
        slot_page[row, :length] = pages[pos // self.page_size]
        slot_offset[row, :length] = pos % self.page_size

    def decode_inputs(self, seqs: list[Sequence], rows_info: list[SamplingRow]) -> StepInputs:
        """Host arrays of a decode step (pure host work: a failure here leaves the device state intact)."""
        n = len(seqs)
        max_pages = max(len(s.pages) for s in seqs)
        rows, width = self._decode_shape(n, max_pages)
        tokens = np.zeros((rows, 1), np.int32)
        positions = np.zeros((rows, 1), np.int32)
        page_table = np.zeros((rows, width), np.int32)
        seq_lens = np.zeros(rows, np.int32)
        q_start = np.zeros(rows, np.int32)
        slot_page = np.zeros((rows, 1), np.int32)
        slot_offset = np.zeros((rows, 1), np.int32)
        token_slot = np.full(rows, -1, np.int32)
        for i, s in enumerate(seqs):
            pos = s.num_tokens - 1
            last = s.output_ids[-1] if s.output_ids else s.prompt_ids[-1]
            if last < 0:  # sampled by the step in flight: read it on the device
                token_slot[i] = s.slot
            else:
                tokens[i, 0] = last
            positions[i, 0] = pos
            page_table[i, : len(s.pages)] = s.pages
            seq_lens[i] = pos + 1
            q_start[i] = pos
            self._fill_slots(s, pos, 1, slot_page, slot_offset, i)
        return self._inputs(
            tokens=tokens, positions=positions, page_table=page_table, seq_lens=seq_lens, q_start=q_start,
            slot_page=slot_page, slot_offset=slot_offset, token_slot=token_slot,
            sampling=build_sampling_batch(rows_info, self._sample_rows(rows)),
        )

    def prefill_inputs(self, chunks: list[PrefillChunk], rows_info: list[SamplingRow]) -> StepInputs:
        """Host arrays of a prefill step (pure host work, like `decode_inputs`)."""
        n = len(chunks)
        rows, t, width = self._prefill_shape(n, max(c.length for c in chunks), max(len(c.seq.pages) for c in chunks))
        tokens = np.zeros((rows, t), np.int32)
        positions = np.zeros((rows, t), np.int32)
        page_table = np.zeros((rows, width), np.int32)
        seq_lens = np.zeros(rows, np.int32)
        q_start = np.zeros(rows, np.int32)
        slot_page = np.zeros((rows, t), np.int32)
        slot_offset = np.zeros((rows, t), np.int32)
        logits_index = np.zeros(rows, np.int32)
        reset_slot = np.full(rows, -1, np.int32)
        chunk_slot = np.full(rows, -1, np.int32)
        chunk_prompt_len = np.zeros(rows, np.int32)
        chunk_len = np.zeros(rows, np.int32)
        logprob_row, logprob_targets = -1, np.zeros(t, np.int32)
        for i, c in enumerate(chunks):
            s = c.seq
            ids = s.token_ids[c.start : c.start + c.length]
            tokens[i, : c.length] = ids
            positions[i, : c.length] = np.arange(c.start, c.start + c.length)
            page_table[i, : len(s.pages)] = s.pages
            seq_lens[i] = c.start + c.length
            q_start[i] = c.start
            self._fill_slots(s, c.start, c.length, slot_page, slot_offset, i)
            logits_index[i] = c.length - 1
            if c.first:
                reset_slot[i] = s.slot
            chunk_slot[i] = s.slot
            chunk_prompt_len[i] = max(0, min(c.length, len(s.prompt_ids) - c.start))
            chunk_len[i] = c.length
            if c.prompt_logprobs:
                if logprob_row >= 0:
                    raise RuntimeError("internal error: two prompt-logprobs rows in one prefill step")
                logprob_row = i
                nxt = s.prompt_ids[c.start + 1:c.start + c.length + 1]  # predicted by positions start...
                logprob_targets[:len(nxt)] = nxt
        return self._inputs(
            tokens=tokens, positions=positions, page_table=page_table, seq_lens=seq_lens, q_start=q_start,
            slot_page=slot_page, slot_offset=slot_offset, logits_index=logits_index, reset_slot=reset_slot,
            chunk_slot=chunk_slot, chunk_prompt_len=chunk_prompt_len, chunk_len=chunk_len,
            logprob_row=logprob_row, logprob_targets=logprob_targets,
            sampling=build_sampling_batch(rows_info, self._sample_rows(rows)),
        )

    def dispatch(self, inp: StepInputs, n: int) -> "PendingResult":
        """Launch one step on the device (asynchronously); its first `n` rows are real."""
        out, prompt = self._run(inp)
        return PendingResult(out, n, prompt if int(inp.logprob_row) >= 0 else None)


def _to_host(x: jax.Array) -> np.ndarray:
    """A replicated result on the host; on a mesh spanning several hosts from this host's own copy."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(x.addressable_shards[0].data)


class PendingResult:
    """A dispatched step whose sampled tokens the host has not read yet (JAX dispatch is asynchronous)."""

    def __init__(self, out: SampleOutput, n: int, prompt: PromptLogprobs | None = None) -> None:
        self._out: SampleOutput | None = out
        self._n = n
        self._result: StepResult | None = None
        self._prompt = prompt
        self._prompt_result: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def result(self) -> StepResult:
        if self._result is None:
            o = self._out
            host = [_to_host(a) for a in (o.tokens, o.logprob, o.top_ids, o.top_logprobs, o.num_allowed)]
            self._result = StepResult(*(a[: self._n] for a in host))
            self._out = None
        return self._result

    def prompt_logprobs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(next-token logprob [T], top ids [T, K], top logprobs [T, K]) of the step's prompt-logprobs row."""
        if self._prompt_result is None:
            if self._prompt is None:
                raise RuntimeError("internal error: this step computed no prompt logprobs")
            p = self._prompt
            self._prompt_result = tuple(_to_host(a) for a in (p.token_logprob, p.top_ids, p.top_logprobs))
            self._prompt = None
        return self._prompt_result
