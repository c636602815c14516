"""Tensor parallelism: how the Llama family is split over a mesh's `tensor` axis (every rule in one place).

Megatron-style, as sglang-jax and vLLM's TPU backend do it: q/k/v and gate/up split by output columns,
o_proj and down_proj by input rows (XLA inserts the all-reduce after them), the embedding and LM head by
vocabulary, norms replicated. The paged KV cache is split by KV head; when a model has fewer KV heads than
shards each KV head is repeated so every shard holds whole heads (the repeated heads cost KV memory: see
`TensorParallelPlan.kv_repeat`). The attention kernels run per shard inside `shard_map`; everything else is
left to XLA's SPMD partitioner, which follows the parameter shardings.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxserve.config import ModelConfig
from jaxserve.models.deferred import Deferred, lazily, materialize

log = logging.getLogger(__name__)

TENSOR = "tensor"  # the mesh axis the model is split over

# Trailing-dimension specs by parameter (module name, leaf name); leading (stacked-layer) dims are unsplit.
_COLUMN = ("qkv_proj", "q_proj", "k_proj", "v_proj", "gate_up_proj", "gate_proj", "up_proj")
_ROW = ("o_proj", "down_proj")


@dataclass(frozen=True)
class TensorParallelPlan:
    """How one model is split over `size` devices."""

    size: int
    kv_repeat: int  # each KV head stored this many times (1 unless the model has fewer KV heads than shards)
    # Query heads per (original) KV head after padding with zero heads so that every shard gets whole heads
    # of whole GQA groups (Qwen2.5-7B: 28 heads = 4 groups of 7, padded to 8 at tp 8); = the model's when
    # the heads already split.
    group_size: int
    model_config: ModelConfig  # the served config: KV heads x kv_repeat, query heads padded
    shard_vocab: bool  # embedding and LM head split by vocabulary (else replicated: vocab not divisible)

    def describe(self, original: ModelConfig) -> str:
        parts = [f"tensor parallel over {self.size} devices"]
        if self.model_config.num_heads != original.num_heads:
            parts.append(f"{original.num_heads} query heads padded to {self.model_config.num_heads} with zero heads "
                         f"(q_proj and o_proj {self.model_config.num_heads / original.num_heads:.2f}x)")
        if self.kv_repeat > 1:
            parts.append(f"{original.num_kv_heads} KV heads repeated x{self.kv_repeat} (one per shard; the KV cache "
                         f"holds {self.kv_repeat}x the unreplicated bytes in total)")
        if not self.shard_vocab:
            parts.append(f"vocabulary {original.vocab_size} not divisible by {self.size}: embedding and LM head replicated")
        return "; ".join(parts)


def plan_tensor_parallel(cfg: ModelConfig, tp: int) -> TensorParallelPlan:
    if tp < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp}")
    kv = cfg.num_kv_heads
    if cfg.num_heads % kv:
        raise ValueError(f"the model's {cfg.num_heads} query heads do not form groups over {kv} KV heads")
    if kv >= tp and kv % tp:
        raise ValueError(f"tp_size {tp} does not divide the model's {kv} KV heads")
    if kv < tp and tp % kv:
        raise ValueError(f"the model's {kv} KV heads cannot be repeated evenly over tp_size {tp}")
    if cfg.intermediate_size % tp:
        raise ValueError(f"tp_size {tp} does not divide the model's intermediate size {cfg.intermediate_size}")
    repeat = max(1, tp // kv)
    # Query heads per KV group, padded until each of the `repeat` copies of a KV head gets whole query heads
    # and the padded total splits over tp (zero heads add nothing: their o_proj rows are zero).
    group = cfg.num_heads // kv
    padded = group
    while padded % repeat or (kv * padded) % tp:
        padded += 1
    served = cfg.replace(num_kv_heads=kv * repeat, num_heads=kv * padded)
    return TensorParallelPlan(tp, repeat, padded, served, cfg.vocab_size % tp == 0)


def adapt_params(params: dict[str, Any], cfg: ModelConfig, plan: TensorParallelPlan) -> dict[str, Any]:
    """The loaded parameters (unfused layout) in the shape `plan.model_config` describes: query heads padded
    per GQA group, KV heads repeated. Lazy on `Deferred` leaves."""
    return repeat_kv_heads(pad_query_heads(params, cfg, plan.group_size), cfg, plan.kv_repeat)


def pad_query_heads(params: dict[str, Any], cfg: ModelConfig, group_size: int) -> dict[str, Any]:
    """q_proj (kernel columns, bias) and o_proj (kernel rows) with each GQA group of query heads padded to
    `group_size` heads by zeros: a zero query head attends uniformly, and its zero o_proj rows drop the result."""
    group = cfg.num_heads // cfg.num_kv_heads
    if group_size == group:
        return params
    kv, d, pad = cfg.num_kv_heads, cfg.head_dim, group_size - group

    def widen(x: Any, axis: int) -> Any:
        """Pad the heads packed along `axis` (-1: kernel columns / bias; -2: o_proj kernel rows)."""
        def run(a: Any) -> Any:
            xp = np if isinstance(a, np.ndarray) else jax.numpy
            ax = a.ndim + axis
            split = a.reshape(*a.shape[:ax], kv, group, d, *a.shape[ax + 1:])
            widths = [(0, 0)] * split.ndim
            widths[ax + 1] = (0, pad)
            padded = xp.pad(split, widths)
            return padded.reshape(*a.shape[:ax], kv * group_size * d, *a.shape[ax + 1:])

        shape = list(x.shape)
        shape[len(shape) + axis] = kv * group_size * d
        return lazily(run, tuple(shape), x)

    def layer(tree: dict[str, Any]) -> dict[str, Any]:
        attn = dict(tree["self_attn"])
        attn["q_proj"] = {key: widen(value, -1) for key, value in attn["q_proj"].items()}
        attn["o_proj"] = {"kernel": widen(attn["o_proj"]["kernel"], -2)}
        return {**tree, "self_attn": attn}

    return {k: layer(v) if k == "layers" or k.startswith("layers_") else v for k, v in params.items()}


def repeat_kv_heads(params: dict[str, Any], cfg: ModelConfig, repeat: int) -> dict[str, Any]:
    """k_proj / v_proj (kernels and biases, unfused layout, stacked or per-layer) with every KV head repeated
    `repeat` times in place ([h0 h0 h1 h1 ...]): query head i then still reads the copy of its original KV head
    (i // (H / (KV * r)) // r == i // (H / KV)), so the outputs are unchanged."""
    if repeat == 1:
        return params
    d = cfg.head_dim

    def widen(x: Any) -> Any:
        heads = x.shape[-1] // d

        def rep(a: Any) -> Any:
            xp = np if isinstance(a, np.ndarray) else jax.numpy
            split = a.reshape(*a.shape[:-1], heads, d)
            return xp.repeat(split, repeat, axis=-2).reshape(*a.shape[:-1], heads * repeat * d)

        return lazily(rep, (*x.shape[:-1], x.shape[-1] * repeat), x)

    def layer(tree: dict[str, Any]) -> dict[str, Any]:
        attn = dict(tree["self_attn"])
        for name in ("k_proj", "v_proj"):
            attn[name] = {key: widen(value) for key, value in attn[name].items()}
        return {**tree, "self_attn": attn}

    return {k: layer(v) if k == "layers" or k.startswith("layers_") else v for k, v in params.items()}


def param_spec(path: Sequence[str], ndim: int, shard_vocab: bool) -> P:
    """The PartitionSpec of one parameter from its tree path (module names, then the leaf name)."""
    module, leaf = (path[-2] if len(path) > 1 else ""), path[-1]
    trailing: tuple[Any, ...] = ()
    if leaf in ("qweight", "scale", "wsum"):  # the CPU int8 form (`llama.quantize_int8`): one device only
        return P()
    if module in _COLUMN:
        trailing = (None, TENSOR) if leaf == "kernel" else (TENSOR,)
    elif module in _ROW and leaf == "kernel":
        trailing = (TENSOR, None)
    elif module == "embed_tokens" and shard_vocab:
        trailing = (TENSOR, None)
    elif module == "lm_head" and shard_vocab:
        trailing = (None, TENSOR)
    if not trailing:
        return P()
    return P(*([None] * (ndim - len(trailing)) + list(trailing)))


def path_names(path: tuple[Any, ...]) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def param_shardings(params: Any, mesh: Mesh, shard_vocab: bool) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, param_spec(path_names(path), len(x.shape), shard_vocab)), params)


def cache_spec() -> P:
    """The paged KV cache `[L, KV, pages, ...]` (each of K and V) split by KV head."""
    return P(None, TENSOR)


def place_params(params: Any, shardings: Any) -> Any:
    """Put every parameter on its devices, one tensor at a time: a host (NumPy or `Deferred`) tensor is read,
    each device receives only its slice, and the host copy is dropped before the next is read."""

    def place(x: Any, sharding: NamedSharding) -> jax.Array:
        if isinstance(x, jax.Array):
            return jax.device_put(x, sharding)
        host = materialize(x) if isinstance(x, Deferred) else np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    leaves, treedef = jax.tree.flatten(params)
    shard_leaves = treedef.flatten_up_to(shardings)
    placed = []
    for i in range(len(leaves)):
        placed.append(place(leaves[i], shard_leaves[i]))
        leaves[i] = None  # the host tensor can go now
    return jax.tree.unflatten(treedef, placed)


def per_device_param_bytes(params: Any, cfg: ModelConfig, plan: TensorParallelPlan) -> int:
    """Bytes of the loaded parameters of `cfg` (`params` before `adapt_params`) on each device once split by
    `plan`, from shapes alone (nothing is read)."""
    total = 0
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = path_names(path)
        nbytes = int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
        if len(names) > 1 and names[-2] in ("k_proj", "v_proj"):
            nbytes *= plan.kv_repeat
        if len(names) > 1 and names[-2] in ("q_proj", "o_proj"):
            nbytes = nbytes * plan.model_config.num_heads // cfg.num_heads
        if param_spec(names, len(x.shape), plan.shard_vocab) != P():
            nbytes //= plan.size
        total += nbytes
    return total


def device_bytes(tree: Any, device: Any) -> int:
    """Bytes of `tree`'s arrays resident on `device` (its shards only)."""
    return sum(int(s.data.nbytes) for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)


def make_mesh(devices: Sequence[Any]) -> Mesh:
    return Mesh(np.asarray(list(devices), dtype=object), (TENSOR,))


@dataclass(frozen=True)
class ShardedEmbedding:
    """The token lookup in a vocabulary-split embedding, per shard: each shard takes the rows of the ids it
    holds (zeros elsewhere) and one psum adds the shards. Left to the SPMD partitioner, XLA:GPU answered a
    one-row lookup by all-gathering the whole table (2 GiB of decode temporaries, Llama-3.3-70B at tp 8 on
    H200, and that much traffic per step); splitting the table by hidden column instead made XLA:TPU copy a
    layer's weights per step. This is exact: one shard contributes each row, the others add zeros."""

    mesh: Mesh

    def __call__(self, table: jax.Array, ids: jax.Array) -> jax.Array:
        def lookup(local: jax.Array, ids: jax.Array) -> jax.Array:
            rows = local.shape[0]
            first = jax.lax.axis_index(TENSOR) * rows
            mine = (ids >= first) & (ids < first + rows)
            found = jax.numpy.take(local, jax.numpy.where(mine, ids - first, 0), axis=0)
            return jax.lax.psum(jax.numpy.where(mine[..., None], found, 0).astype(local.dtype), TENSOR)

        return jax.shard_map(lookup, mesh=self.mesh, in_specs=(P(TENSOR, None), P()), out_specs=P(),
                             check_vma=False)(table, ids)


def sharded_lookup(mesh: Mesh, plan: TensorParallelPlan) -> ShardedEmbedding | None:
    """The embedding lookup the model should use on `mesh` (None: the plain one, unsplit or one device)."""
    return ShardedEmbedding(mesh) if plan.size > 1 and plan.shard_vocab else None


@dataclass(frozen=True)
class ShardedCacheOps:
    """A `KVCacheOps` run per tensor shard: q/k/v split by head, the cache by KV head (`cache_spec`), the
    attention metadata replicated. Pallas kernels cannot be partitioned by XLA, so each shard runs the
    single-device kernel (or reference) over its own heads; GQA groups stay whole because q and KV heads are
    split in the same proportion."""

    inner: Any
    mesh: Mesh

    def update_and_attend(self, q, k, v, cache, layer, meta):
        heads = P(None, None, TENSOR, None)
        cache_specs = jax.tree.map(lambda _: cache_spec(), cache)
        meta_specs = jax.tree.map(lambda _: P(), meta)
        run = jax.shard_map(self.inner.update_and_attend, mesh=self.mesh,
                            in_specs=(heads, heads, heads, cache_specs, P(), meta_specs),
                            out_specs=(heads, cache_specs), check_vma=False)
        return run(q, k, v, cache, layer, meta)
