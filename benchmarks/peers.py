"""qwenkit's decode paths next to its peers on the demo model, one run, each engine in its own process.

    python benchmarks/peers.py [--prompt-tokens 512] [--new-tokens 128] [--rounds 3] [--compile]
                               [--checkpoint DIR ...]

Rows: qwenkit bf16, int8 and int4 (with --compile also each quantized row with the compiled decode
step: on our 2-core CPU 14-24 % faster than eager after a compile of 20 s to 2 minutes), transformers bf16, and
llama.cpp through llama-cpp-python when that is installed: on the GGUF file as it is (Q4_K_M), and on
the same weights requantized to Q8_0 by llama.cpp's own quantizer (made once, beside the demo file),
the 8-bit peer of qwenkit's int8.
--checkpoint adds a row for a checkpoint `qwenkit quantize` wrote (e.g. GPTQ group 32 with an int4
head, the int4 recipe within the quality goal), compiled too with --compile.
Each row: prefill tok/s (512-token prompt, best of 3), time to first token, decode tok/s (128
greedy tokens, eos ignored), achieved GB/s, peak RSS, each the best over --rounds runs of every
engine in turn (every run's decode and prefill stay in the JSON); qwenkit rows add their decode
and prefill ratios to each peer, compiled rows the compile warm-up. Goals (issue 5): int4 decode
>= 1.5x llama.cpp, int8 decode >= 1x llama.cpp (at either of its formats), prefill >= 1.5x transformers bf16.
Results go to benchmarks/results/peers-DATE.json.
"""

import argparse
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from engines import measure, report  # noqa: E402

LLAMA_CPP_MISSING = ("llama.cpp: skipped, llama-cpp-python is not installed. `pip install llama-cpp-python` "
                     "builds llama.cpp from source (a few minutes; CMAKE_ARGS=-DGGML_NATIVE=ON for this CPU).")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--compile", action="store_true",
                        help="add a row with the compiled decode step for each quantized row")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="DIR",
                        help="also measure this quantized checkpoint of the demo model (repeatable)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="run every engine this many times, taking turns, and keep each one's best "
                             "figures: on a shared machine a slow minute then hurts no engine alone (default 3)")
    args = parser.parse_args()
    n = (args.prompt_tokens, args.new_tokens)

    ours = [("qwenkit bf16", {}), ("qwenkit int8", {"quantize": "int8"}), ("qwenkit int4", {"quantize": "int4"})]
    ours += [(f"qwenkit {Path(d).name}", {"model": d}) for d in args.checkpoint]
    if args.compile:
        ours += [(f"{name} compiled", {**options, "compile": True}) for name, options in ours if options]
    engines = [(name, "qwenkit", "bfloat16", options) for name, options in ours]
    engines.append(("transformers bf16", "transformers", "bfloat16", {}))
    if importlib.util.find_spec("llama_cpp") is None:
        print(LLAMA_CPP_MISSING)
    else:
        engines += [("llama.cpp Q4_K_M", "llama.cpp", "gguf", {}), ("llama.cpp Q8_0", "llama.cpp", "q8_0", {})]
    runs = {name: [] for name, *_ in engines}
    for _ in range(args.rounds):
        for name, engine, dtype, options in engines:
            runs[name].append(measure(engine, dtype, *n, **options))
    rows = [{"name": name, **best(runs[name])} for name, *_ in engines]
    rows, peers = rows[:len(ours)], rows[len(ours):]

    columns = [("prefill_tok_s", "prefill tok/s", ".1f"), ("ttft_s", "TTFT s", ".3f"),
               ("decode_tok_s", "decode tok/s", ".2f"), ("gb_per_s", "GB/s", ".1f"),
               ("peak_rss_mib", "peak RSS MiB", ".0f"), ("compile_s", "compile s", ".1f")]
    for peer, short in zip(peers, ("hf", "llama", "llama_q8")):
        if "error" in peer:
            continue
        for key, what in (("decode_tok_s", "decode"), ("prefill_tok_s", "prefill")):
            column = f"{what}_vs_{short}"
            columns.append((column, f"{what} /{short}", ".2f"))
            for row in rows:
                if "error" not in row:
                    row[column] = row[key] / peer[key]
    report("peers", rows + peers, columns, {}, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)


def best(runs: list[dict]) -> dict:
    """One engine's best figures over its runs (decode with the GB/s of the same run), plus every
    run's decode and prefill so the spread stays visible; the first error if every run failed."""
    done = [r for r in runs if "error" not in r]
    if not done:
        return runs[0]
    fastest = max(done, key=lambda r: r["decode_tok_s"])
    return {**fastest, "prefill_tok_s": max(r["prefill_tok_s"] for r in done),
            "ttft_s": min(r["ttft_s"] for r in done), "peak_rss_mib": max(r["peak_rss_mib"] for r in done),
            "decode_tok_s_runs": [r["decode_tok_s"] for r in done],
            "prefill_tok_s_runs": [r["prefill_tok_s"] for r in done]}


if __name__ == "__main__":
    main()
