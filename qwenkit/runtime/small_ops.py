"""The small ops of an eager CPU step in one call each: the RMS norm, decode attention, a whole block.

Eager decode pays a dispatch and an allocation for every torch op: the norm is five of them, decode
attention about a dozen, together a tenth of a demo token's time on two cores (benchmarks/results/
README.md, "The small ops of an eager step"). qwenkit's CPU kernels (qwenkit/kernels) do the same
arithmetic in one call. `use_small_ops(model)` applies them from outside the model: each RMSNorm
becomes a KernelRMSNorm, each Attention takes `kernel_decode_attention` (which also reads an int8 cache as
it is held) and, for a batch-1 decode step over a float cache, runs the rotary embedding, the cache write and
the attention between its projections as one call (KernelSelfAttention). Where all of a block's products are
qwenkit's kernels too (int4, int8, bf16 weights), that step runs the whole block as one call (KernelBlock).
The model's own code runs wherever they do not apply: another device or dtype, autograd, and torch.compile
(which fuses these ops itself).
"""

from __future__ import annotations

import torch
from torch import nn

from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from ..kernels import KernelProduct
from ..model import Attention, Block, Int8KV, RMSNorm, decode_attention
from .cpu_plan import kernel_ops
from .fused import JointAttention, JointMLP, joint_kernel

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
        if self.one_call(x, rope, write_pos, cache, q_scale):
            layer = self.layer_idx
            qkv = self.project_qkv(x).contiguous()  # (a no-op for the joint and concatenated products)
            y = kernel_ops().decode_self_attention(qkv, rope[0], rope[1], cache.k[layer], cache.v[layer], write_pos,
                                                   cache.length, self.num_heads, self.num_kv_heads, mask)
            return self.o_proj(y)
        return super().forward(x, rope, mask, write_pos, cache, q_scale)

    def one_call(self, x, rope, write_pos, cache, q_scale) -> bool:
        """Whether this step's rotary embedding, cache write and attention run as decode_self_attention."""
        layer = self.layer_idx
        return (x.shape[1] == 1 and cache is not None and write_pos.dim() == 1 and q_scale is None
                and self.window is None and self.q_norm is None and cache.k_scale is None
                and cache.ring[layer] is None and rope[0].shape[-1] == self.head_dim and _applies(x)
                and cache.k[layer].dtype == x.dtype and cache.k[layer].is_contiguous())


class KernelJointAttention(KernelSelfAttention, JointAttention):
    """The same for attention whose q/k/v run as one product (runtime/fused.py)."""


KERNEL_ATTENTION = {Attention: KernelSelfAttention, JointAttention: KernelJointAttention}


class KernelBlock(Block):
    """A Block whose one-call attention step (KernelJointAttention.one_call) runs, with everything around it, as
    one call (cpu.cpp's decode_block): both norms, the joint q/k/v and gate/up products, the o and down products,
    silu and the residuals, where each product is one of qwenkit's matrix-vector kernels (KernelProduct). The
    same ops in the same order as the eager block, so the same bits, without a Python call between them. Any other
    forward, or a layer with hooks (tensor parallelism's all-reduce) or another kind (LoRA, float), is the model's
    own."""

    def forward(self, x, rope, mask, write_pos, cache, q_scale):
        attn = self.self_attn
        if isinstance(attn, KernelJointAttention) and attn.one_call(x, rope, write_pos, cache, q_scale):
            products = self._products(x)
            if products is not None:
                layer, norms = attn.layer_idx, (self.input_layernorm, self.post_attention_layernorm)
                return kernel_ops().decode_block(x, norms[0].weight, norms[0].eps, norms[1].weight, norms[1].eps,
                                                 *products, rope[0], rope[1], cache.k[layer], cache.v[layer],
                                                 write_pos, cache.length, attn.num_heads, attn.num_kv_heads, mask)
        return super().forward(x, rope, mask, write_pos, cache, q_scale)

    def _products(self, x: torch.Tensor) -> tuple | None:
        """The q/k/v, o, gate/up and down products as cpu.cpp Products; None where one is not a KernelProduct, a
        norm is not the kernel's, or a module the call would skip has hooks."""
        attn, mlp, norms = self.self_attn, self.mlp, (self.input_layernorm, self.post_attention_layernorm)
        qkv, gate_up = (attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)
        skipped = (attn, mlp, *norms, *qkv, attn.o_proj, *gate_up, mlp.down_proj)
        if (type(mlp) is not JointMLP or _global_forward_hooks or _global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in skipped)
                or any(type(n) is not KernelRMSNorm or n.weight.dtype != x.dtype for n in norms)):
            return None
        x2d = x.reshape(-1, x.shape[-1])  # the products' kernels depend on its rows, dtype and device only
        runs = (joint_kernel(attn.joint, x2d, qkv), joint_kernel(None, x2d, (attn.o_proj,)),
                joint_kernel(mlp.joint, x2d, gate_up), joint_kernel(None, x2d, (mlp.down_proj,)))
        if not all(type(run) is KernelProduct for run in runs):
            return None
        return tuple(run.script_object() for run in runs)


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
        elif type(module) is Block:
            module.__class__ = KernelBlock
    return True
