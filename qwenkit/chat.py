"""Chat on the decode loop: OpenAI-style messages in, a reply (or its deltas) out."""

from __future__ import annotations

from collections.abc import Iterator

from .generate import Delta, GenerationResult, generate, stream_generate
from .model import Model
from .prompts import apply_chat_template
from .tokenizer import Tokenizer


def chat(model: Model, tok: Tokenizer, messages: list[dict], tools: list[dict] | None = None,
         **gen) -> GenerationResult:
    """Reply to OpenAI-style messages; options as in `qwenkit.generate`."""
    return generate(model, tok, apply_chat_template(tok, messages, tools=tools), **gen)


def stream_chat(model: Model, tok: Tokenizer, messages: list[dict], tools: list[dict] | None = None,
                **gen) -> Iterator[Delta]:
    """Like `chat`, yielding text deltas as they are decoded."""
    return stream_generate(model, tok, apply_chat_template(tok, messages, tools=tools), **gen)
