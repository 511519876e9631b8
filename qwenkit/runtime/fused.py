"""Sibling projections of one input (q/k/v, gate/up) run as one product.

`fuse_siblings` swaps each layer's Attention and MLP for a subclass (JointAttention, JointMLP) whose
projection asks for one product over its siblings, where their layers allow it:
- float nn.Linears whose weights are row blocks of one tensor (`lay_out_siblings`, JointWeights);
- quantized layers whose class offers `fused_with(others, x)` (qwenkit.quant.linear): one kernel
  over the siblings' stored tensors.
Otherwise the model's own projections run, one layer at a time. The children keep their names and
types, so state dicts, checkpoints, LoRA and quantizers see the plain model.

`build_model` lays out a float model before its tensors arrive and copies each tensor into its
block: no extra memory. A group whose parameters were replaced since (moved to another device or
dtype, reassigned, sharded for training) runs as separate products again.

It pays on a GPU, where q/k/v take one launch and one split-K reduction instead of three
(benchmarks/results/README.md, "GPU: one H100, 2026-11-27"), and for the quantized kernels at
batch-1 decode (one pass instead of three). On the CPU, bf16 linears are packed for oneDNN instead
(qwenkit.runtime.packed); for float32 ones the layout made no measurable difference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..model import MLP, Attention


class JointWeights:
    """The joint weight (and bias) of sibling nn.Linears whose parameters are its row blocks.

    Called with the siblings and the input, it returns one `F.linear` over the joint tensors while
    the siblings still read them, else None.
    """

    def __init__(self, linears: tuple[nn.Linear, ...], weight: torch.Tensor, bias: torch.Tensor | None):
        # Frozen Parameters because torch.compile(dynamic=True) keeps a Parameter's shape static (see
        # quant.linear._operands); requires_grad=False as training never takes the joint product.
        self.weight, self.bias = (None if t is None else nn.Parameter(t, requires_grad=False) for t in (weight, bias))
        self.linears = linears
        self.params = tuple(p for m in linears for p in (m.weight, m.bias) if p is not None)
        self.addresses = tuple(p.data_ptr() for p in self.params)

    def __call__(self, linears: tuple[nn.Module, ...], x: torch.Tensor):
        if linears != self.linears or any(m._forward_pre_hooks or m._forward_hooks for m in self.linears):
            # Other layers now (LoRA, quantized), or hooks that expect each sibling's own call (GPTQ's
            # calibration, activation probes).
            return None
        current = tuple(p for m in self.linears for p in (m.weight, m.bias) if p is not None)
        if len(current) != len(self.params) or any(a is not b for a, b in zip(current, self.params)):
            return None
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in current)):
            return None  # training: autograd reaches the parameters only through their own products
        # Replaced data (.to(), .data =, sharding) leaves the Parameter objects in place; their
        # addresses tell. Traced code cannot read addresses, and keeps what it traced.
        if not torch.compiler.is_compiling() and tuple(p.data_ptr() for p in current) != self.addresses:
            return None
        return self.linear

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def joint_product(joint: JointWeights | None, x: torch.Tensor, linears: tuple[nn.Module, ...]) -> torch.Tensor | None:
    """The outputs of `linears` on x side by side from one product, or None where they cannot run as one."""
    x2d = x.reshape(-1, x.shape[-1])
    run = joint(linears, x2d) if joint is not None else None
    fused_with = getattr(type(linears[0]), "fused_with", None)
    if run is None and fused_with is not None:
        run = fused_with(linears[0], linears[1:], x2d)
    return None if run is None else run(x2d).view(*x.shape[:-1], -1)


class JointAttention(Attention):
    siblings = ("q_proj", "k_proj", "v_proj")
    joint: JointWeights | None = None

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        y = joint_product(self.joint, x, (self.q_proj, self.k_proj, self.v_proj))
        return super().project_qkv(x) if y is None else y


class JointMLP(MLP):
    siblings = ("gate_proj", "up_proj")
    joint: JointWeights | None = None

    def project_gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = joint_product(self.joint, x, (self.gate_proj, self.up_proj))
        if y is None:
            return super().project_gate_up(x)
        return y.split([self.gate_proj.out_features, self.up_proj.out_features], dim=-1)


JOINT = {Attention: JointAttention, MLP: JointMLP}


def fuse_siblings(model: nn.Module) -> None:
    """Let each Attention and MLP of `model` run its sibling projections as one product where they allow."""
    for module in model.modules():
        if type(module) in JOINT:
            module.__class__ = JOINT[type(module)]


def lay_out_siblings(model: nn.Module, dtype: torch.dtype, device_of: Callable[[str], torch.device]) -> set[str]:
    """Give each group of sibling float linears of a fused model (`fuse_siblings`; plain nn.Linear of one
    input size, all with or all without bias) one uninitialised joint tensor on its device (`device_of(module
    name)`), their parameters views of it; returns the names of those parameters, which the caller must fill."""
    laid_out = set()
    for name, module in model.named_modules():
        if not isinstance(module, (JointAttention, JointMLP)):
            continue
        linears = tuple(getattr(module, child) for child in module.siblings)
        if any(type(m) is not nn.Linear for m in linears) or len({m.in_features for m in linears}) > 1 \
                or len({m.bias is None for m in linears}) > 1:
            continue
        rows = [m.out_features for m in linears]
        device = device_of(name)
        weight = torch.empty(sum(rows), linears[0].in_features, dtype=dtype, device=device)
        bias = None if linears[0].bias is None else torch.empty(sum(rows), dtype=dtype, device=device)
        for child, m, w, b in zip(module.siblings, linears, weight.split(rows),
                                  bias.split(rows) if bias is not None else [None] * len(rows)):
            m.weight = nn.Parameter(w, requires_grad=False)
            laid_out.add(f"{name}.{child}.weight")
            if b is not None:
                m.bias = nn.Parameter(b, requires_grad=False)
                laid_out.add(f"{name}.{child}.bias")
        module.joint = JointWeights(linears, weight, bias)
    return laid_out
