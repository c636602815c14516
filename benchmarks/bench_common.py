"""Small pieces the benchmarks share (no JAX import: the HTTP clients use them too)."""
from __future__ import annotations

import math

# Common English words: with BPE tokenizers each is about one token with its leading space, so a prompt of
# N random words is about N tokens of text-like input.
WORDS = (
    "the of and to in is was for that with as on by at from his her they this which are be or an had not "
    "but what all were when we there can more if no out so said who up one about time would into has "
    "other than then them these two may first way could been people over only after water very long "
    "little just made where through back years much before good new work well also most know think "
    "place such day world still own life year under last great man never city house while country"
).split()


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def machine() -> dict:
    """The CPU this ran on (model name and flags that matter for XLA:CPU), cores and load: every number in
    docs/benchmarks.md names its machine."""
    import os
    import platform

    model, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
    return {"cpu": model, "cpu_flags": [f for f in wanted if f in flags], "cpu_count": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2)}
