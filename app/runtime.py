"""Process-level settings for the compute processes (CLI, workers, benchmarks)."""

from __future__ import annotations

import ctypes

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc() -> bool:
    """Keep big tensor buffers on the heap instead of fresh mmap()s (no page-fault storm).

    Same effect as MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=... in the
    environment (DESIGN.md section 7: page faults on large tangent tensors halved the
    Jacobian's speed). Returns True when glibc accepted both settings.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok_mmap = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(1_000_000_000))
    ok_trim = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1))
    return bool(ok_mmap and ok_trim)
