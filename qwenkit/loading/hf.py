"""Hugging Face checkpoints: safetensors (single or sharded) and pytorch_model.bin -> (name, tensor)
pairs as stored (qwenkit.checkpoint_names turns the names into the model's)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")

# Buffers some checkpoints carry that the model recomputes.
_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|attn\.masked_bias)$")



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


def sliceable_tensors(files: list[Path]) -> Iterator[tuple[str, Any]]:
    """Every tensor of the checkpoint under its own name (buffers the model recomputes left out), unread: a
    safetensors slice (get_slice: indexing it reads those rows or columns alone) or a memory-mapped tensor."""
    for path in files:
        if path.suffix != ".safetensors":
            yield from ((name, t) for name, t in read_tensors(path) if not _IGNORED.match(name))
            continue
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if not _IGNORED.match(name):
                        yield name, f.get_slice(name)
        except SafetensorError as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it is probably "
                                  "truncated or corrupt: re-download it") from e


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
