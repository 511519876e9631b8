"""Checkpoint names -> qwenkit's module names (transformers' Qwen2 names).

Qwen v1 (`transformer.h.N.attn.c_attn`, `mlp.w1`, ...) is converted on the fly: the fused c_attn is
split into q/k/v with their biases, `w2` (the branch that goes through SiLU) becomes gate_proj and
`w1` up_proj. Renames work on module names, so a quantized layer's tensors (qweight, scales, ...)
and a LoRA adapter's target modules follow their module.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

from .config import ModelConfig
from .errors import CheckpointError

_V1_MODULES = [
    (r"^transformer\.wte$", "model.embed_tokens"),
    (r"^transformer\.ln_f$", "model.norm"),
    (r"^transformer\.h\.(\d+)\.ln_1$", r"model.layers.\1.input_layernorm"),
    (r"^transformer\.h\.(\d+)\.ln_2$", r"model.layers.\1.post_attention_layernorm"),
    (r"^transformer\.h\.(\d+)\.attn\.c_proj$", r"model.layers.\1.self_attn.o_proj"),
    (r"^transformer\.h\.(\d+)\.mlp\.w1$", r"model.layers.\1.mlp.up_proj"),
    (r"^transformer\.h\.(\d+)\.mlp\.w2$", r"model.layers.\1.mlp.gate_proj"),
    (r"^transformer\.h\.(\d+)\.mlp\.c_proj$", r"model.layers.\1.mlp.down_proj"),
]
_V1_QKV = re.compile(r"^transformer\.h\.(\d+)\.attn\.c_attn$")
# Tensors of a quantized linear indexed by input rather than by output row: when c_attn is split,
# q, k and v each get the whole of it (the input permutation of an act-order GPTQ layer).
_PER_INPUT = {"perm"}


def canonical_names(tensors: Iterable[tuple[str, torch.Tensor]], config: ModelConfig,
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) pairs -> (canonical name, tensor) pairs, Qwen v1 converted."""
    for name, tensor in tensors:
        if config.arch == "qwen":
            yield from _from_v1(name, tensor, config)
        else:
            yield name, tensor


def canonical_modules(module: str, config: ModelConfig) -> list[str]:
    """The canonical module(s) a checkpoint module becomes: Qwen v1's c_attn is three (q, k, v)."""
    if config.arch != "qwen":
        return [module]
    m = _V1_QKV.match(module)
    if m:
        return [f"model.layers.{m[1]}.self_attn.{proj}_proj" for proj in "qkv"]
    for pattern, replacement in _V1_MODULES:
        new, n = re.subn(pattern, replacement, module)
        if n:
            return [new]
    return [module]  # lm_head keeps its name; anything else is reported as unexpected


def _from_v1(name: str, tensor: torch.Tensor, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    module, _, attr = name.rpartition(".")
    targets = canonical_modules(module, config)
    if len(targets) == 1:
        yield f"{targets[0]}.{attr}".lstrip("."), tensor  # lstrip: a top-level name stays as it is
    elif attr in _PER_INPUT:  # copies: safetensors refuses to save one tensor under three names
        for target in targets:
            yield f"{target}.{attr}", tensor.clone()
    else:
        width = config.num_heads * config.head_dim
        if tensor.shape[0] != 3 * width:
            raise CheckpointError(f"{name} has {tensor.shape[0]} rows, expected 3 x {width} (q, k, v)")
        for target, part in zip(targets, tensor.split(width)):
            yield f"{target}.{attr}", part
