"""`load()`: any supported source -> (Model, Tokenizer).

Sources: a Hugging Face checkpoint directory, a `.gguf` file, a hub id (Hugging Face or
`modelscope:`), or `demo`. The model is built on the meta device and each tensor is assigned
as it is read, so peak memory stays near the size of the final weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import CheckpointError
from ..model import Model
from ..progress import progress
from ..tokenizer import Tokenizer
from . import hf, hub

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto`: the fastest dtype that is still accurate on the device (bf16 where it has bf16 math)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    # oneDNN runs bf16 matmuls natively with AVX512-BF16/AMX: prefill about 2x fp32 on our CPUs.
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


QUANTIZE_BITS = {"int8": 8, "int4": 4}


def load(model: str | Path = "demo", dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
         quantize: str | None = None) -> tuple[Model, Tokenizer]:
    """Load a Qwen model and its tokenizer. See the module docstring for the accepted sources.

    `quantize`: None, "int8" or "int4" — weight-only round-to-nearest quantization after loading
    (see qwenkit.quant.quantize_model: the lm_head becomes int8 in both cases).
    """
    if quantize is not None and quantize not in QUANTIZE_BITS:
        raise ValueError(f"quantize={quantize!r}: use None, 'int8' or 'int4'")
    path = resolve_source(model)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if path.is_file():
        net, tokenizer = _load_gguf(path, dtype, device)
    else:
        config = ModelConfig.from_file(path / "config.json")
        files = hf.weight_files(path)
        tokenizer = Tokenizer.from_pretrained(path)
        total = sum(f.stat().st_size for f in files)
        net = build_model(config, hf.canonical_tensors(files, config), dtype, device,
                          description=f"loading {path.name}", total_bytes=total)
        net.generation_config = _read_json(path / "generation_config.json")
    if quantize is not None:
        from ..quant import quantize_model
        quantize_model(net, bits=QUANTIZE_BITS[quantize])
    return net, tokenizer


def resolve_source(model: str | Path) -> Path:
    """A local path for `model`: demo, an existing path, or a hub id (downloaded)."""
    from .demo import demo_gguf_path

    name = str(model)
    if name == "demo":
        return demo_gguf_path()
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ggufs[0]
            raise CheckpointError(f"{path} has no config.json" + (
                f" and {len(ggufs)} .gguf files: pass one of them" if ggufs else
                ": pass a Hugging Face checkpoint directory (config.json + weights) or a .gguf file"))
        if path.is_file() and path.suffix != ".gguf":
            raise CheckpointError(f"{path} is a file but not a .gguf; pass a .gguf file or a checkpoint directory")
        return path
    if hub.looks_like_hub_id(name):
        return resolve_source(hub.download(name))
    raise CheckpointError(f"{name!r} does not exist: pass a checkpoint directory, a .gguf file, "
                          "a hub id such as Qwen/Qwen2.5-0.5B-Instruct, or demo")


def _load_gguf(path: Path, dtype: torch.dtype, device: torch.device) -> tuple[Model, Tokenizer]:
    from .gguf import GGUFFile

    gguf = GGUFFile(path)
    config = gguf.config()
    tokenizer = Tokenizer.from_gguf_fields(gguf.tokenizer_fields())
    net = build_model(config, gguf.tensors(dtype), dtype, device, description=f"loading {path.name}",
                      total_bytes=path.stat().st_size)
    net.generation_config = dict(GGUF_GENERATION_DEFAULTS[config.arch], eos_token_id=tokenizer.eos_token_id)
    return net, tokenizer


# GGUF files carry no generation_config.json: use what the official chat checkpoints of each
# generation ship (Qwen-7B-Chat; Qwen2/2.5-Instruct; Qwen3 in thinking mode).
GGUF_GENERATION_DEFAULTS = {
    "qwen": {"top_p": 0.8, "top_k": 0, "repetition_penalty": 1.1, "max_new_tokens": 512},
    "qwen2": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "max_new_tokens": 512},
    "qwen3": {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 512},
}


def build_model(config: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype,
                device: torch.device, description: str = "loading", total_bytes: int = 0) -> Model:
    """Build on the meta device, then assign each (canonical name, tensor) as it arrives."""
    with torch.device("meta"):
        net = Model(config)
    expected = dict(net.named_parameters())
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    unexpected = []
    with progress(description, total_bytes, bytes_=True, show=total_bytes > 256 << 20) as advance:
        for name, tensor in tensors:
            advance(tensor.numel() * tensor.element_size())
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # some tied checkpoints store the head too; it equals the embedding
            if name not in expected:
                unexpected.append(name)
                continue
            param = expected[name]
            if tuple(tensor.shape) != tuple(param.shape):
                raise CheckpointError(f"tensor {name} has shape {tuple(tensor.shape)} but the config implies "
                                      f"{tuple(param.shape)}: config.json and the weights do not match")
            _assign(net, name, tensor.to(device=device, dtype=dtype))
    if unexpected:
        raise CheckpointError(f"the checkpoint has {len(unexpected)} tensors this architecture does not use, "
                              f"e.g. {', '.join(unexpected[:5])}: is config.json for these weights?")
    if config.tie_word_embeddings:
        net.lm_head.weight = net.model.embed_tokens.weight
    missing = [n for n, p in net.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:5])}: "
                              "the download may be incomplete")
    return net.eval()


def _assign(net: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(net.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=False))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); fix or delete it") from e
