"""CPU process settings that decide step time more than any single kernel."""
import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory(limit_bytes: int = 1 << 28) -> bool:
    """glibc returns large freed buffers to the OS, so every step page-faults its MB-sized activations afresh
    (measured: 3x slower batched decode attention). Keep them in the heap instead. No-op off glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(option, limit_bytes) == 1 for option in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD))
