"""`qwenkit agent`: a tool-using agent in the terminal (qwenkit.agent). The model's text streams; each tool
call and its result are printed dimmed, prefixed with "→" and "←", on stderr when it is not a terminal's."""

from __future__ import annotations

import argparse
import json
import sys

from .args import (add_devices_args, add_load_args, add_sampling_args, add_speed_args, check_draft_args, drafter_for,
                   load_for, sampling_kwargs)

HELP = "a tool-using agent: the model runs Python, a calculator, reads files, or your functions"
DESCRIPTION = """Ask a question; the model may call tools, the agent runs them and gives it the results, until it
answers without a call. Built-in tools: python (runs code in a sandbox: a temporary directory, time and memory
limits, no network where the OS allows; the value of a last expression is printed, as in a REPL), calculator
(arithmetic and math functions, no code) and read_file (text files under --root only). Add your own Python
functions with --tool: the model sees each one's name, docstring and parameters (from the annotations). With no
PROMPT, questions are read from stdin, one a line, in one conversation."""
EPILOG = """examples:
  qwenkit agent -m demo "what is the 30th Fibonacci number times 7"
  qwenkit agent -m demo --root src "what does main.py import?"
  qwenkit agent -m demo --tool mytools.py:weather "is it raining in Oslo?"
  qwenkit agent --server http://localhost:8000 "what is sqrt(2) to 10 digits?"   (a qwenkit serve / llama.cpp)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("prompt", nargs="?", default=None, metavar="PROMPT",
                        help="the question (default: read questions from stdin, one a line)")
    add_load_args(parser)
    add_devices_args(parser)
    add_speed_args(parser)
    add_sampling_args(parser)
    parser.add_argument("--tool", action="append", default=[], metavar="MODULE:FUNCTION",
                        help="a Python function the model may call: module:function (importable) or "
                             "path/to/file.py:function; repeatable. Its schema comes from its annotations (str, int, "
                             "float, bool, list, dict, Optional, Literal) and its docstring")
    parser.add_argument("--no-builtin-tools", action="store_true",
                        help="offer only the --tool functions, not python, calculator and read_file")
    parser.add_argument("--root", default=".", metavar="DIR",
                        help="the directory read_file may read in (default: the current one)")
    parser.add_argument("--max-steps", type=int, default=8, metavar="N",
                        help="most model replies per question, tool calls included (default: 8)")
    parser.add_argument("--system", default=None,
                        help="system prompt (default: one that tells the model to compute with the tools)")
    parser.add_argument("--server", default=None, metavar="URL",
                        help="use an OpenAI-compatible server (qwenkit serve, llama.cpp's) instead of loading -m")
    parser.add_argument("--model-name", default=None,
                        help="with --server: the request's model field (default: the server's first model)")
    parser.add_argument("--api-key", default=None, help="with --server: its API key")


def run(args: argparse.Namespace) -> int:
    from ..agent import SYSTEM, Agent, AgentError, LocalChat, ServerChat, builtin_tools, load_tool

    # Tools first: a bad --tool or --root fails before a model loads.
    tools = [] if args.no_builtin_tools else builtin_tools(args.root)
    tools += [load_tool(spec) for spec in args.tool]
    if not tools:
        raise AgentError("no tools: --no-builtin-tools needs at least one --tool")
    check_draft_args(args)
    generation = sampling_kwargs(args)
    if "grammar" in generation:
        raise AgentError("--json-schema and --grammar do not apply to the agent: tool calls are constrained already")
    if args.server:
        if args.lookup or args.draft:
            raise AgentError("--lookup and --draft apply to a model loaded here: set them on the server instead")
        chat = ServerChat(args.server, args.model_name, args.api_key, **generation)
    else:
        model, tokenizer = load_for(args)
        draft = drafter_for(args, tokenizer)
        chat = LocalChat(model, tokenizer, **({"draft": draft} if draft else {}), **generation)
    show = Display()
    agent = Agent(chat, tools, system=args.system or SYSTEM, max_steps=args.max_steps, on_text=show.text,
                  on_call=show.call, on_result=show.result)
    if args.prompt is not None:
        agent.ask(args.prompt)
        show.end()
        return 0
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        try:
            agent.ask(line.strip())
        except AgentError as e:  # the conversation goes on
            show.note(str(e))
        show.end()


class Display:
    """The model's text on stdout as it streams; tool calls and results dimmed, on stderr when stdout is not a
    terminal, so that `qwenkit agent ... > answer.txt` keeps only the model's text."""

    def __init__(self, out=None, side=None):
        self.out = out or sys.stdout
        self.side = side or (self.out if self.out.isatty() else sys.stderr)
        dim = self.side.isatty()
        self.dim, self.plain = ("\033[2m", "\033[0m") if dim else ("", "")
        self.at_line_start = True

    def text(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
        self.at_line_start = text.endswith("\n") if text else self.at_line_start

    def _side(self, mark: str, text: str) -> None:
        if not self.at_line_start:
            self.text("\n")
        lines = text.splitlines() or [""]
        body = "\n".join([f"{mark} {lines[0]}", *(f"  {line}" for line in lines[1:])])
        self.side.write(f"{self.dim}{body}{self.plain}\n")
        self.side.flush()

    def call(self, name: str, arguments: str) -> None:
        values = json.loads(arguments)
        code = next(iter(values.values())) if len(values) == 1 else None
        # A program reads better as its lines than as one escaped JSON string.
        self._side("→", f"{name}\n{code}" if isinstance(code, str) and "\n" in code else f"{name} {arguments}")

    def result(self, name: str, result: str) -> None:
        self._side("←", result)

    def note(self, text: str) -> None:
        self._side("!", text)

    def end(self) -> None:
        if not self.at_line_start:
            self.text("\n")
