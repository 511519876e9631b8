"""Prefill, time to first token and decode speed of the demo model: qwenkit next to transformers.

    python benchmarks/generate.py [--dtype bfloat16] [--prompt-tokens 512] [--new-tokens 128]

Greedy decode after a random prompt, eos ignored, each engine in its own process (engines.py).
Goals: decode >= 1.25x and prefill >= 1.5x transformers at bf16. Results go to
benchmarks/results/generate-DTYPE-DATE.json.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from engines import measure, report  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    rows = [measure(e, args.dtype, args.prompt_tokens, args.new_tokens) for e in ("qwenkit", "transformers")]
    columns = [("prefill_tok_s", "prefill tok/s", ".1f"), ("ttft_s", "TTFT s", ".3f"),
               ("decode_tok_s", "decode tok/s", ".2f"), ("gb_per_s", "GB/s", ".1f"),
               ("peak_rss_mib", "peak RSS MiB", ".0f")]
    ratios = {"decode": lambda o, r: o["decode_tok_s"] / r["decode_tok_s"],
              "prefill": lambda o, r: o["prefill_tok_s"] / r["prefill_tok_s"],
              "ttft": lambda o, r: r["ttft_s"] / o["ttft_s"]}
    report(f"generate-{args.dtype}", rows, columns, ratios, dtype=args.dtype,
           prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)


if __name__ == "__main__":
    main()
