"""qwenkit's own CPU kernels (cpu.cpp), built for this machine's instruction set on first use.

torch's weight-only int4/int8 CPU kernels have a vector path only for bf16 activations on AVX2 and
are limited by their own arithmetic elsewhere; cpu.cpp quantizes the activations to int8 per block
of 32 and runs integer dot products (AVX2 maddubs, AVX-512 VNNI dpbusd), as llama.cpp does
(benchmarks/results/README.md, "Every CPU class on qwenkit's own kernels"). It also holds a product over
bf16 weights for float32 or bf16 activations (qwenkit/runtime/packed.py's Bf16Linear), and the RMS norm and
decode attention as one call each, for the eager decode step (qwenkit/runtime/small_ops.py).

`ops(isa)` returns `torch.ops.qwenkit_cpu` once the library is built for `isa` and loaded, or None:
no compiler, or `QWENKIT_KERNELS=0`. Then the quantized layers use torch's own kernels (always
correct, slower), after one warning saying why and what would fix it. Which instruction set is the
CPU plan's choice (runtime/cpu_plan.py `kernel_ops`); this package knows only how to build and load.
The library is compiled with g++ against the installed torch, once per source, torch version and
instruction set, into `~/.cache/qwenkit/kernels` (`QWENKIT_CACHE` moves it).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu.cpp")
FLAGS = {
    "scalar": [],
    "avx2": ["-mavx2", "-mfma"],
    "avx512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
    "avx512_vnni": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"],
}


def _cache_dir() -> Path:
    root = Path(os.environ.get("QWENKIT_CACHE", Path.home() / ".cache" / "qwenkit"))
    return root / "kernels"


def _library_path(isa: str) -> Path:
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + " ".join(FLAGS[isa]).encode())
    return _cache_dir() / f"qwenkit_cpu-{isa}-{key.hexdigest()[:16]}.so"


def _build(isa: str, target: Path) -> None:
    """Compile cpu.cpp into `target` (written under another name, then renamed: a parallel build or
    an interrupted one never leaves a half-written library behind)."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise OSError("no C++ compiler found (install g++, or set CXX)")
    torch_lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        command = [compiler, str(SOURCE), "-o", str(out), "-shared", "-fPIC", "-O3", "-std=c++17", "-fopenmp",
                   f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *FLAGS[isa],
                   *(f"-I{p}" for p in cpp_extension.include_paths()),
                   f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-lc10", "-ltorch_cpu", "-ltorch"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise OSError(f"{compiler} failed:\n{result.stderr[-2000:]}")
        os.replace(out, target)


@functools.cache
def ops(isa: str):
    """torch.ops.qwenkit_cpu built for `isa` (a key of FLAGS) and loaded, or None (and one warning)
    when it cannot be."""
    if os.environ.get("QWENKIT_KERNELS", "1").strip().lower() in ("0", "false", "off", "no"):
        return None
    target = _library_path(isa)
    try:
        if not target.exists():
            print(f"qwenkit: building its CPU kernels for {isa} (once, ~15 s) into {target.parent}",
                  file=sys.stderr)
            _build(isa, target)
        torch.ops.load_library(str(target))
    except (OSError, RuntimeError) as e:
        warnings.warn(f"qwenkit's CPU kernels are unavailable ({e}); quantized layers use torch's slower "
                      "kernels. Install g++ (Debian: apt install g++) to build them, or set QWENKIT_KERNELS=0 "
                      "to silence this.", RuntimeWarning, stacklevel=2)
        return None
    _register_fakes()
    return torch.ops.qwenkit_cpu


def _register_fakes() -> None:
    """Shapes for torch.compile: both ops map x [M, K] to [M, sum of the weights' N] in x's dtype."""
    def int4_linear(x, qweights, scales, zeros, bias, group_size):
        return x.new_empty(x.shape[0], sum(q.shape[0] for q in qweights))

    def int8_linear(x, weights, scales, bias):
        return x.new_empty(x.shape[0], sum(w.shape[0] for w in weights))

    torch.library.register_fake("qwenkit_cpu::int4_linear", int4_linear)
    torch.library.register_fake("qwenkit_cpu::int8_linear", int8_linear)
