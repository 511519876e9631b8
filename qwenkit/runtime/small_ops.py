"""The small ops of an eager CPU step in one call each: the RMS norm and decode attention.

Eager decode pays a dispatch and an allocation for every torch op: the norm is five of them, decode
attention about a dozen, together a tenth of a demo token's time on two cores (benchmarks/results/
README.md, "The small ops of an eager step"). qwenkit's CPU kernels (qwenkit/kernels) do the same
arithmetic in one call. `use_small_ops(model)` applies them from outside the model: each RMSNorm
becomes a KernelRMSNorm, each Attention takes `kernel_decode_attention` (which also reads an int8 cache as
it is held) and, for a batch-1 decode step over a float cache, runs the rotary embedding, the cache write and
the attention between its projections as one call (KernelSelfAttention). The model's own code runs wherever
they do not apply: another device or dtype, autograd, and torch.compile (which fuses these ops itself).
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import Attention, Int8KV, RMSNorm, decode_attention
from .cpu_plan import kernel_ops
from .fused import JointAttention

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


class KernelSelfAttention(Attention):
    """Attention whose one-token step, where its rows all write one position (batch-1 decode) into a float cache,
    runs what lies between the q/k/v and o projections (the rotary embedding, the cache write, attention, and the
    reshapes: a dozen eager ops) as one call with the same arithmetic (cpu.cpp's decode_self_attention). Any other
    forward is the model's own."""

    def forward(self, x, rope, mask, write_pos, cache, q_scale):
        layer = self.layer_idx
        if (x.shape[1] == 1 and cache is not None and write_pos.dim() == 1 and q_scale is None
                and self.window is None and self.q_norm is None and cache.k_scale is None
                and cache.ring[layer] is None and rope[0].shape[-1] == self.head_dim and _applies(x)
                and cache.k[layer].dtype == x.dtype and cache.k[layer].is_contiguous()):
            qkv = self.project_qkv(x).contiguous()  # (a no-op for the joint and concatenated products)
            y = kernel_ops().decode_self_attention(qkv, rope[0], rope[1], cache.k[layer], cache.v[layer], write_pos,
                                                   cache.length, self.num_heads, self.num_kv_heads, mask)
            return self.o_proj(y)
        return super().forward(x, rope, mask, write_pos, cache, q_scale)


class KernelJointAttention(KernelSelfAttention, JointAttention):
    """The same for attention whose q/k/v run as one product (runtime/fused.py)."""


KERNEL_ATTENTION = {Attention: KernelSelfAttention, JointAttention: KernelJointAttention}


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
            module.__class__ = KERNEL_ATTENTION.get(type(module), type(module))
    return True
