"""Quantize a model from outside: swap its nn.Linear modules for Int8Linear / Int4Linear.

The lm_head defaults to int8 whatever the block bits. It is the largest single matrix of the
small Qwen models (151936 x 896 in Qwen2.5-0.5B, a fifth of the weights, so a large share of a
decode step), and the logits are where precision shows first: an int4 head makes greedy text leave
bf16's much sooner than an int8 one (benchmarks/results/README.md, "Quality of each quantization").
`lm_head_bits=4` takes the speed anyway; `lm_head_bits=None` keeps the head in float.

Tied embeddings: the embedding lookup needs the float table, so a quantized head gets its own
copy of the weights and the model is untied (config.tie_word_embeddings becomes False). That
costs the int8 table in memory but halves what every decode step reads for the head."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from fnmatch import fnmatch

from torch import nn

from ..runtime.packed import unpack_linears
from .linear import INT4_GROUP_SIZES, Int4Linear, Int8Linear, QuantizedLinear

QUANT_METHOD = "qwenkit"
LAYER_CLASSES = {8: Int8Linear, 4: Int4Linear}


def quantize_model(model: nn.Module, bits: int = 8, group_size: int = 128, lm_head_bits: int | None = 8,
                   skip: Iterable[str] = ()) -> nn.Module:
    """Round-to-nearest weight-only quantization of `model`, in place; returns the model.

    bits: 8 or 4, for every linear in the blocks (q/k/v/o projections, gate/up/down).
    group_size: inputs per int4 scale/zero (32, 64, 128 or 256); a linear whose input width is
        not a multiple of it stays in float (with a warning).
    lm_head_bits: 8, 4 or None (float) for the output head; see the module docstring.
    skip: module names or fnmatch patterns ("*.down_proj") to leave in float.

    Layers are converted one at a time and each float weight is dropped as soon as its quantized
    form exists, so memory stays near the float model plus one layer's scratch.
    """
    check_settings(bits, group_size, lm_head_bits)
    unpack_linears(model)  # quantizers read and replace plain nn.Linear (a CPU load packs them)
    skip = tuple(skip)
    untie = lm_head_bits is not None and getattr(model.config, "tie_word_embeddings", False)
    _swap_linears(model, bits, group_size, lm_head_bits,
                  lambda name: any(fnmatch(name, pattern) for pattern in skip),
                  lambda cls, linear, kw: cls.from_float(linear, **kw))
    if untie and isinstance(model.get_submodule("lm_head"), QuantizedLinear):
        model.config.tie_word_embeddings = False
    return model


def quantization_config(model: nn.Module) -> dict:
    """What to store under config.json's "quantization_config" for a model quantize_model made."""
    head, blocks, not_converted, act_order = None, set(), [], set()
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            if isinstance(module, Int4Linear):
                act_order.add(module.perm is not None)
            kind = (module.bits, module.group_size)
            if name == "lm_head":
                head = kind
            else:
                blocks.add(kind)
        elif isinstance(module, nn.Linear):
            not_converted.append(name)
    kinds = blocks | ({head} if head else set())
    group_sizes = {g for _, g in kinds if g is not None}
    if len(blocks) != 1 or len(group_sizes) > 1:
        raise ValueError(f"the model's block linears are quantized as {sorted(blocks, key=str) or 'nothing'}: "
                         "a quantization_config describes one bits/group_size for all of them")
    if len(act_order) > 1:
        raise ValueError("some int4 linears have an input permutation (act_order) and some do not: "
                         "a quantization_config describes one act_order for all of them")
    (bits, _), = blocks
    return {"quant_method": QUANT_METHOD, "bits": bits, "group_size": next(iter(group_sizes), None),
            "lm_head_bits": head[0] if head else None, "modules_not_converted": not_converted,
            "act_order": act_order == {True}}


def apply_quantization_config(model: nn.Module, qconfig: dict) -> nn.Module:
    """Swap in empty quantized modules as `qconfig` describes, in place; returns the model.

    For loading a saved quantized checkpoint: build the model (on the meta device), apply its
    quantization_config, then assign the saved tensors by name as for a float checkpoint.
    """
    if qconfig.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"quantization_config quant_method is {qconfig.get('quant_method')!r}; "
                         f"only {QUANT_METHOD!r} checkpoints (made by quantize_model) load this way")
    bits, lm_head_bits = qconfig.get("bits"), qconfig.get("lm_head_bits")
    group_size = qconfig.get("group_size") or 128  # unused when nothing is int4
    check_settings(bits, group_size, lm_head_bits)
    keep_float = set(qconfig.get("modules_not_converted", ()))
    act_order = {"act_order": True} if qconfig.get("act_order") else {}  # int4 layers hold a `perm`
    _swap_linears(model, bits, group_size, lm_head_bits, lambda name: name in keep_float,
                  lambda cls, linear, kw: cls(linear.in_features, linear.out_features, linear.bias is not None,
                                              dtype=linear.weight.dtype, device=linear.weight.device,
                                              **kw, **(act_order if cls is Int4Linear else {})))
    return model


def check_settings(bits, group_size, lm_head_bits) -> None:
    if bits not in LAYER_CLASSES:
        raise ValueError(f"bits must be 8 or 4, not {bits!r}")
    if lm_head_bits is not None and lm_head_bits not in LAYER_CLASSES:
        raise ValueError(f"lm_head_bits must be 8, 4 or None (float), not {lm_head_bits!r}")
    if 4 in (bits, lm_head_bits) and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, not {group_size!r}")


def _swap_linears(model: nn.Module, bits: int, group_size: int, lm_head_bits: int | None,
                  keep_float: Callable[[str], bool], make: Callable[[type, nn.Linear, dict], nn.Module]) -> None:
    """Replace each nn.Linear not kept in float by `make(layer class, linear, class kwargs)`."""
    names = [name for name, m in model.named_modules() if type(m) is nn.Linear and not keep_float(name)]
    for name in names:  # by name, so no list keeps a replaced float weight alive
        layer_bits = lm_head_bits if name == "lm_head" else bits
        if layer_bits is None:
            continue
        linear = model.get_submodule(name)
        if layer_bits == 4 and linear.in_features % group_size:
            warnings.warn(f"{name} stays in float: its {linear.in_features} inputs are not a multiple of "
                          f"the int4 group size {group_size}", stacklevel=3)
            continue
        kwargs = {"group_size": group_size} if layer_bits == 4 else {}
        model.set_submodule(name, make(LAYER_CLASSES[layer_bits], linear, kwargs))
