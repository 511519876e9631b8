"""CPU inference layouts for float linears: bf16 weights read by qwenkit's kernel, or packed for oneDNN.

    pack_linears(model)     # bf16 CPU nn.Linear -> Bf16Linear (or PackedLinear); qwenkit.load does it as it loads
    unpack_linears(model)   # plain nn.Linear again; quantizers and LoRA call it first

A one-token step reads every weight once, so decode is bound by the bytes a weight takes and by how
close a kernel comes to the machine's read bandwidth:
- Bf16Linear (where qwenkit's CPU kernels are built): the bf16 weight as stored, read by
  qwenkit_cpu::bf16_linear for a few rows of x (float32 or bf16 activations; a bf16 value widens to
  float32 exactly, so only the order of the float32 sums differs from F.linear). At the demo's shapes
  on two cores it reads ~34 GB/s, against ~27 for oneDNN's packed bf16 GEMV and ~15 for a float32 GEMV
  over float32 weights on AVX2 (benchmarks/results/README.md, "Float weights on qwenkit's bf16 kernel").
  On a CPU without native bf16, qwenkit.load(dtype="auto") keeps float32 activations and stores the
  linear weights in bf16 this way: half the bytes to read and to hold. Many rows (prefill) run
  F.linear over the weight widened to x's dtype.
- PackedLinear (where the kernels are not built): oneDNN's blocked layout, reordered once at load
  (aten's mkldnn._reorder_linear_weight) instead of on every call, so a one-token step reads each weight
  once, not about twice. It is oneDNN's own kernel, so results are bit-identical to F.linear (checked
  once per process: where they are not, or the CPU lacks what the packed kernel needs, nothing is
  packed). float32 weights stay plain: the packed path does not reproduce MKL's float32 kernels.

Either layer keeps only its own copy of the weight (a tied head gets its own; the embedding keeps the
dense table). Its state dict holds the dense weight, so checkpoints hold the same values (a float32
model whose linears are stored in bf16 saves them in bf16). A PackedLinear does
not train (a forward in training mode with gradients on is refused) and stays a bf16 CPU layer: moving
it elsewhere is refused with a message. A Bf16Linear computes F.linear wherever its kernel does not
apply (autograd, another device or dtype). After unpack_linears both are plain nn.Linear again.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import QwenkitError
from .allocator import return_freed_memory
from .cpu_plan import kernel_ops


def pack_linears(model: nn.Module, weight_dtype: torch.dtype | None = None) -> int:
    """Swap each bf16 CPU nn.Linear of `model` for its inference layout (`inference_linear`); with
    `weight_dtype=torch.bfloat16`, float32 ones too, their weights rounded to bf16. Returns how many."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and module.weight.device.type == "cpu" and (
                module.weight.dtype == torch.bfloat16 or weight_dtype == torch.bfloat16):
            layer = inference_linear(module.weight.detach().to(torch.bfloat16), module.bias, module.weight.dtype)
            if layer is not None:
                model.set_submodule(name, layer)
                swapped += 1
    return_freed_memory()  # the dense weights just freed
    return swapped


def inference_linear(weight: torch.Tensor, bias: nn.Parameter | None, dtype: torch.dtype) -> nn.Module | None:
    """The layer holding the bf16 CPU `weight` for inference in a model computing in `dtype`: a Bf16Linear
    where qwenkit's kernels are built, a PackedLinear where oneDNN's packed bf16 kernel runs, else None."""
    if not inference_layout(dtype):
        return None
    return Bf16Linear(weight, bias, dtype) if kernel_ops() is not None else PackedLinear(weight, bias)


def inference_layout(dtype: torch.dtype) -> bool:
    """Whether bf16 CPU linears of a model computing in `dtype` have an inference layout here."""
    return kernel_ops() is not None or (dtype == torch.bfloat16 and packing_works())


def packed_bytes(model: nn.Module) -> int:
    """Bytes of `model`'s packed weights, which its parameters do not hold."""
    return sum(m.weight_bytes for m in model.modules() if isinstance(m, PackedLinear))


def unpack_linears(model: nn.Module) -> nn.Module:
    """Swap every Bf16Linear and PackedLinear of `model` back for an nn.Linear with its dense weight (in the
    model's compute dtype); returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, (Bf16Linear, PackedLinear)):
            model.set_submodule(name, module.unpacked())
    return model


class Bf16Linear(nn.Module):
    """y = x·Wᵀ + b for a bf16 W held as stored, run by qwenkit's CPU kernel for a few rows of x (see the
    module docstring). Siblings (q/k/v, gate/up) run as one kernel call (`fused_with`)."""

    # From this many rows of x on, F.linear is faster than the kernel (the demo's shapes, 2 threads, AVX-512
    # BF16 and AVX2 forced): for bf16 x oneDNN's GEMM from 4 rows; for float32 x, whose F.linear first
    # widens the weight to float32, from about 64.
    gemm_min_rows = {torch.bfloat16: 4, torch.float32: 64}
    # Weights widened to float32 at a time: a vocabulary-sized head would otherwise need a transient
    # float32 copy of gigabytes.
    widen_chunk = 1 << 24

    def __init__(self, weight: torch.Tensor, bias: nn.Parameter | None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)
        self.bias = bias
        self.compute_dtype = dtype  # the model's, which unpacked() returns the weight in
        self._fused: tuple[tuple, tuple, object] | None = None  # (parameters, their versions, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        run = self.fused_with((), x2d)
        y = run(x2d) if run is not None else self._widened_linear(x2d)
        return y.reshape(*x.shape[:-1], self.out_features)

    def fused_with(self, others: tuple[nn.Module, ...], x: torch.Tensor):
        """One kernel call `x [M, K] -> [M, N + the others' N]` for this layer and `others` (siblings reading
        x), or None where the kernel does not apply: too many rows, autograd, tracing, another device or
        dtype, or siblings that are not Bf16Linears of this input size with bias alike."""
        layers = (self, *others)
        if (x.device.type != "cpu" or x.shape[0] >= self.gemm_min_rows.get(x.dtype, 0)
                or torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad)):
            return None
        # A reassigned or modified weight or bias (another object, or a new version) makes a new kernel.
        params = tuple(p for layer in layers for p in (getattr(layer, "weight", None), getattr(layer, "bias", None)))
        versions = tuple(p._version for p in params if p is not None)
        fused = self._fused
        if fused is None or fused[1] != versions or len(fused[0]) != len(params) \
                or any(a is not b for a, b in zip(fused[0], params)):
            fused = self._fused = (params, versions, self._kernel(layers))
        return fused[2]

    def _kernel(self, layers: tuple[nn.Module, ...]):
        ops = kernel_ops()
        if ops is None or any(type(layer) is not Bf16Linear or layer.in_features != self.in_features
                              or (layer.bias is None) != (self.bias is None) or layer.weight.dtype != torch.bfloat16
                              or layer.weight.device.type != "cpu" for layer in layers):
            return None
        weights = [layer.weight for layer in layers]
        bias = None if self.bias is None else torch.cat([layer.bias.detach().float() for layer in layers])

        def run(x):
            return ops.bf16_linear(x, weights, bias)
        return run

    def _widened_linear(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.weight.dtype == x.dtype:
            return F.linear(x, self.weight, bias)
        step = max(1, self.widen_chunk // self.in_features)
        parts = [F.linear(x, self.weight[r:r + step].to(x.dtype), None if bias is None else bias[r:r + step])
                 for r in range(0, self.out_features, step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def unpacked(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.weight.detach().to(self.compute_dtype), requires_grad=False)
        linear.bias = self.bias
        return linear

    def __getstate__(self):  # the kernel is a closure: deepcopy and pickle make it anew
        return {**self.__dict__, "_fused": None}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bf16 weights")


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

