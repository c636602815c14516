"""Our Flax model against Hugging Face transformers (PyTorch, CPU) on the same random weights."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import jax
import jax.numpy as jnp
from transformers import AutoModelForCausalLM

from jaxserve.models.contiguous import ContiguousCacheOps, ContiguousMeta, init_contiguous_cache
from jaxserve.models.forward import make_forward
from jaxserve.models.llama import fuse_projections, unstack_layers
from jaxserve.models.loader import load_params, read_model_config
from jaxserve.models.testing import FAMILIES

PROMPT_LEN = 13
DECODE_STEPS = 16


@pytest.mark.parametrize(
    "family,scan_layers,fused",
    [(f, True, False) for f in FAMILIES] + [("qwen2", False, False), ("qwen2", False, True), ("qwen3", True, True)],
)
def test_logits_match_transformers(family, scan_layers, fused, tiny_model_dir):
    """fused: q/k/v and gate/up as single matmuls (the engine's layout; qwen2 has q/k/v biases)."""
    path = tiny_model_dir(family)
    cfg = read_model_config(path)
    params = jax.tree.map(jnp.asarray, load_params(path, cfg, "float32"))
    if not scan_layers:
        params = unstack_layers(params, cfg.num_layers)
    if fused:
        params = fuse_projections(params)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    forward = jax.jit(make_forward(cfg, "float32", ContiguousCacheOps(cfg.head_dim**-0.5), scan_layers=scan_layers,
                                      fused_projections=fused))

    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, PROMPT_LEN)
    with torch.no_grad():
        out = hf(torch.tensor(ids[None]), use_cache=True)
    past = out.past_key_values
    cache = init_contiguous_cache(cfg, 1, 64, jnp.float32)
    logits, cache = forward(
        params, jnp.asarray(ids[None], jnp.int32), jnp.arange(PROMPT_LEN, dtype=jnp.int32)[None], cache,
        ContiguousMeta(jnp.array([0], jnp.int32), jnp.array([PROMPT_LEN], jnp.int32)),
    )
    np.testing.assert_allclose(np.asarray(logits[0]), out.logits[0].numpy(), atol=1e-4, rtol=0)

    hf_tokens, our_tokens = [], []
    next_hf = int(out.logits[0, -1].argmax())
    next_ours = int(np.asarray(logits[0, -1]).argmax())
    for step in range(DECODE_STEPS):
        pos = PROMPT_LEN + step
        hf_tokens.append(next_hf)
        our_tokens.append(next_ours)
        with torch.no_grad():
            out = hf(torch.tensor([[next_hf]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits, cache = forward(
            params, jnp.array([[next_hf]], jnp.int32), jnp.array([[pos]], jnp.int32), cache,
            ContiguousMeta(jnp.array([pos], jnp.int32), jnp.array([1], jnp.int32)),
        )
        np.testing.assert_allclose(np.asarray(logits[0, 0]), out.logits[0, 0].numpy(), atol=1e-4, rtol=0)
        next_hf = int(out.logits[0, -1].argmax())
        next_ours = int(np.asarray(logits[0, -1]).argmax())
    assert our_tokens == hf_tokens


def test_bfloat16_forward_runs_close_to_float32(tiny_model_dir):
    path = tiny_model_dir("llama")
    cfg = read_model_config(path)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 8)), jnp.int32)
    pos = jnp.arange(8, dtype=jnp.int32)[None]
    meta = ContiguousMeta(jnp.array([0], jnp.int32), jnp.array([8], jnp.int32))
    results = {}
    for dtype in ("float32", "bfloat16"):
        params = jax.tree.map(jnp.asarray, load_params(path, cfg, dtype))
        cache = init_contiguous_cache(cfg, 1, 16, jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
        fwd = make_forward(cfg, dtype, ContiguousCacheOps(cfg.head_dim**-0.5))
        results[dtype] = np.asarray(fwd(params, ids, pos, cache, meta)[0])
    scale = np.abs(results["float32"]).max()
    assert np.abs(results["bfloat16"] - results["float32"]).max() < 0.05 * scale
