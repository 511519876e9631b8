"""`qwenkit bench`: prefill and decode speed of one model on this machine."""

from __future__ import annotations

import argparse
import json

from ..evals.speed import run_bench
from ..grammar import as_grammar
from .args import (add_devices_args, add_grammar_args, add_load_args, add_parallel_arg, add_speed_args,
                   check_draft_args, drafter_for, file_or_text, grammar_arg, load_for)

HELP = "measure prefill and decode speed"
DESCRIPTION = ("Prefill tok/s, decode tok/s, time to first token, achieved GB/s and peak RSS on a synthetic prompt "
               "(greedy, eos ignored) or on --prompt (to the end of the reply). With --lookup N or --draft MODEL the "
               "same decode runs again with drafts: tokens per step, the drafts' acceptance rate and the speed-up "
               "are printed; with --json-schema or --grammar, again under the grammar: its decode speed and cost per "
               "token.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_load_args(parser)
    add_speed_args(parser)
    add_parallel_arg(parser)
    add_devices_args(parser)
    parser.add_argument("--prompt-tokens", type=int, default=512, help="prompt length (default 512)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens to decode (default 128)")
    parser.add_argument("--prompt", default=None, metavar="TEXT_OR_FILE",
                        help="a real prompt instead of random tokens (as a user message through the chat template "
                             "when the model has one); decoding then stops where the reply ends")
    add_grammar_args(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    check_draft_args(args)
    grammar = as_grammar(grammar_arg(args))
    model, tokenizer = load_for(args)
    draft = drafter_for(args, tokenizer)
    prompt = None
    if args.prompt is not None:
        text = file_or_text(args.prompt)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}]) if tokenizer.chat_template \
            else tokenizer.encode(text)
    result = run_bench(model, tokenizer, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, prompt=prompt)
    if draft is not None:  # the same decode with drafts, after the plain one: the speed-up is theirs
        drafted = run_bench(model, tokenizer, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                            prompt=prompt, warmup=bool(args.draft), draft=draft)  # warms a draft model up
        result.update({k: v for k, v in drafted.items() if k.startswith("draft")})
        result["draft_decode_tok_s"] = drafted["decode_tok_s"]
        result["draft_speedup"] = round(drafted["decode_tok_s"] / result["decode_tok_s"], 2)
    if grammar is not None:  # the same decode under the grammar (which may end it sooner: its text is complete)
        shaped = run_bench(model, tokenizer, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                           prompt=prompt, warmup=False, grammar=grammar)
        result["grammar_new_tokens"] = shaped["new_tokens"]
        result["grammar_decode_tok_s"] = shaped["decode_tok_s"]
        result["grammar_ratio"] = round(shaped["decode_tok_s"] / result["decode_tok_s"], 3)
        result["grammar_ms_per_token"] = round(1e3 / shaped["decode_tok_s"] - 1e3 / result["decode_tok_s"], 2)
    if args.compile:
        result["compile_s"] = round(args.compile_s, 1)
    if getattr(model, "layer_split", None) is not None:  # the blocks each device holds
        split = model.layer_split
        result["layer_split"] = ",".join(f"{device}={n}" for device, n in zip(split.devices, split.counts))
    if args.tensor_parallel is not None:  # each rank holds its shard: its own memory
        result["tp"] = args.tensor_parallel.size
        result["peak_rss_mib_ranks"] = args.tensor_parallel.gather_objects(result["peak_rss_mib"])
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>16}: {value}")
    return 0
