"""Convert a GGUF file (llama.cpp's format) into a Hugging Face model directory, once, cached on disk.

The rest of jaxserve loads only Hugging Face directories (config.json + safetensors + tokenizer files), so a
GGUF is turned into one: weights dequantized to float32 under HF tensor names, the model shape as an HF
config, and a `tokenizer.json` rebuilt from the GGUF metadata (`gguf_tokenizer.py`; the transformers GGUF
path needs torch, which the server must not).

    hf_dir = convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # tens of seconds the first time, then instant
"""
from __future__ import annotations

import hashlib
import logging
import json
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxserve.config import cache_dir
from jaxserve.models.gguf_tokenizer import tokenizer_files

logger = logging.getLogger(__name__)

# Bump when the layout of a converted directory changes, so stale caches are not reused.
CONVERTER_VERSION = 1

# GGUF `general.architecture` -> (HF architectures[0], HF model_type)
_HF_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}

# llama.cpp's convert script interleaves the rows of q/k for these (its `LlamaModel.permute`), so that
# its own RoPE can rotate adjacent pairs; HF rotates the two halves of each head.
_PERMUTED_QK_ARCHITECTURES = frozenset({"llama", "mistral"})

# --------------------------------------------------------------------------------------------------------------
# Reading the file
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFFile:
    """The metadata of a GGUF file, and its reader for the tensors (memory-mapped, read lazily)."""

    path: Path
    metadata: dict[str, Any]
    reader: Any  # gguf.GGUFReader

    @property
    def architecture(self) -> str:
        return str(self.metadata["general.architecture"])

    def arch_value(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open and validate a GGUF file; `ValueError` naming the file when it is missing, corrupt or truncated."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, struct.error, IndexError... on bad bytes
        raise ValueError(f"{path} is not a valid GGUF file (corrupt or truncated): {exc}") from exc
    file_size = path.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > file_size:
            raise ValueError(
                f"{path} is truncated: tensor {tensor.name!r} ends at byte {end} but the file has {file_size} bytes"
            )
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            metadata[key] = field.contents()
        except Exception as exc:
            raise ValueError(f"{path}: cannot read metadata field {key!r}: {exc}") from exc
    if "general.architecture" not in metadata:
        raise ValueError(f"{path}: GGUF metadata has no 'general.architecture'")
    return GGUFFile(path=path, metadata=metadata, reader=reader)


# --------------------------------------------------------------------------------------------------------------
# config.json / generation_config.json
# --------------------------------------------------------------------------------------------------------------


def _tensor_shapes(gf: GGUFFile) -> dict[str, tuple[int, ...]]:
    # GGUF lists dimensions fastest-varying first; numpy/HF order is the reverse.
    return {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in gf.reader.tensors}


def _eos_token_ids(gf: GGUFFile) -> list[int]:
    """EOS plus the model's other end-of-generation tokens (end of turn / end of message)."""
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        value = gf.metadata.get(key)
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def _rope_scaling(gf: GGUFFile, head_dim: int, rope_theta: float) -> dict[str, Any] | None:
    scaling_type = gf.arch_value("rope.scaling.type")
    if scaling_type in (None, "none"):
        if "rope_freqs.weight" in _tensor_shapes(gf):
            return _llama3_rope_scaling_from_freqs(gf, head_dim, rope_theta)
        return None
    factor = gf.arch_value("rope.scaling.factor")
    scaling: dict[str, Any] = {"rope_type": str(scaling_type)}
    if factor is not None:
        scaling["factor"] = float(factor)
    original = gf.arch_value("rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _llama3_rope_scaling_from_freqs(gf: GGUFFile, head_dim: int, rope_theta: float) -> dict[str, Any] | None:
    """Recover Llama-3 `rope_scaling` from the `rope_freqs` tensor llama.cpp stores instead of the config.

    llama.cpp divides each RoPE frequency by `rope_freqs[i]`: 1 for short wavelengths, `factor` for long
    ones, and a smooth blend between. The blend is linear in 1/wavelength, so two blended entries give its
    slope and intercept; `original_max_position_embeddings` is then a free choice (every choice gives the same
    frequencies), and we take the context length llama.cpp records. The result is checked by recomputing.
    """
    tensor = next(t for t in gf.reader.tensors if t.name == "rope_freqs.weight")
    divisors = np.asarray(_dequantize(tensor), dtype=np.float64).reshape(-1)
    inv_freq = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if divisors.shape != inv_freq.shape:
        raise ValueError(f"{gf.path}: rope_freqs has {divisors.size} entries, expected {inv_freq.size}")
    factor = float(divisors.max())
    if np.allclose(divisors, 1.0):
        return None  # all ones: plain RoPE
    inv_wavelen = inv_freq / (2 * np.pi)
    blended = (divisors > 1.0 + 1e-4) & (divisors < factor - 1e-4 * factor)
    # 1/d = (1 - s)/factor + s  ->  s = (1/d - 1/factor) / (1 - 1/factor), and s = a/wavelen + b
    smooth = (1.0 / divisors - 1.0 / factor) / (1.0 - 1.0 / factor)
    original = int(gf.arch_value("context_length", 8192))
    ones, scaled = inv_wavelen[divisors <= 1.0 + 1e-4], inv_wavelen[divisors >= factor * (1 - 1e-4)]
    if blended.sum() >= 2:
        slope, intercept = np.polyfit(inv_wavelen[blended], smooth[blended], 1)
    elif ones.size == 0 or scaled.size == 0:
        raise ValueError(f"{gf.path}: cannot interpret rope_freqs as Llama-3 rope scaling")
    elif blended.sum() == 1:
        # One blended point fixes the line only up to its slope: take the least slope that keeps every
        # unscaled frequency at s >= 1 and every fully scaled one at s <= 0 (the clipping then agrees).
        x0, s0 = float(inv_wavelen[blended][0]), float(smooth[blended][0])
        slope = max((1.0 - s0) / (ones.min() - x0), s0 / (x0 - scaled.max()))
        intercept = s0 - slope * x0
    else:
        # A plain step: s = 0 at the last fully scaled frequency and 1 at the first unscaled one.
        slope = 1.0 / (ones.min() - scaled.max())
        intercept = -slope * scaled.max()
    high_minus_low = original / slope
    low = -intercept * high_minus_low
    high = low + high_minus_low
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": float(low),
        "high_freq_factor": float(high),
        "original_max_position_embeddings": original,
    }
    if not np.allclose(_llama3_divisors(inv_freq, scaling), divisors, rtol=1e-3):
        raise ValueError(f"{gf.path}: rope_freqs does not follow Llama-3 rope scaling; cannot convert it")
    return scaling


def _llama3_divisors(inv_freq: np.ndarray, scaling: dict[str, Any]) -> np.ndarray:
    """By how much HF's llama3 rope scaling divides each frequency (the quantity llama.cpp stores)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * np.pi / inv_freq
    smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
    scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return inv_freq / scaled


def _float32_value(value: Any) -> float:
    """GGUF stores float32; print its shortest decimal (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def hf_config(gf: GGUFFile) -> dict[str, Any]:
    """The HF `config.json` of the model in `gf` (Llama / Mistral / Qwen2 / Qwen3 keys)."""
    arch = gf.architecture
    if arch not in _HF_ARCHITECTURES:
        raise ValueError(
            f"{gf.path}: unsupported GGUF architecture {arch!r}; supported: {sorted(_HF_ARCHITECTURES)}"
        )
    hf_arch, model_type = _HF_ARCHITECTURES[arch]

    def required(key: str) -> Any:
        value = gf.arch_value(key)
        if value is None:
            raise ValueError(f"{gf.path}: GGUF metadata lacks '{arch}.{key}'")
        return value

    shapes = _tensor_shapes(gf)
    if "token_embd.weight" not in shapes:
        raise ValueError(f"{gf.path}: GGUF has no 'token_embd.weight' tensor")
    hidden = int(required("embedding_length"))
    num_heads = int(required("attention.head_count"))
    num_kv_heads = gf.arch_value("attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, list):  # per-layer counts in some files; llama-family models use one value
        if len(set(num_kv_heads)) != 1:
            raise ValueError(f"{gf.path}: per-layer KV head counts {num_kv_heads} are not supported")
        num_kv_heads = num_kv_heads[0]
    head_dim = int(gf.arch_value("attention.key_length", hidden // num_heads))
    rope_theta = _float32_value(gf.arch_value("rope.freq_base", 10000.0))
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": shapes["token_embd.weight"][0],
        "hidden_size": hidden,
        "intermediate_size": int(required("feed_forward_length")),
        "num_hidden_layers": int(required("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(num_kv_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _float32_value(gf.arch_value("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(gf, head_dim, rope_theta),
        "max_position_embeddings": int(gf.arch_value("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in shapes,
        "torch_dtype": "float32",
    }
    if arch == "qwen2":
        config["attention_bias"] = "blk.0.attn_q.bias" in shapes
        config["use_sliding_window"] = False
    elif arch in ("llama", "mistral"):
        config["attention_bias"] = "blk.0.attn_q.bias" in shapes
        config["mlp_bias"] = False
    if arch == "mistral":
        window = gf.arch_value("attention.sliding_window")
        config["sliding_window"] = int(window) if window else None
    bos = gf.metadata.get("tokenizer.ggml.bos_token_id")
    config["bos_token_id"] = int(bos) if bos is not None else None
    eos = _eos_token_ids(gf)
    config["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
    pad = gf.metadata.get("tokenizer.ggml.padding_token_id")
    if pad is not None:
        config["pad_token_id"] = int(pad)
    return config


def generation_config(gf: GGUFFile) -> dict[str, Any]:
    config: dict[str, Any] = {"_from_model_config": True}
    bos = gf.metadata.get("tokenizer.ggml.bos_token_id")
    if bos is not None:
        config["bos_token_id"] = int(bos)
    eos = _eos_token_ids(gf)
    if eos:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    pad = gf.metadata.get("tokenizer.ggml.padding_token_id")
    if pad is not None:
        config["pad_token_id"] = int(pad)
    return config


# --------------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------------

_GLOBAL_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSOR_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Tensors llama.cpp adds that are not HF weights (their content lives in config.json instead).
_NON_WEIGHT_TENSORS = frozenset({"rope_freqs.weight"})


def hf_tensor_name(gguf_name: str) -> str | None:
    """HF name of a GGUF tensor; None for tensors that are not weights; ValueError for unknown ones."""
    if gguf_name in _NON_WEIGHT_TENSORS:
        return None
    if gguf_name in _GLOBAL_TENSOR_NAMES:
        return _GLOBAL_TENSOR_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSOR_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_TENSOR_NAMES[parts[2]]}.{parts[3]}"
    raise ValueError(f"unknown GGUF tensor {gguf_name!r}")


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `LlamaModel.permute` for the q (num_heads) or k (num_kv_heads) projection.

    llama.cpp reorders each head's rows from [first half | second half] to interleaved pairs; this puts
    them back. Works for weights [rows, in] and biases [rows].
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"cannot un-permute {weight.shape} over {num_heads} heads")
    head_half = rows // num_heads // 2
    return weight.reshape(num_heads, head_half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _dequantize(tensor: Any) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        values = dequantize(tensor.data, GGMLQuantizationType(int(tensor.tensor_type)))
    except NotImplementedError as exc:
        raise ValueError(f"cannot dequantize tensor {tensor.name!r} of type {tensor.tensor_type!r}: {exc}") from exc
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return np.ascontiguousarray(values, dtype=np.float32).reshape(shape)


def iter_hf_tensors(gf: GGUFFile, config: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array) for every weight, dequantized one at a time to bound memory."""
    permute = gf.architecture in _PERMUTED_QK_ARCHITECTURES
    for tensor in gf.reader.tensors:
        try:
            name = hf_tensor_name(tensor.name)
        except ValueError as exc:
            raise ValueError(f"{gf.path}: {exc}") from exc
        if name is None:
            continue
        values = _dequantize(tensor)
        if permute and ".attn_q." in tensor.name:
            values = unpermute_qk(values, config["num_attention_heads"])
        elif permute and ".attn_k." in tensor.name:
            values = unpermute_qk(values, config["num_key_value_heads"])
        yield name, values


def _tensor_plan(gf: GGUFFile) -> list[tuple[str, tuple[int, ...]]]:
    plan = []
    for tensor in gf.reader.tensors:
        try:
            name = hf_tensor_name(tensor.name)
        except ValueError as exc:
            raise ValueError(f"{gf.path}: {exc}") from exc
        if name is not None:
            plan.append((name, tuple(int(d) for d in reversed(tensor.shape.tolist()))))
    return plan


def write_safetensors(path: Path, plan: list[tuple[str, tuple[int, ...]]], tensors: Iterator[tuple[str, np.ndarray]]) -> None:
    """Stream float32 tensors into a safetensors file without holding them all in memory.

    The header (names, shapes, byte ranges) is known up front from `plan`; each tensor must then arrive
    in plan order with the planned shape.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in plan:
        nbytes = 4 * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the format asks for 8-byte aligned data
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for (planned_name, shape), (name, values) in zip(plan, tensors, strict=True):
            if name != planned_name or values.shape != shape:
                raise ValueError(f"tensor {name} {values.shape} does not match the plan {planned_name} {shape}")
            f.write(np.ascontiguousarray(values, dtype="<f4").tobytes())



# --------------------------------------------------------------------------------------------------------------
# The conversion
# --------------------------------------------------------------------------------------------------------------


def converted_dir(gguf_path: str | os.PathLike[str]) -> Path:
    """Where the conversion of this exact file (path, size, modification time) is cached."""
    path = Path(gguf_path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|v{CONVERTER_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{path.stem}-{digest}"


def write_hf_directory(gf: GGUFFile, out_dir: Path) -> None:
    """Write the HF files of `gf` into the existing, empty directory `out_dir`."""
    config = hf_config(gf)
    files = tokenizer_files(gf)  # before the slow weights, so bad tokenizers fail fast
    write_safetensors(out_dir / "model.safetensors", _tensor_plan(gf), iter_hf_tensors(gf, config))
    documents = {"config.json": config, "generation_config.json": generation_config(gf), **files}
    for name, content in documents.items():
        (out_dir / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf(gguf_path: str | os.PathLike[str]) -> Path:
    """Convert a GGUF file to a Hugging Face directory (cached) and return the directory.

    The directory is written under a temporary name and renamed into place, so an interrupted conversion
    never leaves a half-written cache entry, and concurrent conversions of the same file are safe.
    """
    path = Path(gguf_path)
    if not path.is_file():
        raise ValueError(f"GGUF file not found: {path}")
    target = converted_dir(path)
    if (target / "config.json").is_file():
        return target
    t0 = time.perf_counter()
    logger.info("converting %s to a Hugging Face directory (once; cached at %s)", path.name, target)
    gf = read_gguf(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(staging, 0o755)  # mkdtemp makes it owner-only; the cache may be shared
    try:
        write_hf_directory(gf, staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # Another process finished the same conversion first; theirs is equivalent.
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("converted %s in %.1f s", path.name, time.perf_counter() - t0)
    return target
