"""`qwenkit quantize`: write an int4/int8 checkpoint and print what it costs against the original."""

from __future__ import annotations

import argparse
import json

from ..errors import QwenkitError
from ..evals.quantization import quantize_checkpoint
from .args import add_load_args

HELP = "write an int4/int8 checkpoint (RTN or GPTQ) and compare it"
DESCRIPTION = ("Quantize the linear layers of a model (blocks int4 or int8, the lm_head int8), write a checkpoint "
               "that -m DIR loads, then print perplexity on held-out text, weights on disk, peak RSS, prefill and "
               "decode tok/s for the original and the quantized model (each measured in a fresh process).")
EPILOG = ("GPTQ calibrates on 128 windows of 512 tokens from Python's standard library source (available offline) "
          "unless --calib gives a file: plain text, or .json/.jsonl conversations in the fine-tuning formats, "
          "rendered with the chat template. Perplexity uses held-out standard-library files, never calibration "
          "text.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_load_args(parser, quantize=False, dtype_help="float dtype of the unquantized tensors and activations "
                                                     "(default auto: bfloat16 on CPUs with bf16 math)")
    parser.add_argument("--out", required=True, help="directory to write (refused if it exists and is not empty)")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4, help="4: int4 per group; 8: int8 per channel")
    parser.add_argument("--method", choices=("rtn", "gptq"), default="gptq",
                        help="gptq (default): minimise output error on calibration data; rtn: round to nearest, "
                             "instant")
    parser.add_argument("--group-size", type=int, default=None,
                        help="inputs per int4 scale: 32, 64, 128 (default) or 256")
    parser.add_argument("--act-order", action="store_true",
                        help="GPTQ: quantize columns in order of activation size (usually more accurate)")
    parser.add_argument("--calib", help="GPTQ calibration file: text, or .json/.jsonl conversations")
    parser.add_argument("--calib-samples", type=int, default=128, help="GPTQ calibration sequences (default 128)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    parser.add_argument("--lm-head-bits", choices=("8", "4", "float"), default="8",
                        help="the output head, rounded to nearest (default 8: the logits are where precision shows)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--no-eval", action="store_true", help="only quantize and save; skip the comparison table")
    parser.add_argument("--eval-tokens", type=int, default=8192,
                        help="held-out tokens for perplexity (default 8192)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


def run(args: argparse.Namespace) -> int:
    if args.bits == 8 and args.group_size is not None:
        raise QwenkitError("--group-size applies to --bits 4 only (int8 has one scale per output channel)")
    report = quantize_checkpoint(
        args.model or "demo", args.out, bits=args.bits, method=args.method, group_size=args.group_size or 128,
        act_order=args.act_order, calib=args.calib, calib_samples=args.calib_samples, seq_len=args.seq_len,
        lm_head_bits=None if args.lm_head_bits == "float" else int(args.lm_head_bits), dtype=args.dtype,
        device=args.device, force=args.force, evaluate=not args.no_eval, eval_tokens=args.eval_tokens)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"wrote {args.out}")
        if "rows" in report:
            print(format_table(report))
    return 0


def format_table(report: dict) -> str:
    """The rows as an aligned text table, perplexity change against the original included."""
    header = ("", "perplexity", "Δ ppl", "size on disk", "peak RSS", "prefill tok/s", "decode tok/s")
    base = report["rows"][0]["perplexity"]
    lines = [header]
    for row in report["rows"]:
        delta = "" if row is report["rows"][0] else f"{100 * (row['perplexity'] / base - 1):+.2f} %"
        lines.append((row["name"], f"{row['perplexity']:.3f}", delta, f"{row['size_bytes'] / 2**20:,.0f} MiB",
                      f"{row['peak_rss_mib']:,.0f} MiB", f"{row['prefill_tok_s']:.1f}", f"{row['decode_tok_s']:.1f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
                     for line in lines)
    return f"{text}\nperplexity on {report['heldout']}; quantized in {report['quantize_seconds']} s"
