"""Hugging Face checkpoints: safetensors (single or sharded) and pytorch_model.bin -> canonical tensors.

Canonical names are transformers' Qwen2 names. Qwen v1 (`transformer.h.N.attn.c_attn`, `mlp.w1`,
...) is converted on the fly: the fused c_attn is split into q/k/v with their biases, `w2` (the
branch that goes through SiLU) becomes gate_proj and `w1` up_proj. Renames work on module names,
so a quantized layer's tensors (qweight, scales, ...) follow their module.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import CheckpointError

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")

# Buffers some checkpoints carry that the model recomputes.
_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|attn\.masked_bias)$")

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


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, in load order."""
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{path} is not a valid shard index ({e}); re-download the checkpoint") from e
            shards = [directory / s for s in dict.fromkeys(weight_map.values())]
            missing = [str(s) for s in shards if not s.is_file()]
            if missing:
                raise CheckpointError(f"{path} lists shards that are not on disk: {', '.join(missing)}; "
                                      "finish the download or re-download the checkpoint")
            return shards
        return [path]
    raise CheckpointError(
        f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILES)} "
        "(or pass a .gguf file)")


def read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Raw (name, tensor) pairs of one weight file, one tensor at a time."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it is probably "
                                  "truncated or corrupt: re-download it") from e
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises several unrelated types for a damaged zip/pickle
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({e}); it is probably "
                                  "truncated or corrupt: re-download it") from e
        yield from state.items()


def checkpoint_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint under its own name, buffers the model recomputes left out."""
    for path in files:
        for name, tensor in read_tensors(path):
            if not _IGNORED.match(name):
                yield name, tensor


def tensor_names(files: list[Path]) -> list[str]:
    """The checkpoint's tensor names; for safetensors from the headers alone, without reading data."""
    names = []
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                names += f.keys()
        else:
            names += [name for name, _ in read_tensors(path)]
    return [name for name in names if not _IGNORED.match(name)]


def canonical_tensors(files: list[Path], config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint under its canonical name (Qwen v1 converted)."""
    return canonical_names(checkpoint_tensors(files), config)


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
