"""The Llama family (Llama 2/3/3.1, Mistral, Qwen2, Qwen3, SmolLM2) in Flax Linen.

Why Linen: the forward pass must be a pure function of (params, tokens, positions, KV cache) that the
runner jits once per shape bucket; Linen's `apply(params, ...)` is exactly that, and `nn.scan` stacks the
decoder layers' weights on a leading axis so the layers run as one `lax.scan` (compile time does not grow
with depth). NNX would need split/merge around every jitted call for the same result.

The KV cache is carried through the scan and updated in place; how it is written and attended over is
delegated to a `KVCacheOps` (contiguous for the reference path, paged for the engine), so the model code
is the same for both.
"""
from __future__ import annotations

import math
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.int8_matmul import PackedShapes, int8_matmul, pack
from jaxserve.config import ModelConfig
from jaxserve.models.deferred import lazily, materialize


class KVCacheOps(Protocol):
    """Writes a layer's new K/V into the cache and attends over it. Implementations are static (hashable)
    objects; the cache arrays and metadata are traced pytrees passed alongside."""

    def update_and_attend(
        self, q: jax.Array, k: jax.Array, v: jax.Array, cache: Any, layer: jax.Array, meta: Any
    ) -> tuple[jax.Array, Any]:
        """q: [B, T, H, D], k/v: [B, T, KV, D] -> (out [B, T, H, D], updated cache)."""
        ...


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies, with Llama-3 / linear scaling applied as in transformers' rope init."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    rs = cfg.rope_scaling
    if rs is None:
        return inv.astype(np.float32)
    if rs.rope_type == "linear":
        return (inv / rs.factor).astype(np.float32)
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """positions [B, T] -> cos, sin [B, T, head_dim] (float32, halves duplicated as in HF)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, D]; the rotate-half convention of HF checkpoints (GGUF weights are un-permuted to it)."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype: Any) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * scale.astype(jnp.float32)).astype(dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        return rms_norm(x, scale, self.eps, self.dtype)


def head_logits(cfg: ModelConfig, dtype: Any, params: dict[str, Any], x: jax.Array, int8: bool = False) -> jax.Array:
    """The model's final norm and LM head as a pure function of its parameters: float32 logits of hidden
    states `x` [..., hidden] (for positions the forward did not compute logits for, e.g. prompt logprobs);
    int8: the packed LM head, as the `int8` model computes its logits."""
    x = rms_norm(x, params["norm"]["scale"], cfg.rms_norm_eps, dtype)
    if int8:
        head = params["lm_head"]
        return int8_matmul(x, head["qweight"], head["scale"], head["wsum"], cfg.vocab_size)
    weight = params["embed_tokens"]["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]["kernel"]
    return jnp.dot(x, weight.astype(dtype), precision=jax.lax.Precision.HIGHEST).astype(jnp.float32)


class Linear(nn.Module):
    """x @ kernel (+ bias), `nn.Dense`'s parameter names. With `int8` the weight is the packed int8 form
    (`pallas_kernels.int8_matmul.pack`: qweight, scale, wsum) and the matmul is the CPU int8 custom call; the
    runner picks per compiled program which of the two a step uses (both may be in the parameter tree)."""

    features: int
    use_bias: bool
    dtype: Any
    int8: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.int8:
            shapes = PackedShapes(x.shape[-1], self.features)
            qweight = self.param("qweight", nn.initializers.zeros, shapes.qweight, jnp.int8)
            scale = self.param("scale", nn.initializers.ones, (shapes.padded_out,), jnp.float32)
            wsum = self.param("wsum", nn.initializers.zeros, shapes.wsum, jnp.int32)
            y = int8_matmul(x, qweight, scale, wsum, self.features).astype(self.dtype)
        else:
            kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features), self.dtype)
            y = jnp.dot(x.astype(self.dtype), kernel, precision=jax.lax.Precision.HIGHEST)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
        return y


def _dense(features: int, bias: bool, dtype: Any, name: str, int8: bool = False) -> Linear:
    return Linear(features, bias, dtype, int8, name=name)


class Attention(nn.Module):
    cfg: ModelConfig
    dtype: Any
    cache_ops: Any
    fused_projections: bool = False
    shard_groups: int = 1  # the fused layout's interleaving (`fuse_projections(groups=...)`)
    int8: bool = False  # the projections as CPU int8 matmuls (`Linear.int8`)

    @nn.compact
    def __call__(self, x, cos, sin, cache, layer, meta):
        cfg = self.cfg
        b, t, _ = x.shape
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        if self.fused_projections:  # one matmul instead of three (see `fuse_projections`)
            g = self.shard_groups
            qkv = _dense(q_dim + 2 * kv_dim, cfg.attention_bias, self.dtype, "qkv_proj", self.int8)(x)
            qkv = qkv.reshape(b, t, g, -1)
            q, k, v = jnp.split(qkv, [q_dim // g, (q_dim + kv_dim) // g], axis=-1)
        else:
            q = _dense(q_dim, cfg.attention_bias, self.dtype, "q_proj", self.int8)(x)
            k = _dense(kv_dim, cfg.attention_bias, self.dtype, "k_proj", self.int8)(x)
            v = _dense(kv_dim, cfg.attention_bias, self.dtype, "v_proj", self.int8)(x)
        q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, self.dtype, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, self.dtype, name="k_norm")(k)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        out, cache = self.cache_ops.update_and_attend(q, k, v, cache, layer, meta)
        out = out.reshape(b, t, cfg.num_heads * cfg.head_dim).astype(self.dtype)
        return _dense(cfg.hidden_size, False, self.dtype, "o_proj", self.int8)(out), cache


class MLP(nn.Module):
    cfg: ModelConfig
    dtype: Any
    fused_projections: bool = False
    shard_groups: int = 1
    int8: bool = False

    @nn.compact
    def __call__(self, x):
        if self.fused_projections:
            g, inter = self.shard_groups, self.cfg.intermediate_size
            gate_up = _dense(2 * inter, False, self.dtype, "gate_up_proj", self.int8)(x)
            gate, up = jnp.split(gate_up.reshape(*x.shape[:-1], g, -1), 2, axis=-1)
            gate, up = gate.reshape(*x.shape[:-1], inter), up.reshape(*x.shape[:-1], inter)
        else:
            gate = _dense(self.cfg.intermediate_size, False, self.dtype, "gate_proj", self.int8)(x)
            up = _dense(self.cfg.intermediate_size, False, self.dtype, "up_proj", self.int8)(x)
        return _dense(self.cfg.hidden_size, False, self.dtype, "down_proj", self.int8)(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """One layer, written as a scan body: carry = (hidden, cache, layer index)."""

    cfg: ModelConfig
    dtype: Any
    cache_ops: Any
    fused_projections: bool = False
    shard_groups: int = 1
    int8: bool = False

    @nn.compact
    def __call__(self, carry, cos, sin, meta):
        x, cache, layer = carry
        h = RMSNorm(self.cfg.rms_norm_eps, self.dtype, name="input_layernorm")(x)
        attn_out, cache = Attention(self.cfg, self.dtype, self.cache_ops, self.fused_projections, self.shard_groups,
                                   self.int8, name="self_attn")(
            h, cos, sin, cache, layer, meta
        )
        x = x + attn_out
        h = RMSNorm(self.cfg.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
        x = x + MLP(self.cfg, self.dtype, self.fused_projections, self.shard_groups, self.int8, name="mlp")(h)
        return (x, cache, layer + 1), None


class LlamaModel(nn.Module):
    cfg: ModelConfig
    dtype: Any
    cache_ops: Any
    # True: one lax.scan over stacked layer weights (compile time independent of depth; the default on
    # GPU/TPU). False: a Python loop over per-layer weights, `layers_0` ... : XLA:CPU copies each layer's
    # slice out of stacked weights before its matmuls, which makes a batch-1 decode step ~3x slower there.
    scan_layers: bool = True
    # True: q/k/v and gate/up each run as one matmul over concatenated weights (`fuse_projections` converts
    # the loaded tree); fewer, wider matmuls are faster on every backend.
    fused_projections: bool = False
    # Tensor-parallel shards the fused projections are interleaved for (`fuse_projections(groups=...)`).
    shard_groups: int = 1
    # (embedding table, ids) -> embeddings in place of the plain lookup (tensor parallelism:
    # `sharding.ShardedEmbedding`); None: `nn.Embed`'s own.
    embed_lookup: Any = None
    # True: every projection and the LM head as CPU int8 matmuls (`Linear.int8`; the tree holds their packed
    # weights, `quantize_int8`); with tied embeddings the packed LM head is its own `lm_head` entry.
    int8: bool = False

    @nn.compact
    def __call__(self, tokens, positions, cache, meta, logits_index=None, hidden_row=None):
        """tokens, positions: [B, T] int32. logits_index: [B] int32 picks one position per row for the
        logits (what serving needs); None returns logits for every position (tests, echo).
        Returns (logits float32 [B, V] or [B, T, V], updated cache); with `hidden_row` (int32 scalar) also
        the last layer's hidden states of that row [T, hidden] (before the final norm; see `head_logits`)."""
        cfg = self.cfg
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=self.dtype,
            embedding_init=nn.initializers.normal(0.02),
            name="embed_tokens",
        )
        x = embed(tokens) if self.embed_lookup is None else self.embed_lookup(embed.embedding, tokens).astype(self.dtype)
        cos, sin = rope_cos_sin(cfg, positions)
        if self.scan_layers:
            layers = nn.scan(
                DecoderLayer,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
            )(cfg, self.dtype, self.cache_ops, self.fused_projections, self.shard_groups, self.int8, name="layers")
            (x, cache, _), _ = layers((x, cache, jnp.int32(0)), cos, sin, meta)
        else:
            for i in range(cfg.num_layers):
                layer = DecoderLayer(cfg, self.dtype, self.cache_ops, self.fused_projections, self.shard_groups,
                                     self.int8, name=f"layers_{i}")
                (x, cache, _), _ = layer((x, cache, jnp.int32(i)), cos, sin, meta)
        row_hidden = None
        if hidden_row is not None:
            row_hidden = jax.lax.dynamic_index_in_dim(x, jnp.clip(hidden_row, 0, x.shape[0] - 1), 0, keepdims=False)
        if logits_index is not None:
            x = jnp.take_along_axis(x, logits_index[:, None, None].astype(jnp.int32), axis=1)[:, 0]
        x = RMSNorm(cfg.rms_norm_eps, self.dtype, name="norm")(x)
        if cfg.tie_word_embeddings and not self.int8:
            logits = jnp.dot(x, embed.embedding.T, precision=jax.lax.Precision.HIGHEST)
        else:
            logits = _dense(cfg.vocab_size, False, self.dtype, "lm_head", self.int8)(x)
        if row_hidden is not None:
            return logits.astype(jnp.float32), cache, row_hidden
        return logits.astype(jnp.float32), cache


def unstack_layers(params: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Stacked `layers` (the scan layout) -> per-layer `layers_0` ... (the loop layout)."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda a: a[i], params["layers"])
    return out


def fuse_projections(params: dict[str, Any], groups: int = 1) -> dict[str, Any]:
    """The loaded layout -> the `fused_projections` layout: q/k/v kernels (and biases) concatenated along the
    output axis into `qkv_proj`, gate/up into `gate_up_proj`. Works on stacked (`layers`) and per-layer
    (`layers_i`) trees of NumPy, device or `Deferred` arrays.

    `groups` > 1 (tensor parallelism over that many shards) interleaves the parts per group: the columns are
    [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], so an even column split hands each shard its own heads of all three
    (and gate_g | up_g of the MLP) and the fused matmul needs no communication. groups = 1 is the plain
    concatenation; the model splits with the same `groups` (`LlamaModel.shard_groups`)."""

    def cat(parts: list[Any]) -> Any:
        widths = [p.shape[-1] for p in parts]
        if any(w % groups for w in widths):
            raise ValueError(f"projection widths {widths} do not split into {groups} tensor-parallel groups")

        def join(*arrays: Any) -> Any:
            xp = np if all(isinstance(a, np.ndarray) for a in arrays) else jnp
            split = [a.reshape(*a.shape[:-1], groups, a.shape[-1] // groups) for a in arrays]
            joined = xp.concatenate(split, axis=-1)
            return joined.reshape(*joined.shape[:-2], -1)

        return lazily(join, (*parts[0].shape[:-1], sum(widths)), *parts)

    def fuse_layer(layer: dict[str, Any]) -> dict[str, Any]:
        attn = dict(layer["self_attn"])
        parts = [attn.pop(name) for name in ("q_proj", "k_proj", "v_proj")]
        attn["qkv_proj"] = {key: cat([p[key] for p in parts]) for key in parts[0]}
        mlp = dict(layer["mlp"])
        gate, up = mlp.pop("gate_proj"), mlp.pop("up_proj")
        mlp["gate_up_proj"] = {"kernel": cat([gate["kernel"], up["kernel"]])}
        return {**layer, "self_attn": attn, "mlp": mlp}

    return {k: fuse_layer(v) if k == "layers" or k.startswith("layers_") else v for k, v in params.items()}


def quantize_int8(params: dict[str, Any], cfg: ModelConfig, keep_float: bool) -> dict[str, Any]:
    """Add the packed int8 form (`pallas_kernels.int8_matmul.pack`) beside every projection kernel and the LM
    head (from the embedding when tied) for the `int8` model; keep_float=False drops the float kernels (no
    program will use them; the embedding stays, for the lookup). Reads the weights (host, device or
    `Deferred`) one tensor at a time; stacked layers are packed per layer."""

    def packed(w: Any) -> dict[str, np.ndarray]:
        w = np.asarray(materialize(w), np.float32)
        if w.ndim == 2:
            return pack(w)
        parts = [pack(layer) for layer in w]
        return {key: np.stack([p[key] for p in parts]) for key in parts[0]}

    def walk(tree: dict[str, Any], name: str) -> dict[str, Any]:
        out = {}
        for key, value in tree.items():
            if key == "kernel" and name in _PROJECTIONS:
                out.update(packed(value))
                if keep_float:
                    out[key] = value
            elif isinstance(value, dict):
                out[key] = walk(value, key)
            else:
                out[key] = value
        return out

    out = walk(params, "")
    if cfg.tie_word_embeddings:
        out["lm_head"] = pack(np.asarray(materialize(params["embed_tokens"]["embedding"]), np.float32).T)
    return out


_PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj",
                          "gate_up_proj", "down_proj", "lm_head"})


def dtype_of(name: str) -> Any:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
