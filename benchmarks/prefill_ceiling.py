"""How fast any engine could prefill the demo model on this CPU: its matrix products alone.

    python benchmarks/prefill_ceiling.py [--prompt-tokens 512] [--no-peer]

Times each of a layer's products at prefill shape ([T, K] x [K, N]) as bf16 GEMMs (oneDNN, the
weights pre-packed as qwenkit packs them, which is faster than plain F.linear) and as int8 x int8
GEMMs (torch._int_mm, VNNI), adds attention's products at the same rate, and prints the prefill
tok/s an engine would reach if nothing else took any time: a ceiling, not a forecast. Next to it
(unless --no-peer) transformers' and qwenkit's bf16 prefill measured in the same run (engines.py).

Why: the goal, bf16 prefill >= 1.5x transformers on this machine, is only reachable if
that figure is under the bf16 ceiling. Results go to benchmarks/results/prefill-ceiling-DATE.json.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from engines import _timed, layer_shapes, measure, report  # noqa: E402


def best_seconds(fn, repeats: int = 15) -> float:
    fn()  # warm-up: oneDNN picks and caches its kernel on the first call
    return min(_timed(fn) for _ in range(repeats))


def bf16_gemm(t: int, k: int, n: int) -> float:
    from qwenkit.runtime.packed import PackedLinear, packing_works

    x, w = torch.randn(t, k).bfloat16(), torch.randn(n, k).bfloat16()
    linear = PackedLinear(w, None) if packing_works() else (lambda a: F.linear(a, w))
    with torch.inference_mode():
        return best_seconds(lambda: linear(x))


def int8_gemm(t: int, k: int, n: int) -> float:
    x = torch.randint(-127, 128, (t, k), dtype=torch.int8)
    w = torch.randint(-127, 128, (k, n), dtype=torch.int8)
    return best_seconds(lambda: torch._int_mm(x, w))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--no-peer", action="store_true",
                        help="only the ceilings, no engine runs (written to prefill-ceiling-no-peer-DATE.json)")
    args = parser.parse_args()
    from qwenkit.loading.demo import demo_gguf_path
    from qwenkit.loading.gguf import GGUFFile

    cfg, t = GGUFFile(demo_gguf_path()).config(), args.prompt_tokens
    # Causal attention: query i meets i + 1 keys, in q.k and in p.v, for every head of every layer.
    attention_flops = 2 * 2 * cfg.num_heads * cfg.head_dim * t * (t + 1) / 2 * cfg.num_layers
    linear_flops = sum(2 * t * k * n for k, n, _ in layer_shapes(cfg, joined=True)) * cfg.num_layers
    rows = []
    for kind, gemm in (("bf16 GEMMs", bf16_gemm), ("int8 GEMMs", int8_gemm)):
        seconds = sum(gemm(t, k, n) for k, n, _ in layer_shapes(cfg, joined=True)) * cfg.num_layers
        rate = linear_flops / seconds
        seconds += attention_flops / rate
        rows.append({"engine": f"ceiling, {kind}", "prefill_tok_s": t / seconds, "tflop_s": rate / 1e12})
    if not args.no_peer:
        rows += [measure(engine, "bfloat16", t, 8) for engine in ("transformers", "qwenkit")]
    peer = rows[2] if len(rows) > 2 and "error" not in rows[2] else None
    for row in rows:
        if peer and "error" not in row:
            row["vs_transformers"] = row["prefill_tok_s"] / peer["prefill_tok_s"]
    columns = [("prefill_tok_s", "prefill tok/s", ".1f"), ("tflop_s", "TFLOP/s", ".3f"),
               ("vs_transformers", "vs transformers", ".2f")]
    # Without the peers, a file of its own: it must not replace a dated run that has them.
    report("prefill-ceiling-no-peer" if args.no_peer else "prefill-ceiling", rows, columns, {}, prompt_tokens=t,
           flops_per_token=(linear_flops + attention_flops) / t)


if __name__ == "__main__":
    main()
