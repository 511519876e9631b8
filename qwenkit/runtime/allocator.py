"""Keep freed activation memory in the process instead of handing it back to the kernel (glibc).

With glibc's defaults a freed activation of a few megabytes is unmapped, or trimmed off the top
of the heap, and the next layer's tensor of the same size faults it back in page by page, which
slows a CPU prefill markedly (benchmarks/results/README.md, "Quantized decode against llama.cpp and
transformers"). Keeping the memory is what jemalloc or tcmalloc preloaded (the usual advice for
PyTorch on CPUs) does too. Peak memory is unchanged; memory freed after a long prompt stays with
the process (up to the trim threshold) for the next one.

`qwenkit.load` calls `keep_freed_memory()` for CPU models, and the trainer `keep_all_freed_memory()`
on the CPU. QWENKIT_MALLOC_TUNING=0 turns both off; they do nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit: smaller blocks come from the heap
TRIM_THRESHOLD = 256 << 20  # free memory at the top of the heap kept before trimming
TRAINING_TRIM_THRESHOLD = -1  # never trim

_done = _training_done = False


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


def keep_all_freed_memory() -> bool:
    """keep_freed_memory, and for training: blocks above glibc's largest mmap threshold (32 MiB) come
    from the heap too (M_MMAP_MAX 0), and the heap is never trimmed (M_TRIM_THRESHOLD -1). A training
    step frees and makes again gigabytes of activations and vocabulary-sized logits, which would
    otherwise be faulted back in every step; the memory stays with the process at its peak between
    steps (benchmarks/results/README.md, "Fine-tuning against transformers + peft"). True when in
    effect."""
    global _training_done
    if _training_done:
        return True
    if not keep_freed_memory():
        return False
    mallopt = _libc().mallopt
    _training_done = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRAINING_TRIM_THRESHOLD))
    return _training_done


def return_freed_memory() -> None:
    """Hand memory that freed blocks hold back to the kernel (glibc's malloc_trim; elsewhere nothing).
    Packing or quantizing weights as they load frees a float copy per weight, in whichever allocator
    arena the thread that made it used; without this the process kept them (benchmarks/results/README.md,
    "Memory while loading")."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, looked up once (find_library runs ldconfig in a subprocess, and loading calls
    return_freed_memory once per weight); None where it cannot be loaded."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
