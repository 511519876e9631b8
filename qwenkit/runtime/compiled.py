"""Opt-in `torch.compile` of the one-token decode step.

    model, tok = qwenkit.load("demo", quantize="int4", compile=True)   # or:
    seconds = qwenkit.compile_decode(model)

A batch-1 decode step is mostly per-op overhead once the weights are int4: thousands of small
PyTorch calls per token around a few matrix-vector kernels per layer. Inductor fuses the norms, RoPE,
attention and residual arithmetic into a few loops, and its C++ wrapper calls them without Python
in between. Only the one-token steps a decode loop takes run compiled (runtime/decode.py: the
loop's step calls the compiled `Transformer.blocks`); prefill, training and plain forwards stay
eager. The quantized linears' kernels are prepared by one eager step first and then called from the
compiled code as they are (extern kernels), and greedy text is the same as eager's.

It stays opt-in: it pays for quantized weights on a CPU and, with CUDA graphs, on a GPU, after a
one-off compile; but float weights on a CPU decode slower compiled, because it runs them plain where
eager reads them with qwenkit's bf16 kernel or oneDNN's packed layout (qwenkit/runtime/packed.py). See
benchmarks/results/README.md, "Quantized decode against llama.cpp and transformers" and "GPU: one H100, 2026-11-27".

Inductor writes the KV cache in place because each layer's cache is a tensor of its own
(model.KVCache), and the quantized linears' tensors arrive as frozen Parameters, whose shapes stay
static under dynamic=True (quant.linear._operands). Sizes that do change between steps (cached
positions, batch rows, each Decoder's cache length) are symbols, so one warm-up covers them: batch 1,
plus a batch of several rows for a server.

torch.compile's per-call guards on the model's modules (thousands, a noticeable share of a small
model's step) are skipped (`skip_guard_on_all_nn_modules_unsafe`; the guards on the step's inputs
stay). The compiled step checks the same things itself, once per decode loop's step: a model whose modules or
weights' shapes, dtypes or devices changed since compile_decode decodes eagerly from then on, with a
warning, until compile_decode compiles it again.
"""

from __future__ import annotations

import time
import types
import warnings
from collections.abc import Iterable

import torch
from torch.fx.experimental import _config as fx_config

from ..errors import QwenkitError
from ..model import Model
from .decode import decode_setup, decode_step
from .packed import Bf16Linear, PackedLinear, unpack_linears


def compile_decode(model: Model, batch_sizes: Iterable[int] = (1,), cpp_wrapper: bool | None = None) -> float:
    """Compile `model`'s one-token decode step and warm it up for each batch size; returns the seconds
    it took. Idempotent: a model already compiled returns 0. `cpp_wrapper` (default: on the CPU) calls
    the compiled kernels from C++ rather than Python; on a GPU the CUDA graphs replay them anyway."""
    if getattr(model, "tensor_parallel", None) is not None:
        # Tried (torch 2.13, gloo): traced or left eager between graphs, the all-reduces gave NaN logits with AVX2
        # code and a corrupted heap natively.
        raise QwenkitError("compile_decode (--compile) does not compile a tensor-parallel shard (--tp) yet: decode "
                           "it eagerly")
    if getattr(model, "layer_split", None) is not None:
        raise QwenkitError("compile_decode (--compile) does not compile a model split over devices "
                           "(qwenkit.parallel's layer split): decode it eagerly, or load it on one device")
    setup = decode_setup(model)
    if setup.compiled is not None:
        return 0.0
    start = time.perf_counter()
    if any(isinstance(m, (Bf16Linear, PackedLinear)) for m in model.modules()):
        warnings.warn("the compiled step runs this model's float weights unpacked, which on a CPU is slower than "
                      "eager with qwenkit's bf16 kernel or oneDNN's packed layout; drop --compile "
                      "unless `qwenkit bench --compile` shows a gain here", stacklevel=2)
    unpack_linears(model)  # the tracer cannot read oneDNN's packed weights, nor call qwenkit's bf16 kernel
    _warm_up(model, 1)  # eager: quantized linears prepare their kernels outside the trace
    if cpp_wrapper is None:
        cpp_wrapper = model.device.type == "cpu"
    setup.compiled = CompiledBlocks(model.model, cpp_wrapper)
    for batch in sorted(set(batch_sizes) | {1}):
        _warm_up(model, batch)
    return time.perf_counter() - start


class CompiledBlocks:
    """A model's Transformer.blocks compiled, called as blocks is."""

    def __init__(self, net: torch.nn.Module, cpp_wrapper: bool):
        self.compiled = torch.compile(_own_code(net.blocks), dynamic=True, options={
            "cpp_wrapper": cpp_wrapper, "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
        self.compiled_for = _structure(net)

    def fits(self, net: torch.nn.Module) -> bool:
        """Whether `net` is as it was compiled (what the skipped guards would check); warns if not."""
        if _structure(net) == self.compiled_for:
            return True
        warnings.warn("the model's modules or weights changed after qwenkit.compile_decode, so its "
                      "compiled step would be stale: decoding eagerly; call qwenkit.compile_decode(model) "
                      "again to compile the model as it is now", stacklevel=4)
        return False

    def __call__(self, tokens, rope, mask, write_pos, cache, q_scale):
        # Without duck sizing, a batch of 2 rows is not taken to equal the 2 KV heads (which would
        # compile again at the first batch of 3).
        with fx_config.patch(use_duck_shape=False):
            return self.compiled(tokens, rope, mask, write_pos, cache, q_scale)


def _own_code(method):
    """`method` bound to a copy of its code object. torch.compile keeps compiled steps per code
    object, and with the module guards skipped, another model's compiled `blocks` would pass for
    this one's: a copy per model keeps each model's compiled steps apart."""
    fn = method.__func__
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return copy.__get__(method.__self__)


def _structure(net: torch.nn.Module) -> list:
    """What the skipped guards would check, in brief: each module's class and each weight's shape,
    dtype and device. Weights changed in place, or replaced by tensors of the same kind, leave it
    (and the compiled step, which reads them at each call) as it was."""
    return [(name, type(m)) for name, m in net.named_modules()] + \
           [(name, p.shape, p.dtype, p.device) for name, p in net.named_parameters()]


def _warm_up(model: Model, batch: int) -> None:
    """Two decode steps at distinct cache lengths (sizes 0 and 1 would be specialised, not symbols),
    on a cache made and viewed as Decoder makes and views its own (guards check how tensors were made)."""
    cache = model.new_cache(batch, 37)
    step = decode_step(model, cache)
    tokens = torch.zeros(batch, 1, dtype=torch.long, device=model.device)
    # With CUDA graphs on, these steps go through them: the compiled step is then traced as the
    # graphs call it (a mask over the attended length), and later lengths need no recompile.
    with torch.inference_mode():
        for pos in (21, 22):
            step(tokens, torch.full((batch, 1), pos, device=model.device), cache.rows(0, batch))
