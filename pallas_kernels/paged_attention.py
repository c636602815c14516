"""One entry point for paged attention: picks the Pallas kernel for the platform or the reference.

`paged_attention(..., impl=...)`:
- "reference": the pure-JAX reference (the CPU backend).
- "pallas_gpu" / "pallas_tpu": that kernel; unsupported shapes raise ValueError (explicit request).
- "pallas": the kernel of the current platform (GPU -> Triton, TPU -> Mosaic); on CPU only with
  `interpret=True`, where it runs the GPU kernel in Pallas' interpret mode (tests, debugging).
  Unsupported shapes fall back to the reference with a warning.
- "auto": "pallas" on GPU/TPU, the reference on CPU.

The decision is made in Python from static shapes, so under `jit` it happens once per trace and the
warning is logged once per compiled shape, never per step.
"""
from __future__ import annotations

import logging
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels.paged_attention_gpu import paged_attention_gpu, gpu_support
from pallas_kernels.paged_attention_tpu import packing_of, paged_attention_tpu, tpu_support, unpacked_shape
from pallas_kernels.reference import paged_attention_reference

logger = logging.getLogger(__name__)

Impl = Literal["auto", "reference", "pallas", "pallas_gpu", "pallas_tpu"]
IMPLS: tuple[str, ...] = ("auto", "reference", "pallas", "pallas_gpu", "pallas_tpu")

_PLATFORM_KERNEL = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}


def _normalise_platform(platform: str) -> str:
    return "gpu" if platform in ("cuda", "gpu") else platform


def supports(
    *, head_dim: int, page_size: int, dtype: jnp.dtype, platform: str
) -> tuple[bool, str]:
    """Whether a Pallas kernel exists for `platform` ("gpu"/"cuda"/"tpu"/"cpu") and these shapes."""
    platform = _normalise_platform(platform)
    kernel = _PLATFORM_KERNEL.get(platform)
    if kernel is None:
        return False, f"no Pallas kernel for platform {platform!r} (the reference runs there)"
    if kernel == "pallas_gpu":
        return gpu_support(head_dim=head_dim, page_size=page_size, dtype=dtype)
    return tpu_support(head_dim=head_dim, page_size=page_size, dtype=dtype)


def resolve_impl(
    impl: str, *, head_dim: int, page_size: int, dtype: jnp.dtype, platform: str, interpret: bool = False
) -> str:
    """The concrete implementation ("reference" | "pallas_gpu" | "pallas_tpu") that `impl` means here."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS}")
    platform = _normalise_platform(platform)
    if impl == "reference":
        return impl
    if impl in ("pallas_gpu", "pallas_tpu"):
        kernel_platform = "gpu" if impl == "pallas_gpu" else "tpu"
        ok, reason = supports(head_dim=head_dim, page_size=page_size, dtype=dtype, platform=kernel_platform)
        if not ok:
            raise ValueError(f"{impl} cannot run this shape: {reason}")
        if platform != kernel_platform and not interpret:
            raise ValueError(f"{impl} needs a {kernel_platform} device or interpret=True (platform is {platform})")
        return impl
    if impl == "auto" and platform not in _PLATFORM_KERNEL:
        return "reference"
    kernel = _PLATFORM_KERNEL.get(platform)
    if kernel is None:
        if not interpret:
            raise ValueError(f"impl 'pallas' on {platform} needs interpret=True (no native Pallas kernel there)")
        kernel = "pallas_gpu"  # the generic interpreter runs the Triton-style kernel fastest on CPU
    ok, reason = supports(
        head_dim=head_dim, page_size=page_size, dtype=dtype, platform="gpu" if kernel == "pallas_gpu" else "tpu"
    )
    if not ok:
        logger.warning(
            "paged attention: %s does not support head_dim=%d page_size=%d dtype=%s (%s); using the reference",
            kernel, head_dim, page_size, jnp.dtype(dtype), reason,
        )
        return "reference"
    return kernel


def paged_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array | int,
    page_table: jax.Array,
    seq_lens: jax.Array,
    q_start: jax.Array,
    *,
    scale: float,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    impl: Impl = "auto",
    interpret: bool = False,
    platform: str | None = None,
) -> jax.Array:
    """Attention of `q [B, Tq, H, D]` over paged stacked caches (docs/architecture.md contract).

    `platform` defaults to `jax.default_backend()`; pass it when the step runs elsewhere.
    """
    platform = platform or jax.default_backend()
    # A packed cache ([L, KV, P, page / n, n * D] with n * D = lcm(D, 128), jaxserve.engine.kv_cache.cache_shape)
    # goes to the TPU kernel as it is; the other implementations read the plain view (a reshape: free for a
    # row-major array, a relayout copy on TPU, which only a fallback from the kernel pays).
    pack = packing_of(k_cache.shape, q.shape[-1])
    chosen = resolve_impl(
        impl, head_dim=q.shape[-1], page_size=k_cache.shape[3] * pack, dtype=k_cache.dtype,
        platform=platform, interpret=interpret,
    )
    if pack > 1 and chosen != "pallas_tpu":
        k_cache = k_cache.reshape(unpacked_shape(k_cache.shape, q.shape[-1]))
        v_cache = v_cache.reshape(unpacked_shape(v_cache.shape, q.shape[-1]))
    args = (q, k_cache, v_cache, layer, page_table, seq_lens, q_start)
    options = dict(scale=scale, soft_cap=soft_cap, sliding_window=sliding_window)
    if chosen == "reference":
        return paged_attention_reference(*args, **options)
    if chosen == "pallas_gpu":
        return paged_attention_gpu(*args, **options, interpret=interpret)
    return paged_attention_tpu(*args, **options, interpret=interpret)
