"""`qwenkit bench`: prefill and decode speed of one model on this machine."""

from __future__ import annotations

import argparse
import json

from ..evals.speed import run_bench
from .args import add_load_args, add_speed_args, load_for

HELP = "measure prefill and decode speed"
DESCRIPTION = ("Prefill tok/s, decode tok/s, time to first token, achieved GB/s and peak RSS on a synthetic prompt "
               "(greedy, eos ignored).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_load_args(parser)
    add_speed_args(parser)
    parser.add_argument("--prompt-tokens", type=int, default=512, help="prompt length (default 512)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens to decode (default 128)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load_for(args)
    result = run_bench(model, tokenizer, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
    if args.compile:
        result["compile_s"] = round(args.compile_s, 1)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>16}: {value}")
    return 0
