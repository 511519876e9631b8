"""bf16 linears whose weights live in oneDNN's blocked layout, for inference on the CPU.

    pack_linears(model)     # bf16 CPU nn.Linear -> PackedLinear (qwenkit.load packs as it loads)
    unpack_linears(model)   # plain nn.Linear again; quantizers and LoRA call it first

oneDNN multiplies by a plain [out, in] bf16 weight by reordering it into its blocked layout on
every call, so a one-token step moves each weight about twice over. Reordered once at load
(aten's mkldnn._reorder_linear_weight), a weight is read once, and bf16 decode is that much faster
(benchmarks/results/README.md, the opening section). It is the same kernel, so results are
bit-identical to F.linear (checked once per process: where they are not, or the CPU lacks what the
packed kernel needs, nothing is packed). float32 models keep F.linear, whose MKL kernels the
packed path does not reproduce bit for bit.

A PackedLinear keeps only the packed weight: the loader packs each weight as it arrives and frees
the dense one (a tied head gets its own packed copy; the embedding keeps the dense table). Its state
dict and its `weight` give back the dense matrix (a copy), so checkpoints are unchanged. It does not
train: a forward in training mode with gradients on is refused (in eval mode, inputs that need
gradients get them through a dense copy). It stays a bf16 CPU layer: moving a model with packed
layers elsewhere is refused with a message; after unpack_linears it moves as usual.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import QwenkitError
from .allocator import return_freed_memory


def pack_linears(model: nn.Module) -> int:
    """Swap every bf16 CPU nn.Linear of `model` for a PackedLinear; returns how many (0 where the
    packed kernel is unavailable or not bit-identical here)."""
    if not packing_works():
        return 0
    swapped = 0
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and module.weight.dtype == torch.bfloat16 and module.weight.device.type == "cpu":
            model.set_submodule(name, PackedLinear(module.weight.detach(), module.bias))
            swapped += 1
    return_freed_memory()  # the dense weights just freed
    return swapped


def packed_bytes(model: nn.Module) -> int:
    """Bytes of `model`'s packed weights, which its parameters do not hold."""
    return sum(m.weight_bytes for m in model.modules() if isinstance(m, PackedLinear))


def unpack_linears(model: nn.Module) -> nn.Module:
    """Swap every PackedLinear of `model` back for an nn.Linear with its dense weight; returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, PackedLinear):
            model.set_submodule(name, module.unpacked())
    return model


class PackedLinear(nn.Module):
    """y = x·Wᵀ + b for a bf16 W held in oneDNN's blocked layout (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: nn.Parameter | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = _pack(weight)
        self.bias = bias

    @property
    def weight(self) -> torch.Tensor:
        """The dense [out, in] weight: a copy (writing to it changes nothing)."""
        return self.packed.to_dense()

    @property
    def weight_bytes(self) -> int:
        return self.in_features * self.out_features * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():  # the weight is no parameter: it would never learn
            raise QwenkitError("this model's linears are packed for inference (qwenkit.runtime.packed) and cannot "
                               "train: call qwenkit.runtime.packed.unpack_linears(model) first, or load it with "
                               "pack=False")
        if x.dtype != torch.bfloat16 or (x.requires_grad and torch.is_grad_enabled()):
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def unpacked(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.weight, requires_grad=False)
        linear.bias = self.bias
        return linear

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            self.packed = _pack(state_dict[key].to(torch.bfloat16))
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        else:
            missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # oneDNN's packed tensors cannot be copied or pickled: deepcopy and torch.save carry the dense weight.
    def __getstate__(self):
        return {**self.__dict__, "packed": self.weight}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.packed = _pack(self.packed)

    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0, dtype=torch.bfloat16))
        if probe.device.type != "cpu" or probe.dtype != torch.bfloat16:
            raise QwenkitError(f"this model's bf16 CPU linears are packed for oneDNN and cannot become "
                               f"{probe.dtype} on {probe.device}: call qwenkit.runtime.packed.unpack_linears(model) "
                               "first, or load the model with that device and dtype")
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed"


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)


@functools.cache
def packing_works() -> bool:
    """Whether packed bf16 linears run here and match F.linear bit for bit (odd sizes, a few batch sizes)."""
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(97, 200, generator=gen).bfloat16()
        bias = torch.randn(97, generator=gen).bfloat16()
        packed = _pack(weight)
        for rows in (1, 3, 64):
            x = torch.randn(rows, 200, generator=gen).bfloat16()
            if not torch.equal(torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], ""),
                               F.linear(x, weight, bias)):
                return False
        return torch.equal(packed.to_dense(), weight)
    except (RuntimeError, AttributeError):  # a torch built without oneDNN, or a CPU without bf16 support
        return False

