"""Opt-in `torch.compile` of the one-token decode step.

    model, tok = qwenkit.load("demo", quantize="int4", compile=True)   # or:
    seconds = qwenkit.compile_decode(model)

A batch-1 decode step is mostly per-op overhead once the weights are int4: a few thousand small
PyTorch calls per token around ~170 matrix-vector kernels. Inductor fuses the norms, RoPE,
attention and residual arithmetic into a few loops, and its C++ wrapper calls them without Python
in between. Only one-token steps with a KV cache run compiled (`Transformer.compiled_decode_blocks`);
prefill, training and cache-less forwards stay eager. The quantized linears' kernels are prepared
by one eager step first and then called from the compiled code as they are (extern kernels), and
greedy text is the same as eager's.

Inductor writes the KV cache in place because each layer's cache is a tensor of its own (model.KVCache);
while the layers were slices of one tensor, its code copied every layer's cache on every step.
Measured: on an H100 (with CUDA graphs of the compiled step) a Qwen-7B-shaped model decodes at 141-143
tok/s in bf16 against 118 for graphs of the eager step, and int4 at 250 against 207, after a 45-160 s
compile; on our 2-core CPU the demo model decodes at 74.8 tok/s in int4 against 60.5 eager, and
50.1 against 43.8 in int8 (benchmarks/peers.py), after a 20-120 s compile, while the bf16 one is slower
(40-50 against 25 ms), because it runs on plain weights where eager uses oneDNN-packed ones
(qwenkit/runtime/packed.py). So it stays opt-in. The quantized linears hand their kernels' tensors over as
frozen Parameters, whose shapes dynamic=True keeps static (quant.linear._operands): as plain tensors
their ~430 sizes were symbols, and the compiled int4 step was no faster than eager.

Sizes that change between steps (cached positions, batch rows, each Decoder's cache length) are
compiled as symbols, so one warm-up covers them: batch 1, plus a batch of several rows for a server.

Before each call, torch.compile checks ~5,000 guards, most of them on the model's modules (their
types, hooks, attributes, each weight's shape): 1.0-1.2 ms of the demo's 13.6 ms int4 step on our
CPU. Those are skipped (`skip_guard_on_all_nn_modules_unsafe`; the guards on the step's inputs
stay), and the compiled step checks the same things itself, once per KV cache rather than once per
step: a model whose modules or weights' shapes, dtypes or devices changed since compile_decode
decodes eagerly from then on, with a warning, until compile_decode compiles it again.
"""

from __future__ import annotations

import time
import types
import warnings
from collections.abc import Iterable

import torch
from torch.fx.experimental import _config as fx_config

from ..model import Model
from .packed import PackedLinear, unpack_linears


def compile_decode(model: Model, batch_sizes: Iterable[int] = (1,), cpp_wrapper: bool | None = None) -> float:
    """Compile `model`'s one-token decode step and warm it up for each batch size; returns the seconds
    it took. Idempotent: a model already compiled returns 0. `cpp_wrapper` (default: on the CPU) calls
    the compiled kernels from C++ rather than Python; on a GPU the CUDA graphs replay them anyway."""
    net = model.model
    if net.compiled_decode_blocks is not None:
        return 0.0
    start = time.perf_counter()
    if any(isinstance(m, PackedLinear) for m in model.modules()):
        warnings.warn("the compiled step runs this model's bf16 weights unpacked, which on a CPU is slower than "
                      "eager with the packed ones (the demo: 40-50 against 25 ms a token); drop --compile "
                      "unless `qwenkit bench --compile` shows a gain here", stacklevel=2)
    unpack_linears(model)  # oneDNN's packed weights are opaque to the tracer
    _warm_up(model, 1)  # eager: quantized linears prepare their kernels outside the trace
    if cpp_wrapper is None:
        cpp_wrapper = model.device.type == "cpu"
    compiled = torch.compile(_own_code(net.blocks), dynamic=True, options={
        "cpp_wrapper": cpp_wrapper, "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
    compiled_for = _structure(net)

    def blocks(tokens, rope, mask, input_pos, cache, q_scale):
        checked = cache.captured if cache.captured is not None else {}  # shared by the cache's views
        if "compiled_step_checked" not in checked:
            if _structure(net) != compiled_for:
                warnings.warn("the model's modules or weights changed after qwenkit.compile_decode, so its "
                              "compiled step would be stale: decoding eagerly; call qwenkit.compile_decode(model) "
                              "again to compile the model as it is now", stacklevel=2)
                net.compiled_decode_blocks = None
                return net.blocks(tokens, rope, mask, input_pos, cache, q_scale)
            checked["compiled_step_checked"] = True
        # Without duck sizing, a batch of 2 rows is not taken to equal the 2 KV heads (which would
        # compile again at the first batch of 3).
        with fx_config.patch(use_duck_shape=False):
            return compiled(tokens, rope, mask, input_pos, cache, q_scale)

    net.compiled_decode_blocks = blocks
    for batch in sorted(set(batch_sizes) | {1}):
        _warm_up(model, batch)
    return time.perf_counter() - start


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
    tokens = torch.zeros(batch, 1, dtype=torch.long, device=model.device)
    # With CUDA graphs on, these steps go through them: the compiled step is then traced as the
    # graphs call it (a mask over the attended length), and later lengths need no recompile.
    with torch.inference_mode():
        for pos in (21, 22):
            model(tokens, torch.full((batch, 1), pos, device=model.device), cache.rows(0, batch))
