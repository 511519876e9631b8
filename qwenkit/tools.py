"""Tool (function) calling: the prompts that offer tools, and parsers that find the calls in the reply.

Two formats exist:

* **Hermes** (Qwen2.5, Qwen3): the checkpoint's chat template lists the tools, and the model answers
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, possibly several, possibly after
  some text. Chosen when the tokenizer's template renders ``tools``.
* **ReAct** (Qwen v1, and templates without a tools section such as Qwen1.5/Qwen2): the Qwen-7B scripts'
  openai_api.py prompt (shared/reference/qwen-v1-spec.md §5.4-5.5). An instruction listing the APIs
  precedes the last question; the model answers ``Thought: ...\\nAction: NAME\\nAction Input: {...}``
  and generation stops at ``Observation:``, or it writes ``Final Answer: ...``.

Parsers are incremental: the server feeds them each text delta and forwards the events they return
(content, the start of a tool call, pieces of its arguments). ``finish()`` flushes what is held back
and returns every complete call; a non-empty list means finish_reason "tool_calls". Text that is not
a valid call (broken JSON, no name, arguments that are not a JSON object) comes back as content:
parsers never raise on model output.

``tool_choice`` "required" or a named function is enforced with a forced prefix: text the assistant
turn must begin with (``forced_prefix``). The server appends its ids to the prompt and feeds the
same text to the parser first, so the parser sees the whole reply.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import sys
from dataclasses import dataclass
from typing import Protocol

from .grammar import Grammar, GrammarError, lark_json
from .prompts import DEFAULT_SYSTEM, MAX_JSON_DEPTH, apply_chat_template, render_qwen_v1, text_of
from .tokenizer import Tokenizer


@dataclass
class ToolCall:
    id: str  # "call_" + 24 random url-safe characters
    name: str
    arguments: str  # JSON text of an object, as OpenAI returns it


@dataclass
class ContentDelta:
    text: str


@dataclass
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass
class ToolCallArgs:
    index: int
    text: str  # a piece of the arguments JSON text


Event = ContentDelta | ToolCallStart | ToolCallArgs


class ToolParser(Protocol):
    stop: list[str]  # stop strings the generation must add

    def feed(self, text: str) -> list[Event]: ...

    def finish(self) -> tuple[list[Event], list[ToolCall]]: ...


# ------------------------------------------------------------------------- shared helpers

def _content(text: str) -> list[Event]:
    return [ContentDelta(text)] if text else []


def deeper_than(value, limit: int) -> str | None:
    """Where `value` (decoded JSON) nests more than `limit` levels, as a path ("" for the top), or None.
    Walked without recursion, since the depth is someone else's choice."""
    stack = [(value, 1, "")]
    while stack:
        value, depth, path = stack.pop()
        if depth > limit:
            return path
        if isinstance(value, dict):
            stack += [(v, depth + 1, f"{path}.{k}" if path else str(k)) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(v, depth + 1, f"{path}[{i}]") for i, v in enumerate(value)]
    return None


def _json_object(text: str) -> dict | None:
    """The JSON object ``text`` holds, or None (invalid JSON, a value that is not an object, or one
    nested deeper than MAX_JSON_DEPTH)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) and deeper_than(value, MAX_JSON_DEPTH) is None else None


def _new_call(index: int, name: str, arguments: dict) -> tuple[ToolCall, list[Event]]:
    """A complete call and the events announcing it (the arguments go out as one piece)."""
    call = ToolCall("call_" + secrets.token_urlsafe(18), name, json.dumps(arguments, ensure_ascii=False))
    return call, [ToolCallStart(index, call.id, call.name), ToolCallArgs(index, call.arguments)]


def _is_react(tokenizer: Tokenizer) -> bool:
    """ReAct unless the chat template can list tools itself (Qwen2.5+); Qwen v1 has no template."""
    return not (tokenizer.chat_template and "tools" in tokenizer.chat_template)


def _tool_choice(tool_choice) -> tuple[str, str | None]:
    """tool_choice -> (mode, function name): mode is "none", "auto", "required" or "function"."""
    if tool_choice is None:
        return "auto", None
    if tool_choice in ("none", "auto", "required"):
        return tool_choice, None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str) and name:
            return "function", name
    raise ValueError("tool_choice must be 'none', 'auto', 'required' or "
                     f"{{'type': 'function', 'function': {{'name': NAME}}}} (got {tool_choice!r})")


def checked_functions(tools: list[dict]) -> list[dict]:
    """The function specs inside OpenAI tools, checked: a name is required."""
    functions = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type") != "function" or not function.get("name"):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                             f"'description': ..., 'parameters': {{...}}}}}} (got {tool!r})")
        functions.append(function)
    return functions


class PlainParser:
    """No tools: every piece of text is content."""

    def __init__(self):
        self.stop: list[str] = []

    def feed(self, text: str) -> list[Event]:
        return _content(text)

    def finish(self) -> tuple[list[Event], list[ToolCall]]:
        return [], []


# ------------------------------------------------------------------------- Hermes <tool_call>

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FENCE = "```"
JSON_FENCES = ("", "json", "json5", "tool_call", "tool_calls")  # a fence a call may hide in; others are code
_CLOSING_FENCE = re.compile(r"\n[ \t]*```")
_PARTIAL_CLOSING_FENCE = re.compile(r"\n[ \t]*`{0,2}$")
_FENCE_OR_BRACE = re.compile(r"(?m)^[ \t]*(```|\{)")
_PARTIAL_FENCE = re.compile(r"(?:^|\n)[ \t]*`{0,2}$")
MAX_HELD = 1 << 16  # characters of a possible call held back before they are let out as content


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that could be the start of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _call_objects(text: str, names: frozenset[str] | None) -> list[tuple[str, dict]] | None:
    """The calls ``text`` holds: one JSON object ``{"name": ..., "arguments": {...}}`` (or "parameters", or
    arguments as a JSON string of an object), a list of them, or several in a row. With ``names``, each name
    must be one of them. None when the text is anything else."""
    decoder, values, at = json.JSONDecoder(), [], 0
    text = text.strip()
    while at < len(text):
        try:
            value, at = decoder.raw_decode(text, at)
        except (ValueError, RecursionError):
            return None
        values += value if isinstance(value, list) else [value]
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
    calls = []
    for value in values:
        if not isinstance(value, dict) or deeper_than(value, MAX_JSON_DEPTH) is not None:
            return None
        name = value.get("name")
        arguments = value.get("arguments", value.get("parameters", {}))
        if isinstance(arguments, str):
            arguments = _json_object(arguments)
        if not (isinstance(name, str) and name and isinstance(arguments, dict)) or (names and name not in names):
            return None
        calls.append((name, arguments))
    return calls or None


class _ObjectEnd:
    """Finds where a JSON object ends in text that arrives in pieces: braces inside strings do not count,
    and each character is looked at once."""

    def __init__(self):
        self.at, self.depth, self.in_string, self.escaped = 0, 0, False, False

    def __call__(self, text: str) -> int:
        """The index after the closing brace of the object ``text`` starts with, or -1 if it has not ended."""
        for i in range(self.at, len(text)):
            c = text[i]
            if self.in_string:
                self.escaped, self.in_string = (False, True) if self.escaped else (c == "\\", c != '"')
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        self.at = len(text)
        return -1


class HermesParser:
    """Finds tool calls in streamed text, in the shapes models write them:

    - ``<tool_call>{json}</tool_call>`` blocks (the Qwen2.5+ format), any name;
    - a fenced block (```` ```json ```` or a bare fence) holding a call object, a list of them or several,
      each naming one of ``names`` (the declared functions): what small models write instead;
    - such an object alone on its line, naming a declared function.

    A call object is ``{"name": ..., "arguments": {...}}``; "parameters" for "arguments", or arguments as JSON
    text of an object, also pass. Anything else is content: a fenced block in another language streams as
    it comes and nothing inside it is read as a call; a JSON block or object that is not a call comes back
    verbatim once it has ended. Text that could still turn into a call (a partial ``<tool_call``, a fence
    line not yet ended, a JSON block or a line-start object not yet closed) and the whitespace before it are
    held back. Whitespace next to a call is layout, not content, so it is dropped. A call cut off without its
    closing tag or fence (the model stopped right after the JSON) still counts when its JSON is complete.
    """

    def __init__(self, names: frozenset[str] | set[str] = frozenset()):
        self.stop: list[str] = []
        self._names = frozenset(names)
        self._calls: list[ToolCall] = []
        self._buffer = ""  # text not yet emitted; inside a held block, the block's body so far
        self._opening = ""  # inside a held block: the whitespace and the opener (tag, fence line) before it
        self._state = "text"  # or held: "tag", "fence", "object"; or "code", a fenced block in another language
        self._searched = 0  # how much of the buffer a held block's end was looked for in
        self._object_end, self._end = _ObjectEnd(), -1  # a line-start object: where it ends, once known
        self._line_start = True  # the buffer begins a line (nothing emitted yet, or a call just ended)
        self._after_call = False  # no content since the last call: leading whitespace is layout

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        events: list[Event] = []
        steps = {"text": self._in_text, "tag": self._in_tag, "fence": self._in_fence, "object": self._in_object,
                 "code": self._in_code}
        while (step := steps[self._state]()) is not None:
            events += step
        return events

    def finish(self) -> tuple[list[Event], list[ToolCall]]:
        if self._state in ("tag", "fence", "object"):
            events = self._close(len(self._buffer), "", None if self._state == "tag" else self._names)
        else:
            events = _content(self._buffer) if self._state == "code" else self._text(self._buffer)
        self._buffer, self._state = "", "text"
        return events, list(self._calls)

    # Each state's step: the events of what it settled, or None when it needs more text.

    def _in_text(self) -> list[Event] | None:
        buffer = self._buffer
        tag = buffer.find(OPEN)
        found = _FENCE_OR_BRACE.search(buffer) if self._names else None
        if found and found.start() == 0 and not self._line_start:
            found = _FENCE_OR_BRACE.search(buffer, 1)
        block = found.start(1) if found else -1
        if tag < 0 and block < 0:  # let out all but what could still become a call
            undecided = _partial_tag(buffer, OPEN)
            partial = _PARTIAL_FENCE.search(buffer) if self._names else None
            if partial and (buffer.startswith("\n", partial.start()) or self._line_start):
                undecided = max(undecided, len(buffer) - partial.start())
            return self._let_out(len(buffer) - undecided)
        if block >= 0 and (tag < 0 or block < tag):
            start = block
            if buffer.startswith(FENCE, block):
                line_end = buffer.find("\n", block)
                if line_end < 0:  # the fence's language is not known yet
                    return self._let_out(found.start())
                if buffer[block + len(FENCE):line_end].strip().lower() not in JSON_FENCES:
                    events = self._text(buffer[:line_end])  # code: it streams, and nothing in it is a call
                    self._take(line_end)
                    self._enter("code")
                    return events
                opener_end = line_end  # the newline stays in the body, where a closing fence looks for it
                self._enter("fence")
            else:
                opener_end = block
                self._enter("object")
        else:
            start, opener_end = tag, tag + len(OPEN)
            self._enter("tag")
        cut = len(buffer[:start].rstrip())
        events = self._text(buffer[:cut])
        self._opening, self._buffer = buffer[cut:opener_end], buffer[opener_end:]
        return events

    def _in_tag(self) -> list[Event] | None:
        end = self._buffer.find(CLOSE, max(0, self._searched - len(CLOSE)))
        self._searched = len(self._buffer)
        return self._close(end, CLOSE, None) if end >= 0 else self._overflow()

    def _in_fence(self) -> list[Event] | None:
        closing = self._closing_fence()
        if closing is None:
            return self._overflow()
        return self._close(closing.start(), self._buffer[closing.start():closing.end()], self._names)

    def _in_object(self) -> list[Event] | None:
        if self._end < 0 and (end := self._object_end(self._buffer)) >= 0:
            self._end = end
        if self._end < 0:
            return self._overflow()
        rest = self._buffer[self._end:]
        line = rest[:rest.find("\n")] if "\n" in rest else rest
        if not line.strip():  # alone on its line: a call if it names one
            return self._close(self._end, "", self._names) if "\n" in rest else None
        raw, self._buffer = self._opening + self._buffer[:self._end], rest  # more on its line: prose
        self._opening, self._state, self._line_start = "", "text", False
        return self._text(raw)

    def _in_code(self) -> list[Event] | None:
        closing = self._closing_fence()
        if closing is not None:
            events = _content(self._buffer[:closing.end()])
            self._take(closing.end())
            self._state = "text"
            return events
        partial = _PARTIAL_CLOSING_FENCE.search(self._buffer, max(0, self._buffer.rfind("\n")))
        keep = len(self._buffer) - partial.start() if partial else 0
        events = _content(self._buffer[:len(self._buffer) - keep])
        self._take(len(self._buffer) - keep)
        self._searched = 0
        return events or None

    def _closing_fence(self) -> re.Match | None:
        """A closing fence in the buffer, looked for from the last line already searched."""
        found = _CLOSING_FENCE.search(self._buffer, max(0, self._buffer.rfind("\n", 0, self._searched)))
        self._searched = len(self._buffer)
        return found

    def _enter(self, state: str) -> None:
        self._state, self._searched, self._object_end, self._end = state, 0, _ObjectEnd(), -1

    def _overflow(self) -> list[Event] | None:
        """A held block past MAX_HELD is no call anyone wants: it goes out as content."""
        if len(self._buffer) <= MAX_HELD:
            return None
        events = self._text(self._opening + self._buffer)
        self._opening = self._buffer = ""
        self._state = "text"
        return events

    def _let_out(self, end: int) -> list[Event] | None:
        """Emit the buffer up to `end`, less the whitespace before it (layout if a call follows)."""
        cut = len(self._buffer[:end].rstrip())
        events = self._text(self._buffer[:cut])
        self._take(cut)
        return events or None

    def _take(self, n: int) -> None:
        if n:
            self._line_start = self._buffer[n - 1] == "\n"
            self._buffer = self._buffer[n:]

    def _text(self, text: str) -> list[Event]:
        if self._after_call:
            text = text.lstrip()
            self._after_call = not text
        return _content(text)

    def _close(self, end: int, closing: str, names: frozenset[str] | None) -> list[Event]:
        """Settle a held block whose body is the buffer up to `end`, followed by `closing`: its calls, or its
        raw text as content when it holds none."""
        body, raw = self._buffer[:end], self._opening + self._buffer[:end] + closing
        self._buffer, self._opening, self._state = self._buffer[end + len(closing):], "", "text"
        calls = _call_objects(body, names)
        if calls is None:
            self._line_start = raw.endswith("\n")
            return self._text(raw)
        events = []
        for name, arguments in calls:
            tool_call, announced = _new_call(len(self._calls), name, arguments)
            self._calls.append(tool_call)
            events += announced
        self._after_call = self._line_start = True
        return events


# ------------------------------------------------------------------------- ReAct (Qwen v1)

THOUGHT, ACTION, ACTION_INPUT = "Thought: ", "\nAction:", "\nAction Input:"
OBSERVATION, FINAL_ANSWER = "\nObservation:", "\nFinal Answer: "

TOOL_DESC = ("{name_for_model}: Call this tool to interact with the {name_for_human} API. What is the "
             "{name_for_human} API useful for? {description_for_model} Parameters: {parameters}")

REACT_INSTRUCTION = """Answer the following questions as best you can. You have access to the following APIs:

{tools_text}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tools_name_text}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""


class ReActParser:
    """The Qwen-7B scripts' parse_response, made incremental.

    Whether the reply is a call can only be known at its end, so text is held until ``finish``,
    which applies the Qwen-7B scripts' rules: with ``\\nAction:`` before ``\\nAction Input:`` and a non-empty
    name, the content is the thought and the Action Input is the arguments (re-serialized; a reply
    whose input is not a JSON object comes back whole as content, with no call); otherwise the
    content is the text after ``\\nFinal Answer: `` if present, else the whole text.

    One deviation lets answers stream: once ``\\nFinal Answer: `` arrives with no ``\\nAction:``
    before it, everything after it streams as content. So the first Final Answer counts (the Qwen-7B scripts
    take the last), and an Action written after a final answer is part of the answer (the Qwen-7B scripts
    would call it). The model writes neither.
    """

    def __init__(self):
        self.stop: list[str] = [OBSERVATION.strip()]
        self._text = ""
        self._answering = False  # past the Final Answer marker: everything streams as content

    def feed(self, text: str) -> list[Event]:
        if self._answering:
            return _content(text)
        self._text += text
        answer, action = self._text.find(FINAL_ANSWER), self._text.find(ACTION)
        if answer < 0 or 0 <= action < answer:
            return []
        self._answering = True
        return _content(self._text[answer + len(FINAL_ANSWER):])

    def finish(self) -> tuple[list[Event], list[ToolCall]]:
        text = self._text
        if self._answering:
            return [], []
        i, j = text.find(ACTION), text.find(ACTION_INPUT)
        if 0 <= i < j and (name := text[i + len(ACTION):j].strip()):
            k = text.find(OBSERVATION, j)  # present only when the caller left the stop word in
            arguments = _json_object(text[j + len(ACTION_INPUT):k if k >= 0 else len(text)].strip())
            if arguments is None:
                return _content(text), []
            thought = text[:i]
            if (t := thought.find(THOUGHT)) >= 0:
                thought = thought[t + len(THOUGHT):]
            call, events = _new_call(0, name, arguments)
            return _content(thought.strip()) + events, [call]
        if (z := text.rfind(FINAL_ANSWER)) >= 0:
            text = text[z + len(FINAL_ANSWER):]
        return _content(text), []


def react_instruction(tools: list[dict]) -> str:
    """The Qwen-7B scripts' ReAct instruction for OpenAI tools (Qwen-style *_for_model / *_for_human keys win)."""
    functions = checked_functions(tools)
    lines, names = [], []
    for f in functions:
        name = f.get("name_for_model", f["name"])
        description = f.get("description_for_model", f.get("description", ""))
        lines.append(TOOL_DESC.format(name_for_model=name, name_for_human=f.get("name_for_human", f["name"]),
                                      description_for_model=description,
                                      parameters=json.dumps(f.get("parameters", {}), ensure_ascii=False)))
        names.append(name)
    return REACT_INSTRUCTION.format(tools_text="\n\n".join(lines), tools_name_text=", ".join(names))


def _strip(text) -> str:
    """Message text as the Qwen-7B scripts keep it: leading newlines and trailing whitespace removed."""
    return text_of(text).lstrip("\n").rstrip()


def _assistant_calls(message: dict) -> list[tuple[str, str]]:
    """(name, arguments text) of an assistant message's tool_calls, or of its legacy function_call."""
    calls = message.get("tool_calls") or []
    if not calls and message.get("function_call"):
        calls = [{"function": message["function_call"]}]
    pairs = []
    for call in calls:
        function = call.get("function") or {}
        arguments = function.get("arguments", "")
        pairs.append((function.get("name", ""),
                      arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)))
    return pairs


def _react_conversation(messages: list[dict], tools: list[dict] | None) -> tuple[str, list[list[str]]]:
    """OpenAI messages -> (system, turns), as the Qwen-7B scripts' parse_messages builds them.

    Turns are [user, assistant] pairs; the last has assistant None when a user message ends the
    conversation, else the assistant text to continue. System messages may stand anywhere: they
    are joined into the system prompt. An assistant message with several tool calls writes each
    Action in turn, and the tool results follow as Observations in order.
    """
    systems, kept = [], []  # kept: [role, text] after merging, as the Qwen-7B scripts' `messages`
    last_role = None  # of the last message that is not a system message
    for n, m in enumerate(messages):
        role, content = m.get("role"), _strip(m.get("content"))
        if role == "system":
            systems.append(content)
            continue
        last_role = role
        if role == "user":
            kept.append(["user", content])
        elif role in ("tool", "function"):
            if not kept or kept[-1][0] != "assistant":
                raise ValueError(f"messages[{n}]: a {role!r} message must follow the assistant message "
                                 "that called the tool")
            kept[-1][1] += f"\nObservation: {content}"
        elif role == "assistant":
            if not kept:
                raise ValueError(f"messages[{n}]: the conversation must start with a user message")
            calls = _assistant_calls(m)
            if calls:
                if not content.startswith("Thought:"):
                    content = f"Thought: {content}"
                content += "".join(f"\nAction: {name}\nAction Input: {arguments}" for name, arguments in calls)
            elif tools:
                content = f"Thought: I now know the final answer.\nFinal Answer: {content}"
            if kept[-1][0] == "user":
                kept.append(["assistant", content.lstrip("\n").rstrip()])
            else:
                kept[-1][1] += "\n" + content
        else:
            raise ValueError(f"messages[{n}]: unknown role {role!r} (system, user, assistant, tool, function)")
    if not any(role == "user" for role, _ in kept):
        raise ValueError("messages must contain at least one user message")
    if last_role in ("tool", "function"):
        kept[-1][1] += "\nThought:"  # the model continues its turn after the observation

    turns = []
    for n in range(0, len(kept), 2):
        user, assistant = kept[n], kept[n + 1] if n + 1 < len(kept) else None
        if user[0] != "user" or (assistant is not None and assistant[0] != "assistant"):
            raise ValueError("messages must alternate user and assistant turns (tool results belong to the "
                             "assistant turn before them); two user messages in a row are not allowed")
        turns.append([user[1], None if assistant is None else assistant[1].lstrip("\n").rstrip()])
    return "\n".join(systems) or DEFAULT_SYSTEM, turns


def _react_prompt(tokenizer: Tokenizer, messages: list[dict], tools: list[dict] | None, forced: bool) -> list[int]:
    system, turns = _react_conversation(messages, tools)
    if tools:
        turns[-1][0] = f"{react_instruction(tools)}\n\nQuestion: {turns[-1][0]}"
    *history, (query, open_turn) = turns
    open_turn = open_turn or ""
    if forced and not open_turn.endswith("Thought:"):
        # forced_prefix continues right after "Thought:", the Qwen-7B scripts' own completion point.
        open_turn += ("\n" if open_turn else "") + "Thought:"
    # The whole conversation is sent every time: a prompt that does not fit the context is refused
    # by the caller rather than silently losing turns, so no max_window_size truncation here.
    ids = render_qwen_v1(tokenizer, query, history, system, max_window_size=sys.maxsize)
    # The open assistant turn continues after "assistant\n" without <|im_end|>, tokenized like the
    # turns before it.
    return ids + tokenizer.encode(open_turn, allowed_special=set())


# ------------------------------------------------------------------------- templated prompts

def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages -> what Qwen chat templates expect: text content, tool_calls with arguments
    as a parsed object (the Qwen2.5 template writes ``arguments | tojson``), legacy function_call
    and function results as tool_calls and tool messages."""
    converted = []
    for m in copy.deepcopy(messages):
        m["content"] = text_of(m.get("content"))
        if m.get("role") == "function":
            m["role"] = "tool"
        if m.get("role") == "assistant" and m.get("function_call") and not m.get("tool_calls"):
            m["tool_calls"] = [{"type": "function", "function": m.pop("function_call")}]
        for call in m.get("tool_calls") or []:
            function = call.get("function") or {}
            if isinstance(function.get("arguments"), str):
                # Not a JSON object: the template writes the string as it is.
                function["arguments"] = _json_object(function["arguments"]) or function["arguments"]
        converted.append(m)
    return converted


# ------------------------------------------------------------------------- public API

def build_prompt(tokenizer: Tokenizer, messages: list[dict], tools: list[dict] | None,
                 tool_choice=None) -> list[int]:
    """OpenAI messages and tools -> prompt ids, in the format the model was trained on.

    tool_choice "none" leaves the tools out of the prompt. "required" and a named function change
    nothing for Hermes (the caller appends ``forced_prefix``); for ReAct the assistant turn is
    opened with "Thought:", the point the prefix continues from. Bad messages raise ValueError.
    """
    if tools and (where := deeper_than(tools, MAX_JSON_DEPTH)) is not None:
        raise ValueError(f"the tools nest deeper than {MAX_JSON_DEPTH} levels (at {where}): flatten the schema")
    mode, name = _tool_choice(tool_choice)
    names = {f["name"] for f in checked_functions(tools or [])}
    if mode in ("required", "function") and not tools:
        raise ValueError(f"tool_choice {tool_choice!r} needs tools")
    if name is not None and name not in names:
        raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools")
    if mode == "none":
        tools = None
    if _is_react(tokenizer):
        return _react_prompt(tokenizer, messages, tools, forced=mode in ("required", "function"))
    return apply_chat_template(tokenizer, template_messages(messages), tools=tools or None)


def forced_prefix(tokenizer: Tokenizer, tool_choice) -> str | None:
    """Text the assistant reply must begin with to honour tool_choice; None when it may answer freely.

    Hermes: the opening of a call, with the name filled in for a named function (for "required",
    up to the name's opening quote). ReAct: the prompt
    ends in "Thought:" (see build_prompt) and the prefix skips the thought, so the reply's content
    stays empty: "\\nAction: NAME\\nAction Input:" for a named function, "\\nAction:" for "required"
    (the model picks one of the listed APIs).
    """
    mode, name = _tool_choice(tool_choice)
    if mode not in ("required", "function"):
        return None
    if _is_react(tokenizer):
        return f"{ACTION} {name}{ACTION_INPUT}" if name else ACTION
    if name:
        return f'{OPEN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": '
    # Up to the name's opening quote: after a bare "<tool_call>\n" small models end the turn at once.
    return f'{OPEN}\n{{"name": "'


def _lit(text: str) -> str:
    """A Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def _schema_of(function: dict) -> str:
    parameters = function.get("parameters")
    # Qwen v1's own parameter lists are not JSON schemas: any object then.
    return lark_json(parameters if isinstance(parameters, dict) else {"type": "object"})


HERMES_NAME = '\n{"name": "'  # what follows <tool_call> up to the name
HERMES_ARGUMENTS = '", "arguments": '  # and from the name to the arguments


def reply_grammar(tokenizer: Tokenizer, tools: list[dict] | None, tool_choice=None,
                  answer: dict | None = None) -> Grammar | None:
    """What a reply must keep to, or None when it is free.

    With tool_choice "required" or a named function: the rest of the call after ``forced_prefix``, its
    arguments valid against the function's JSON schema. With "auto": any text, but a call the model opens
    (Hermes ``<tool_call>``, ReAct ``\nAction:``) names a declared function and gives arguments valid against
    its schema (a lazy grammar: nothing is constrained until the call starts). `answer`, a JSON schema
    (response_format): the reply is JSON valid against it, unless it is a call (Hermes only).
    Raises GrammarError for a schema that cannot constrain decoding."""
    mode, name = _tool_choice(tool_choice)
    functions = checked_functions(tools or []) if mode != "none" else []
    if not functions:
        return Grammar.json_schema(answer, "response_format schema") if answer is not None else None
    react = _is_react(tokenizer)
    if react and answer is not None:
        raise GrammarError("response_format with tools needs a model whose chat template lists tools (Qwen2.5 and "
                           "later); this one uses ReAct prompts, whose answers are free text")
    special = {OPEN, CLOSE} <= set(tokenizer.special_tokens)
    open_tag, close_tag = (OPEN, CLOSE) if special else (_lit(OPEN), _lit(CLOSE))  # Lark: a token, or text
    # After a call's JSON: what models write before they stop (the ReAct stop string; Hermes' closing tag).
    after = f"/[ \\t]*/ {_lit(OBSERVATION)}?" if react else f"/[ \\t\\r\\n]*/ {close_tag}?"
    if mode == "function":  # the forced prefix ends where the arguments begin
        schema = _schema_of(next(f for f in functions if f["name"] == name))
        rest = f'{_lit(" ")} {schema}' if react else f'{schema} {_lit("}")}'
        return Grammar.lark(f"start: {rest} {after}\n", "function's parameters schema")
    # Each declared function from its name on: ReAct " NAME\nAction Input: {...}", Hermes 'NAME", "arguments": {...}}'.
    if react:
        bodies = [f'{_lit(" " + f["name"] + ACTION_INPUT + " ")} {_schema_of(f)}' for f in functions]
    else:
        bodies = [f"{_lit(f['name'] + HERMES_ARGUMENTS)} {_schema_of(f)} {_lit('}')}" for f in functions]
    rules = "".join(f"function_{i}: {body}\n" for i, body in enumerate(bodies))
    function = "(" + " | ".join(f"function_{i}" for i in range(len(bodies))) + ")"
    if mode == "required":  # the forced prefix ends where the name begins
        return Grammar.lark(f"start: {function} {after}\n{rules}", "functions' parameters schemas")
    if answer is not None:  # JSON valid against it, or calls and nothing else (Hermes only, see above)
        start = f"start: call+ | {lark_json(answer)}\n"
        call = f"call: {open_tag} {_lit(HERMES_NAME)} {function} {after}\n"
    else:  # text with calls in it
        start = "start: call* TEXT\n"
        if special and not react:  # a special token opens a call: text cannot hold one, so no ambiguity
            call = f"tagged: TEXT {open_tag} {_lit(HERMES_NAME)} {function} {after}\n"
        else:  # text opens a call: matched lazily, where it first appears
            opening, rest = (_lit(ACTION), "") if react else (_lit(OPEN), f"{_lit(HERMES_NAME)} ")
            call = f"tagged: trigger {rest}{function} {after}\ntrigger[lazy]: TEXT {opening}\n"
        if react:
            call += "call: tagged\n"
        else:  # or a call object without the tag, bare or fenced, as small models write it (HermesParser)
            call += f"call: tagged | bare {function}\nbare[lazy]: TEXT {_lit(HERMES_NAME.lstrip())}\n"
    lark = f"%llguidance {{}}\n{start}{call}{rules}TEXT: /(.|\\n)*/\n"
    return Grammar.lark(lark, "tools' parameters schemas")


def parser_for(tokenizer: Tokenizer) -> type[HermesParser] | type[ReActParser]:
    """The tool-call parser class for this tokenizer's format."""
    return ReActParser if _is_react(tokenizer) else HermesParser


def new_parser(tokenizer: Tokenizer, tools: list[dict] | None, tool_choice=None) -> ToolParser:
    """A fresh parser for one reply: content only when there are no tools or tool_choice is "none"."""
    if not tools or _tool_choice(tool_choice)[0] == "none":
        return PlainParser()
    if parser_for(tokenizer) is ReActParser:
        return ReActParser()
    return HermesParser({function["name"] for function in checked_functions(tools)})
