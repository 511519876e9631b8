"""Sibling float projections as one matrix: each layer's q/k/v weights, and its gate/up weights, are
laid out as row blocks of a single tensor, so that a step runs one matrix product per group.

`build_model` lays out a float model this way before its tensors arrive, and copies each tensor
into its block: no extra memory. Each nn.Linear keeps its own parameters, which are views of the
group's tensor, so state dicts, checkpoints, LoRA and in-place updates see the usual names and
shapes. The model asks for the joint product through `fused_with` (model.shared_input_linears),
the hook the quantized linears offer too. A group whose parameters were replaced since (moved to
another device or dtype, reassigned, sharded for training) runs as separate products again.

It pays on a GPU, where q/k/v take one launch and one split-K reduction instead of three
(benchmarks/results/README.md, "GPU: one H100, 2026-11-27"). On the CPU, bf16 linears are packed for
oneDNN instead (qwenkit.runtime.packed); for float32 ones the layout made no measurable difference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SIBLINGS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


class JointWeights:
    """The joint weight (and bias) of sibling nn.Linears whose parameters are its row blocks.

    Set as the first sibling's `fused_with`: called with the other siblings and the input, it
    returns one `F.linear` over the joint tensors while the siblings still read them, else None.
    """

    def __init__(self, linears: tuple[nn.Linear, ...], weight: torch.Tensor, bias: torch.Tensor | None):
        # Frozen Parameters because torch.compile(dynamic=True) keeps a Parameter's shape static (see
        # quant.linear._operands); requires_grad=False as training never takes the joint product.
        self.weight, self.bias = (None if t is None else nn.Parameter(t, requires_grad=False) for t in (weight, bias))
        self.linears = linears
        self.params = tuple(p for m in linears for p in (m.weight, m.bias) if p is not None)
        self.addresses = tuple(p.data_ptr() for p in self.params)

    def __call__(self, others: tuple[nn.Module, ...], x: torch.Tensor):
        if others != self.linears[1:] or any(m._forward_pre_hooks or m._forward_hooks for m in self.linears):
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


def lay_out_siblings(model: nn.Module, dtype: torch.dtype, device: torch.device) -> set[str]:
    """Give each group of sibling float linears (plain nn.Linear of one input size, all with or all
    without bias) one uninitialised joint tensor on `device`, their parameters views of it; returns
    the names of those parameters, which the caller must fill."""
    laid_out = set()
    for name, module in model.named_modules():
        kind = name.rpartition(".")[2]
        if kind not in SIBLINGS:
            continue
        linears = tuple(getattr(module, child) for child in SIBLINGS[kind])
        if any(type(m) is not nn.Linear for m in linears) or len({m.in_features for m in linears}) > 1 \
                or len({m.bias is None for m in linears}) > 1:
            continue
        rows = [m.out_features for m in linears]
        weight = torch.empty(sum(rows), linears[0].in_features, dtype=dtype, device=device)
        bias = None if linears[0].bias is None else torch.empty(sum(rows), dtype=dtype, device=device)
        for child, m, w, b in zip(SIBLINGS[kind], linears, weight.split(rows),
                                  bias.split(rows) if bias is not None else [None] * len(rows)):
            m.weight = nn.Parameter(w, requires_grad=False)
            laid_out.add(f"{name}.{child}.weight")
            if b is not None:
                m.bias = nn.Parameter(b, requires_grad=False)
                laid_out.add(f"{name}.{child}.bias")
        linears[0].fused_with = JointWeights(linears, weight, bias)
    return laid_out
