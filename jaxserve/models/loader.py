"""Load a Llama-family model from a Hugging Face directory (config.json + safetensors) or a GGUF file.

GGUF files are converted once into a Hugging Face directory under the cache (see `gguf.py`), so there is
one loading path. Weights are described lazily (`Deferred`), stacked per layer (the model scans over
layers) and cast to the serving dtype as each is read, just before it is placed on its devices.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open

from jaxserve.config import ModelConfig
from jaxserve.models.deferred import Deferred, materialize, stack

log = logging.getLogger(__name__)

_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


@dataclass(frozen=True)
class ModelFiles:
    """A resolved model: the HF-format directory holding config, weights and tokenizer."""

    path: Path
    config: ModelConfig
    name: str  # a default served-model name


def resolve_model_dir(model: str | None) -> Path:
    """None -> the embedded default model; a .gguf file -> its cached conversion; else an HF directory."""
    if model is None:
        from jaxserve.models.default import default_model_path

        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ValueError(f"model path {str(path)!r} does not exist (pass a Hugging Face directory or a .gguf file)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {str(path)!r} is not a .gguf file")
        from jaxserve.models.gguf import convert_gguf

        return convert_gguf(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"model directory {str(path)!r} has no config.json")
    return path


def read_model_config(path: Path) -> ModelConfig:
    cfg_path = path / "config.json"
    try:
        hf = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {cfg_path}: {e}") from e
    gen: dict[str, Any] | None = None
    gen_path = path / "generation_config.json"
    if gen_path.is_file():
        try:
            gen = json.loads(gen_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"cannot parse {gen_path}: {e}") from e
    try:
        return ModelConfig.from_hf_config(hf, gen)
    except KeyError as e:
        raise ValueError(f"{cfg_path} lacks the field {e.args[0]!r}") from e


def resolve_model(model: str | None) -> ModelFiles:
    path = resolve_model_dir(model)
    name = Path(model).stem if model else "SmolLM2-135M-Instruct"
    return ModelFiles(path=path, config=read_model_config(path), name=name)


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e}") from e
        files = sorted({path / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index} names missing shard files: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {path}")
    return files


class HFTensors:
    """The tensors of a safetensors checkpoint by name, read on demand (the shapes from the headers)."""

    def __init__(self, path: Path) -> None:
        self._file: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        for f in _safetensors_files(path):
            try:
                with safe_open(str(f), framework="np") as st:
                    for key in st.keys():
                        self._file[key] = f
                        self._shape[key] = tuple(st.get_slice(key).get_shape())
            except Exception as e:  # safetensors raises its own error types for corrupt headers/data
                raise ValueError(f"cannot read weights file {f}: {e}") from e

    def __contains__(self, name: str) -> bool:
        return name in self._file

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def read(self, name: str) -> np.ndarray:
        f = self._file[name]
        try:
            with safe_open(str(f), framework="np") as st:
                return st.get_tensor(name)
        except Exception as e:
            raise ValueError(f"cannot read tensor {name!r} from {f}: {e}") from e


def hf_to_params(tensors: "dict[str, np.ndarray] | HFTensors", cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """Map HF tensor names to the Linen parameter tree (layers stacked on axis 0, Linear kernels transposed).
    From an `HFTensors` source the leaves are `Deferred` (nothing is read until each is placed); from a dict
    of arrays they are arrays."""
    np_dtype = _NP_DTYPES[dtype]
    lazy = isinstance(tensors, HFTensors)

    def take(name: str, transpose: bool = False) -> Any:
        if name not in tensors:
            raise ValueError(f"weights lack the tensor {name!r}")
        if not lazy:
            t = tensors[name]
            return (t.T if transpose else t).astype(np_dtype)
        shape = tensors.shape(name)

        def read() -> np.ndarray:
            t = tensors.read(name)
            return (t.T if transpose else t).astype(np_dtype)

        return Deferred(tuple(reversed(shape)) if transpose else shape, np.dtype(np_dtype), read)

    def stacked(fmt: str, transpose: bool = False) -> Any:
        parts = [take(fmt.format(i), transpose) for i in range(cfg.num_layers)]
        return stack(parts) if lazy else np.stack(parts)

    prefix = "model.layers.{}."
    attn: dict[str, Any] = {}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        attn[proj] = {"kernel": stacked(prefix + f"self_attn.{proj}.weight", transpose=True)}
        if cfg.attention_bias and proj != "o_proj":
            attn[proj]["bias"] = stacked(prefix + f"self_attn.{proj}.bias")
    if cfg.qk_norm:
        attn["q_norm"] = {"scale": stacked(prefix + "self_attn.q_norm.weight")}
        attn["k_norm"] = {"scale": stacked(prefix + "self_attn.k_norm.weight")}
    layers = {
        "input_layernorm": {"scale": stacked(prefix + "input_layernorm.weight")},
        "post_attention_layernorm": {"scale": stacked(prefix + "post_attention_layernorm.weight")},
        "self_attn": attn,
        "mlp": {p: {"kernel": stacked(prefix + f"mlp.{p}.weight", transpose=True)} for p in ("gate_proj", "up_proj", "down_proj")},
    }
    params: dict[str, Any] = {
        "embed_tokens": {"embedding": take("model.embed_tokens.weight")},
        "layers": layers,
        "norm": {"scale": take("model.norm.weight")},
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": take("lm_head.weight", transpose=True)}
    return params


def load_params_deferred(path: Path, cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """The parameter tree in `dtype` with `Deferred` leaves: the runner reads each tensor only when it places
    it on its devices (sharded), so the whole model is never in host memory at once."""
    return hf_to_params(HFTensors(path), cfg, dtype)


def load_params(path: Path, cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """Host (NumPy) parameter tree in `dtype`, read in full (tests and benchmarks)."""
    import jax

    return jax.tree.map(materialize, load_params_deferred(path, cfg, dtype))
