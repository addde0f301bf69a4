"""spear.runtime: glibc keeps freed memory once retain_freed_memory() ran (checked by page
faults in a fresh process, against a control process without it)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from spear import runtime

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# Allocate, touch and free 3 / 9 / 30 MiB blocks with the C allocator; print the minor page
# faults of five more rounds after one warm-up round.
PROBE = """
import ctypes, resource, sys
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
if sys.argv[1] == "1":
    from spear.runtime import retain_freed_memory
    assert retain_freed_memory()
def cycle():
    for mib in (3, 9, 30):
        p = libc.malloc(mib * 2**20); libc.memset(p, 1, mib * 2**20); libc.free(p)
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(retain: bool) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "1" if retain else "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the allocator settings are glibc's")
def test_freed_blocks_are_reused_without_page_faults():
    control = _faults(False)  # glibc's defaults hand some of these blocks back to the kernel
    assert control > 500  # of 53,760 pages touched (7,679 where this was written)
    assert _faults(True) < 64  # reused from the heap: (almost) no page is faulted in again


@pytest.mark.skipif(not GLIBC, reason="the allocator settings are glibc's")
def test_settings_are_accepted_and_the_answer_is_cached():
    assert runtime.retain_freed_memory() is True
    assert runtime.retain_freed_memory() is True
    assert runtime.retain_freed_memory.cache_info().hits >= 1


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("", ""))
    assert runtime.retain_freed_memory.__wrapped__() is False
