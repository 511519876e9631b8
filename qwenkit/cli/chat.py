"""`qwenkit chat`: the terminal chat. Streaming replies, history, the Qwen-7B scripts' `:` commands
and Ollama's `/` ones."""

from __future__ import annotations

import argparse
import ast
import sys
import time

from ..generate import stream_generate
from ..model import Model
from ..parallel import LinesFromRank0
from ..prompts import history_prompt
from ..sampling import SamplingParams
from ..tokenizer import Tokenizer
from .args import (add_adapter_arg, add_devices_args, add_load_args, add_parallel_arg, add_sampling_args,
                   add_speed_args, check_draft_args, drafter_for, load_for, sampling_kwargs)

HELP = "interactive chat with history and streaming"
DESCRIPTION = ("Chat in the terminal. Type :help inside for the commands (:clear-history, :conf temperature=0, "
               ":system ..., /bye, ...).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_load_args(parser)
    add_speed_args(parser)
    add_parallel_arg(parser)
    add_devices_args(parser)
    add_adapter_arg(parser)
    add_sampling_args(parser)
    parser.add_argument("--system", default=None, help="system prompt (default: the model's own)")
    parser.add_argument("--verbose", action="store_true", help="print tokens/s after each reply")


def run(args: argparse.Namespace) -> int:
    check_draft_args(args)
    model, tokenizer = load_for(args)
    draft = drafter_for(args, tokenizer)
    gen = {**sampling_kwargs(args), **({"draft": draft} if draft else {})}
    stdin = None if args.tensor_parallel is None else LinesFromRank0(sys.stdin, args.tensor_parallel)
    Repl(model, tokenizer, system=args.system, gen=gen, verbose=args.verbose, stdin=stdin).run()
    return 0


COMMANDS = """Commands:
  :help  :h                 show this help
  :exit  :quit  :q  /bye    leave
  :clear :cl                clear the screen
  :clear-history :clh /clear  forget the conversation
  :history :his             show the conversation
  :seed [N]                 show or set the seed used for every reply
  :conf [key=value ...]     show or change generation settings, e.g. :conf temperature=0 top_p=0.9
  :reset-conf               restore the settings the session started with
  :system TEXT  /system TEXT  /set system TEXT   set the system prompt (forgets the conversation)
  /set parameter KEY VALUE  change a setting, as in Ollama
  :verbose  /set verbose    print tokens/s after each reply
Multi-line input: start and end it with three double quotes (\"\"\")."""

_CONF_KEYS = set(SamplingParams.__dataclass_fields__) | {"max_new_tokens"}


class Repl:
    """One terminal conversation: reads inputs, runs commands, streams the replies."""

    def __init__(self, model: Model, tokenizer: Tokenizer, system: str | None = None, gen: dict | None = None,
                 verbose: bool = False, stdin=None, stdout=None):
        self.model, self.tokenizer = model, tokenizer
        self.system = system  # None: the model's own default system prompt
        self.start_conf = dict(gen or {})
        self.conf = dict(self.start_conf)
        self.history: list[tuple[str, str]] = []
        self.verbose = verbose
        self.stdin, self.out = stdin or sys.stdin, stdout or sys.stdout
        self.interactive = self.stdin.isatty()

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def read(self) -> str | None:
        """One user input (a line, or a \"\"\"-delimited block); None at end of input."""
        if self.interactive:
            self.say("User> ", end="")
        line = self.stdin.readline()
        if not line:
            return None
        line = line.rstrip("\n")
        if not line.strip().startswith('"""'):
            return line
        lines = [line.strip()[3:]]
        while not lines[-1].endswith('"""'):
            more = self.stdin.readline()
            if not more:
                break
            lines.append(more.rstrip("\n"))
        return "\n".join(lines).removesuffix('"""')

    def run(self) -> None:
        if self.interactive:
            self.say("qwenkit chat: type :help for commands, :exit to leave.")
        while True:
            try:
                text = self.read()
            except KeyboardInterrupt:
                self.say()
                return
            if text is None:
                return
            if not text.strip():
                continue
            done = self.command(text.strip()) if text.strip().startswith((":", "/")) else None
            if done == "exit":
                return
            if done is None:
                self.reply(text)

    # ---------------------------------------------------------------- commands
    def command(self, line: str) -> str | None:
        """Run a command: "exit", "done", or None when `line` is not one (it is then sent as a query,
        as the Qwen-7B scripts do with unknown `:xxx`)."""
        word, _, rest = line.partition(" ")
        rest = rest.strip()
        if word in (":exit", ":quit", ":q", "/bye", "/exit"):
            return "exit"
        if word in (":help", ":h", "/help", "/?"):
            self.say(COMMANDS)
        elif word in (":clear", ":cl"):
            self.say("\033[2J\033[H", end="")
        elif word in (":clear-history", ":clear-his", ":clh", "/clear"):
            self.history = []
            self.say("[history cleared]")
        elif word in (":history", ":his"):
            for i, (q, a) in enumerate(self.history):
                self.say(f"User[{i}]: {q}\nQwen[{i}]: {a}")
        elif word == ":seed":
            if rest:
                self.set_conf("seed", rest)
            self.say(f"[seed: {self.conf.get('seed')}]")
        elif word == ":conf":
            for item in rest.split():
                key, _, value = item.partition("=")
                self.set_conf(key, value)
            self.say(f"[generation settings: {self.conf or 'checkpoint defaults'}]")
        elif word == ":reset-conf":
            self.conf = dict(self.start_conf)
            self.say("[settings reset]")
        elif word in (":system", "/system"):
            self.set_system(rest)
        elif word == ":verbose":
            self.verbose = not self.verbose
        elif word == "/set":
            what, _, value = rest.partition(" ")
            if what == "system":
                self.set_system(value.strip())
            elif what == "parameter":
                key, _, val = value.strip().partition(" ")
                self.set_conf({"num_predict": "max_new_tokens", "repeat_penalty": "repetition_penalty"}.get(key, key),
                              val.strip())
            elif what == "verbose":
                self.verbose = True
            elif what == "quiet":
                self.verbose = False
            else:
                self.say("[usage: /set system TEXT | /set parameter KEY VALUE | /set verbose | /set quiet]")
        else:
            return None
        return "done"

    def set_conf(self, key: str, value: str) -> None:
        if key not in _CONF_KEYS:
            self.say(f"[unknown setting {key!r}; known: {', '.join(sorted(_CONF_KEYS))}]")
            return
        try:
            parsed = ast.literal_eval(value) if value not in ("None", "") else None
        except (ValueError, SyntaxError):
            self.say(f"[cannot read {value!r} as a value for {key}]")
            return
        if parsed is None:
            self.conf.pop(key, None)
            return
        try:
            SamplingParams(**{key: parsed}).validate() if key != "max_new_tokens" else None
        except (TypeError, ValueError) as e:
            self.say(f"[{e}]")
            return
        self.conf[key] = parsed

    def set_system(self, text: str) -> None:
        self.system = text or None
        self.history = []
        self.say("[system prompt set; history cleared]")

    # ---------------------------------------------------------------- replies
    def reply(self, query: str) -> None:
        prompt = history_prompt(self.tokenizer, query, self.history, self.system,
                                generation_config=self.model.generation_config)
        parts, count, start, first = [], 0, time.perf_counter(), None
        try:
            for delta in stream_generate(self.model, self.tokenizer, prompt, **self.conf):
                first = first or time.perf_counter()
                count += delta.token_id is not None
                parts.append(delta.text)
                self.say(delta.text, end="")
        except KeyboardInterrupt:
            self.say("\n[interrupted; this turn is not kept]")
            return
        self.say()
        self.history.append((query, "".join(parts).strip()))
        if self.verbose and first:
            decode = (count - 1) / max(time.perf_counter() - first, 1e-9)
            print(f"[{len(prompt)} prompt tokens in {first - start:.2f}s, {count} new tokens, "
                  f"{decode:.1f} tok/s]", file=sys.stderr)
