"""Conversations -> prompt token ids.

Qwen v1 has no chat template: its ChatML is built piece by piece exactly as the Qwen-7B scripts'
`make_context` does (token-exact). Newer checkpoints carry a Jinja template, rendered with the
globals transformers provides. In both, text inside messages never becomes a control token: a
user who types `<|im_end|>` gets those characters, not the end of their turn.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a tokenizer renders its chat template through this module
    from .tokenizer import Tokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."
DEFAULT_MAX_WINDOW = 6144
MAX_JSON_DEPTH = 64  # nesting of messages and tools (and of a server request): deeper is nobody's schema

# ------------------------------------------------------------------------- Qwen v1 ChatML


def chatml_segment(tok: Tokenizer, role: str, content: str) -> list[int]:
    nl = tok.encode("\n", allowed_special=set())
    return ([tok.im_start_id] + tok.encode(role, allowed_special=set()) + nl
            + tok.encode(content, allowed_special=set()) + [tok.im_end_id])


def render_qwen_v1(tok: Tokenizer, query: str, history: Sequence[tuple[str, str]] = (),
                   system: str = DEFAULT_SYSTEM, max_window_size: int = DEFAULT_MAX_WINDOW) -> list[int]:
    """The Qwen-7B scripts' make_context: system, as many newest history turns as fit, the query, 'assistant\\n'.

    A history turn is kept only while system + kept turns + it stay under max_window_size; the
    first turn that does not fit drops itself and everything older. The query is never dropped.
    """
    nl = tok.encode("\n", allowed_special=set())
    system_tokens = chatml_segment(tok, "system", system)
    kept: list[int] = []
    for user, assistant in reversed(list(history)):
        turn = nl + chatml_segment(tok, "user", user) + nl + chatml_segment(tok, "assistant", assistant)
        if len(system_tokens) + len(turn) + len(kept) >= max_window_size:
            break
        kept = turn + kept
    return (system_tokens + kept + nl + chatml_segment(tok, "user", query) + nl
            + [tok.im_start_id] + tok.encode("assistant", allowed_special=set()) + nl)


def _render_chatml_messages(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Plain ChatML for a template-less (Qwen v1) tokenizer, built like render_qwen_v1."""
    nl = tok.encode("\n", allowed_special=set())
    if not messages or messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}] + messages
    ids: list[int] = []
    for m in messages:
        ids += (nl if ids else []) + chatml_segment(tok, m["role"], text_of(m.get("content")))
    if add_generation_prompt:
        ids += nl + [tok.im_start_id] + tok.encode("assistant", allowed_special=set()) + nl
    return ids


def text_of(content) -> str:
    """Message content as text: a string, None, or OpenAI-style content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


# ------------------------------------------------------------------------- Jinja templates

@lru_cache(maxsize=8)
def _compile(template: str):
    # jinja2 is imported only when a template is rendered.
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # The builtin tojson escapes HTML characters; chat templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    return env.from_string(template)


_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")


def render_template(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None, **kwargs) -> list[int]:
    """Render the checkpoint's Jinja template and encode it, guarding message text.

    Control-token text inside messages and tools is swapped for placeholders before rendering,
    so only the template itself can produce control tokens; afterwards the text is restored and
    encoded as ordinary characters, in context, so everything else tokenizes as transformers does.
    """
    controls = tok.control_tokens
    escaped: list[str] = []
    control = "|".join(re.escape(t) for t in sorted(controls, key=len, reverse=True)) or "(?!)"
    # The placeholders' own delimiters are escaped too, so text that imitates a placeholder stays text.
    pattern = re.compile(f"{control}|\ue000|\ue001")

    def escape(value, depth=0):
        if depth > MAX_JSON_DEPTH:  # the depth is the caller's: bound the recursion before Python does
            raise ValueError(f"messages or tools nest deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, str):
            if not pattern.search(value):
                return value

            def swap(m):
                escaped.append(m.group(0))
                return f"\ue000{len(escaped) - 1}\ue001"
            return pattern.sub(swap, value)
        if isinstance(value, dict):
            return {escape(k): escape(v, depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [escape(v, depth + 1) for v in value]
        return value

    special = {"bos_token": tok.special_text(tok.bos_token_id), "eos_token": tok.special_text(tok.eos_token_id),
               "pad_token": tok.special_text(tok.pad_token_id)}
    text = _compile(tok.chat_template).render(
        messages=escape(copy.deepcopy(messages)), tools=escape(tools) if tools else None,
        add_generation_prompt=add_generation_prompt, **{**special, **kwargs})
    if not escaped:
        return tok.encode(text, allowed_special="all")
    # Split only at control tokens the template wrote; escaped ones go back as plain text.
    ids: list[int] = []
    plain = ""
    for piece in re.split(f"(\ue000\\d+\ue001|{control})", text):
        if piece in controls:
            ids += tok.encode(plain, allowed_special=set()) + [controls[piece]]
            plain = ""
        elif (m := _PLACEHOLDER.fullmatch(piece)):
            plain += escaped[int(m.group(1))]
        else:
            plain += piece
    return ids + tok.encode(plain, allowed_special=set())


def apply_chat_template(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                        tools: list[dict] | None = None, **kwargs) -> list[int]:
    """Messages (OpenAI style) -> prompt ids, with the checkpoint's template or Qwen v1 ChatML."""
    _check_messages(messages)
    if tok.chat_template:
        return render_template(tok, messages, add_generation_prompt, tools, **kwargs)
    if tools:
        raise ValueError("this tokenizer has no chat template with a tools section (Qwen v1 uses the ReAct "
                         "prompt instead); pass tools to the server's function-calling mode")
    return _render_chatml_messages(tok, messages, add_generation_prompt)


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be a dict with a string 'role' (got {m!r})")


def history_messages(query: str, history, system: str | None) -> list[dict]:
    messages = [] if system is None else [{"role": "system", "content": system}]
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages + [{"role": "user", "content": query}]


def history_prompt(tok: Tokenizer, query: str, history, system: str | None = None,
                   max_window_size: int | None = None, generation_config: dict | None = None) -> list[int]:
    """(query, history of (user, assistant) turns, system) -> prompt ids, dropping the oldest turns that
    do not fit the window; system None means the model's own default. `generation_config` is the
    model's (its chat_format and max_window_size)."""
    gc = generation_config or {}
    if gc.get("chat_format") == "raw":
        raise ValueError("this is a base model (generation_config chat_format 'raw'): chat() needs a chat "
                         "model such as Qwen-7B-Chat; use qwenkit.generate() for plain completion")
    window = max_window_size or gc.get("max_window_size") or DEFAULT_MAX_WINDOW
    if not tok.chat_template:
        return render_qwen_v1(tok, query, history, system or DEFAULT_SYSTEM, window)
    history = list(history)
    while True:  # same rule for templated models: drop the oldest turns that do not fit the window
        ids = apply_chat_template(tok, history_messages(query, history, system))
        if len(ids) < window or not history:
            return ids
        history = history[1:]
