"""Process-wide settings of a training process: glibc's allocator keeps the memory it frees.

Every step allocates the same large tensors again (KV caches, activations, logits chunks). With
glibc's default settings a freed block above the mmap threshold (dynamic, 128 KiB to 32 MiB) is
unmapped, and free memory at the top of the heap beyond the trim threshold is handed back to the
kernel, so the next step's tensors fault their pages in again: the kernel zeroes every 4 KiB page
on first touch. At the TRL-comparison settings that was about 55,000 page faults and a tenth of
the CPU time of a step (``benchmarks/profile.md``, fourth round). :func:`retain_freed_memory`
raises both thresholds, so freed blocks go back to malloc's free lists and are reused without
faults. The peak resident memory is the same (the same tensors are alive at the peak); what
changes is that the process does not shrink after it.

It is ``mallopt(3)``, which applies to the whole process and to every malloc arena, called
through ``ctypes``; where the C library is not glibc (macOS, musl) nothing is changed.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import sys
from functools import cache

log = logging.getLogger(__name__)

# mallopt(3) parameters (glibc's malloc.h) and the values spear sets
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest: blocks up to this size come from the heap
TRIM_THRESHOLD = 2**30  # give the top of the heap back only above 1 GiB free
TOP_PAD = 64 * 2**20  # grow the heap in steps of 64 MiB (untouched pages cost no memory)
SETTINGS = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (M_TOP_PAD, TOP_PAD))  # fmt: skip


@cache
def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring). Returns whether the
    settings are in force; False, with nothing changed, where the C library is not glibc. Once
    per process (later calls return the first answer)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        log.debug("not glibc: the allocator settings are left as they are")
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.debug("mallopt not found: the allocator settings are left as they are")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = [mallopt(param, value) == 1 for param, value in SETTINGS]
    if not all(applied):
        log.warning("mallopt refused some allocator settings: %s", applied)
    return all(applied)
