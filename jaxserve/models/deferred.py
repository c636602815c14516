"""Host tensors read on demand, so that weights go to their devices one tensor at a time.

The loader describes every parameter as a `Deferred` (shape, dtype, how to read it); the layout transforms
(`llama.unstack_layers`, `llama.fuse_projections`, `sharding.repeat_kv_heads`) compose them without reading
anything; `sharding.place_params` then materialises one leaf, hands each device its slice and drops it. Host
memory beyond the page cache is one (stacked) tensor at a time, never the whole model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True, eq=False)
class Deferred:
    shape: tuple[int, ...]
    dtype: np.dtype
    make: Callable[[], np.ndarray]
    # A stack of per-layer tensors: indexing picks one part without reading the others.
    parts: tuple["Deferred", ...] | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def __getitem__(self, index: int) -> "Deferred":
        if not isinstance(index, (int, np.integer)):
            raise TypeError("a Deferred tensor is indexed by one integer (a layer)")
        if self.parts is not None:
            return self.parts[index]
        return Deferred(self.shape[1:], self.dtype, lambda: self.make()[index])

    def materialize(self) -> np.ndarray:
        out = self.make()
        if tuple(out.shape) != tuple(self.shape):
            raise ValueError(f"internal error: a deferred tensor promised shape {self.shape}, read {out.shape}")
        return out


def stack(parts: list[Deferred]) -> Deferred:
    first = parts[0]
    return Deferred((len(parts), *first.shape), first.dtype,
                    lambda: np.stack([p.materialize() for p in parts]), parts=tuple(parts))


def materialize(x: Any) -> Any:
    return x.materialize() if isinstance(x, Deferred) else x


def lazily(fn: Callable[..., Any], shape: tuple[int, ...], *inputs: Any) -> Any:
    """`fn(*inputs)`, deferred when any input is: `shape` is what `fn` returns (its dtype the first input's)."""
    if not any(isinstance(x, Deferred) for x in inputs):
        return fn(*inputs)
    return Deferred(tuple(shape), inputs[0].dtype, lambda: fn(*(materialize(x) for x in inputs)))
