"""A tool-using agent: the model calls tools, the agent runs them and feeds the results back as ``tool``
messages, until the model answers without a call.

Tools are plain Python functions. Their OpenAI schema comes from the signature and the docstring
(`tool_schema`), the same for the built-in ones (`python`, `calculator`, `read_file`) and a user's own
(`load_tool`, ``--tool module:function``). The model is either loaded here (`LocalChat`: the prompt and
the call parser of `qwenkit.tools`, Hermes or ReAct as the model's template asks) or behind an
OpenAI-compatible server (`ServerChat`). A tool that raises, a bad argument or an unknown tool name
becomes the tool message's text, so the model can read the error and try again.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import inspect
import json
import math
import operator
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import QwenkitError
from .evals.sandbox import Limits, run_program
from .tools import ContentDelta, ToolCall, build_prompt, new_parser, reply_grammar

MAX_RESULT_CHARS = 4000  # of a tool's result shown to the model: a small model's context is short
# Small models show code instead of running it, or guess its output, unless told otherwise; a call written out
# shows them the JSON escaping of a program in a string (ending in "\\n": without it the demo ends its code with a
# stray "}").
SYSTEM = ("You are a helpful assistant. You cannot run code yourself or know its output: to compute anything, call "
          "a tool and wait for its result, then answer from it. For example, to compute the sum of the squares of 1 "
          'to 10, reply with exactly:\n<tool_call>\n{"name": "python", "arguments": {"code": "def square(n):\\n    '
          'return n * n\\n\\nprint(sum(square(i) for i in range(1, 11)))\\n"}}\n</tool_call>')


# The answer turn (Agent.answer): the same model, its results in view, no tools listed and calls ruled out.
ANSWER = ("You are a helpful assistant. Answer the user's question from the results of the tool calls above (a "
          "python call's result is what its code printed), without calling a tool.")
# An answer, not a call: it does not open with what starts one (a JSON object or list, a code fence, a tag).
NOT_A_CALL = r"[^\s{<\[`][\s\S]*"


class AgentError(QwenkitError):
    pass


class Failure(str):
    """A tool result that reports a failure (an error, a traceback, a timeout). The model reads it as any other
    result; the agent knows the call did not work (Agent.ask)."""


# How alike two calls' arguments are (difflib's ratio) for the second to count as an edited copy of the first.
NEAR_COPY = 0.9


def truncated(text: str, limit: int = MAX_RESULT_CHARS) -> str:
    """`text` cut to `limit` characters, saying how much was left out (a Failure stays one)."""
    if len(text) <= limit:
        return text
    return type(text)(f"{text[:limit]}\n[truncated: {len(text) - limit} more characters]")


# ------------------------------------------------------------------------- schemas from signatures

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


def _type_schema(annotation, where: str) -> dict:
    """The JSON schema of a parameter's annotation; `where` names the parameter in errors."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in _JSON_TYPES:
        return {"type": _JSON_TYPES[annotation]}
    if origin is typing.Literal:
        kinds = {type(a) for a in args}
        if len(kinds) != 1 or not kinds <= set(_JSON_TYPES):
            raise AgentError(f"{where}: a Literal's values must be all str, all int, ... (got {args!r})")
        return {"type": _JSON_TYPES[kinds.pop()], "enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        others = [a for a in args if a is not type(None)]
        if len(others) == 1 and len(args) == 2:  # Optional[X]
            return {"anyOf": [_type_schema(others[0], where), {"type": "null"}]}
        return {"anyOf": [_type_schema(a, where) for a in args]}
    if annotation is type(None):
        return {"type": "null"}
    if origin is list and len(args) == 1:
        return {"type": "array", "items": _type_schema(args[0], where)}
    if origin is dict and len(args) == 2 and args[0] is str:
        return {"type": "object", "additionalProperties": _type_schema(args[1], where)}
    raise AgentError(f"{where}: unsupported annotation {annotation!r} (use str, int, float, bool, list, dict, "
                     "list[X], dict[str, X], Optional[X], X | Y or Literal[...])")


_GOOGLE_ARG = re.compile(r"^(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_SPHINX_ARG = re.compile(r"^:param\s+(?:[^:]*\s)?(\w+)\s*:\s*(.*)$")
_SECTION = re.compile(r"^(Args|Arguments|Parameters|Returns|Raises|Yields|Examples?|Notes?)\s*:\s*$")


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(description, {parameter: description}) of a docstring: its first paragraph, and the entries of a
    Google-style ``Args:`` section or Sphinx ``:param name:`` lines (continuation lines are joined)."""
    lines = doc.strip().splitlines()
    description = " ".join(line.strip() for line in _first_paragraph(lines))
    params: dict[str, str] = {}
    current, in_args = None, False
    for line in lines:
        stripped = line.strip()
        if m := _SPHINX_ARG.match(stripped):
            current = m.group(1)
            params[current] = m.group(2).strip()
        elif m := _SECTION.match(stripped):
            in_args, current = m.group(1) in ("Args", "Arguments", "Parameters"), None
        elif in_args and (m := _GOOGLE_ARG.match(stripped)) and not line.startswith(" " * 8):
            current = m.group(1).lstrip("*")
            params[current] = m.group(2).strip()
        elif current and stripped and not stripped.startswith(":"):
            params[current] = f"{params[current]} {stripped}".strip()
        else:
            current = None
    return description, params


def _first_paragraph(lines: list[str]) -> list[str]:
    for i, line in enumerate(lines):
        if not line.strip() or _SECTION.match(line.strip()) or line.strip().startswith(":param"):
            return lines[:i]
    return lines


def tool_schema(function: Callable) -> dict:
    """The OpenAI tool (``{"type": "function", "function": {...}}``) describing `function`: its name, its
    docstring's first paragraph, and a JSON schema of its parameters from their annotations (a default
    makes one optional; docstring ``Args:`` / ``:param:`` entries describe them). Raises AgentError for a
    parameter it cannot describe, naming it."""
    name = getattr(function, "__name__", None)
    if not callable(function) or not name:
        raise AgentError(f"{function!r} is not a named function")
    try:
        hints = typing.get_type_hints(function)
    except Exception as e:  # an annotation naming something that does not exist
        raise AgentError(f"{name}: cannot read its annotations ({e})") from None
    description, param_docs = _parse_docstring(inspect.getdoc(function) or "")
    properties, required = {}, []
    for p in inspect.signature(function).parameters.values():
        where = f"parameter {p.name!r} of {name}"
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise AgentError(f"{where}: *args and **kwargs cannot be described to a model; name each parameter")
        if p.name not in hints:
            raise AgentError(f"{where} has no annotation: annotate it (str, int, float, bool, list, dict, ...)")
        schema = _type_schema(hints[p.name], where)
        if p.name in param_docs:
            schema["description"] = param_docs[p.name]
        properties[p.name] = schema
        if p.default is p.empty:
            required.append(p.name)
    parameters = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


def load_tool(spec: str) -> Callable:
    """The function ``module:function`` or ``path/to/file.py:function`` names, checked to have a schema."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise AgentError(f"--tool {spec!r}: give module:function or path/to/file.py:function")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # as `python -m` does: a module in the current directory
    try:
        if where.endswith(".py") or "/" in where:
            module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except FileNotFoundError:
        raise AgentError(f"--tool {spec!r}: no file {where}") from None
    except ModuleNotFoundError as e:
        raise AgentError(f"--tool {spec!r}: no module named {e.name!r} (put it on PYTHONPATH, or give "
                         "path/to/file.py:function)") from None
    except Exception as e:
        raise AgentError(f"--tool {spec!r}: importing {where} failed: {type(e).__name__}: {e}") from None
    function = getattr(module, name, None)
    if not callable(function):
        defined = sorted(k for k, v in vars(module).items() if inspect.isfunction(v) and not k.startswith("_"))
        raise AgentError(f"--tool {spec!r}: {where} has no function {name!r} (it defines: "
                         f"{', '.join(defined) or 'none'})")
    try:
        tool_schema(function)
    except AgentError as e:
        raise AgentError(f"--tool {spec!r}: {e}") from None
    return function


# ------------------------------------------------------------------------- built-in tools

PYTHON_LIMITS = Limits(timeout_s=10.0, memory_bytes=1 << 30)

# Runs the model's code like a REPL cell: a last line that is an expression has its value printed.
# Tracebacks start at the model's code, not at this wrapper.
_REPL = """import ast, sys, traceback
source = {source!r}
namespace = {{"__name__": "__main__"}}
try:
    tree = ast.parse(source, "<code>")
except SyntaxError as e:
    sys.exit("".join(traceback.format_exception_only(type(e), e)))
try:
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, "<code>", "exec"), namespace)
    if last is not None:
        value = eval(compile(ast.Expression(last.value), "<code>", "eval"), namespace)
        if value is not None:
            print(repr(value))
except BaseException as e:
    traceback.print_exception(type(e), e, e.__traceback__.tb_next)
    sys.exit(1)
"""


def run_python(code: str, limits: Limits = PYTHON_LIMITS) -> str:
    """Run `code` in the sandbox (qwenkit.evals.sandbox): its stdout, stderr and how it ended, as text."""
    outcome = run_program(_REPL.format(source=code), limits, stdout_chars=MAX_RESULT_CHARS + 1)
    parts = [outcome.stdout.rstrip("\n")] if outcome.stdout.strip() else []
    if outcome.stderr.strip():
        parts.append("stderr:\n" + outcome.stderr.rstrip("\n"))
    if outcome.status == "timeout":
        parts.append(f"[timed out: {outcome.detail}]")
    elif outcome.status == "failed" and not outcome.stderr.strip():
        parts.append(f"[{outcome.detail}]")
    text = truncated("\n".join(parts)) or "[no output: print() what you want to see]"
    return text if outcome.passed else Failure(text)


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
              ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCTIONS = {name: getattr(math, name) for name in (
    "sqrt", "cbrt", "exp", "log", "log10", "log2", "sin", "cos", "tan", "asin", "acos", "atan", "atan2", "sinh",
    "cosh", "tanh", "floor", "ceil", "fabs", "factorial", "comb", "perm", "gcd", "lcm", "hypot", "degrees",
    "radians", "isqrt") if hasattr(math, name)} | {"abs": abs, "round": round, "min": min, "max": max}
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau, "inf": math.inf}
MAX_INT_BITS = 100_000  # of a power's or factorial's result (2 ** 100000 has 30,103 digits)
MAX_EXPRESSION = 1000  # characters


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly as Python would, and return its value.

    Allowed: numbers, + - * / // % ** and parentheses, the math functions sqrt, cbrt, exp, log, log10,
    log2, sin, cos, tan, asin, acos, atan, atan2, sinh, cosh, tanh, floor, ceil, fabs, factorial, comb,
    perm, gcd, lcm, hypot, degrees, radians, isqrt, abs, round, min, max, and the constants pi, e, tau.

    Args:
        expression: the expression, e.g. "sqrt(2) * (3 + 4) ** 2"
    """
    if len(expression) > MAX_EXPRESSION:
        raise ValueError(f"the expression has {len(expression)} characters; at most {MAX_EXPRESSION}")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {e.msg}") from None
    value = _evaluate(tree.body)
    return repr(value)


def _evaluate(node: ast.AST):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        raise ValueError(f"unknown name {node.id!r}: only the constants {', '.join(_CONSTANTS)} and the listed "
                         "math functions may be used")
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        return _OPERATORS[type(node.op)](left, right)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
        raise ValueError("^ is not a power here: write ** (2 ** 10)")
    if isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in _FUNCTIONS or node.keywords:
            raise ValueError(f"{ast.unparse(node.func)!r} is not an allowed function (allowed: "
                             f"{', '.join(_FUNCTIONS)}; positional arguments only)")
        args = [_evaluate(a) for a in node.args]
        if name in ("factorial", "comb", "perm") and any(isinstance(a, int) and a > 10_000 for a in args):
            raise ValueError(f"{name} of a number over 10000 is too large to compute here")
        return _FUNCTIONS[name](*args)
    raise ValueError(f"{ast.unparse(node)!r} is not allowed: only numbers, arithmetic operators, the listed math "
                     "functions and constants")


def _check_power(base, exponent) -> None:
    """Refuse an integer power whose result would be huge (its bits estimated before it is computed)."""
    if isinstance(base, int) and isinstance(exponent, int) and abs(base) > 1 and exponent > 0:
        if base.bit_length() * exponent > MAX_INT_BITS:
            raise ValueError(f"{base} ** {exponent} is too large (over {MAX_INT_BITS} bits)")


MAX_FILE_BYTES = 1 << 20


def read_text_file(path: str, root: Path) -> str:
    """The text of the file `path` names inside `root` (relative to it); errors for paths outside it
    (``..``, absolute paths, symlinks that resolve outside), directories, big or binary files."""
    root = root.resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(root):
        raise PermissionError(f"{path!r} is outside the directory this agent may read ({root}); give a path "
                              "relative to it")
    if target.is_dir():
        entries = sorted(p.name + "/" * p.is_dir() for p in target.iterdir())
        raise IsADirectoryError(f"{path!r} is a directory; it holds: {', '.join(entries[:100]) or 'nothing'}")
    if not target.is_file():
        raise FileNotFoundError(f"no file {path!r} in {root}")
    size = target.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ValueError(f"{path!r} has {size} bytes; at most {MAX_FILE_BYTES} are read")
    try:
        return truncated(target.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path!r} is not a UTF-8 text file") from None


def builtin_tools(root: str | Path = ".", python_limits: Limits = PYTHON_LIMITS) -> list[Callable]:
    """The built-in tools, read_file confined to `root` and python run under `python_limits`."""
    root = Path(root)
    if not root.is_dir():
        raise AgentError(f"--root {str(root)!r} is not a directory")

    def python(code: str) -> str:
        """Run a Python program in a sandbox (no network, a temporary directory, a time limit) and return what
        it printed. The value of a last line that is an expression is printed too, as in a REPL.

        Args:
            code: the program's source
        """
        return run_python(code, python_limits)

    def read_file(path: str) -> str:
        """Read a text file from the working directory.

        Args:
            path: the file's path, relative to the working directory
        """
        return read_text_file(path, root)

    return [python, calculator, read_file]


# ------------------------------------------------------------------------- the models

OnText = Callable[[str], None]


class LocalChat:
    """A model loaded in this process, prompted and parsed by qwenkit.tools (Hermes or ReAct) as qwenkit serve
    does: a call the model opens is held to the tools' schemas (reply_grammar), so its JSON is valid."""

    def __init__(self, model, tokenizer, **generation):
        self.model, self.tokenizer, self.generation = model, tokenizer, generation

    def reply(self, messages: list[dict], tools: list[dict], on_text: OnText) -> tuple[str, list[ToolCall]]:
        from .generate import stream_generate

        prompt = build_prompt(self.tokenizer, messages, tools)
        parser = new_parser(self.tokenizer, tools)
        content = []

        def show(events) -> None:
            for event in events:
                if isinstance(event, ContentDelta):
                    content.append(event.text)
                    on_text(event.text)

        grammar = reply_grammar(self.tokenizer, tools)
        for delta in stream_generate(self.model, self.tokenizer, prompt, stop=parser.stop, grammar=grammar,
                                     **self.generation):
            show(parser.feed(delta.text))
        events, calls = parser.finish()
        show(events)
        return "".join(content), calls

    def answer(self, messages: list[dict], on_text: OnText) -> str:
        from .generate import stream_generate
        from .grammar import Grammar

        prompt = build_prompt(self.tokenizer, messages, None)
        content = []
        for delta in stream_generate(self.model, self.tokenizer, prompt, grammar=Grammar.regex(NOT_A_CALL),
                                     **self.generation):
            content.append(delta.text)
            on_text(delta.text)
        return "".join(content)


class ServerChat:
    """An OpenAI-compatible server (qwenkit serve, llama.cpp's, vLLM, ...) through the `openai` client."""

    def __init__(self, url: str, model_name: str | None = None, api_key: str | None = None, **generation):
        try:
            from openai import OpenAI
        except ImportError:
            raise AgentError("--server needs the openai client: pip install openai") from None
        base = url.rstrip("/")
        self.client = OpenAI(base_url=base if base.endswith("/v1") else base + "/v1", api_key=api_key or "none")
        self.model_name = model_name or self.client.models.list().data[0].id
        # The OpenAI fields by their names; the others (top_k, min_p, ...) as extra fields, which qwenkit serve
        # and llama.cpp's server read.
        openai = {"temperature": "temperature", "top_p": "top_p", "seed": "seed", "max_new_tokens": "max_tokens"}
        self.generation = {openai[k]: v for k, v in generation.items() if k in openai}
        extra = {k: v for k, v in generation.items() if k not in openai}
        if extra:
            self.generation["extra_body"] = extra

    def reply(self, messages: list[dict], tools: list[dict], on_text: OnText) -> tuple[str, list[ToolCall]]:
        stream = self.client.chat.completions.create(model=self.model_name, messages=messages, tools=tools or None,
                                                     stream=True, **self.generation)
        content, calls = [], {}  # index -> [id, name, arguments]
        for chunk in stream:
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            if delta.content:
                content.append(delta.content)
                on_text(delta.content)
            for piece in delta.tool_calls or []:
                call = calls.setdefault(piece.index, ["", "", ""])
                call[0] = piece.id or call[0]
                if piece.function:
                    call[1] += piece.function.name or ""
                    call[2] += piece.function.arguments or ""
        return "".join(content), [ToolCall(id, name, arguments or "{}") for id, name, arguments in calls.values()]

    def answer(self, messages: list[dict], on_text: OnText) -> str:
        """(No tools offered: a server has no standard way to rule calls out of the text itself.)"""
        content, _ = self.reply(messages, [], on_text)
        return content


# ------------------------------------------------------------------------- the loop

def _call_key(call: ToolCall) -> tuple[str, str]:
    """A call's name and arguments, the same for the same JSON however it is spaced."""
    try:
        return call.name, json.dumps(json.loads(call.arguments), sort_keys=True)
    except ValueError:
        return call.name, call.arguments


def _near_copy(call: tuple[str, str], other: tuple[str, str]) -> bool:
    """Whether `call` is the same tool as `other` with arguments at least NEAR_COPY alike (an edited copy)."""
    return call[0] == other[0] and difflib.SequenceMatcher(None, call[1], other[1]).ratio() >= NEAR_COPY


class Agent:
    """A conversation in which the model may call `tools` (Python functions) before it answers.

    `chat` is a LocalChat or a ServerChat. `on_text` receives the model's text as it streams, `on_call(name,
    arguments)` each call before it runs and `on_result(name, result)` its result."""

    def __init__(self, chat: LocalChat | ServerChat, tools: Sequence[Callable], system: str | None = SYSTEM,
                 max_steps: int = 8, on_text: OnText | None = None,
                 on_call: Callable[[str, str], None] | None = None,
                 on_result: Callable[[str, str], None] | None = None):
        if max_steps < 1:
            raise AgentError(f"max_steps={max_steps} must be at least 1")
        self.chat, self.max_steps = chat, max_steps
        self.functions = {f.__name__: f for f in tools}
        self.schemas = [tool_schema(f) for f in tools]
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.on_text = on_text or (lambda text: None)
        self.on_call = on_call or (lambda name, arguments: None)
        self.on_result = on_result or (lambda name, result: None)

    def ask(self, question: str) -> str:
        """Put `question` to the model, run the tools it calls, and return its answer. Small models call again
        instead of reading a result: a reply that only repeats calls already made is not run again, and one whose
        calls all fail as edited copies of calls that worked is taken back; either way the model is asked for its
        answer from the results it has, with calls ruled out (`answer`). Raises AgentError when it is still
        calling tools after max_steps replies."""
        self.messages.append({"role": "user", "content": question})
        made = set()  # (name, arguments) of the calls made for this question
        worked = []  # the same, of those whose result was not a Failure
        for _ in range(self.max_steps):
            content, calls = self.chat.reply(self.messages, self.schemas, self.on_text)
            if not calls:
                self.messages.append({"role": "assistant", "content": content})
                return content
            fresh = {key: c for c in calls if (key := _call_key(c)) not in made}
            if not fresh:
                return self.answer()
            made.update(fresh)
            calls = list(fresh.values())
            self.messages.append({"role": "assistant", "content": content, "tool_calls": [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in calls]})
            broken_copies = 0
            for key, call in fresh.items():
                self.on_call(call.name, call.arguments)
                result = self.run_tool(call.name, call.arguments)
                self.on_result(call.name, result)
                self.messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result})
                if not isinstance(result, Failure):
                    worked.append(key)
                elif any(_near_copy(key, other) for other in worked):
                    broken_copies += 1
            if broken_copies == len(calls):  # a copy of what worked, broken in the editing: answer from what worked
                del self.messages[-1 - len(calls):]
                return self.answer()
        raise AgentError(f"no answer after {self.max_steps} steps: the model was still calling tools (allow "
                         "more with --max-steps)")

    def answer(self) -> str:
        """The model's answer from the conversation so far, without tools (told to read the results it has)."""
        system = next((m["content"] for m in self.messages if m["role"] == "system"), None)
        told = {"role": "system", "content": ANSWER if system in (None, SYSTEM) else f"{system}\n\n{ANSWER}"}
        content = self.chat.answer([told] + [m for m in self.messages if m["role"] != "system"], self.on_text)
        self.messages.append({"role": "assistant", "content": content})
        return content

    def run_tool(self, name: str, arguments: str) -> str:
        """The result of one call as the text the model reads; errors are results too (a Failure)."""
        function = self.functions.get(name)
        if function is None:
            return Failure(f"error: there is no tool {name!r}; the tools are: {', '.join(self.functions)}")
        try:
            kwargs = json.loads(arguments)
        except ValueError as e:
            return Failure(f"error: the arguments are not JSON ({e})")
        if not isinstance(kwargs, dict):
            return Failure("error: the arguments must be a JSON object")
        try:
            inspect.signature(function).bind(**kwargs)
        except TypeError as e:
            return Failure(f"error: {e}; the parameters are: "
                           f"{json.dumps(tool_schema(function)['function']['parameters'])}")
        try:
            result = function(**kwargs)
        except Exception as e:
            return Failure(f"error: {type(e).__name__}: {e}")
        if not isinstance(result, str):
            result = json.dumps(result, ensure_ascii=False, default=str)
        return truncated(result)
