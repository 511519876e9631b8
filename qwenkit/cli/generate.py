"""`qwenkit generate`: one completion of a prompt, printed."""

from __future__ import annotations

import argparse
import sys

from ..generate import stream_generate
from ..parallel import LinesFromRank0
from ..prompts import apply_chat_template
from .args import (add_adapter_arg, add_devices_args, add_load_args, add_parallel_arg, add_sampling_args,
                   add_speed_args, check_draft_args, drafter_for, load_for, sampling_kwargs)

HELP = "one completion of a prompt"
DESCRIPTION = "Generate once from --prompt (or standard input) and print the text."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_load_args(parser)
    add_speed_args(parser)
    add_parallel_arg(parser)
    add_devices_args(parser)
    add_adapter_arg(parser)
    add_sampling_args(parser)
    parser.add_argument("--prompt", help="the prompt text (default: read standard input)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    parser.add_argument("--system", default=None, help="system prompt, with --chat")
    parser.add_argument("--stream", action="store_true", help="print text as it is generated")


def run(args: argparse.Namespace) -> int:
    check_draft_args(args)
    model, tokenizer = load_for(args)
    draft = drafter_for(args, tokenizer)
    stdin = sys.stdin if args.tensor_parallel is None else LinesFromRank0(sys.stdin, args.tensor_parallel)
    prompt = args.prompt if args.prompt is not None else stdin.read()
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}]
        prompt = apply_chat_template(tokenizer, messages)
    text = []
    for delta in stream_generate(model, tokenizer, prompt, draft=draft, **sampling_kwargs(args)):
        if args.stream:
            print(delta.text, end="", flush=True)
        text.append(delta.text)
    print("" if args.stream else "".join(text))
    return 0
