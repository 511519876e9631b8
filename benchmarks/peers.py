"""qwenkit's decode paths next to its peers on the demo model, one run, each engine in its own process.

    python benchmarks/peers.py [--prompt-tokens 512] [--new-tokens 128] [--rounds 3] [--compile]
                               [--checkpoint DIR ...] [--isa avx2]
    python benchmarks/peers.py --long [4096,16384,32768] [--isa avx2]

Rows: qwenkit's default path (no flags: the GGUF's own quantization, dtype auto), float weights
(`--quantize none`, dtype auto: bf16 weights, with bf16 activations where the CPU has bf16 natively,
else float32 ones), int8 and int4 (with --compile also
each quantized row with the compiled decode step), transformers (bf16 or float32 as dtype auto), and
llama.cpp through llama-cpp-python when that is installed: on the GGUF file as it is (Q4_K_M), and
on the same weights requantized to Q8_0 by llama.cpp's own quantizer (made once, beside the demo
file), the 8-bit peer of qwenkit's int8.
--checkpoint adds a row for a checkpoint `qwenkit quantize` wrote (e.g. GPTQ group 32 with an int4
head), compiled too with --compile.
--isa avx2 runs every engine as on an AVX2-only CPU: torch, oneDNN and qwenkit held to AVX2
(ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, QWENKIT_CPU_CLASS), and llama.cpp built for AVX2
(GGML_NATIVE off, AVX2/FMA/F16C on; built once into ~/.cache/qwenkit/peers, a few minutes).
Each row: prefill tok/s (512-token prompt, best of 3), time to first token, decode tok/s (128
greedy tokens, eos ignored), achieved GB/s, peak RSS and its growth from before loading per
weight byte, each the best over --rounds runs of every engine in turn (every run's decode and
prefill stay in the JSON); qwenkit rows add their decode and prefill ratios to each peer,
compiled rows the compile warm-up. Goals (per CPU class):
the default path decodes >= 1.0x llama.cpp Q4_K_M and prefills >= 1.5x llama.cpp; int4 decodes
>= 1.5x llama.cpp Q4_K_M, int8 >= 1.0x Q8_0; no row under 0.5x in decode or 1.0x in prefill; RSS
growth <= 1.3x the weights.
Results go to benchmarks/results/peers-DATE.json (peers-avx2-DATE.json with --isa avx2).

--long: long prompts instead, each length once per engine (one prefill each; 16 new tokens): qwenkit's
default path with its chunked prefill, the same with --kv-cache int8, transformers (its prefill alone) and
llama.cpp Q4_K_M; prefill tok/s, TTFT, decode tok/s after the long prompt, peak RSS and qwenkit's cache
MiB, with qwenkit's prefill ratios to the peers at the same length. Results: peers-long[-avx2]-DATE.json.
"""

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from engines import measure, report  # noqa: E402

FORCED = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "QWENKIT_CPU_CLASS": "avx2"}}
LLAMA_CPP_FLAGS = {"avx2": "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_FMA=ON -DGGML_F16C=ON"}
LLAMA_CPP_VERSION = "0.3.36"
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
    parser.add_argument("--isa", choices=sorted(FORCED), help="run every engine as on a CPU of this class")
    parser.add_argument("--long", nargs="?", const="4096,16384,32768", default=None, metavar="N,N,...",
                        help="long prompts of these lengths instead (default 4096,16384,32768)")
    args = parser.parse_args()
    if args.long:
        return long_prompts([int(n) for n in args.long.split(",")], args.isa)
    n = (args.prompt_tokens, args.new_tokens)
    env = FORCED.get(args.isa, {})
    float_dtype = float_dtype_of(env)

    ours = [("qwenkit default", {"quantize": "auto"}), (f"qwenkit float, {float_dtype} x", {}),
            ("qwenkit int8", {"quantize": "int8"}), ("qwenkit int4", {"quantize": "int4"})]
    ours += [(f"qwenkit {Path(d).name}", {"model": d}) for d in args.checkpoint]
    if args.compile:
        ours += [(f"{name} compiled", {**options, "compile": True}) for name, options in ours if options]
    engines = [(name, "qwenkit", "auto", options, env) for name, options in ours]
    engines.append((f"transformers {float_dtype}", "transformers", float_dtype, {}, env))
    llama_env = llama_cpp_for(args.isa)
    if llama_env is not None:
        engines += [("llama.cpp Q4_K_M", "llama.cpp", "gguf", {}, {**env, **llama_env}),
                    ("llama.cpp Q8_0", "llama.cpp", "q8_0", {}, {**env, **llama_env})]
    runs = {name: [] for name, *_ in engines}
    for _ in range(args.rounds):
        for name, engine, dtype, options, engine_env in engines:
            runs[name].append(measure(engine, dtype, *n, **options, env=engine_env))
    rows = [{"name": name, **best(runs[name])} for name, *_ in engines]
    for row in rows:  # the goal's measure: what the process grew by, from before loading, per weight byte
        if "error" not in row:
            row["rss_growth_per_weight"] = (row["peak_rss_mib"] - row["rss_before_load_mib"]) / row["weight_mib"]
    rows, peers = rows[:len(ours)], rows[len(ours):]

    columns = [("prefill_tok_s", "prefill tok/s", ".1f"), ("ttft_s", "TTFT s", ".3f"),
               ("decode_tok_s", "decode tok/s", ".2f"), ("gb_per_s", "GB/s", ".1f"),
               ("peak_rss_mib", "peak RSS MiB", ".0f"), ("rss_growth_per_weight", "RSS growth/weights", ".2f"),
               ("compile_s", "compile s", ".1f")]
    for peer, short in zip(peers, ("hf", "llama", "llama_q8")):
        if "error" in peer:
            continue
        for key, what in (("decode_tok_s", "decode"), ("prefill_tok_s", "prefill")):
            column = f"{what}_vs_{short}"
            columns.append((column, f"{what} /{short}", ".2f"))
            for row in rows:
                if "error" not in row:
                    row[column] = row[key] / peer[key]
    report(f"peers-{args.isa}" if args.isa else "peers", rows + peers, columns, {}, isa=args.isa or "native",
           prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)


def long_prompts(lengths: list[int], isa: str | None) -> None:
    """Prefill speed and memory at long prompts, each engine once per length."""
    env = FORCED.get(isa, {})
    engines = [("qwenkit default", "qwenkit", "auto", {"quantize": "auto"}, env),
               ("qwenkit default, int8 cache", "qwenkit", "auto", {"quantize": "auto", "kv_cache": "int8"}, env),
               (f"transformers {float_dtype_of(env)}", "transformers", float_dtype_of(env), {}, env)]
    llama_env = llama_cpp_for(isa)
    if llama_env is not None:
        engines.append(("llama.cpp Q4_K_M", "llama.cpp", "gguf", {}, {**env, **llama_env}))
    rows = []
    for n in lengths:
        at = [{"name": f"{name} @{n}", "prompt_tokens": n,
               **measure(engine, dtype, n, 16, **options, env=engine_env, once=True)}
              for name, engine, dtype, options, engine_env in engines]
        for peer, short in zip(at[2:], ("hf", "llama")):
            for row in at[:2]:
                if "error" not in row and "error" not in peer:
                    row[f"prefill_vs_{short}"] = row["prefill_tok_s"] / peer["prefill_tok_s"]
        rows += at
    columns = [("prefill_tok_s", "prefill tok/s", ".1f"), ("ttft_s", "TTFT s", ".1f"),
               ("decode_tok_s", "decode tok/s", ".2f"), ("peak_rss_mib", "peak RSS MiB", ".0f"),
               ("kv_cache_mib", "cache MiB", ".0f"), ("prefill_vs_hf", "prefill /hf", ".2f"),
               ("prefill_vs_llama", "prefill /llama", ".2f")]
    report(f"peers-long-{isa}" if isa else "peers-long", rows, columns, {}, isa=isa or "native", lengths=lengths)


def float_dtype_of(env: dict) -> str:
    """What dtype auto is for float weights in a child with `env`: bf16 where it is native, else float32."""
    code = "from qwenkit.runtime.cpu_plan import auto_dtype; print(str(auto_dtype()).removeprefix('torch.'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    return out.stdout.strip() or "float32"


def llama_cpp_for(isa: str | None) -> dict | None:
    """The environment that makes a child import llama.cpp built for `isa` (None: the installed one,
    built for this CPU), building it first if needed; None when there is none to run."""
    if isa is None:
        if importlib.util.find_spec("llama_cpp") is None:
            print(LLAMA_CPP_MISSING)
            return None
        return {}
    target = Path.home() / ".cache" / "qwenkit" / "peers" / f"llama-cpp-{isa}"
    if not (target / "llama_cpp").is_dir():
        print(f"building llama-cpp-python {LLAMA_CPP_VERSION} for {isa} into {target} (a few minutes)")
        # --no-cache-dir: pip would otherwise reuse a wheel it built earlier for another class.
        out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-cache-dir",
                              "--target", str(target),
                              f"llama-cpp-python=={LLAMA_CPP_VERSION}"],
                             env={**os.environ, "CMAKE_ARGS": LLAMA_CPP_FLAGS[isa]}, capture_output=True, text=True)
        if out.returncode:
            print(f"llama.cpp for {isa}: the build failed, skipped:\n{out.stderr[-2000:]}")
            return None
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}


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
