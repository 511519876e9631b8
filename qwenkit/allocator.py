"""Keep freed activation memory in the process instead of handing it back to the kernel (glibc).

With glibc's defaults a freed activation of a few megabytes is unmapped, or trimmed off the top
of the heap, and the next layer's tensor of the same size faults it back in page by page. On our
2-core CPU that made `silu` and `mul` three times slower inside a 512-token prefill than on warm
memory: bf16 prefill 630 tok/s, 850 with the thresholds below. Keeping the memory is what jemalloc
or tcmalloc preloaded (the usual advice for PyTorch on CPUs) does too. Peak memory is unchanged;
memory freed after a long prompt stays with the process (up to the trim threshold) for the next one.

`qwenkit.load` calls `keep_freed_memory()` for CPU models. QWENKIT_MALLOC_TUNING=0 turns it off;
it does nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit: smaller blocks come from the heap
TRIM_THRESHOLD = 256 << 20  # free memory at the top of the heap kept before trimming

_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True when they are in effect."""
    global _done
    if _done:
        return True
    if os.environ.get("QWENKIT_MALLOC_TUNING", "1") == "0":
        return False
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:  # not glibc (musl, macOS, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done


def return_freed_memory() -> None:
    """Hand memory that freed blocks hold back to the kernel (glibc's malloc_trim; elsewhere nothing).
    Packing or quantizing weights as they load frees a float copy per weight, in whichever allocator
    arena the thread that made it used; without this the process kept them (~0.5 GiB of packing
    temporaries on the demo model, ~90 MiB of int8 quantizing ones)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, looked up once (find_library runs ldconfig: ~1 ms, and loading calls
    return_freed_memory once per weight); None where it cannot be loaded."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
