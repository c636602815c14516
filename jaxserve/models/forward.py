"""Build the pure forward function of a loaded model for a given KV-cache implementation."""
from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax

from jaxserve.config import ModelConfig
from jaxserve.models.llama import LlamaModel, dtype_of, head_logits


def make_forward(cfg: ModelConfig, dtype: str, cache_ops: Any, *, scan_layers: bool = True,
                 fused_projections: bool = False, shard_groups: int = 1,
                 embed_lookup: Any = None, int8: bool = False) -> Callable[..., tuple[jax.Array, Any]]:
    """forward(params, tokens [B,T], positions [B,T], cache, meta, logits_index [B] | None) -> (logits, cache);
    with `hidden_row` also that row's last hidden states, for `forward.head_logits(params, hidden)`.
    With scan_layers=False the params must be in the per-layer layout (`llama.unstack_layers`); with
    fused_projections=True in the fused one (`llama.fuse_projections`, with the same `shard_groups`); with
    int8=True the projections run as CPU int8 matmuls over the packed weights (`llama.quantize_int8`)."""
    model = LlamaModel(cfg, dtype_of(dtype), cache_ops, scan_layers=scan_layers, fused_projections=fused_projections,
                       shard_groups=shard_groups, embed_lookup=embed_lookup, int8=int8)

    def forward(params, tokens, positions, cache, meta, logits_index=None, hidden_row=None):
        return model.apply({"params": params}, tokens, positions, cache, meta, logits_index, hidden_row)

    # The final norm + LM head alone, for hidden states returned with `hidden_row` (prompt logprobs).
    forward.head_logits = partial(head_logits, cfg, dtype_of(dtype), int8=int8)
    return forward


def param_shapes(cfg: ModelConfig, dtype: str, *, fused_projections: bool = False) -> Any:
    """ShapeDtypeStructs of the parameter tree (stacked layers; q/k/v and gate/up fused or not), from the
    model's own init traced abstractly: nothing is allocated."""
    import jax.numpy as jnp

    from jaxserve.models.contiguous import ContiguousCacheOps, ContiguousMeta

    model = LlamaModel(cfg, dtype_of(dtype), ContiguousCacheOps(cfg.head_dim**-0.5), scan_layers=True,
                       fused_projections=fused_projections)
    ids = jnp.zeros((1, 1), jnp.int32)
    cache_shape = (cfg.num_layers, 1, 1, cfg.num_kv_heads, cfg.head_dim)
    cache = (jnp.zeros(cache_shape, dtype_of(dtype)), jnp.zeros(cache_shape, dtype_of(dtype)))
    meta = ContiguousMeta(jnp.zeros(1, jnp.int32), jnp.ones(1, jnp.int32))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids, cache, meta))["params"]
