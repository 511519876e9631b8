"""Quantization quality and cost on the demo model: int4 and int8, round-to-nearest and GPTQ.

    python benchmarks/quantize.py [--calib-samples 128] [--seq-len 512] [--eval-tokens 8192]

For each recipe, `qwenkit.evals.quantization.quantize_checkpoint` writes a checkpoint (GPTQ wall
time recorded); then each model, the original included, is measured in a fresh process: perplexity
on the held-out standard-library text, prefill/decode speed and peak RSS (as `qwenkit quantize`
does), and whether its greedy reply to the Fibonacci prompt holds Python that computes Fibonacci
numbers.
The demo GGUF is itself Q4_K_M: "original" means its weights dequantized to bf16.
Goals: perplexity +3 % at most for int4, +0.5 % for int8. Results go to
benchmarks/results/quantize-DATE.json.
"""

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from multiprocessing import get_context
from pathlib import Path

RECIPES = [(4, "rtn", False), (4, "gptq", False), (4, "gptq", True), (8, "rtn", False), (8, "gptq", False)]
FIBONACCI = "Write a Python function that returns the n-th Fibonacci number."
# Runs the reply's code: the function it defines must follow the Fibonacci recurrence.
CHECK = """
ns = {{}}
exec({code!r}, ns)
f = ns[{name!r}]
values = [f(n) for n in range(2, 13)]
assert all(c == a + b for a, b, c in zip(values, values[1:], values[2:])) and f(10) in (34, 55), values
"""


def measure(path: str, ids: list[int]) -> dict:
    """In a fresh process: what `qwenkit quantize` measures, plus the Fibonacci reply."""
    import qwenkit
    from qwenkit.evals.quantization import measure as measure_model

    model, tok = qwenkit.load(path, device="cpu")
    row = measure_model(model, tok, ids)
    reply = qwenkit.chat(model, tok, [{"role": "user", "content": FIBONACCI}], temperature=0,
                         max_new_tokens=200).text
    return row | {"fibonacci_reply": reply, "fibonacci_correct": fibonacci_correct(reply)}


def fibonacci_correct(reply: str) -> bool:
    block = re.search(r"```python\n(.*?)```", reply, re.DOTALL)
    name = re.search(r"def (\w+)\(", block.group(1)) if block else None
    if not name:
        return False
    run = subprocess.run([sys.executable, "-c", CHECK.format(code=block.group(1), name=name.group(1))],
                         capture_output=True, timeout=20, check=False)
    return run.returncode == 0


def in_fresh_process(fn, *args):
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    args = parser.parse_args()

    import qwenkit
    from qwenkit.evals.quantization import quantize_checkpoint
    from qwenkit.loading import resolve_source
    from qwenkit.quant.calibration import heldout_ids

    source = resolve_source("demo")
    _, tok = qwenkit.load(source, device="cpu")  # the tokenizer; the model is dropped
    ids = heldout_ids(tok, args.eval_tokens)
    rows = [dict(name="original (Q4_K_M dequantized to bf16)", size_bytes=source.stat().st_size,
                 **in_fresh_process(measure, str(source), ids))]
    with tempfile.TemporaryDirectory() as tmp:
        for bits, method, act_order in RECIPES:
            name = f"int{bits} {method}" + (" act-order" if act_order else "")
            out = Path(tmp) / name.replace(" ", "-")
            print(f"{name} ...", file=sys.stderr, flush=True)
            extra = {"act_order": act_order, "calib_samples": args.calib_samples, "seq_len": args.seq_len} \
                if method == "gptq" else {}
            report = quantize_checkpoint(str(source), out, bits=bits, method=method, evaluate=False, device="cpu",
                                         **extra)
            size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            rows.append(dict(name=name, size_bytes=size, quantize_seconds=report["quantize_seconds"],
                             quantization=report.get("gptq"), **in_fresh_process(measure, str(out), ids)))
            base = rows[0]["perplexity"]
            print(f"  ppl {rows[-1]['perplexity']:.3f} ({100 * (rows[-1]['perplexity'] / base - 1):+.2f} %), "
                  f"fibonacci {rows[-1]['fibonacci_correct']}, {report['quantize_seconds']} s", file=sys.stderr)

    base = rows[0]["perplexity"]
    for row in rows:
        row["perplexity_change_pct"] = round(100 * (row["perplexity"] / base - 1), 3)
        print(f"{row['name']:<40} ppl {row['perplexity']:8.3f} {row['perplexity_change_pct']:+7.2f} %  "
              f"{row['size_bytes'] / 2**20:6.0f} MiB  RSS {row['peak_rss_mib']:6.0f} MiB  "
              f"prefill {row['prefill_tok_s']:7.1f}  decode {row['decode_tok_s']:6.1f}  "
              f"fib {'ok' if row['fibonacci_correct'] else 'WRONG'}  {row.get('quantize_seconds', '')}")
    result = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "model": "demo: Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF; original = its weights dequantized to bf16",
              "heldout": f"python-stdlib held-out files, {len(ids)} tokens, windows of 512",
              "calibration": f"python-stdlib calibration files, {args.calib_samples} x {args.seq_len} tokens",
              "goals": "perplexity change: int4 <= +3 %, int8 <= +0.5 %", "rows": rows}
    path = Path(__file__).parent / "results" / f"quantize-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
