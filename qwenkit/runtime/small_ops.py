"""The small ops of an eager CPU step in one call each: the RMS norm and decode attention.

Eager decode pays a dispatch and an allocation for every torch op: the norm is five of them, decode
attention about a dozen, together a tenth of a demo token's time on two cores (benchmarks/results/
README.md, "The small ops of an eager step"). qwenkit's CPU kernels (qwenkit/kernels) do the same
arithmetic in one call. `use_small_ops(model)` applies them from outside the model: each RMSNorm
becomes a KernelRMSNorm, each Attention takes `kernel_decode_attention` (which also reads an int8 cache as
it is held). The model's own code runs wherever they do not apply: another device or dtype, autograd,
and torch.compile (which fuses these ops itself).
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import Attention, Int8KV, RMSNorm, decode_attention
from .cpu_plan import kernel_ops

KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _applies(*tensors: torch.Tensor) -> bool:
    first = tensors[0]
    return (first.device.type == "cpu" and first.dtype in KERNEL_DTYPES
            and all(t.dtype == first.dtype for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and not torch.compiler.is_compiling())


class KernelRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _applies(x, self.weight):
            return kernel_ops().rms_norm(x, self.weight, self.eps)
        return super().forward(x)


def kernel_decode_attention(q: torch.Tensor, k: torch.Tensor | Int8KV, v: torch.Tensor | Int8KV,
                            mask: torch.Tensor | None):
    if isinstance(k, Int8KV):  # an int8 cache, read as it is held
        if _applies(q):
            return kernel_ops().decode_attention_int8(q, k.values, v.values, k.scales, v.scales, mask)
    elif _applies(q, k, v):
        return kernel_ops().decode_attention(q, k, v, mask)
    return decode_attention(q, k, v, mask)


def use_small_ops(model: nn.Module) -> bool:
    """Give `model`'s norms and attention qwenkit's one-call CPU ops; False (nothing changed) when the
    kernels are not built."""
    if kernel_ops() is None:
        return False
    for module in model.modules():
        if type(module) is RMSNorm:
            module.__class__ = KernelRMSNorm
        elif isinstance(module, Attention):
            module.decode_attention = kernel_decode_attention
    return True
