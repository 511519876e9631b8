"""`qwenkit env`: versions, the CPU class and the plan qwenkit follows on this machine."""

from __future__ import annotations

import argparse
import platform

import torch

from .. import __version__
from ..runtime.cpu_plan import plan

HELP = "this machine's CPU class and the kernels and dtypes qwenkit picks for it"
DESCRIPTION = ("Print the versions, the CPU class (AVX2, AVX-512, VNNI, BF16, AMX) and the plan that follows from "
               "it: the dtype of dtype=auto and the kernels each kind of product runs. Force a lower class with "
               "ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA and QWENKIT_CPU_CLASS (e.g. avx2).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """env takes no options."""


def run(args: argparse.Namespace) -> int:
    print(f"qwenkit {__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()}, {torch.get_num_threads()} threads")
    print(plan().describe())
    if torch.cuda.is_available():
        print(f"cuda: {torch.cuda.get_device_name()} (bf16 {torch.cuda.is_bf16_supported()})")
    return 0
