"""`qwenkit merge`: a LoRA adapter folded into its base model, saved as a checkpoint."""

from __future__ import annotations

import argparse

from .args import add_load_args, load_for

HELP = "fold a LoRA adapter into its base model and save the result"
DESCRIPTION = ("Load -m MODEL, fold the LoRA adapter (peft format) into its weights and write a full checkpoint "
               "that -m OUT loads like any other. Adapted layers of a quantized base (a GPTQ checkpoint) are "
               "dequantized: they come out float.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_load_args(parser, quantize=False, model_help="the base model the adapter was trained on (default: demo)",
                  dtype_help="float32, bfloat16, float16 or auto (bfloat16 on CPUs with bf16 math): the dtype of "
                             "the merged weights")
    parser.add_argument("--adapter", metavar="DIR", required=True, help="the LoRA adapter directory")
    parser.add_argument("--out", required=True, help="directory to write (refused if it exists and is not empty)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    from ..saving import check_out_dir, save_checkpoint
    from ..train.lora import merge_lora

    check_out_dir(args.out, args.force)  # before the slow load
    model, tokenizer = load_for(args)  # folds the adapter into the float linears
    merge_lora(model)  # and into quantized ones (a GPTQ base), which become float
    save_checkpoint(model, tokenizer, args.out, force=args.force)
    print(f"wrote {args.out}: {args.model or 'demo'} with {args.adapter} merged")
    return 0
