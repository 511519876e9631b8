"""Hugging Face checkpoints: safetensors (single or sharded) and pytorch_model.bin -> canonical tensors.

Canonical names are transformers' Qwen2 names. Qwen v1 (`transformer.h.N.attn.c_attn`, `mlp.w1`,
...) is converted on the fly: the fused c_attn is split into q/k/v with their biases, `w2` (the
branch that goes through SiLU) becomes gate_proj and `w1` up_proj.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import CheckpointError

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")

# Buffers some checkpoints carry that the model recomputes.
_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|attn\.masked_bias)$")

_V1_RENAMES = [
    (r"^transformer\.wte\.weight$", "model.embed_tokens.weight"),
    (r"^transformer\.ln_f\.weight$", "model.norm.weight"),
    (r"^transformer\.h\.(\d+)\.ln_1\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (r"^transformer\.h\.(\d+)\.ln_2\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"^transformer\.h\.(\d+)\.attn\.c_proj\.(weight|bias)$", r"model.layers.\1.self_attn.o_proj.\2"),
    (r"^transformer\.h\.(\d+)\.mlp\.w1\.weight$", r"model.layers.\1.mlp.up_proj.weight"),
    (r"^transformer\.h\.(\d+)\.mlp\.w2\.weight$", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"^transformer\.h\.(\d+)\.mlp\.c_proj\.weight$", r"model.layers.\1.mlp.down_proj.weight"),
]
_V1_QKV = re.compile(r"^transformer\.h\.(\d+)\.attn\.c_attn\.(weight|bias)$")


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


def canonical_tensors(files: list[Path], config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint under its canonical name (Qwen v1 converted)."""
    for path in files:
        for name, tensor in read_tensors(path):
            if _IGNORED.match(name):
                continue
            if config.arch == "qwen":
                yield from _from_v1(name, tensor, config)
            else:
                yield name, tensor


def _from_v1(name: str, tensor: torch.Tensor, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    m = _V1_QKV.match(name)
    if m:
        layer, kind = m.groups()
        width = config.num_heads * config.head_dim
        if tensor.shape[0] != 3 * width:
            raise CheckpointError(f"{name} has {tensor.shape[0]} rows, expected 3 x {width} (q, k, v)")
        for proj, part in zip("qkv", tensor.split(width)):
            yield f"model.layers.{layer}.self_attn.{proj}_proj.{kind}", part
        return
    for pattern, replacement in _V1_RENAMES:
        new, n = re.subn(pattern, replacement, name)
        if n:
            yield new, tensor
            return
    yield name, tensor  # lm_head.weight keeps its name; anything else is reported as unexpected
