"""Keep freed host memory in the malloc heap, so XLA:CPU's per-step buffers do not page-fault every step.

On CPU every jitted call allocates its outputs and temporaries with malloc and frees them at the end. glibc
hands large blocks back to the kernel (mmap/munmap, heap trimming) as soon as they are freed, so the next step
touches fresh pages and pays a page fault per 4 KiB: on the 2-core dev VM, materialising 189 MB of gathered
KV pages took 61 ms with the defaults and 22 ms with the settings below. Raising the mmap threshold to its
maximum (32 MiB on 64-bit glibc) and never trimming keeps those pages mapped between steps; the cost is that
the process keeps its peak heap size, which a server does anyway.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt parameters from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
_TOP_PAD = 64 << 20
_NEVER_TRIM = 2**31 - 1


def keep_freed_memory_in_heap() -> bool:
    """Tune glibc malloc for many large, short-lived allocations; True if applied. Process-wide and
    idempotent; a no-op (False, logged) where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("host malloc tuning skipped: no glibc mallopt in this process")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), (_M_TRIM_THRESHOLD, _NEVER_TRIM), (_M_TOP_PAD, _TOP_PAD),
    ))
    if not ok:
        log.warning("host malloc tuning: mallopt refused a setting; XLA:CPU steps may page-fault more")
    return ok
