"""Conversation files -> training examples (input_ids, labels), rendered by the inference chat code.

Formats, told apart by the first character of the file ('[' is a JSON array, anything else JSONL):
- the Qwen fine-tuning JSON: `[{"id": ..., "conversations": [{"from": "user", "value": "..."}, ...]}]`
  ("from": system, user, assistant; ShareGPT's human and gpt are read as user and assistant);
- JSONL of the same records, one per line;
- OpenAI chat fine-tuning JSONL: `{"messages": [{"role": ..., "content": ...}], "tools": [...]}`,
  with assistant `tool_calls`, `tool` results and the optional `"weight": 0` that leaves an
  assistant message out of the loss.

Rendering: Qwen v1 (no chat template) with the same ChatML segments as `qwenkit.prompts`; newer
models with the checkpoint's template exactly as the server renders a request (tools included).
The tokens of a conversation therefore start with the inference prompt of each of its prefixes.

Labels (IGNORE_INDEX = -100 is not trained):
- Qwen v1, the Qwen-7B scripts' rule (spec §7.2): in every segment `<|im_start|>`, `<|im_end|>` and the "\n"
  after it are trained, the role name and the "\n" after it are not; content only for assistants.
- Templated models: each assistant reply as the template writes it after its generation prompt, up
  to and including its `<|im_end|>`, which is the token generation stops at; the "\n" the template
  writes after `<|im_end|>` is the next turn's context, never generated, and is not trained.
Examples longer than `max_length` keep their first `max_length` tokens (as the Qwen-7B scripts do).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F
from jinja2.exceptions import TemplateError

from .errors import DataError
from .prompts import DEFAULT_SYSTEM, apply_chat_template, chatml_segment
from .tokenizer import Tokenizer
from .tools import checked_functions, template_messages

IGNORE_INDEX = -100
QWEN7B_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
MESSAGE_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE_INDEX where no loss is taken


@dataclass
class DataStats:
    records: int = 0  # records read from the file, bad ones included
    examples: int = 0  # examples returned (a record gives more when its template rewrites history)
    truncated: int = 0  # examples cut to max_length
    skipped: int = 0  # bad records dropped (skip_bad=True)
    skipped_errors: list[str] = field(default_factory=list)  # why each was dropped
    tokens: int = 0  # input tokens over all examples, after truncation
    label_tokens: int = 0  # of which trained (label != IGNORE_INDEX)

    def summary(self) -> str:
        parts = [f"{self.records} records -> {self.examples} examples",
                 f"{self.tokens:,} tokens ({self.label_tokens:,} trained)", f"{self.truncated} truncated"]
        if self.skipped:
            parts.append(f"{self.skipped} bad records skipped")
        return ", ".join(parts)


def load_dataset(path: str | Path, tokenizer: Tokenizer, max_length: int,
                 skip_bad: bool = False) -> tuple[list[Example], DataStats]:
    """Read a conversation file (see the module docstring) into examples of at most `max_length` tokens.

    A bad record raises DataError naming the file and line; `skip_bad=True` drops it and counts it.
    A syntax error inside a JSON array is always an error: the records after it cannot be found.
    """
    if max_length < 2:
        raise DataError(f"max_length is {max_length}: it must be at least 2 tokens")
    path = Path(path)
    examples, stats = [], DataStats()
    for line, record in _records(path):
        stats.records += 1
        try:
            if isinstance(record, DataError):
                raise record
            messages, tools = _conversation(record)
            made = _examples(tokenizer, messages, tools)
        except (ValueError, TemplateError) as e:  # DataError is a ValueError, as are the chat code's refusals
            error = f"{path}:{line}: {e}"
            if not skip_bad:
                raise DataError(f"{error} (pass skip_bad / --skip-bad to drop bad records)") from None
            stats.skipped += 1
            stats.skipped_errors.append(error)
            continue
        for example in made:
            if len(example.input_ids) > max_length:
                stats.truncated += 1
                example = Example(example.input_ids[:max_length], example.labels[:max_length])
            examples.append(example)
            stats.tokens += len(example.input_ids)
            stats.label_tokens += sum(label != IGNORE_INDEX for label in example.labels)
    stats.examples = len(examples)
    if not examples:
        raise DataError(f"{path}: no usable records" + (f" ({stats.skipped} bad ones skipped)" if stats.skipped else ""))
    return examples, stats


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example: `input_ids` and `labels` [B, T] (labels -100 on padding).

    Right padding needs no attention mask: under the model's causal mask no real token sees the
    padding after it, and the padding's own outputs carry no label.
    """
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, :len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "labels": labels}


def predicting_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, T] of the positions whose next token is a label, those labels [n]): the logits at
    those positions (Model's `logits_at` computes only them) against the labels make loss.lm_loss."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return F.pad(mask, (0, 1)), targets[mask]


# ----------------------------------------------------------------------------- reading files

_SPACE = re.compile(r"[ \t\r\n]*")


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of `path`, or a DataError naming it as `what` (e.g. "data file") and the problem."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {what} {path} as UTF-8 text ({e})") from None


def _records(path: Path) -> Iterator[tuple[int, object]]:
    """(line where it starts, parsed record) in file order; a JSONL line that is not JSON comes as a
    DataError in place of the record, so it can be skipped like any bad record."""
    text = read_text(path, "data file")
    start = _SPACE.match(text).end()
    if start == len(text):
        raise DataError(f"{path}: the file is empty")
    if text[start] == "[":
        yield from _json_array(path, text, start + 1)
        return
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                yield n, DataError(f"not valid JSON ({e.msg}, column {e.colno}); JSONL needs one record per line")


def _json_array(path: Path, text: str, i: int) -> Iterator[tuple[int, object]]:
    decoder, line, counted = json.JSONDecoder(), 1, 0
    i = _SPACE.match(text, i).end()
    if text.startswith("]", i):
        return
    while True:
        line += text.count("\n", counted, i)
        counted = i
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}); "
                            "a syntax error inside a JSON array cannot be skipped, fix the file") from None
        yield line, record
        i = _SPACE.match(text, i).end()
        if text.startswith(",", i):
            i = _SPACE.match(text, i + 1).end()
        elif text.startswith("]", i) and _SPACE.match(text, i + 1).end() == len(text):
            return
        else:
            raise DataError(f"{path}:{text.count(chr(10), 0, i) + 1}: expected ',' or the closing ']' of "
                            "the JSON array")


# ----------------------------------------------------------------------------- checking records

def _conversation(record) -> tuple[list[dict], list[dict] | None]:
    """A record -> (OpenAI-style messages, tools), checked; ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise DataError(f"a record must be a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        messages = [_qwen7b_turn(n, turn) for n, turn in enumerate(_nonempty_list(record, "conversations"))]
    elif "messages" in record:
        messages = [_message(n, m) for n, m in enumerate(_nonempty_list(record, "messages"))]
    else:
        raise DataError("the record has neither 'conversations' (Qwen fine-tuning format) nor 'messages' "
                        f"(OpenAI format); its keys are {sorted(record)}")
    tools = record.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise DataError("'tools' must be a list of {'type': 'function', 'function': {...}}")
        checked_functions(tools)
    _check_order(messages)
    return messages, tools or None


def _nonempty_list(record: dict, key: str) -> list:
    value = record[key]
    if not isinstance(value, list) or not value:
        raise DataError(f"'{key}' must be a non-empty list (got {json.dumps(value)[:60]})")
    return value


def _qwen7b_turn(n: int, turn) -> dict:
    if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
        raise DataError(f"conversations[{n}] must be {{'from': ROLE, 'value': TEXT}} with string values "
                        f"(got {json.dumps(turn, ensure_ascii=False)[:80]})")
    if turn["from"] not in QWEN7B_ROLES:
        raise DataError(f"conversations[{n}]: unknown role {turn['from']!r}; use {', '.join(QWEN7B_ROLES)}")
    return {"role": QWEN7B_ROLES[turn["from"]], "content": turn["value"]}


def _message(n: int, m) -> dict:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise DataError(f"messages[{n}] must be an object with a string 'role' (got {json.dumps(m)[:80]})")
    role, content, calls = m["role"], m.get("content"), m.get("tool_calls")
    if role not in MESSAGE_ROLES:
        raise DataError(f"messages[{n}]: unknown role {role!r}; use {', '.join(MESSAGE_ROLES)}")
    if not (isinstance(content, str) or (content is None and role == "assistant" and calls)):
        raise DataError(f"messages[{n}]: 'content' must be a string" + (" (or null with tool_calls)"
                        if role == "assistant" else "") + f", got {json.dumps(content)[:60]}")
    if calls is not None:
        if role != "assistant" or not isinstance(calls, list) or not calls:
            raise DataError(f"messages[{n}]: 'tool_calls' must be a non-empty list on an assistant message")
        for k, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not (isinstance(function, dict) and isinstance(function.get("name"), str) and function["name"]
                    and isinstance(function.get("arguments"), (str, dict))):
                raise DataError(f"messages[{n}].tool_calls[{k}] must be {{'type': 'function', 'function': "
                                "{'name': NAME, 'arguments': JSON_TEXT_OR_OBJECT}}")
    if m.get("weight", 1) not in (0, 1) or ("weight" in m and role != "assistant"):
        raise DataError(f"messages[{n}]: 'weight' is 0 or 1 and only on assistant messages")
    return dict(m)


def _check_order(messages: list[dict]) -> None:
    """system? then user, assistant, user, ...; tool results right after the assistant that called them."""
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not body:
        raise DataError("the conversation has no user or assistant turn")
    if body[0]["role"] != "user":
        raise DataError(f"the conversation must start with a user turn (after an optional system message), "
                        f"not {body[0]['role']}")
    for prev, m in pairwise(body):
        allowed = {"user": ("assistant",), "tool": ("tool", "assistant"),
                   "assistant": ("tool",) if prev.get("tool_calls") else ("user",)}[prev["role"]]
        if m["role"] not in allowed:
            if m["role"] == "system":
                raise DataError("a system message may only come first")
            raise DataError(f"a {m['role']} turn follows a {prev['role']} turn: turns must alternate user and "
                            "assistant, and tool results follow the assistant message that called the tool")
    if body[-1]["role"] != "assistant":
        raise DataError(f"the conversation ends with a {body[-1]['role']} turn: it must end with an assistant reply")


# ----------------------------------------------------------------------------- rendering and labels

def _examples(tok: Tokenizer, messages: list[dict], tools: list[dict] | None) -> list[Example]:
    if tok.chat_template:
        return _template_examples(tok, messages, tools)
    if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        raise DataError("tool calls need a chat template that lists tools (Qwen2.5 and later); for Qwen v1 write "
                        "the ReAct text (Thought / Action / Action Input / Observation) into the turns, as the "
                        "Qwen-7B scripts' function-calling examples do")
    return [_qwen_v1_example(tok, messages)]


def _qwen_v1_example(tok: Tokenizer, messages: list[dict]) -> Example:
    """The Qwen-7B scripts' preprocess: ChatML segments, each followed by "\\n", masked as spec §7.2."""
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}] + messages
    nl = tok.encode("\n", allowed_special=set())
    ids, labels = [], []
    for m in messages:
        segment = chatml_segment(tok, m["role"], m["content"]) + nl
        head = 1 + len(tok.encode(m["role"], allowed_special=set())) + len(nl)  # <|im_start|> role \n
        tail = 1 + len(nl)  # <|im_end|> \n
        content = segment[head:-tail]
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            content = [IGNORE_INDEX] * len(content)
        ids += segment
        labels += segment[:1] + [IGNORE_INDEX] * (head - 1) + content + segment[-tail:]
    return Example(ids, labels)


def _template_examples(tok: Tokenizer, messages: list[dict], tools: list[dict] | None) -> list[Example]:
    """Each assistant reply is the template's text after its own generation prompt.

    Usually one example holds the whole conversation. A template that renders past turns differently
    from the live one (Qwen3 drops the reasoning of earlier replies) cannot: then the reply that no
    longer extends the tokens so far starts a new example, whose context is the history as the model
    will see it at inference.
    """
    def render(msgs: list[dict], generation_prompt: bool) -> list[int]:
        return apply_chat_template(tok, template_messages(msgs), add_generation_prompt=generation_prompt,
                                   tools=tools)

    end_of_turn = tok.im_end_id if tok.im_end_id is not None else tok.eos_token_id
    examples, ids, labels = [], [], []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        if prompt[:len(ids)] != ids:
            examples.append(Example(ids, labels))
            ids, labels = [], []
        labels += [IGNORE_INDEX] * (len(prompt) - len(ids))
        full = render(messages[:i + 1], False)
        if full[:len(prompt)] != prompt:
            raise DataError("the chat template writes an assistant reply that does not continue its own "
                            "generation prompt; this template cannot be trained on as is")
        reply = full[len(prompt):]
        stop = len(reply) - reply[::-1].index(end_of_turn) if end_of_turn in reply else len(reply)
        trained = reply[:stop] if m.get("weight", 1) else [IGNORE_INDEX] * stop
        labels += trained + [IGNORE_INDEX] * (len(reply) - stop)
        ids = full
    return examples + [Example(ids, labels)]
