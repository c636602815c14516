"""Tiny random Llama-family models for tests, written as real Hugging Face directories.

The same loader path as real checkpoints is exercised, and the tokenizer is SmolLM2's (49152 tokens), so
chat templates and detokenization are real. Weights are scaled so that logits are far from ties: greedy
tokens are then stable under float reassociation, which the batch-invariance tests rely on.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

FAMILIES = ("llama", "llama3", "mistral", "qwen2", "qwen3")

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def tiny_hf_config(family: str, vocab_size: int = 49152) -> dict[str, Any]:
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny-model family {family!r}; choose from {FAMILIES}")
    base: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "attention_bias": False,
    }
    if family == "llama":
        base.update(architectures=["LlamaForCausalLM"], model_type="llama")
    elif family == "llama3":
        base.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    elif family == "mistral":
        base.update(architectures=["MistralForCausalLM"], model_type="mistral", tie_word_embeddings=False,
                    sliding_window=None, num_key_value_heads=1)
    elif family == "qwen2":
        base.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False,
                    sliding_window=None, rope_theta=1000000.0)
        base.pop("attention_bias")
    elif family == "qwen3":
        base.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=32, use_sliding_window=False,
                    sliding_window=None, tie_word_embeddings=False)
    return base


def tiny_hf_weights(hf: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    hidden, inter = hf["hidden_size"], hf["intermediate_size"]
    heads, kv, hd = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
    family = hf["model_type"]

    def linear(out_dim: int, in_dim: int) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    def norm(dim: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(dim)).astype(np.float32)

    w: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": rng.standard_normal((hf["vocab_size"], hidden)).astype(np.float32),
        "model.norm.weight": norm(hidden),
    }
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(hidden)
        w[p + "post_attention_layernorm.weight"] = norm(hidden)
        w[p + "self_attn.q_proj.weight"] = linear(heads * hd, hidden)
        w[p + "self_attn.k_proj.weight"] = linear(kv * hd, hidden)
        w[p + "self_attn.v_proj.weight"] = linear(kv * hd, hidden)
        w[p + "self_attn.o_proj.weight"] = linear(hidden, heads * hd)
        if family == "qwen2":
            for proj, dim in (("q_proj", heads * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
                w[p + f"self_attn.{proj}.bias"] = (0.1 * rng.standard_normal(dim)).astype(np.float32)
        if family == "qwen3":
            w[p + "self_attn.q_norm.weight"] = norm(hd)
            w[p + "self_attn.k_norm.weight"] = norm(hd)
        w[p + "mlp.gate_proj.weight"] = linear(inter, hidden)
        w[p + "mlp.up_proj.weight"] = linear(inter, hidden)
        w[p + "mlp.down_proj.weight"] = linear(hidden, inter)
    if not hf["tie_word_embeddings"]:
        w["lm_head.weight"] = linear(hf["vocab_size"], hidden)
    return w


def make_tiny_model(out_dir: str | Path, family: str = "llama", seed: int = 0, tokenizer_dir: str | Path | None = None,
                    **config_overrides: Any) -> Path:
    """Write a tiny random model of `family` into `out_dir` (created) and return it.

    tokenizer_dir: where to copy tokenizer files from; None = the embedded default model's (SmolLM2).
    config_overrides: config.json fields to change (e.g. more heads for tensor-parallel tests).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        from jaxserve.models.default import default_model_path

        tokenizer_dir = default_model_path()
    tok_dir = Path(tokenizer_dir)
    for name in _TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copy(tok_dir / name, out / name)
    if not (out / "tokenizer.json").is_file():
        raise ValueError(f"{tok_dir} has no tokenizer.json to copy")
    hf = {**tiny_hf_config(family), **config_overrides}
    # keep the special ids of the real tokenizer so EOS handling is the real one
    gen_path = tok_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    for key in ("bos_token_id", "eos_token_id"):
        if key in gen:
            hf[key] = gen[key]
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": hf["bos_token_id"], "eos_token_id": hf["eos_token_id"]}, indent=2)
    )
    save_file(tiny_hf_weights(hf, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def random_params(cfg, dtype: str = "bfloat16", seed: int = 0):
    """Random weights of any size for `cfg`, created directly on the default device (no files): the
    parameter tree the engine expects, for benchmarks of real model shapes."""
    import jax
    import jax.numpy as jnp

    from jaxserve.models.forward import param_shapes

    shapes = param_shapes(cfg, dtype)
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    def fill(key, shape, dtype):
        return (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dtype)

    # Norm scales are set to one below; everything else is N(0, 0.02).
    arrays = [jax.jit(fill, static_argnums=(1, 2))(k, l.shape, l.dtype) for k, l in zip(keys, leaves)]
    params = jax.tree.unflatten(treedef, arrays)

    def ones_for_norms(path, x):
        name = jax.tree_util.keystr(path)
        return jnp.ones_like(x) if "norm" in name or "layernorm" in name else x

    return jax.tree_util.tree_map_with_path(ones_for_norms, params)


def synthetic_tokenizer(vocab_size: int, eos_token_id: int = 1):
    """A real (word-level) fast tokenizer over `vocab_size` tokens named t0, t1, ...: for random-weight
    benchmarks whose text is meaningless anyway."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from jaxserve.tokenizer import Tokenizer

    core = HFTokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=f"t{eos_token_id}", unk_token="t0")
    return Tokenizer(hf, eos_token_ids=(eos_token_id,))
