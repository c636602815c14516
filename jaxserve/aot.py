"""Compile the engine's programs ahead of time for a named TPU or GPU target, without the chip.

`python -m jaxserve.aot --model-config llama-3.1-8b --target v6e-1` builds every jitted program the
engine runs (the forward of each decode and prefill bucket, the sampler with the grammar tables of each
row bucket, the KV page copy and the penalty-slot fork) from a model config and abstract weights
(`jax.ShapeDtypeStruct` trees: no weight file, no device array), compiles each one for the target with the
target's own compiler (libtpu for TPU topologies, the CUDA plugin + ptxas for H100/H200), and prints per
program the compile time, the HBM it needs (arguments, outputs, temporaries) and XLA's flops and bytes;
then the KV tokens that fit and a roofline estimate of decode throughput. The last line is JSON.

Nothing here runs on a device: with JAX_PLATFORMS=cpu the host backend stays the CPU and the target's
devices come from `jax.experimental.topologies` (compile-only devices). What needs installing:
`pip install -e ".[test]"` brings libtpu and the CUDA plugin with ptxas (tests/test_aot.py).

A multi-chip target (v5e-4, v6e-8, h200-8) compiles the tensor-parallel programs over all its chips by default
(`--tp-size` picks fewer): the same sharding rules, `shard_map` around the attention kernels and jitted
programs as the engine (models/sharding.py, engine/runner.jit_programs); the memory figures are per chip.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

GiB = 1024**3
CONFIG_DIR = Path(__file__).parent / "models" / "configs"


# -- chips and targets ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Chip:
    """Per-chip figures used for the memory check and the roofline (published vendor figures)."""

    name: str
    platform: str  # "tpu" | "gpu"
    hbm_bytes: int  # memory of one chip (what a device reports as its total)
    hbm_bandwidth: float  # bytes/s
    peak_bf16_flops: float  # dense bf16 FLOP/s
    vmem_bytes: int = 0  # TPU: VMEM per core; GPU: 0
    shared_memory_per_block: int = 0  # GPU: opt-in shared memory per block (bytes)

    def describe(self) -> str:
        return (f"{self.name}: {self.hbm_bandwidth / 1e9:,.0f} GB/s, {self.peak_bf16_flops / 1e12:,.0f} TFLOP/s bf16, "
                f"{self.hbm_bytes / GiB:.1f} GiB")


CHIPS: dict[str, Chip] = {
    # TPU figures: cloud.google.com/tpu/docs (v5e, v6e system architecture); VMEM is 128 MiB on both.
    "v5e": Chip("TPU v5e", "tpu", 16 * GiB, 819e9, 197e12, vmem_bytes=128 * 1024**2),
    "v6e": Chip("TPU v6e", "tpu", 32 * GiB, 1640e9, 918e12, vmem_bytes=128 * 1024**2),
    # GPU figures: NVIDIA H100 SXM / H200 datasheets (dense bf16); memory is what the device reports.
    "h100": Chip("NVIDIA H100 SXM 80GB", "gpu", 84_942_979_072, 3.35e12, 989e12, shared_memory_per_block=232_448),
    "h200": Chip("NVIDIA H200 141GB", "gpu", 151_397_597_184, 4.8e12, 989e12, shared_memory_per_block=232_448),
}

# Named targets: chip generation and the topology jax.experimental.topologies takes.
_TPU_TOPOLOGIES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4"}


@dataclass(frozen=True)
class Target:
    name: str
    chip: Chip
    topology: str  # TPU: "v6e:2x4"; GPU: "1x1x1"
    num_chips: int

    @property
    def platform(self) -> str:
        return self.chip.platform


def parse_target(name: str) -> Target:
    """`v5e-1`, `v5e-4`, `v6e-1`, `v6e-8` (any `<v5e|v6e>-<1|4|8|16>`), a raw TPU topology such as `v6e:4x4`,
    `h100` / `h200`, or `h100-8` / `h200-8` (n GPUs of one host)."""
    key = name.lower()
    if key in ("h100", "h200"):
        return Target(key, CHIPS[key], "1x1x1", 1)
    gpu = key.split("-", 1)
    if gpu[0] in ("h100", "h200") and len(gpu) == 2 and gpu[1] in ("1", "2", "4", "8"):
        # One host with n GPUs (the topology is slices x hosts x devices per host).
        return Target(key, CHIPS[gpu[0]], f"1x1x{gpu[1]}", int(gpu[1]))
    if ":" in key:
        gen, shape = key.split(":", 1)
        if gen in CHIPS and CHIPS[gen].platform == "tpu":
            return Target(key, CHIPS[gen], key, math.prod(int(x) for x in shape.split("x")))
    if "-" in key:
        gen, count = key.split("-", 1)
        if gen in CHIPS and CHIPS[gen].platform == "tpu" and count.isdigit() and int(count) in _TPU_TOPOLOGIES:
            return Target(key, CHIPS[gen], f"{gen}:{_TPU_TOPOLOGIES[int(count)]}", int(count))
    raise ValueError(f"unknown target {name!r}: use v5e-1, v5e-4, v6e-1, v6e-8 (or <v5e|v6e>:<AxB>), h100, h200, "
                     "h100-8, h200-8 (1, 2, 4 or 8 GPUs of one host)")


def gpu_target_config(chip: Chip) -> str:
    """An XLA GpuTargetConfig (text proto) for a Hopper chip: what the CUDA compiler needs to know about the
    device it compiles for (the same fields as openxla/xla's target_config/specs, written from the
    datasheet figures above)."""
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(chip.hbm_bandwidth)}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {chip.hbm_bytes}
  shared_memory_per_block_optin: {chip.shared_memory_per_block}
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 patch: 0 }}
device_description_str: "{chip.name}"
"""


def target_devices(target: Target) -> list:
    """Compile-only devices of the target (no chip needed)."""
    from jax.experimental import topologies

    if target.platform == "tpu":
        # Compile-only use of libtpu: several processes may do it at once (no chip to guard), and without
        # a TPU VM's metadata libtpu would warn about every missing variable.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        kwargs = {"chips_per_host_bounds": (1, 1, 1)} if target.num_chips == 1 else {}
        return list(topologies.get_topology_desc(target.topology, platform="tpu", **kwargs).devices)
    # No GPU here, so no cuDNN/driver to check the plugin against (it only compiles).
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    return list(topologies.get_topology_desc("", "cuda", target_config=gpu_target_config(target.chip),
                                             topology=target.topology).devices)


# -- model configs -------------------------------------------------------------------------------------
def available_model_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_model_config(name_or_path: str):
    """A bundled name (`llama-3.1-8b`, see `available_model_configs`), an HF config.json, or a directory."""
    from jaxserve.config import ModelConfig

    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        path = CONFIG_DIR / f"{name_or_path.lower()}.json"
    if not path.exists():
        raise ValueError(f"no model config {name_or_path!r}; bundled: {', '.join(available_model_configs())}")
    return ModelConfig.from_hf_config(json.loads(path.read_text()))


# -- KV pool sizing (SGLang's --mem-fraction-static meaning) ------------------------------------------
# -- the engine's programs, abstractly -----------------------------------------------------------------
@dataclass
class Program:
    name: str
    kind: str  # forward-decode | forward-prefill | sampler | copy-pages | fork-slots
    fn: Any  # the jitted function
    args: tuple  # abstract arguments (static ones as Python values)
    shape: tuple = ()  # (rows, tokens, pages) of forward programs, (rows,) of the sampler


@dataclass
class EngineShape:
    """What the engine would run with on the target: its config, buckets and pool size."""

    engine_config: Any
    max_model_len: int
    num_pages: int
    buckets: Any
    dtype: str
    weight_bytes: int  # per chip
    bytes_per_page: int  # per chip
    state_bytes: int  # penalty state, grammar tables, last tokens (resident besides weights and KV)
    tp_plan: Any = None  # models.sharding.TensorParallelPlan


def _sds(x, sharding=None):
    import jax
    import numpy as np

    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def unfused_abstract_params(cfg, dtype: str):
    """ShapeDtypeStructs of the loaded parameter tree (stacked layers, separate q/k/v and gate/up), what the
    engine's per-device sizing reads."""
    from jaxserve.models.forward import param_shapes

    return param_shapes(cfg, dtype)


def abstract_params(cfg, dtype: str, sharding=None):
    """ShapeDtypeStructs of the runner's parameter tree (stacked layers, fused projections); `sharding`: one
    sharding for every leaf, or a function (path names, shape) -> sharding."""
    import jax

    from jaxserve.models.forward import param_shapes
    from jaxserve.models.sharding import path_names

    shapes = param_shapes(cfg, dtype, fused_projections=True)
    if callable(sharding):
        return jax.tree_util.tree_map_with_path(
            lambda path, s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding(path_names(path), s.shape)), shapes)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def tree_bytes(tree) -> int:
    import jax
    import numpy as np

    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def engine_shape(cfg, chip: Chip, *, kv_memory_fraction: float, dtype: str = "bfloat16", max_model_len: int | None = None,
                 max_running_requests: int | None = None, max_num_batched_tokens: int | None = None,
                 page_size: int = 16, num_pages: int | None = None, tp_size: int = 1) -> EngineShape:
    """The engine's shape on `chip` (each of `tp_size` chips), as the engine derives it (accelerator defaults,
    the runner's buckets, the tensor-parallel plan) with the KV pool sized by `engine.kv_cache.kv_cache_pages`
    per chip, as the engine sizes it on a device."""
    from jaxserve.config import EngineConfig
    from jaxserve.engine.kv_cache import kv_bytes_per_page, kv_cache_pages
    from jaxserve.engine.runner import Buckets
    from jaxserve.models.sharding import per_device_param_bytes, plan_tensor_parallel

    ecfg = EngineConfig(max_model_len=max_model_len, max_running_requests=max_running_requests,
                        max_num_batched_tokens=max_num_batched_tokens, page_size=page_size, num_pages=num_pages,
                        kv_memory_fraction=min(kv_memory_fraction, 0.95), attention_backend="pallas",
                        layer_loop="scan").with_platform_defaults(chip.platform)
    mml = min(ecfg.max_model_len, cfg.max_position_embeddings)
    max_pages_per_row = math.ceil(mml / page_size)
    plan = plan_tensor_parallel(cfg, tp_size)
    per_page = kv_bytes_per_page(plan.model_config, page_size, 4 if dtype == "float32" else 2) // tp_size
    weight_bytes = per_device_param_bytes(unfused_abstract_params(cfg, dtype), cfg, plan)
    full = ecfg.max_running_requests * max_pages_per_row + 1
    if num_pages is None:
        num_pages = kv_cache_pages(chip.hbm_bytes, weight_bytes, kv_memory_fraction, per_page, max_pages=full)
    max_chunk = min(ecfg.max_num_batched_tokens, mml)
    buckets = Buckets.make(ecfg.max_running_requests, max_pages_per_row, ecfg.max_num_batched_tokens, max_chunk,
                           short_prefill_width=False)
    R, V = ecfg.max_running_requests, cfg.vocab_size
    rows = -(-ecfg.grammar_capacity_states // 16) * 16
    state = R * V * 5 + 8 * R + rows * (-(-V // 32) * 4 + 5 * 4) + max(ecfg.grammar_class_map_slots, 1) * V * 4 \
        + max(ecfg.grammar_next_capacity // 1024 * 1024, 1) * 4
    return EngineShape(ecfg, mml, num_pages, buckets, dtype, weight_bytes, per_page, state, plan)


def engine_programs(cfg, shape: EngineShape, platform: str, mesh, *, attend: Callable | None = None) -> list[Program]:
    """Every jitted program the engine compiles at start-up, with abstract arguments, built from the runner's
    own module-level step functions, jits and Buckets (what `ModelRunner.warmup` compiles, plus the fork
    programs), split over `mesh` (the `tensor` axis: shape.tp_plan.size devices) as the runner splits them.
    `platform`: "tpu" | "gpu" picks the Pallas kernel the engine's `auto` backend would; `attend` overrides the
    attention function (tests: a deliberately broken kernel configuration)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxserve.constrained.tables import META_COLUMNS, GrammarTables
    from jaxserve.engine.attention import PagedCacheOps
    from jaxserve.engine.kv_cache import PagedKVCache, cache_shape
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxserve.engine.runner import ModelRunner, _first_at_least, jit_programs
    from jaxserve.models.forward import make_forward
    from jaxserve.models.sharding import ShardedCacheOps, cache_spec, param_spec, sharded_lookup
    from jaxserve.sampling.batch import build_sampling_batch
    from jaxserve.sampling.penalties import PenaltyState
    from pallas_kernels.paged_attention import paged_attention

    ecfg, b, plan = shape.engine_config, shape.buckets, shape.tp_plan
    if mesh.size != plan.size:
        raise ValueError(f"the mesh has {mesh.size} devices, the plan {plan.size}")
    cfg = plan.model_config  # KV heads repeated when fewer than the shards, as the runner does
    replicated = NamedSharding(mesh, PartitionSpec())
    kv_sharding = NamedSharding(mesh, cache_spec())
    S = partial(jax.ShapeDtypeStruct, sharding=replicated)
    if attend is None:
        attend = partial(paged_attention, impl="pallas", platform=platform)
    cache_ops = PagedCacheOps(attend, cfg.head_dim**-0.5, cfg.sliding_window)
    if plan.size > 1:
        cache_ops = ShardedCacheOps(cache_ops, mesh)
    forward = make_forward(cfg, shape.dtype, cache_ops, scan_layers=True, fused_projections=True,
                           shard_groups=plan.size, embed_lookup=sharded_lookup(mesh, plan))
    params = abstract_params(cfg, shape.dtype,
                             lambda names, s: NamedSharding(mesh, param_spec(names, len(s), plan.shard_vocab)))
    kv_dtype = jnp.float32 if shape.dtype == "float32" else jnp.bfloat16
    cshape = cache_shape(cfg, shape.num_pages, ecfg.page_size, platform)  # the layout the engine uses there
    cache = PagedKVCache(jax.ShapeDtypeStruct(cshape, kv_dtype, sharding=kv_sharding),
                         jax.ShapeDtypeStruct(cshape, kv_dtype, sharding=kv_sharding))
    R, V = ecfg.max_running_requests, cfg.vocab_size
    penalty = PenaltyState(S((R, V), jnp.int32), S((R, V), jnp.bool_))
    last_tokens = S((R,), jnp.int32)
    grammar_state = S((R,), jnp.int32)
    cap_rows = -(-ecfg.grammar_capacity_states // 16) * 16
    grammar = GrammarTables(S((cap_rows, -(-V // 32)), jnp.uint32), S((cap_rows, META_COLUMNS), jnp.int32),
                            S((max(ecfg.grammar_class_map_slots, 1), V), jnp.int32),
                            S((max(ecfg.grammar_next_capacity // 1024 * 1024, 1),), jnp.int32))
    end_ids = S((max(len(cfg.eos_token_ids), 1),), jnp.int32)
    as_abstract = lambda tree: jax.tree.map(lambda x: S(np.shape(x), np.asarray(x).dtype), tree)

    # The runner's own jits (same functions, static and donated arguments, output shardings).
    fwd, sample, copy_pages, fork_slots = jit_programs(forward, replicated, kv_sharding)

    def step_inputs(rows: int, tokens: int, pages: int):
        zeros = np.zeros((rows, tokens), np.int32)
        sample_rows = _first_at_least(b.sample_rows, rows)
        inp = ModelRunner._inputs(
            tokens=zeros, positions=zeros, page_table=np.zeros((rows, pages), np.int32),
            seq_lens=np.zeros(rows, np.int32), q_start=np.zeros(rows, np.int32), slot_page=zeros,
            slot_offset=zeros, sampling=build_sampling_batch([], sample_rows))
        return sample_rows, as_abstract(inp)

    programs: list[Program] = []
    fwd_shapes = [(r, 1, p, "forward-decode") for r in b.decode_rows for p in b.page_widths]
    fwd_shapes += [(r, t, w, "forward-prefill") for r, t in b.prefill_shapes for w in b.prefill_widths]
    for rows, tokens, pages, kind in fwd_shapes:
        sample_rows, inp = step_inputs(rows, tokens, pages)
        programs.append(Program(f"{kind.split('-')[1]} r{rows} t{tokens} p{pages}", kind, fwd,
                                (sample_rows, params, cache, penalty, last_tokens, inp), (rows, tokens, pages)))
    for rows in b.sample_rows:
        sampling = as_abstract(build_sampling_batch([], rows))
        programs.append(Program(f"sampler r{rows}", "sampler", sample,
                                (S((rows, V), jnp.float32), sampling, penalty, grammar, end_ids, last_tokens,
                                 grammar_state), (rows,)))
    idx = S((R,), jnp.int32)
    programs.append(Program(f"copy_pages w{R}", "copy-pages", copy_pages, (cache, idx, idx)))
    programs.append(Program(f"fork_slots w{R}", "fork-slots", fork_slots, (penalty, idx, idx)))
    return programs


# -- compiling and reporting ---------------------------------------------------------------------------
@dataclass
class Compiled:
    name: str
    kind: str
    shape: tuple
    compile_s: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    flops: float | None
    bytes_accessed: float | None
    error: str | None = None

    @property
    def hbm_bytes(self) -> int:
        """Peak HBM the program needs: arguments + outputs - donated aliases + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def _rejected(p: Program, seconds: float, e: Exception) -> Compiled:
    """The target's compiler (or the lowering for it) rejected the program: report, never hide."""
    first = str(e).strip().splitlines()[0][:400] if str(e).strip() else ""
    return Compiled(p.name, p.kind, p.shape, seconds, 0, 0, 0, 0, None, None, error=f"{type(e).__name__}: {first}")


def _compiled(p: Program, seconds: float, compiled) -> Compiled:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    flops = float(cost["flops"]) if cost and "flops" in cost else None
    nbytes = float(cost["bytes accessed"]) if cost and "bytes accessed" in cost else None
    return Compiled(p.name, p.kind, p.shape, seconds, int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes),
                    int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes), flops, nbytes)


def compile_programs(programs: list[Program], mesh,
                     progress: Callable[[Compiled], None] | None = None) -> list[Compiled]:
    """Compile each program for the mesh's target, one after another; results (and `progress` calls) in the
    programs' order. A program the lowering or the target's compiler rejects is reported, never hidden.

    One at a time on purpose: two deviceless compiles on threads at once crashed the process (SIGSEGV inside
    backend_compile_and_load, CI on a 2-core AMD EPYC, cold caches), which no speed-up is worth."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    # A compile-only target's executables cannot be serialized into (or read back from) the persistent cache
    # of this host's CPU backend: leave it out of these compiles. JAX decides once per process whether the
    # cache is used, so the switch only takes effect with a reset (without it, a process that had compiled
    # anything before tried to read and write deviceless executables there).
    cache_was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    results = []
    try:
        for p in programs:
            t0 = time.perf_counter()
            try:
                with jax.set_mesh(mesh):  # Pallas asks the mesh's devices for the chip kind while lowering
                    compiled = p.fn.lower(*p.args).compile()
            except Exception as e:
                r = _rejected(p, time.perf_counter() - t0, e)
            else:
                r = _compiled(p, time.perf_counter() - t0, compiled)
            results.append(r)
            if progress:
                progress(r)
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_was)
        compilation_cache.reset_cache()
    return results


def analytic_decode_cost(cfg, rows: int, context: int, dtype_bytes: int = 2) -> tuple[float, float]:
    """(flops, bytes) of one decode step from the model's shapes: every weight read once, each row's KV
    read over `context` tokens; used where the compiler gives no cost analysis (the CUDA plugin)."""
    from jaxserve.engine.kv_cache import kv_bytes_per_page

    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    qkv = h * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    per_layer = qkv + cfg.num_heads * cfg.head_dim * h + 3 * h * i
    matmul_params = L * per_layer + cfg.vocab_size * h
    weights = (L * per_layer + cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)) * dtype_bytes
    kv = rows * context * kv_bytes_per_page(cfg, 1, dtype_bytes)
    attn_flops = rows * L * cfg.num_heads * context * cfg.head_dim * 4
    return 2.0 * matmul_params * rows + attn_flops, float(weights + kv)


@dataclass
class Report:
    model: str
    target: Target
    shape: EngineShape
    results: list[Compiled]
    roofline: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def failures(self) -> list[Compiled]:
        return [r for r in self.results if r.error]


def roofline(cfg, chip: Chip, results: list[Compiled], shape: EngineShape, batches=(1, 64, 256),
             context: int = 2048) -> list[dict]:
    """Decode throughput bound at each batch: step time = max(flops / peak, bytes / bandwidth), with flops and
    bytes counted from the model's shapes (every weight read once per step, each row's KV over `context`).
    XLA's cost analysis of the compiled decode program is reported beside it but not used: it counts the body
    of the layer scan (a while loop) once, not once per layer, so it undercounts weights and KV by ~L x."""
    b = shape.buckets
    pages = math.ceil(context / shape.engine_config.page_size)
    by = {(r.kind, r.shape): r for r in results if not r.error}
    out = []
    for batch in batches:
        entry: dict[str, Any] = {"batch": batch, "context": context}
        try:
            rows, width = b.decode_shape(batch, pages)
        except ValueError:
            rows, width = None, None
        fwd = by.get(("forward-decode", (rows, 1, width))) if rows == batch else None
        tp = shape.tp_plan.size if shape.tp_plan is not None else 1
        served = shape.tp_plan.model_config if shape.tp_plan is not None else cfg
        flops, nbytes = analytic_decode_cost(served, batch, context, 4 if shape.dtype == "float32" else 2)
        flops, nbytes = flops / tp, nbytes / tp  # per chip: weights and KV heads are split over the chips
        entry["source"] = "analytic (weights + KV over the context" + (
            f", per chip of {tp}; all-reduces not counted)" if tp > 1 else ")")
        entry["compiled"] = ("ok" if fwd else "no compiled decode program for this batch") if rows == batch else \
            "batch above the engine's max_running_requests"
        if fwd is not None:
            entry["compiled_flops_scan_body_once"] = fwd.flops
            entry["compiled_bytes_scan_body_once"] = fwd.bytes_accessed
        kv_needed = batch * pages * shape.engine_config.page_size
        entry["fits_kv_pool"] = kv_needed <= max(0, shape.num_pages - 1) * shape.engine_config.page_size
        t_compute, t_memory = flops / chip.peak_bf16_flops, nbytes / chip.hbm_bandwidth
        step = max(t_compute, t_memory)
        entry.update(flops=flops, bytes=nbytes, step_ms=step * 1e3, bound="compute" if t_compute > t_memory else "memory",
                     tokens_per_s=batch / step if step > 0 else None)
        out.append(entry)
    return out


def run_aot(model: str, target_name: str, *, kv_memory_fraction: float = 0.85, kinds: set[str] | None = None,
            progress: Callable[[Compiled], None] | None = None, programs_filter: Callable[[Program], bool] | None = None,
            cfg=None, attend: Callable | None = None, tp_size: int | None = None, **engine_kw) -> Report:
    """Compile the engine's programs of `model` (a bundled config name or path; or pass `cfg`) for the target,
    split over `tp_size` of its chips (default: all of them)."""
    target = parse_target(target_name)
    cfg = cfg if cfg is not None else load_model_config(model)
    tp = target.num_chips if tp_size is None else tp_size
    if not 1 <= tp <= target.num_chips:
        raise ValueError(f"tp_size {tp} does not fit {target.name} ({target.num_chips} chips)")
    shape = engine_shape(cfg, target.chip, kv_memory_fraction=kv_memory_fraction, tp_size=tp, **engine_kw)
    report = Report(model, target, shape, [])
    if tp > 1:
        report.notes.append(shape.tp_plan.describe(cfg) + "; memory figures are per chip")
    if tp < target.num_chips:
        report.notes.append(f"{target.name} has {target.num_chips} chips; these programs use {tp} of them")
    if shape.num_pages < 2:
        need = shape.weight_bytes / GiB
        report.notes.append(f"the weights ({need:.2f} GiB per chip) leave no KV cache within {kv_memory_fraction:.2f} of "
                            f"the chip's {target.chip.hbm_bytes / GiB:.1f} GiB: this model needs more tensor parallelism "
                            "(or a larger --kv-memory-fraction) on this target; nothing compiled")
        return report
    from jaxserve.models.sharding import make_mesh

    mesh = make_mesh(target_devices(target)[:tp])
    programs = [p for p in engine_programs(cfg, shape, target.platform, mesh, attend=attend)
                if (kinds is None or p.kind in kinds) and (programs_filter is None or programs_filter(p))]
    report.results.extend(compile_programs(programs, mesh, progress=progress))
    report.roofline = roofline(cfg, target.chip, report.results, shape)
    return report


# -- CLI -----------------------------------------------------------------------------------------------
def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:.3f} GiB" if n >= 0.1 * GiB else f"{n / 1024**2:.1f} MiB"


def _fmt_num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def summary(report: Report) -> dict:
    s, chip = report.shape, report.target.chip
    ok = [r for r in report.results if not r.error]
    decode = [r for r in ok if r.kind == "forward-decode"]
    kv_bytes = (s.num_pages * s.bytes_per_page) if s.num_pages else 0
    return {
        "model": report.model, "target": report.target.name, "chip": chip.name, "platform": report.target.platform,
        "tp_size": s.tp_plan.size if s.tp_plan is not None else 1,
        "programs": len(report.results), "failed": len(report.failures()),
        "compile_s_total": round(sum(r.compile_s for r in report.results), 2),
        "max_program_hbm_bytes": max((r.hbm_bytes for r in ok), default=0),
        "chip_hbm_bytes": chip.hbm_bytes, "weight_bytes": s.weight_bytes, "kv_cache_bytes": kv_bytes,
        "kv_pages": s.num_pages, "kv_tokens": max(0, s.num_pages - 1) * s.engine_config.page_size,
        "max_decode_temp_bytes": max((r.temp_bytes for r in decode), default=0),
        "kv_memory_fraction": s.engine_config.kv_memory_fraction,
        "max_model_len": s.max_model_len, "max_running_requests": s.engine_config.max_running_requests,
        "roofline": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in e.items()} for e in report.roofline],
        "notes": report.notes,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxserve.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-config", default="llama-3.1-8b",
                    help=f"bundled name ({', '.join(available_model_configs())}), an HF config.json or a model directory")
    ap.add_argument("--target", default="v6e-1",
                    help="v5e-1, v5e-4, v6e-1, v6e-8, <v5e|v6e>:<AxB>, h100, h200, h100-8, h200-8")
    ap.add_argument("--tp-size", type=int, default=None, help="tensor-parallel chips (default: all of the target's)")
    ap.add_argument("--kv-memory-fraction", type=float, default=0.85,
                    help="share of the chip's total memory for weights + KV cache (SGLang's --mem-fraction-static)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--max-running-requests", type=int, default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--only", default=None, help="comma-separated program kinds: forward-decode, forward-prefill, "
                                                 "sampler, copy-pages, fork-slots")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host backend; the target's devices are compile-only

    def show(r: Compiled) -> None:
        if r.error:
            print(f"{r.name:<28} FAILED after {r.compile_s:.2f}s: {r.error}", flush=True)
            return
        print(f"{r.name:<28} {r.compile_s:7.2f} {_fmt_bytes(r.argument_bytes):>12} {_fmt_bytes(r.output_bytes):>12} "
              f"{_fmt_bytes(r.temp_bytes):>12} {_fmt_num(r.flops):>10} {_fmt_num(r.bytes_accessed):>10}", flush=True)

    target = parse_target(args.target)
    print(f"target {target.name} ({target.topology}); {target.chip.describe()}")
    print(f"{'program':<28} {'compile s':>7} {'arguments':>12} {'outputs':>12} {'temps':>12} {'flops':>10} {'bytes':>10}")
    report = run_aot(args.model_config, args.target, kv_memory_fraction=args.kv_memory_fraction, dtype=args.dtype,
                     kinds=set(args.only.split(",")) if args.only else None, progress=show,
                     max_model_len=args.max_model_len, max_running_requests=args.max_running_requests,
                     max_num_batched_tokens=args.max_num_batched_tokens, page_size=args.page_size,
                     tp_size=args.tp_size)
    s = summary(report)
    for note in report.notes:
        print(f"note: {note}")
    print(f"weights {_fmt_bytes(s['weight_bytes'])} per chip; KV pool {s['kv_pages']} pages = {s['kv_tokens']:,} tokens "
          f"({_fmt_bytes(s['kv_cache_bytes'])}) at --kv-memory-fraction {args.kv_memory_fraction} of "
          f"{_fmt_bytes(target.chip.hbm_bytes)}; largest program {_fmt_bytes(s['max_program_hbm_bytes'])}")
    for e in report.roofline:
        tps = e["tokens_per_s"]
        print(f"decode batch {e['batch']:>3} context {e['context']}: {e['step_ms']:.2f} ms/step, "
              f"{tps:,.0f} tok/s ({e['bound']}-bound; {e['source']}; compiled program: {e['compiled']}"
              f"{'' if e['fits_kv_pool'] else '; KV pool too small for this batch'})")
    print(json.dumps(s))
    return 1 if report.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
