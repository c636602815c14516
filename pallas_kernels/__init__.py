"""jaxserve's kernels: paged attention (a pure-JAX reference and Pallas kernels for CUDA GPUs and TPUs) and
the CPU int8 matmul (`pallas_kernels.int8_matmul`, a C++ XLA FFI custom call beside its pure-JAX reference).

The engine calls `paged_attention(..., impl=...)`; see `pallas_kernels.paged_attention`.
"""
from pallas_kernels.paged_attention import IMPLS, paged_attention, resolve_impl, supports
from pallas_kernels.reference import paged_attention_reference

__all__ = ["IMPLS", "paged_attention", "paged_attention_reference", "resolve_impl", "supports"]
