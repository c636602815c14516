"""Frozen configuration dataclasses: the model's shape, the engine's limits, the server's knobs."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = {
    # HF `architectures[0]` / `model_type` -> our family name
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


def cache_dir() -> Path:
    """Root of everything jaxserve caches on disk (converted models, compiled XLA programs)."""
    return Path(os.environ.get("JAXSERVE_CACHE", Path.home() / ".cache" / "jaxserve")).expanduser()


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (`rope_type: llama3`) or linear scaling; None means plain RoPE."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    family: str  # llama | mistral | qwen2 | qwen3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qkv bias (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], generation_config: dict[str, Any] | None = None) -> "ModelConfig":
        archs = hf.get("architectures") or []
        family = None
        for arch in archs:
            family = SUPPORTED_ARCHITECTURES.get(arch)
            if family:
                break
        if family is None:
            mt = hf.get("model_type")
            family = mt if mt in SUPPORTED_ARCHITECTURES.values() else None
        if family is None:
            raise ValueError(
                f"unsupported architecture {archs or hf.get('model_type')!r}; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim") or hidden // num_heads
        rs = hf.get("rope_scaling") or None
        rope_theta = hf.get("rope_theta")
        rope_params = hf.get("rope_parameters")  # transformers >= 5 moves theta/scaling here
        if isinstance(rope_params, dict):
            rope_theta = rope_theta or rope_params.get("rope_theta")
            if rs is None and rope_params.get("rope_type", "default") != "default":
                rs = rope_params
        scaling = None
        if rs:
            rtype = rs.get("rope_type", rs.get("type", "default"))
            if rtype not in ("default", "llama3", "linear"):
                raise ValueError(f"unsupported rope_scaling type {rtype!r} (supported: llama3, linear)")
            if rtype != "default":
                scaling = RopeScaling(
                    rope_type=rtype,
                    factor=float(rs.get("factor", 1.0)),
                    low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
                    high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
                    original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
                )
        eos: list[int] = []
        for src in (hf, generation_config or {}):
            e = src.get("eos_token_id")
            for x in (e if isinstance(e, list) else [e]):
                if x is not None and int(x) not in eos:
                    eos.append(int(x))
        sliding = hf.get("sliding_window") if hf.get("use_sliding_window", family == "mistral") else None
        return cls(
            family=family,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", family == "qwen2")),
            qk_norm=family == "qwen3",
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(eos),
        )

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


# What an unconfigured start uses. On CPU (2 cores, a laptop) a modest context and batch keep start-up
# compilation short; accelerators get the sizes serving needs.
PLATFORM_DEFAULTS = {
    # 64 running on CPU: with 16, a 32-stream load queued half its streams (TTFT p50 21.8 s against llama-server's
    # 2.3 s with 32 slots, docs/benchmarks.md); the KV pool (CPU_KV_BYTES_CAP) holds ~1,400 tokens each.
    "cpu": {"max_model_len": 2048, "max_running_requests": 64, "max_num_batched_tokens": 256},
    "accelerator": {"max_model_len": 8192, "max_running_requests": 128, "max_num_batched_tokens": 2048},
}


@dataclass(frozen=True)
class EngineConfig:
    """Limits and shapes of the engine. Shape buckets are what the runner precompiles at start-up."""

    model: str | None = None  # HF directory or .gguf file; None = the embedded default model
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on GPU/TPU) | float32 | bfloat16
    # None = a default for the platform (see `platform_defaults`): a CPU start compiles far fewer shapes.
    max_model_len: int | None = None  # capped by the model's max positions
    page_size: int = 16
    num_pages: int | None = None  # None: derived from kv_memory_fraction (accelerators) or max_model_len
    kv_memory_fraction: float = 0.5
    max_running_requests: int | None = None
    max_num_batched_tokens: int | None = None  # chunked-prefill budget per step
    max_queued_requests: int = 1024
    attention_backend: str = "auto"  # auto (cpu on CPU, pallas on GPU/TPU) | cpu | xla | reference | pallas
    # auto: on the CPU, int8 x int8 matmuls (pallas_kernels/int8_matmul) for the steps where this machine runs them
    # faster than float32, measured once and cached (engine/matmul_plan.py) | none | int8 (every CPU step)
    quantization: str = "auto"
    tp_size: int = 1  # devices one engine's model is split over (tensor parallelism)
    # Engine replicas on disjoint groups of tp_size devices behind one server (engine/data_parallel.py).
    dp_size: int = 1
    compilation_cache_dir: str | None = "auto"  # "auto" = cache_dir()/xla; None disables
    # Serialized step executables (engine/programs.py): a warm start loads them without tracing anything.
    executable_cache_dir: str | None = "auto"  # "auto" = cache_dir()/executables; None disables
    # The server starts once the programs any step needs are ready and compiles the cheaper buckets in
    # the background (serving never compiles: steps use the ready buckets meanwhile).
    compile_in_background: bool = True
    compile_workers: int | None = None  # programs compiled at once before serving (None: the cores, at most 4)
    seed: int = 0
    layer_loop: str = "auto"  # auto (a Python loop on CPU, lax.scan elsewhere) | scan | loop
    grammar_capacity_states: int = 16384  # rows of the device grammar mask pool (vocab/8 bytes each)
    # CPU only: keep freed memory in the malloc heap (engine/host_memory.py); XLA:CPU steps page-fault less.
    host_malloc_tuning: bool = True
    # Device transition tables that let constrained rows advance their grammar state on the device (so their
    # steps overlap host work): class-map slots (one per resident grammar, vocab_width int32 each: 12.6 MB
    # at 64 x 49152) and next-state entries shared by all grammars (S states x C token classes each; the
    # JSONSchemaBench schemas need p50 15.5k, max 295k, so 4M entries = 16 MiB hold hundreds). A grammar
    # that does not fit advances on the host instead (logged, counted in the engine stats).
    grammar_class_map_slots: int = 64
    grammar_next_capacity: int = 4 * 1024 * 1024
    # The watchdog declares the engine dead (health 503, every waiting client answered) when one step has
    # not returned for this long. Warm-up compiles every shape first, so a serving step takes seconds.
    stuck_step_timeout_s: float = 300.0
    # Constraint compiles run on a pool of their own (never the event loop's executor that tokenizes);
    # past max_pending_constraints distinct compiles queued or running, new ones are answered 503.
    # Reuse the KV pages of cached prompt prefixes (radix tree over whole pages, engine/prefix_cache.py).
    enable_prefix_cache: bool = True
    constraint_workers: int = 2
    max_pending_constraints: int = 64
    # Constraints the device tables cannot hold (keywords a DFA cannot express, automata past the compile
    # budget) get a per-request host matcher (llguidance; constrained/host_matcher.py) instead of a 400.
    constraint_host_matcher: bool = True
    # With the host matcher on: how long a request waits for its constraint's device compile before the host
    # matcher takes it (the device compile goes on for the constraint's later requests). None (default): until
    # the device path answers, so the path a constraint takes never depends on the machine's load.
    constraint_device_wait_s: float | None = None

    def __post_init__(self) -> None:
        if self.quantization not in ("auto", "none", "int8"):
            raise ValueError(f"quantization must be one of auto, none, int8, got {self.quantization!r}")
        if self.page_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"page_size must be one of 8, 16, 32, 64, 128, got {self.page_size}")
        if self.max_running_requests is not None and self.max_running_requests < 1:
            raise ValueError("max_running_requests must be >= 1")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 16:
            raise ValueError("max_num_batched_tokens must be >= 16")
        if self.max_model_len is not None and self.max_model_len < 16:
            raise ValueError("max_model_len must be >= 16")
        if self.grammar_class_map_slots < 0 or self.grammar_next_capacity < 0:
            raise ValueError("grammar_class_map_slots and grammar_next_capacity must be >= 0")
        if self.attention_backend not in ("auto", "cpu", "xla", "reference", "pallas"):
            raise ValueError("attention_backend must be auto, cpu, xla, reference or pallas, got "
                             f"{self.attention_backend!r}")
        if self.layer_loop not in ("auto", "scan", "loop"):
            raise ValueError(f"layer_loop must be auto, scan or loop, got {self.layer_loop!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if not 0.0 < self.kv_memory_fraction <= 0.95:
            raise ValueError("kv_memory_fraction must be in (0, 0.95]")
        if self.max_queued_requests < 1:
            raise ValueError("max_queued_requests must be >= 1")
        if self.constraint_device_wait_s is not None and self.constraint_device_wait_s < 0:
            raise ValueError("constraint_device_wait_s must be >= 0 (or None: wait for the device compile)")
        if self.constraint_workers < 1 or self.max_pending_constraints < 1:
            raise ValueError("constraint_workers and max_pending_constraints must be >= 1")
        if self.compile_workers is not None and self.compile_workers < 1:
            raise ValueError("compile_workers must be >= 1")
        if self.tp_size < 1 or self.dp_size < 1:
            raise ValueError("tp_size and dp_size must be >= 1")
        if not self.stuck_step_timeout_s > 0:
            raise ValueError("stuck_step_timeout_s must be > 0")

    def with_platform_defaults(self, platform: str) -> "EngineConfig":
        """Fill the fields left as None with the defaults of `platform` ("cpu", "gpu", "tpu")."""
        d = PLATFORM_DEFAULTS["cpu" if platform == "cpu" else "accelerator"]
        return dataclasses.replace(self, **{k: v for k, v in d.items() if getattr(self, k) is None})


@dataclass(frozen=True)
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 30000
    served_model_name: str | None = None  # None: derived from the model path
    api_key: str | None = None
    log_level: str = "info"
    max_request_body_bytes: int = 16 * 1024 * 1024
    # On SIGINT/SIGTERM: stop accepting, let in-flight requests finish this long, then answer the rest
    # with 503 (a final error event for streams) and exit 0.
    graceful_shutdown_timeout_s: float = 30.0
    # Per-request deadline from arrival to the last token (None: none). Past it the request is aborted and
    # answered with 504 (an error event when streaming).
    request_timeout_s: float | None = None
    # Multi-host serving (engine/multihost.py): this many processes (hosts) run one engine whose devices span
    # them all; host 0 (node_rank 0) serves HTTP and schedules, the others follow its device operations.
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None  # host 0's HOST:PORT for jax.distributed's coordinator
