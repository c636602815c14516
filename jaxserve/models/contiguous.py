"""A contiguous (non-paged) KV cache: every row owns `max_len` consecutive slots.

It is the simple reference the paged engine is checked against, and the cache of the offline
`jaxserve.generate` helper. Attention here is a dense masked softmax, written independently of the
paged kernels on purpose.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxserve.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class ContiguousMeta:
    start: jax.Array  # [B] int32: position of each row's first new token
    num_new: jax.Array  # [B] int32: how many of the T new tokens of the row are real


@dataclass(frozen=True)
class ContiguousCacheOps:
    scale: float

    def update_and_attend(self, q, k, v, cache, layer, meta: ContiguousMeta):
        kc, vc = cache  # [L, B, S, KV, D]
        b, t, h, d = q.shape
        kv = k.shape[2]
        s = kc.shape[2]
        offs = jnp.arange(t, dtype=jnp.int32)
        pos = meta.start[:, None] + offs[None, :]  # [B, T]
        # padding tokens are sent past the end of the cache, where the scatter drops them
        pos_w = jnp.where(offs[None, :] < meta.num_new[:, None], pos, s)
        rows = jnp.arange(b, dtype=jnp.int32)[:, None]
        kc = kc.at[layer, rows, pos_w].set(k.astype(kc.dtype), mode="drop")
        vc = vc.at[layer, rows, pos_w].set(v.astype(vc.dtype), mode="drop")
        keys = kc[layer].astype(jnp.float32)  # [B, S, KV, D]
        vals = vc[layer].astype(jnp.float32)
        g = h // kv
        qg = q.astype(jnp.float32).reshape(b, t, kv, g, d)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, keys, precision=jax.lax.Precision.HIGHEST) * self.scale
        kpos = jnp.arange(s, dtype=jnp.int32)
        valid = kpos[None, None, :] <= pos[:, :, None]  # causal, [B, T, S]
        scores = jnp.where(valid[:, None, None], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, vals, precision=jax.lax.Precision.HIGHEST)
        return out.reshape(b, t, h, d), (kc, vc)


def init_contiguous_cache(cfg: ModelConfig, batch: int, max_len: int, dtype) -> tuple[jax.Array, jax.Array]:
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
