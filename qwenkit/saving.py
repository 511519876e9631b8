"""Write a model and its tokenizer as a checkpoint directory that `qwenkit.load(dir)` reads back.

Any model `load()` returns can be saved, float or quantized, whatever its source (Hugging Face,
GGUF, a merged fine-tune). The directory is a Hugging Face Qwen2/Qwen3 checkpoint:

    model.safetensors        the state dict under canonical names: float weights, or a quantized
                             linear's portable tensors (`...q_proj.qweight`, `scales`, `zeros`)
    config.json              from the model's ModelConfig, plus "quantization_config" when quantized
    tokenizer.json, tokenizer_config.json   (or qwen.tiktoken for Qwen v1)
    generation_config.json   the model's generation defaults

Everything is written into a temporary directory beside `out_dir` and renamed into place, so an
interrupted save never leaves a half-written checkpoint where a complete one is expected.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from .errors import QwenkitError
from .model import Model
from .quant import QuantizedLinear, quantization_config
from .tokenizer import Tokenizer


def save_checkpoint(model: Model, tokenizer: Tokenizer, out_dir: str | Path, force: bool = False,
                    quantization: dict | None = None) -> Path:
    """Save `model` and `tokenizer` to `out_dir`; returns its path.

    force: replace an existing non-empty `out_dir` (refused otherwise).
    quantization: facts about how the model was quantized (method, act-order, calibration data ...),
        added to config.json's quantization_config next to what the layers themselves tell.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        _write(model, tokenizer, tmp, quantization)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)  # out_dir is only ever missing between these two renames
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def check_out_dir(out_dir: str | Path, force: bool) -> None:
    """Refuse an output path that is a file, or a non-empty directory unless `force` (checked before
    any long work starts, so a mistake costs nothing)."""
    out_dir = Path(out_dir)
    if out_dir.is_file():
        raise QwenkitError(f"output path {out_dir} is a file; pass a directory path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise QwenkitError(f"output directory {out_dir} exists and is not empty; choose another one, "
                           "or replace it with --force (force=True)")


def _write(model: Model, tokenizer: Tokenizer, directory: Path, quantization: dict | None) -> None:
    config = model.config
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as the embedding; load() ties them again
    save_file({name: t.contiguous() for name, t in state.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})

    hf_config = config.to_hf_dict() | {"torch_dtype": str(model.dtype).removeprefix("torch.")}
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        hf_config["quantization_config"] = quantization_config(model) | (quantization or {})
    elif quantization:
        raise QwenkitError("quantization details were given for a model with no quantized layers")
    _write_json(directory / "config.json", hf_config)
    _write_json(directory / "generation_config.json", getattr(model, "generation_config", None) or {})
    tokenizer.save_pretrained(directory)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
