"""Which JAX backend to start, decided before JAX is imported.

The test extra installs libtpu and the CUDA plugin (for the deviceless AOT compiles); on a machine without
a chip, JAX would then probe for one at start-up (slow, or hanging until a TPU times out). So when no GPU or
TPU device node exists and the user chose no backend, JAX is pinned to the CPU. A real GPU/TPU VM keeps
JAX's own choice.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

_DEVICE_NODES = ("nvidia[0-9]*", "accel[0-9]*", "vfio/[0-9]*")  # CUDA GPUs, TPU v4+/v5e/v6e (accel, vfio)


def accelerator_present(dev: Path = Path("/dev")) -> bool:
    return any(any(dev.glob(pattern)) for pattern in _DEVICE_NODES)


def default_to_cpu_without_accelerator() -> None:
    if "JAX_PLATFORMS" in os.environ or accelerator_present():
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    jax = sys.modules.get("jax")
    if jax is not None:  # imported already (e.g. by a pytest plugin): its config has read the variable
        jax.config.update("jax_platforms", "cpu")
