"""CPU process settings that decide step time more than any single kernel."""
import ctypes
import ctypes.util
import mmap

import torch
from torch import nn

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
HUGE_PAGE = 2 << 20
ALIGN = 64  # bytes between tensors packed into one huge-page buffer: a cache line, as torch's allocator gives


def glibc_function(name: str):
    """A function of the C library (glibc's malloc tuning), or None where there is no such function."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def keep_freed_memory(limit_bytes: int = 1 << 28) -> bool:
    """glibc returns large freed buffers to the OS, so every step page-faults its MB-sized activations afresh
    (measured: 3x slower batched decode attention). Keep them in the heap instead. No-op off glibc."""
    mallopt = glibc_function("mallopt")
    return mallopt is not None and all(mallopt(option, limit_bytes) == 1
                                       for option in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD))


def return_freed_memory() -> bool:
    """Hand the heap's free memory back to the OS once (glibc's malloc_trim): keep_freed_memory keeps it otherwise,
    and after the weights move to huge pages their old copies would stay resident (+256 MB for SmolLM2)."""
    malloc_trim = glibc_function("malloc_trim")
    return malloc_trim is not None and bool(malloc_trim(0))


def huge_pages_available() -> bool:
    return all(hasattr(mmap, name) for name in ("MADV_HUGEPAGE", "MAP_PRIVATE", "MAP_ANONYMOUS"))


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """nbytes of zeroed memory (uint8) that the kernel is asked to back with 2 MB transparent huge pages. A decode
    step streams every weight once: through 4 KB pages that is a TLB miss every 4 KB, which made a pass over
    SmolLM2's linear layers with 1-4 input rows 1.1-1.25x slower on this project's CPU (docs/benchmarks.md). Plain
    torch memory where huge pages do not exist."""
    if not huge_pages_available():
        return torch.zeros(nbytes, dtype=torch.uint8)
    whole_pages = -(-nbytes // HUGE_PAGE) * HUGE_PAGE  # the last huge page must fit in the mapping too
    region = mmap.mmap(-1, whole_pages + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # transparent huge pages off in this kernel: still plain, zeroed memory
        pass
    whole = torch.frombuffer(region, dtype=torch.uint8)  # holds a reference to region, which lives as long
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start:start + nbytes]


def move_to_huge_pages(*modules: nn.Module) -> int:
    """Copy every CPU parameter and buffer of these modules into one huge-page buffer, in place (tensors that shared
    memory, like tied embeddings, still share it). Returns the bytes moved."""
    slots, moved = [], {}
    for module in modules:
        for sub in module.modules():
            for table in (sub._parameters, sub._buffers):
                slots += [(table, name, t, t.data_ptr()) for name, t in table.items()
                          if t is not None and t.device.type == "cpu" and t.is_contiguous() and t.numel()]
    for _, _, t, ptr in slots:
        moved.setdefault(ptr, t)
    offsets, total = {}, 0
    for ptr, t in moved.items():
        offsets[ptr] = total
        total += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    buffer = huge_page_buffer(total)
    views = {ptr: buffer[offsets[ptr]:offsets[ptr] + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
             for ptr, t in moved.items()}
    for ptr, t in moved.items():
        views[ptr].copy_(t)
    for table, name, t, ptr in slots:
        if isinstance(t, nn.Parameter):
            t.data = views[ptr]  # the same Parameter object: what holds it (a tied head, an optimiser) follows
        else:
            table[name] = views[ptr]
    return total
