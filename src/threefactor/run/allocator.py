"""Keep freed memory in the process instead of handing it back to the OS at every step.

Online learning frees and reallocates the same few megabyte-sized buffers at every time step
(oneDNN's blocked copies of each conv weight, the weight gradients). With glibc's defaults a
buffer that large is either its own ``mmap`` or sits at the top of the heap, where ``free``
returns it to the OS; the next step then page-faults it back in, zero-filled. How often
depends on the process's history (glibc adapts its thresholds to past frees):
``benchmarks.speed`` counted 4,000 page faults per training step of the paper's DvsGesture
network at batch 32 (86 with this policy), and 2,600 per batch-1 step of the authors' code
(0 with it). Raising glibc's mmap and trim thresholds keeps those pages mapped and reused.

The cost is memory the process keeps after a peak: up to ``trim_threshold`` at the top of the
heap. Allocations above ``mmap_threshold`` still get their own mapping and go back on free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit (HEAP_MAX_SIZE / 2)


def _mallopt():
    """glibc's ``mallopt``, or None where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def share_one_arena() -> bool:
    """Make threads started from now on allocate from the main malloc arena; True where it took
    effect. A stream whose segments are made in a thread (a camera, an AEDAT4 file:
    ``stream.prefetch``) gives that thread the main arena, where its segment-sized buffers are
    mapped apart (``SEGMENT_MMAP_THRESHOLD``) instead of fragmenting an arena of its own."""
    mallopt = _mallopt()
    return mallopt is not None and mallopt(_M_ARENA_MAX, 1) == 1


def retain_freed_memory(
    mmap_threshold: int = _MMAP_THRESHOLD_MAX, trim_threshold: int = 256 * 1024 * 1024
) -> bool:
    """Set glibc's malloc thresholds for this process; True where it took effect.

    A no-op returning False where the C library is not glibc (macOS, Windows, musl).
    """
    mallopt = _mallopt()
    if mallopt is None:
        return False
    mmap_ok = mallopt(_M_MMAP_THRESHOLD, min(int(mmap_threshold), _MMAP_THRESHOLD_MAX)) == 1
    trim_ok = mallopt(_M_TRIM_THRESHOLD, min(int(trim_threshold), 2**31 - 1)) == 1
    return mmap_ok and trim_ok
