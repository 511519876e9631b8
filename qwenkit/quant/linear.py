"""Weight-only int8 and int4 linear layers.

A layer's state dict holds only the portable tensors (documented on each class). The layout a
fast kernel wants, if it wants another, is derived from them in memory the first time the layer
runs on a given device and activation dtype, and is never saved. The kernel is picked at run time:

| layer | CPU                                 | CUDA                                | anything else        |
|-------|-------------------------------------|-------------------------------------|----------------------|
| int8  | qwenkit_cpu::int8_linear            | dequantize + matmul                 | dequantize + matmul  |
|       | (else aten._weight_int8pack_mm)     |                                     |                      |
| int4  | qwenkit_cpu::int4_linear            | aten._weight_int4pack_mm (bf16)     | dequantize + matmul  |
|       | (else aten._weight_int4pack_mm_for_cpu) |                                 |                      |

qwenkit's CPU kernels (qwenkit/kernels) read the stored tensors as they are, for float32 and bf16
activations alike; torch's run only where they are not built (see the CPU plan, runtime/cpu_plan.py).

The kernels are matrix-vector loops whose cost grows linearly with the rows of x, so from
`gemm_min_rows` rows on (prefill) the layer dequantizes and lets the float GEMM (oneDNN, cuBLAS)
do the work, which is faster there (benchmarks/results/README.md, "Quantized decode against
llama.cpp and transformers"); except where the CPU plan prefers qwenkit's integer GEMM over the
stored tensors (`int_gemm_prefill`: CPUs without native bf16, whose float32 GEMM is the slower one),
which takes over from `int_gemm_min_rows` rows. Between `int_gemm_min_rows` and `gemm_min_rows` rows (a batch of
sequences decoded together) the integer GEMM runs on every CPU with qwenkit's kernels: measured faster there than
the matrix-vector loop and than dequantize-and-matmul with native bf16 too (benchmarks/results/README.md, "A batch
of decoded sequences on the integer GEMM"). The same dequantize-and-matmul path covers devices and
shapes without a kernel, and autograd (the fast ops have no backward). CUDA's int8 op is a naive
one-thread-per-output loop, slower than dequantizing, so int8 on CUDA saves memory, not time.

Siblings that read the same input (q/k/v, gate/up) can run as one kernel (`fused_with`, called by
qwenkit.runtime.fused's joint projections): at batch-1 decode one pass instead of three. qwenkit's kernels
take the siblings' tensors as they are; torch's int4 kernel takes a concatenated packed copy, which
replaces the per-layer ones rather than adding to them.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.cpu_plan import int_gemm_prefill, kernel_ops
from .rtn import quantize_int4, quantize_int8

aten = torch.ops.aten
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernels accept


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> uint8 [N, K/2]: two values per byte along K, the even k in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K] values 0..15 (the inverse of pack_int4)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def frozen(t: torch.Tensor) -> nn.Parameter:
    # Parameters (not buffers) so loaders that assign by parameter name and byte counts over
    # named_parameters() see the quantized tensors like any other weight.
    return nn.Parameter(t, requires_grad=False)


def _operands(*tensors: torch.Tensor | None) -> tuple:
    """A kernel's prepared tensors as frozen Parameters. torch.compile(dynamic=True) keeps the shape of
    a Parameter static; a plain tensor captured by the kernel would make each of its sizes a symbol
    that every compiled step's guards check and its wrapper passes, for a slower step and a longer
    compile (benchmarks/results/README.md, "Quantized decode against llama.cpp and transformers")."""
    return tuple(t if t is None or isinstance(t, nn.Parameter) else frozen(t) for t in tensors)


def _qwenkit_ops(device: torch.device, dtype: torch.dtype):
    """qwenkit's CPU kernels for activations of `dtype` on `device`, or None (torch's kernels then)."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return None
    return kernel_ops()


def _joint_bias(layers) -> torch.Tensor | None:
    """The layers' biases one after another in float32 (as qwenkit's ops add them), or None (siblings
    all have one or none)."""
    return None if layers[0].bias is None else torch.cat([layer._bias_in(torch.float32) for layer in layers])


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` contiguous and 64-byte aligned: the CPU int8 kernel's bf16 path uses aligned vector loads
    (a safetensors mmap or a sliced activation can start anywhere; misaligned input crashes it).
    Under torch.compile the address cannot be traced, so the tensor is always copied (one row of
    activations per decode step: negligible)."""
    if not torch.compiler.is_compiling() and t.is_contiguous() and t.data_ptr() % 64 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


class QuantizedLinear(nn.Module):
    """What the int8 and int4 layers share: shapes, bias, the lazily prepared kernel, the fallback."""

    bits: int
    group_size: int | None = None
    # Whether torch's kernel may run siblings as one over a concatenated copy of their weights
    # (qwenkit's kernels always may, reading them as they are).
    concatenated_for_torch = True
    gemm_min_rows: int  # from this many rows of x on, dequantize + float GEMM beats the kernel
    int_gemm_min_rows: int  # the same for qwenkit's integer GEMM, where the CPU plan has it (int_gemm_prefill)
    # Weights dequantized at a time on the float path: a vocabulary-sized head (152k x 3584 in
    # Qwen2.5-7B) would otherwise need a transient float copy of gigabytes.
    dequant_chunk = 1 << 24

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if bias:
            self.bias = frozen(torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self._kernel: tuple[torch.dtype, Callable | None] | None = None  # activation dtype, fast kernel
        self._gemm: tuple[torch.dtype, Callable | None] | None = None  # the same for many rows (int_gemm_prefill)
        self._generation = 0  # counts changes of the stored tensors; a fused kernel records them
        self._fused: tuple[tuple, Callable | None] | None = None  # (what it was made from, kernel)

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice = slice(None)) -> torch.Tensor:
        """The float weight [N, K] (or the given output rows of it) that the stored tensors stand for."""
        raise NotImplementedError

    def _build_kernel(self, device: torch.device, dtype: torch.dtype) -> Callable | None:
        """A fast `x [M, K] -> y [M, N]` (bias included) for this device/dtype, or None."""
        return self._qwenkit_kernel((self,), device, dtype) or self._torch_kernel(device, dtype)

    def _qwenkit_kernel(self, layers: tuple[QuantizedLinear, ...], device: torch.device,
                        dtype: torch.dtype, gemm: bool = False) -> Callable | None:
        """qwenkit's CPU kernel computing `layers`' outputs side by side from their stored tensors, or None;
        `gemm`: its GEMM for many rows (x as int16 per block) instead of the matrix-vector loop."""
        raise NotImplementedError

    def _torch_kernel(self, device: torch.device, dtype: torch.dtype) -> Callable | None:
        """torch's kernel for this layer alone, or None."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        run = self._kernel_for(x2d) if self._wants_kernel(x2d) else None
        if run is not None:
            y = run(x2d)
        elif x.requires_grad and torch.is_grad_enabled():  # through a frozen layer (Q-LoRA)
            y = _FrozenWeightLinear.apply(x2d, self)
        else:
            y = self._dequantized_linear(x2d)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _dequantized_linear(self, x: torch.Tensor) -> torch.Tensor:
        step = max(1, self.dequant_chunk // self.in_features)
        bias = self._bias_in(x.dtype)
        parts = [F.linear(x, self.dequantize(x.dtype, slice(r, r + step)), None if bias is None else bias[r:r + step])
                 for r in range(0, self.out_features, step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def _wants_kernel(self, x2d: torch.Tensor) -> bool:
        """Whether a kernel takes x2d rather than dequantize-and-matmul: a few rows, or many where the CPU
        plan has qwenkit's integer GEMM; never under autograd."""
        if x2d.requires_grad and torch.is_grad_enabled():
            return False
        return x2d.shape[0] < self.gemm_min_rows or self._int_gemm(x2d)

    def _int_gemm(self, x2d: torch.Tensor) -> bool:
        """Whether x2d's rows take qwenkit's integer GEMM rather than the matrix-vector kernel: from
        `int_gemm_min_rows` on where the CPU plan has it for prefill, and up to `gemm_min_rows` on every CPU
        with qwenkit's kernels (a batch of decoded sequences; see the module docstring). The row count is
        tested first: a decode step (and the code torch.compile traces for it) stops there."""
        rows = x2d.shape[0]
        return (rows >= self.int_gemm_min_rows and x2d.device.type == "cpu"
                and ((rows < self.gemm_min_rows and _qwenkit_ops(x2d.device, x2d.dtype) is not None)
                     or int_gemm_prefill()))

    def fused_with(self, others: tuple[nn.Module, ...], x: torch.Tensor) -> Callable | None:
        """One kernel `x [M, K] -> [M, N + the others' N]` for this layer and `others`, siblings that
        read the same input (q/k/v, gate/up): one matrix-vector pass instead of several. None when
        they cannot fuse (another layer kind, group size, input order or bias presence) or when the
        rows of x take the float path. Made from the stored tensors; remade when any of them change.
        """
        if not self._wants_kernel(x):
            return None
        layers, gemm = (self, *others), self._int_gemm(x)
        key = (x.dtype, x.device, layers, tuple(getattr(layer, "_generation", None) for layer in layers), gemm)
        if self._fused is None or self._fused[0] != key:
            self._fused = (key, self._sibling_kernel(layers, x, gemm) if self._siblings(layers) else None)
        return self._fused[1]

    def _siblings(self, layers: tuple[nn.Module, ...]) -> bool:
        return not any(type(layer) is not type(self) or layer.in_features != self.in_features
                       or layer.group_size != self.group_size or getattr(layer, "perm", None) is not None
                       or (layer.bias is None) != (self.bias is None) for layer in layers)

    def _sibling_kernel(self, layers: tuple[QuantizedLinear, ...], x: torch.Tensor, gemm: bool) -> Callable | None:
        if gemm:
            return self._qwenkit_kernel(layers, x.device, x.dtype, gemm=True)
        if _kernel_verified(type(self), x.device, x.dtype, self.group_size):
            run = self._qwenkit_kernel(layers, x.device, x.dtype)
            if run is not None:
                return run
        if not self.concatenated_for_torch:
            return None
        return self._concatenated(layers)._kernel_for(x)

    def _concatenated(self, layers: tuple[QuantizedLinear, ...]) -> QuantizedLinear:
        """A layer computing all of `layers`' outputs in order."""
        merged = copy.copy(self)
        merged._parameters = {name: None if value is None else
                              frozen(torch.cat([layer._parameters[name] for layer in layers]))
                              for name, value in self._parameters.items()}
        merged.out_features = sum(layer.out_features for layer in layers)  # (copy.copy left out the kernels)
        return merged

    def _kernel_for(self, x: torch.Tensor) -> Callable | None:
        if self._int_gemm(x):
            if self._gemm is None or self._gemm[0] is not x.dtype:
                self._gemm = (x.dtype, self._qwenkit_kernel((self,), x.device, x.dtype, gemm=True))
            return self._gemm[1]
        # Checked on every call, so kept to one attribute read and one comparison: the prepared
        # kernel is dropped instead whenever the tensors it was derived from change (below).
        if self._kernel is None or self._kernel[0] is not x.dtype:
            run = self._build_kernel(x.device, x.dtype)
            if run is not None and not _kernel_verified(type(self), x.device, x.dtype, self.group_size):
                run = None
            self._kernel = (x.dtype, run)
        return self._kernel[1]

    _PREPARED = ("_kernel", "_gemm", "_fused")  # what is derived from the stored tensors

    # The ways the portable tensors change: assigned by name (loaders), copied into by
    # load_state_dict, converted or moved by .to()/.half()/.cuda().
    def __setattr__(self, name, value):
        if isinstance(value, torch.Tensor):
            self._changed()
        super().__setattr__(name, value)

    def _load_from_state_dict(self, *args, **kwargs):
        self._changed()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._changed()
        return super()._apply(fn, recurse)

    def _changed(self) -> None:
        """Drop what was derived from the stored tensors (this layer's kernel, fused kernels)."""
        self.__dict__.update(dict.fromkeys(self._PREPARED))
        self.__dict__["_generation"] = self.__dict__.get("_generation", 0) + 1

    def _bias_in(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)

    def __getstate__(self):
        # The prepared kernels are closures over this layer's tensors: pickle cannot write them, and a deepcopy
        # would share them (the copy computing with the original's tensors). Both make them anew.
        return {**self.__dict__, **dict.fromkeys(self._PREPARED)}

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}{group}")


class _FrozenWeightLinear(torch.autograd.Function):
    """y = x·Wᵀ + b for a quantized layer's frozen W, with a backward that dequantizes W again.

    Plain autograd would keep every layer's dequantized float weight alive from forward to backward
    (it is what dx = dy·W needs), which is the memory Q-LoRA exists to save; recomputing it costs one
    more dequantization per layer. Gradients flow to x only: W and b are frozen.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return layer._dequantized_linear(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        layer = ctx.layer
        step = max(1, layer.dequant_chunk // layer.in_features)
        grad_x = sum(grad[:, r:r + step] @ layer.dequantize(grad.dtype, slice(r, r + step))
                     for r in range(0, layer.out_features, step))
        return grad_x.to(ctx.x_dtype), None


class Int8Linear(QuantizedLinear):
    """y = x · (weight · scales[:, None])ᵀ + bias, symmetric int8 per output channel.

    State dict: `weight` int8 [N, K], `scales` [N] (float dtype), `bias` [N] if any.
    """

    bits = 8
    gemm_min_rows = 48
    int_gemm_min_rows = 16
    # torch's kernel reads the stored int8 weight itself: a concatenated copy for it would hold the
    # weights twice for a small gain in a decode step.
    concatenated_for_torch = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.weight = frozen(torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.scales = frozen(torch.empty(out_features, dtype=dtype, device=device))

    @classmethod
    @torch.no_grad()
    def from_float(cls, linear: nn.Linear, scale_dtype: torch.dtype | None = None) -> Int8Linear:
        """Round-to-nearest int8 of a float linear; scales in `scale_dtype` (default: the weight's)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    scale_dtype or linear.weight.dtype, "meta")
        q, scales = quantize_int8(linear.weight, layer.scales.dtype)
        layer.weight, layer.scales = frozen(q), frozen(scales)
        if linear.bias is not None:
            layer.bias = frozen(linear.bias.detach())
        return layer

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice = slice(None)) -> torch.Tensor:
        return self.weight[rows].to(dtype).mul_(self.scales[rows].to(dtype)[:, None])

    def _qwenkit_kernel(self, layers, device, dtype, gemm=False):
        ops = _qwenkit_ops(device, dtype)
        if ops is None or self.in_features % 32:
            return None
        weights = _operands(*(layer.weight.contiguous() for layer in layers))
        scales, bias = _operands(torch.cat([layer.scales.float() for layer in layers]),
                                 _joint_bias(layers))

        op = ops.int8_gemm if gemm else ops.int8_linear

        def run(x):
            return op(x, weights, scales, bias)
        return run

    def _torch_kernel(self, device, dtype):
        if device.type != "cpu" or dtype not in FLOAT_DTYPES or not hasattr(aten, "_weight_int8pack_mm"):
            return None
        if dtype == torch.bfloat16 and self.in_features % 16:
            return None  # the AVX-512 bf16 path reads K 16 at a time and returns garbage otherwise
        weight, scales, bias = _operands(_aligned(self.weight), self.scales.to(dtype), self._bias_in(dtype))

        def run(x):
            y = aten._weight_int8pack_mm(_aligned(x), weight, scales)
            return y if bias is None else y.add_(bias)
        return run


class Int4Linear(QuantizedLinear):
    """y = x · Wᵀ + bias with W[n, k] = (q[n, k] − zeros[n, g]) · scales[n, g], g = k // group_size.

    Asymmetric int4 per group of `group_size` inputs, q in 0..15. State dict: `qweight` uint8
    [N, K/2] (two values per byte along K, the even k in the low nibble), `scales` and `zeros`
    [N, K/group_size] (float dtype; zeros in q units), `bias` [N] if any.

    act_order: the groups are sets of inputs scattered over K (GPTQ with desc_act quantizes the
    columns in activation order). `perm` int32 [K] lists the inputs group by group; the stored
    tensors are the weight's columns in that order, W[:, perm], and the kernel takes x[..., perm].
    """

    bits = 4
    gemm_min_rows = 128
    int_gemm_min_rows = 32

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 dtype: torch.dtype = torch.float32, device=None, act_order: bool = False):
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group_size {group_size} is not one of {INT4_GROUP_SIZES}")
        if in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}")
        super().__init__(in_features, out_features, bias, dtype, device)
        self.group_size = group_size
        groups = in_features // group_size
        self.qweight = frozen(torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.scales = frozen(torch.empty(out_features, groups, dtype=dtype, device=device))
        self.zeros = frozen(torch.empty(out_features, groups, dtype=dtype, device=device))
        if act_order:
            self.perm = frozen(torch.empty(in_features, dtype=torch.int32, device=device))
        else:
            self.register_parameter("perm", None)

    @classmethod
    @torch.no_grad()
    def from_float(cls, linear: nn.Linear, group_size: int = 128,
                   scale_dtype: torch.dtype | None = None) -> Int4Linear:
        """Round-to-nearest int4 of a float linear; scales and zeros in `scale_dtype` (default: the weight's)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size,
                    scale_dtype or linear.weight.dtype, "meta")
        q, scales, zeros = quantize_int4(linear.weight, group_size, layer.scales.dtype)
        layer.qweight, layer.scales, layer.zeros = frozen(pack_int4(q)), frozen(scales), frozen(zeros)
        if linear.bias is not None:
            layer.bias = frozen(linear.bias.detach())
        return layer

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice = slice(None)) -> torch.Tensor:
        packed = self.qweight[rows]
        n, k, g = packed.shape[0], self.in_features, self.group_size
        scales, zeros = self.scales[rows].to(dtype)[..., None], self.zeros[rows].to(dtype)[..., None]
        # In place on the one float copy, the nibbles converted as they are written into it: a
        # prefill dequantizes every layer, and each temporary of a weight's size is memory traffic.
        weight = torch.empty(n, k, dtype=dtype, device=packed.device)
        weight[:, 0::2], weight[:, 1::2] = packed & 0xF, packed >> 4  # pack_int4's layout
        weight = weight.view(n, k // g, g).sub_(zeros).mul_(scales).view(n, k)
        if self.perm is not None:  # stored column j is input perm[j]
            weight = torch.empty_like(weight).index_copy_(1, self.perm.long(), weight)
        return weight

    def _qwenkit_kernel(self, layers, device, dtype, gemm=False):
        ops = _qwenkit_ops(device, dtype)
        if ops is None or self.in_features % 32 or any(layer.scales.dtype not in (torch.float32, torch.bfloat16)
                                                       for layer in layers):
            return None  # (it reads scales and zeros as they are stored: float32 or bf16)
        qweights = _operands(*(layer.qweight.contiguous() for layer in layers))
        scales = _operands(*(layer.scales.contiguous() for layer in layers))
        zeros = _operands(*(layer.zeros.contiguous() for layer in layers))
        bias, perm = _operands(_joint_bias(layers), None if self.perm is None else self.perm.long())
        group_size, op = self.group_size, ops.int4_gemm if gemm else ops.int4_linear

        def run(x):
            x = x if perm is None else x.index_select(-1, perm)  # stored column j is input perm[j]
            return op(x, qweights, scales, zeros, bias, group_size)
        return run

    def _torch_kernel(self, device, dtype):
        n, k = self.out_features, self.in_features
        if n % 16:
            return None  # both packers tile N by 16
        if device.type == "cpu" and dtype in FLOAT_DTYPES and hasattr(aten, "_weight_int4pack_mm_for_cpu"):
            # Takes int32 values 0..15 [N, K]; its innerKTiles argument is ignored on the CPU.
            packed = aten._convert_weight_to_int4pack_for_cpu(unpack_int4(self.qweight).to(torch.int32), 1)
            mm = aten._weight_int4pack_mm_for_cpu
        elif device.type == "cuda" and dtype == torch.bfloat16 and k % 32 == 0:
            # Takes our bytes with the nibbles swapped (even k high); K is tiled by 16 * innerKTiles.
            inner_k_tiles = 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2
            packed = aten._convert_weight_to_int4pack((self.qweight << 4) | (self.qweight >> 4), inner_k_tiles)
            mm = aten._weight_int4pack_mm
        else:
            return None
        # Both kernels dequantize as (q − 8)·scale + offset, with [K/g, N, 2] (scale, offset) pairs in
        # the activation dtype. Ours is (q − zero)·scale, so offset = (8 − zero)·scale.
        scales, zeros = self.scales.float(), self.zeros.float()
        scale_and_offset = torch.stack((scales, (8 - zeros) * scales), dim=-1).transpose(0, 1)
        packed, scale_and_offset, bias, perm = _operands(packed, scale_and_offset.to(dtype).contiguous(),
                                                          self._bias_in(dtype),
                                                          None if self.perm is None else self.perm.long())
        group_size = self.group_size

        def run(x):
            x = x.contiguous() if perm is None else x.index_select(-1, perm)
            y = mm(x, packed, group_size, scale_and_offset)
            return y if bias is None else y.add_(bias)
        return run

    def extra_repr(self) -> str:
        return super().extra_repr() + (", act_order=True" if self.perm is not None else "")


@functools.cache
def _kernel_verified(cls: type[QuantizedLinear], device: torch.device, dtype: torch.dtype,
                     group_size: int | None) -> bool:
    """Check a fast kernel against dequantize-and-matmul once per layer kind, device, dtype and group
    size, so a kernel whose layout or conventions differ in some torch build (or on a GPU these
    tests never ran on) degrades to the slow path instead of computing garbage."""
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(256, 64)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(64, 256, generator=gen))
        linear.bias.copy_(torch.randn(64, generator=gen))
    layer = cls.from_float(linear, **({"group_size": group_size} if group_size else {})).to(device)
    x = torch.randn(3, 256, generator=gen).to(device=device, dtype=dtype)
    reason = None
    try:
        with torch.no_grad():
            fast = layer._build_kernel(device, dtype)(x).float()
            ref = F.linear(x.float(), layer.dequantize(), layer.bias)
        error = float((fast - ref).norm() / ref.norm())
        if not error < 0.02:
            reason = f"relative error {error:.3g} against dequantize-and-matmul"
    except RuntimeError as e:  # an op missing or refusing in this torch build
        reason = str(e).splitlines()[0]
    if reason:
        warnings.warn(f"{cls.__name__}: the fast {device.type} kernel for {dtype} fails its self-check "
                      f"({reason}); using the slower dequantize-and-matmul path", RuntimeWarning, stacklevel=3)
    return reason is None
