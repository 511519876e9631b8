"""The CPU plan: the kernels and activation dtype this process uses, chosen once from what the CPU can do.

CPUs differ in what runs fast. On AVX2 (most laptops and many cloud VMs) bf16 matrix products are
emulated and torch's int4/int8 kernels take a scalar path for float32 activations; AVX-512 adds
wider vectors, VNNI integer dot products and, on newer parts, native bf16 (AVX-512 BF16, AMX). The
plan maps the class to choices:

| product | AVX2 / AVX-512 without BF16 | AVX-512 BF16, AMX |
|---|---|---|
| float weights (dtype auto), decode | bf16 weights, float32 activations: qwenkit's kernel | bf16: qwenkit's kernel |
| float weights, prefill | each layer widened to float32, float32 GEMM | bf16 GEMM |
| int8 / int4 weights, a few rows (decode) | qwenkit's kernels: int8 activations, integer dot products | the same |
| int8 / int4 weights, many rows (prefill) | qwenkit's int16 GEMM | dequantize, bf16 GEMM |

The class is the lowest of what the CPU reports, what torch will run (`ATEN_CPU_CAPABILITY` lowers
it), what oneDNN will run (`ONEDNN_MAX_CPU_ISA`), and `QWENKIT_CPU_CLASS`, so any class can be
tried on a better machine: set all three, e.g. `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
QWENKIT_CPU_CLASS=avx2`. A class the CPU lacks is refused. `qwenkit env` prints the plan. Without
qwenkit's kernels (no compiler), float weights take the activations' dtype (bf16 ones in oneDNN's
packed layout) and quantized ones torch's weight-only kernels.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import QwenkitError
from ..kernels import ops

CLASSES = ("scalar", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx")  # lowest first
# What qwenkit's kernels are built for in each class (bf16 and AMX add nothing they use).
KERNEL_ISA = {"scalar": "scalar", "avx2": "avx2", "avx512": "avx512", "avx512_vnni": "avx512_vnni",
              "avx512_bf16": "avx512_vnni", "amx": "avx512_vnni"}


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (empty where there is no such file)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def detected_class() -> str:
    """The best class this process can run: the CPU's flags, as far as torch and oneDNN will go."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "scalar"
    capability = torch.backends.cpu.get_cpu_capability()  # lowered by ATEN_CPU_CAPABILITY
    if capability == "AVX2":
        return "avx2"
    if not capability.startswith("AVX512"):
        return "scalar"
    flags = cpu_flags()
    if not flags:  # flags unreadable: trust torch
        return "avx512"
    if "avx512_vnni" not in flags:
        return "avx512"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():  # no BF16, or oneDNN held below it
        return "avx512_vnni"
    return "amx" if "amx_bf16" in flags else "avx512_bf16"


@functools.cache
def cpu_class() -> str:
    """The class this process plans for: the detected one, or QWENKIT_CPU_CLASS if it is not higher."""
    best = detected_class()
    wanted = os.environ.get("QWENKIT_CPU_CLASS", "").strip().lower()
    if not wanted:
        return best
    if wanted not in CLASSES:
        raise QwenkitError(f"QWENKIT_CPU_CLASS={wanted!r} is not one of {', '.join(CLASSES)}")
    if CLASSES.index(wanted) > CLASSES.index(best):
        raise QwenkitError(f"QWENKIT_CPU_CLASS={wanted} asks for more than this CPU runs ({best}; torch "
                           f"{torch.backends.cpu.get_cpu_capability()}): use {best} or a lower class")
    return wanted


def native_bf16() -> bool:
    """Whether bf16 matrix products run natively here (else oneDNN emulates them, slower than float32)."""
    return CLASSES.index(cpu_class()) >= CLASSES.index("avx512_bf16")


def auto_dtype() -> torch.dtype:
    """dtype="auto" on the CPU: bf16 where its products are native (a much faster prefill than float32's;
    benchmarks/results/README.md, "Every CPU class on qwenkit's own kernels"), else float32."""
    return torch.bfloat16 if native_bf16() else torch.float32


def auto_weight_dtype() -> torch.dtype:
    """How dtype="auto" stores float linear weights on the CPU: bf16 where the CPU multiplies bf16 natively
    or qwenkit's kernels read bf16 weights with float32 activations (half the bytes of float32 to read per
    token, exactly the values of a bf16 checkpoint), else the activations' dtype."""
    return torch.bfloat16 if native_bf16() or kernel_ops() is not None else auto_dtype()


def int_gemm_prefill() -> bool:
    """Whether quantized layers take many rows of x (prefill) through qwenkit's integer GEMM, x as int16 per
    block against the stored weights, instead of dequantizing for a float32 GEMM: on the classes with float32
    activations and vector kernels (AVX2, AVX-512 without BF16), where int16 pairs multiply-add at twice
    float32's rate per instruction (with native bf16 the bf16 GEMM stays). Measured: benchmarks/results/README.md,
    "An integer GEMM for prefill on AVX2"."""
    return cpu_class() in ("avx2", "avx512", "avx512_vnni") and kernel_ops() is not None


@dataclass(frozen=True)
class Plan:
    cpu_class: str
    dtype: torch.dtype
    kernels: str | None  # the instruction set qwenkit's kernels run, or None (torch's own)
    int_gemm: bool = False  # quantized prefill through qwenkit's integer GEMM (int_gemm_prefill)

    def rows(self) -> list[tuple[str, str]]:
        """(product, how it runs) for `qwenkit env` and `bench`."""
        dtype = str(self.dtype).removeprefix("torch.")
        if self.kernels:
            float_rows = [("float weights, decode (a few rows)", f"bf16 weights, {dtype} activations, qwenkit "
                                                                f"{self.kernels} kernel"),
                          ("float weights, prefill (many rows)", f"{dtype} GEMM" + (
                              "" if self.dtype == torch.bfloat16 else ", each layer widened from bf16"))]
            quantized = f"qwenkit {self.kernels} kernels, int8 activations per 32"
        else:
            float_rows = [("float weights, prefill and decode",
                           "bf16, oneDNN packed" if self.dtype == torch.bfloat16 else dtype)]
            quantized = "torch's weight-only kernels"
        prefill = (f"qwenkit {self.kernels} GEMM, int16 activations per block" if self.int_gemm
                   else f"dequantize the layer, {dtype} GEMM")
        # (the row counts are the layers' int_gemm_min_rows and gemm_min_rows, in qwenkit/quant/linear.py)
        batched = [("int8 / int4 weights, a batch of decoded sequences (tens of rows)",
                    f"qwenkit {self.kernels} GEMM, int16 activations per block")] if self.kernels else []
        return float_rows + [
            ("int8 / int4 weights, decode (a few rows)", quantized),
            *batched,
            ("int8 / int4 weights, prefill (many rows)", prefill),
        ]

    def describe(self) -> str:
        return "\n".join([f"cpu class: {self.cpu_class} (torch {torch.backends.cpu.get_cpu_capability()})",
                          f"dtype auto: {str(self.dtype).removeprefix('torch.')}"]
                         + [f"{product}: {how}" for product, how in self.rows()])


def kernel_ops():
    """qwenkit's CPU kernels built for this class (torch.ops.qwenkit_cpu), or None (see qwenkit.kernels)."""
    return ops(KERNEL_ISA[cpu_class()])


def plan() -> Plan:
    kernels = kernel_ops()
    return Plan(cpu_class(), auto_dtype(), None if kernels is None else kernels.isa(), int_gemm_prefill())
