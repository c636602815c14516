"""int8 x int8 linear layers on the CPU: a C++ custom call (int8_matmul.cc: AVX-512 VNNI or AVX2) and its
pure-JAX reference, which computes the same integers.

Weights are quantized once, per output channel (symmetric, 127 / max|w|), and packed for the kernel
(`pack`: qweight, scale, wsum); activations are quantized inside the call per row and group of GROUP inputs.
Results equal the reference's up to float32 rounding of the scale multiplies."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.native_build import KernelUnavailable, load

TARGET = "jaxserve_int8_matmul"
LANES = 16  # output channels per packed block
K_GROUP = 4  # consecutive inputs per lane (one vpdpbusd)
GROUP = 64  # inputs per activation scale; the packed input dimension is padded to a multiple


@dataclass(frozen=True)
class PackedShapes:
    in_features: int
    out_features: int

    @property
    def padded_in(self) -> int:
        return -(-self.in_features // GROUP) * GROUP

    @property
    def padded_out(self) -> int:
        return -(-self.out_features // LANES) * LANES

    @property
    def qweight(self) -> tuple[int, int]:
        return (self.padded_out // LANES, self.padded_in * LANES)

    @property
    def wsum(self) -> tuple[int, int]:
        return (self.padded_in // GROUP, self.padded_out)


def pack(w: np.ndarray) -> dict[str, np.ndarray]:
    """A float weight [in, out] (x @ w) -> {"qweight": int8 [out/16, in*16] (packed, padded), "scale": float32
    [out padded], "wsum": int32 [in/GROUP, out padded], each group's sum of the int8 weights, for the kernel's
    unsigned activations} (padded inputs and channels are zero; `int8_matmul` slices the channels off)."""
    if w.ndim != 2:
        raise ValueError(f"int8 packing takes a 2-D weight [in, out], got shape {w.shape}")
    shapes = PackedShapes(*w.shape)
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    kp, n_p = shapes.padded_in, shapes.padded_out
    q = np.pad(q, ((0, kp - q.shape[0]), (0, n_p - q.shape[1])))
    scale = np.pad(scale, (0, n_p - scale.shape[0]), constant_values=1.0)
    # [k/4, 4, n/16, 16] -> [n/16, k/4, 16, 4]: each 64-byte group is 4 inputs of 16 channels.
    packed = q.reshape(kp // K_GROUP, K_GROUP, n_p // LANES, LANES).transpose(2, 0, 3, 1).reshape(shapes.qweight)
    wsum = q.astype(np.int32).reshape(kp // GROUP, GROUP, n_p).sum(axis=1)
    return {"qweight": np.ascontiguousarray(packed), "scale": scale, "wsum": wsum}


def unpack(qweight: jax.Array) -> jax.Array:
    """Packed int8 [out/16, in*16] -> int8 [in (padded), out (padded)]."""
    blocks, width = qweight.shape
    kp = width // LANES
    q = qweight.reshape(blocks, kp // K_GROUP, LANES, K_GROUP).transpose(1, 3, 0, 2)
    return q.reshape(kp, blocks * LANES)


def _rows(x: jax.Array, padded_in: int) -> jax.Array:
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    if padded_in > x2.shape[1]:
        x2 = jnp.pad(x2, ((0, 0), (0, padded_in - x2.shape[1])))
    return x2


def int8_matmul(x: jax.Array, qweight: jax.Array, scale: jax.Array, wsum: jax.Array, out_features: int) -> jax.Array:
    """x [..., in] (any float dtype) -> float32 [..., out_features] through the C++ kernel (CPU only; the
    kernel must be registered: `load_kernel`)."""
    padded_in = qweight.shape[1] // LANES
    x2 = _rows(x, padded_in)
    y = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x2.shape[0], scale.shape[0]), jnp.float32))(
        x2, qweight, scale, wsum)
    return y[:, :out_features].reshape(*x.shape[:-1], out_features)


def int8_matmul_reference(x: jax.Array, qweight: jax.Array, scale: jax.Array, wsum: jax.Array,
                          out_features: int) -> jax.Array:
    """The kernel's arithmetic in plain JAX: symmetric int8 activations per row and GROUP inputs (round half
    to even), an exact int32 dot per group, the groups' scales summed in float32, then the channel scale."""
    del wsum  # the kernel's unsigned-activation correction; the reference multiplies signed values directly
    padded_in = qweight.shape[1] // LANES
    groups = padded_in // GROUP
    x2 = _rows(x, padded_in).reshape(-1, groups, GROUP)
    amax = jnp.maximum(jnp.max(jnp.abs(x2), axis=-1, keepdims=True), 1e-30)
    xq = jnp.round(x2 * (127.0 / amax)).astype(jnp.int32)
    w = unpack(qweight).astype(jnp.int32).reshape(groups, GROUP, -1)
    acc = jnp.einsum("mgk,gkn->mgn", xq, w, preferred_element_type=jnp.int32)
    y = jnp.sum(acc.astype(jnp.float32) * (amax / 127.0), axis=1) * scale
    return y[:, :out_features].reshape(*x.shape[:-1], out_features)


ISAS = ("portable", "avx2", "avx512_vnni")  # indexed by the library's jaxserve_int8_matmul_isa()


def load_kernel(build_dir: Path) -> str:
    """Build (once per machine) and register the kernel, and check it once against the reference. Returns
    the instruction set it was built for (one of ISAS; "portable" is a scalar loop); raises
    `KernelUnavailable` when it cannot be built or loaded, or computes other numbers than the reference."""
    lib = load("int8_matmul.cc", Path(build_dir), ((TARGET, "JaxserveInt8Matmul"),))
    isa = ISAS[lib.jaxserve_int8_matmul_isa()]
    _self_check(isa)
    return isa


@functools.lru_cache(maxsize=None)
def _self_check(isa: str) -> None:
    # Each instruction set's path is tested where CI's CPU has it; this catches one that is wrong on a CPU
    # the tests never ran on before it serves a token (rows and groups past a tile, padded channels).
    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((192, 40), np.float32), rng.standard_normal((6, 192), np.float32)
    x[1, 70] = 40.0
    p = {key: jnp.asarray(v) for key, v in pack(w).items()}
    got = np.asarray(int8_matmul(jnp.asarray(x), p["qweight"], p["scale"], p["wsum"], 40))
    ref = np.asarray(int8_matmul_reference(jnp.asarray(x), p["qweight"], p["scale"], p["wsum"], 40))
    err = float(np.abs(got - ref).max())
    if not err <= 1e-5 * float(np.abs(ref).max()):
        raise KernelUnavailable(f"the {isa} int8 kernel differs from its reference by {err:.3g} on a check problem")


__all__ = ["GROUP", "ISAS", "KernelUnavailable", "PackedShapes", "int8_matmul", "int8_matmul_reference",
           "load_kernel", "pack", "unpack"]
