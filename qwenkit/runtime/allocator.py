"""Keep freed activation memory in the process instead of handing it back to the kernel, and bounded.

With glibc's defaults a freed activation of a few megabytes is unmapped, or trimmed off the top
of the heap, and the next layer's tensor of the same size faults it back in page by page, which
slows a CPU prefill markedly (benchmarks/results/README.md, "Quantized decode against llama.cpp and
transformers"). Keeping the memory is what jemalloc or tcmalloc preloaded (the usual advice for
PyTorch on CPUs) does too. glibc's heap, with raised mmap and trim thresholds, keeps it but fragments:
the demo's 512-token prefill grew it by ~250 MiB for ~60 MiB of live tensors, which put the peak RSS
at ~1.5x the weights. So where qwenkit's kernels build, tensors of LARGE_BLOCK bytes or more come from
their LargeBlocks allocator instead (qwenkit/kernels/cpu.cpp): each freed block is kept for the next
tensor it fits, and blocks no tensor has taken for IDLE_ALLOCATIONS, or beyond MAX_FREE bytes, are
unmapped. The heap tuning stays for smaller blocks, and everywhere when the kernels are unavailable.

`qwenkit.load` calls `keep_freed_memory()` for CPU models, and the trainer `keep_all_freed_memory()`
on the CPU. QWENKIT_MALLOC_TUNING=0 turns both off; the heap tuning does nothing where the C library
is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit: smaller blocks come from the heap
TRIM_THRESHOLD = 256 << 20  # free memory at the top of the heap kept before trimming
TRAINING_TRIM_THRESHOLD = -1  # never trim
LARGE_BLOCK = 256 << 10  # tensors from this size on come from LargeBlocks
MAX_FREE = 256 << 20  # free large blocks kept at most (as the trim threshold)
# A free block no tensor took for this many large allocations is left from other shapes. A step of 32 sequences
# decoded together makes ~120 (their logits, 19 MiB, one of them): at 64 each step mapped its logits anew.
IDLE_ALLOCATIONS = 512

_done = _training_done = _large_blocks = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process, and take large tensors from LargeBlocks
    where qwenkit's kernels build; True when the thresholds are in effect."""
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
    _keep_large_blocks(MAX_FREE, IDLE_ALLOCATIONS)
    return _done


def keep_all_freed_memory() -> bool:
    """keep_freed_memory, and for training: blocks above glibc's largest mmap threshold (32 MiB) come
    from the heap too (M_MMAP_MAX 0), and the heap is never trimmed (M_TRIM_THRESHOLD -1). A training
    step frees and makes again gigabytes of activations and vocabulary-sized logits, which would
    otherwise be faulted back in every step; the memory stays with the process at its peak between
    steps (benchmarks/results/README.md, "Fine-tuning against transformers + peft"). LargeBlocks, for
    the same reason, keeps every freed block. True when in effect."""
    global _training_done
    if _training_done:
        return True
    if not keep_freed_memory():
        return False
    mallopt = _libc().mallopt
    _training_done = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRAINING_TRIM_THRESHOLD))
    _keep_large_blocks(-1, -1)  # every freed block kept, as the heap is
    return _training_done


def large_block_stats() -> tuple[int, int]:
    """(bytes LargeBlocks has mapped, bytes of them free); zeros when it is not in use."""
    return tuple(_large_block_ops().large_block_stats()) if _large_blocks else (0, 0)


def _keep_large_blocks(max_free: int, idle: int) -> None:
    global _large_blocks
    ops = _large_block_ops()
    _large_blocks = ops is not None and ops.keep_large_blocks(LARGE_BLOCK, max_free, idle)


def _large_block_ops():
    """qwenkit's CPU kernels (which hold LargeBlocks), or None where they are unavailable."""
    from .cpu_plan import kernel_ops

    return kernel_ops()


def return_freed_memory() -> None:
    """Hand memory that freed blocks hold back to the kernel (glibc's malloc_trim, and LargeBlocks' free
    blocks; elsewhere nothing). Packing or quantizing weights as they load frees a float copy per weight,
    in whichever allocator arena the thread that made it used; without this the process kept them
    (benchmarks/results/README.md, "Memory while loading")."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)
    if _large_blocks:
        _large_block_ops().release_free_blocks()


MADV_PAGEOUT = 21  # Linux 5.4+


def release_file_pages(tensor: torch.Tensor) -> None:
    """Let the kernel take back the pages wholly inside `tensor`'s bytes (madvise MADV_PAGEOUT): a tensor
    read from a memory-mapped checkpoint and then converted (another dtype, quantized, packed) would
    otherwise keep the file's pages it was read from in this process's RSS beside the copy, e.g. a bf16
    embedding beside its float32 one. Data is never lost: file pages are read again if touched, and
    anonymous ones are kept (or swapped). Nothing where the call or the flag is unknown."""
    madvise = getattr(_libc(), "madvise", None)
    if madvise is None or tensor.device.type != "cpu" or tensor.nbytes == 0:
        return
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    page = mmap.PAGESIZE
    start = -(-tensor.data_ptr() // page) * page
    end = (tensor.data_ptr() + tensor.nbytes) // page * page
    if end > start:
        madvise(start, end - start, MADV_PAGEOUT)


HUGE_PAGE = 2 << 20
CACHE_LINE = 64
COPY_CHUNK = 8 << 20  # bytes copied before the file pages they came from are let go (bounds the peak RSS)


def onto_huge_pages(params: list[torch.nn.Parameter]) -> mmap.mmap | None:
    """Move the tensors of `params` that are read in place from a memory-mapped file (a safetensors
    checkpoint's, as the loader keeps them where it can) into one anonymous mapping, 2 MiB-aligned and advised
    for transparent huge pages, each at a 64-byte boundary, letting go of the file's pages as they are copied.
    Why: a decode step streams every weight from memory. In place they sit at the file's offsets (safetensors
    aligns tensors to 8 bytes, so most 64-byte loads straddle two cache lines) on 4 KiB pages (a TLB miss
    every 4 KiB): the int4 demo checkpoint's decode step took ~7 % longer on the file's pages than on anonymous
    ones, and ~12 % longer than on huge pages (benchmarks/results/README.md, "Weights on huge pages").
    Tensors elsewhere stay: copying one in memory would hold it twice for a moment, and the largest (a head)
    would raise the peak RSS past its goal. Returns the mapping (the tensors hold it too); None where nothing
    moved or there is no such mapping (not Linux)."""
    file_pages = _file_mapped_ranges()
    params = [p for p in params if p.device.type == "cpu" and p.layout == torch.strided and p.is_contiguous()
              and p.nbytes > 0 and any(lo <= p.data_ptr() < hi for lo, hi in file_pages)]
    if not params or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    sizes = [-(-p.nbytes // CACHE_LINE) * CACHE_LINE for p in params]
    try:
        area = mmap.mmap(-1, sum(sizes) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        start = -ctypes.addressof(ctypes.c_char.from_buffer(area)) % HUGE_PAGE
        area.madvise(mmap.MADV_HUGEPAGE, start, len(area) - start)
    except OSError:  # no memory to map, or a kernel without huge pages: the tensors stay where they are
        return None
    offset = start
    for param, size in zip(params, sizes):
        old = param.data
        # A storage of its own (holding `area` while it lives), so that it saves and pickles alone.
        new = torch.frombuffer(area, dtype=torch.uint8, count=old.nbytes, offset=offset)
        source = old.reshape(-1).view(torch.uint8)
        for at in range(0, old.nbytes, COPY_CHUNK):
            new[at:at + COPY_CHUNK].copy_(source[at:at + COPY_CHUNK])
            release_file_pages(source[at:at + COPY_CHUNK])
        param.data = new.view(old.dtype).view(old.shape)
        offset += size
    return area


def _file_mapped_ranges() -> list[tuple[int, int]]:
    """The address ranges this process maps from files (/proc/self/maps), or none where that is unknown."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and fields[5].startswith("/"):
                    lo, hi = fields[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        pass
    return ranges


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, looked up once (find_library runs ldconfig in a subprocess, and loading calls
    return_freed_memory once per weight); None where it cannot be loaded."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
