"""The Qwen-7B release's chat API, for callers of its scripts: `model.chat(tokenizer, query, history)`
returns (response, new history) and `model.chat_stream(...)` yields the cumulative response.

`load()` returns models with these two methods (ChatMethods); `chat` and `chat_stream` below are the
same as functions. They take the release's keyword arguments (stop_words_ids, generation_config,
do_sample, max_window_size) besides qwenkit.generate's options.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

from .generate import SAMPLING_FIELDS, generate, stream_generate
from .model import Model
from .prompts import DEFAULT_SYSTEM, history_prompt
from .tokenizer import Tokenizer


def generate_options(tok: Tokenizer, stop_words_ids=None, generation_config=None, do_sample=None, **gen) -> dict:
    """The release's keyword arguments -> generate() options (stop_words_ids, generation_config, do_sample)."""
    if "stream" in gen:
        raise TypeError("chat(stream=...) is gone, as in the Qwen-7B release: use model.chat_stream(...)")
    config = dict(generation_config.to_dict() if hasattr(generation_config, "to_dict") else generation_config or {})
    options = {k: config[k] for k in (*SAMPLING_FIELDS, "max_new_tokens") if config.get(k) is not None}
    if do_sample is False or (do_sample is None and config.get("do_sample") is False):
        options["temperature"] = 0.0
    options.update(gen)
    stop_ids = [seq for seq in (stop_words_ids or []) + config.get("stop_words_ids", [])]
    options["stop_token_ids"] = list(options.get("stop_token_ids", [])) + [seq[0] for seq in stop_ids if len(seq) == 1]
    multi = [tok.decode(seq) for seq in stop_ids if len(seq) > 1]
    if multi:
        options["stop"] = list(options.get("stop", [])) + multi
    return options


def chat(model: Model, tok: Tokenizer, query: str, history=None, system: str = DEFAULT_SYSTEM,
         max_window_size: int | None = None, **gen) -> tuple[str, list[tuple[str, str]]]:
    """Returns (response, new history); the caller's history is untouched."""
    history = copy.deepcopy(list(history or []))
    prompt = history_prompt(tok, query, history, system, max_window_size, model.generation_config)
    response = generate(model, tok, prompt, **generate_options(tok, **gen)).text.strip()
    history.append((query, response))
    return response, history


def chat_stream(model: Model, tok: Tokenizer, query: str, history=None, system: str = DEFAULT_SYSTEM,
                max_window_size: int | None = None, **gen) -> Iterator[str]:
    """Yields the cumulative response (not deltas), as the release's chat_stream does."""
    prompt = history_prompt(tok, query, list(history or []), system, max_window_size, model.generation_config)
    text = ""
    for delta in stream_generate(model, tok, prompt, **generate_options(tok, **gen)):
        if delta.text:
            text += delta.text
            yield text.strip()


class ChatMethods:
    """`model.chat` and `model.chat_stream` as methods, as the release's remote code defines them."""

    def chat(self, tokenizer: Tokenizer, query: str, history=None, system: str = DEFAULT_SYSTEM, **kwargs):
        return chat(self, tokenizer, query, history, system, **kwargs)

    def chat_stream(self, tokenizer: Tokenizer, query: str, history=None, system: str = DEFAULT_SYSTEM, **kwargs):
        return chat_stream(self, tokenizer, query, history, system, **kwargs)


class ChatModel(ChatMethods, Model):
    """What load() builds: the plain Model plus the release's chat methods."""
