"""Load time, peak RSS and 512-token prefill of the demo model: qwenkit next to transformers.

    python benchmarks/load.py [--dtype bfloat16]

Each engine runs in its own process (engines.py). Goal: peak memory while loading
stays within 1.3x the final weights. Results go to benchmarks/results/load-DTYPE-DATE.json.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from engines import measure, report  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    rows = [measure(engine, args.dtype) for engine in ("qwenkit", "transformers")]
    columns = [("load_s", "load s", ".2f"), ("rss_before_load_mib", "RSS before MiB", ".0f"),
               ("rss_after_load_mib", "peak RSS after load MiB", ".0f"),
               ("weight_mib", "weights MiB", ".0f"), ("prefill_tok_s", "prefill tok/s", ".1f")]
    ratios = {"load_speedup": lambda o, r: r["load_s"] / o["load_s"],
              # what loading added to the process, over the size of the weights it built
              "qwenkit_load_peak_over_weights": lambda o, r: (o["rss_after_load_mib"] - o["rss_before_load_mib"])
              / o["weight_mib"],
              "prefill": lambda o, r: o["prefill_tok_s"] / r["prefill_tok_s"]}
    report(f"load-{args.dtype}", rows, columns, ratios, dtype=args.dtype)


if __name__ == "__main__":
    main()
