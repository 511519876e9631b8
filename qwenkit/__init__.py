"""qwenkit: a PyTorch-native toolkit for Qwen-family language models."""

from importlib.metadata import PackageNotFoundError, version

from .chat import chat, stream_chat
from .config import ModelConfig
from .generate import GenerationResult, generate, generate_batch, stream_generate
from .loading import load
from .model import KVCache, Model
from .prompts import apply_chat_template
from .runtime.compiled import compile_decode
from .sampling import SamplingParams
from .tokenizer import Tokenizer

try:
    __version__ = version("qwenkit")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

__all__ = ["GenerationResult", "KVCache", "Model", "ModelConfig", "SamplingParams", "Tokenizer",
           "apply_chat_template", "chat", "compile_decode", "generate", "generate_batch", "load", "stream_chat",
           "stream_generate", "__version__"]
