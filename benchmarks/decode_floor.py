"""How fast a PyTorch engine could decode the demo model on this CPU at batch 1: its weight products alone.

    python benchmarks/decode_floor.py [--steps 20] [--no-peer] [--qwenkit int8|int4|DIR ...]

One decode token multiplies a single row by every weight once. This times exactly those products,
with nothing else in between, through the kernels qwenkit runs (quant.linear's int4 and int8
layers, and the bf16 layers float weights load as), on the demo model's shapes: q/k/v and gate/up
joined where qwenkit joins them, each of the 24 layers its own tensors so that they stream from memory
as in a real step, the vocabulary-sized head included. The weights are random: the kernels' speed
does not depend on the values. Next to it: the machine's read bandwidth (a sum over 1 GiB), the
tok/s that bandwidth alone would allow at each format's bytes, and (unless --no-peer) llama.cpp's
decode, Q4_K_M and its Q8_0, measured in the same run, as in peers.py. `--qwenkit` adds qwenkit's
whole compiled decode step in the same run (`--quantize int8`/`int4`, or a checkpoint `qwenkit
quantize` wrote), for the time its step spends beside the kernels.

Why: the goals compare qwenkit's whole decode step with llama.cpp's. This splits our
step's time into what the kernels need and what is left for everything else (attention, norms,
RoPE, dispatch). Results go to benchmarks/results/decode-floor-DATE.json
(decode-floor-no-peer-DATE.json with --no-peer).
"""

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from engines import _timed, layer_shapes, measure, report  # noqa: E402
from peers import LLAMA_CPP_MISSING  # noqa: E402


def int4_layer(k: int, n: int, bias: bool, group_size: int):
    from qwenkit.quant.linear import Int4Linear

    layer = Int4Linear(k, n, bias, group_size, torch.bfloat16, "cpu")
    with torch.no_grad():
        layer.qweight.random_(0, 256)
        layer.scales.uniform_(1e-3, 2e-3)
        layer.zeros.random_(0, 16)
        if bias:
            layer.bias.zero_()
    return layer


def int8_layer(k: int, n: int, bias: bool, group_size: int):
    from qwenkit.quant.linear import Int8Linear

    layer = Int8Linear(k, n, bias, torch.bfloat16, "cpu")
    with torch.no_grad():
        layer.weight.random_(-127, 128)
        layer.scales.uniform_(1e-3, 2e-3)
        if bias:
            layer.bias.zero_()
    return layer


def bf16_layer(k: int, n: int, bias: bool, group_size: int):
    """What the default float path runs: qwenkit's bf16 kernel (Bf16Linear) where it is built, else oneDNN's
    packed layout, else a plain bf16 linear."""
    from qwenkit.runtime.packed import inference_linear

    weight = torch.randn(n, k, dtype=torch.bfloat16) * 0.02
    bias_ = torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16), requires_grad=False) if bias else None
    layer = inference_linear(weight, bias_, torch.bfloat16)
    if layer is not None:
        return layer
    linear = torch.nn.Linear(k, n, bias=bias, dtype=torch.bfloat16)
    linear.weight.data = weight
    return linear


# name, layer maker, layers joined, group size, the head's maker (the int4 recipes' heads differ)
FORMATS = [
    ("int4 g32, int4 head (g32h4)", int4_layer, True, 32, int4_layer),
    ("int4 g128, int8 head (--quantize int4)", int4_layer, True, 128, int8_layer),
    ("int8 (--quantize int8)", int8_layer, False, None, int8_layer),
    ("bf16 weights (float weights' default)", bf16_layer, True, None, bf16_layer),
]


def weight_bytes(layer) -> int:
    if hasattr(layer, "packed"):  # PackedLinear: the blocked copy is what a step reads
        return layer.packed.numel() * layer.packed.element_size()
    return sum(p.numel() * p.element_size() for p in layer.parameters())


def read_bandwidth(repeats: int = 8) -> float:
    """Bytes per second of a sum over 1 GiB of float32 (memory-bound on any recent CPU), best of `repeats`."""
    buf = torch.ones(1 << 28)
    buf.sum()
    best = min(_timed(buf.sum) for _ in range(repeats))
    del buf
    return (1 << 30) / best


def step_products(cfg, make, joined: bool, group_size: int | None, make_head) -> tuple[list, int, int]:
    """Every product of one decode step, as (layer, input row) pairs; their weight bytes and weights."""
    products = []
    for _ in range(cfg.num_layers):
        products += [(make(k, n, bias, group_size), torch.randn(1, k, dtype=torch.bfloat16))
                     for k, n, bias in layer_shapes(cfg, joined)]
    head = make_head(cfg.hidden_size, cfg.vocab_size, False, group_size)
    products.append((head, torch.randn(1, cfg.hidden_size, dtype=torch.bfloat16)))
    weights = sum(layer.in_features * layer.out_features for layer, _ in products)
    return products, sum(weight_bytes(layer) for layer, _ in products), weights


@torch.inference_mode()
def best_step_seconds(products: list, steps: int) -> float:
    def step():
        for layer, x in products:
            layer(x)
    step()  # the quantized layers prepare their kernels' layouts on the first call
    return min(_timed(step) for _ in range(steps))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per format; the best counts (default 20)")
    parser.add_argument("--no-peer", action="store_true",
                        help="no llama.cpp run (written to decode-floor-no-peer-DATE.json)")
    parser.add_argument("--qwenkit", action="append", default=[], metavar="int8|int4|DIR",
                        help="also measure qwenkit's whole decode step, compiled, with --quantize int8/int4 "
                             "or for a checkpoint directory (repeatable)")
    args = parser.parse_args()
    from qwenkit.loading.demo import demo_gguf_path
    from qwenkit.loading.gguf import GGUFFile

    cfg = GGUFFile(demo_gguf_path()).config()
    bandwidth = read_bandwidth()
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    rows = []
    for name, make, joined, group_size, make_head in FORMATS:
        products, nbytes, weights = step_products(cfg, make, joined, group_size, make_head)
        seconds = best_step_seconds(products, args.steps)
        rows.append({"name": f"kernels alone: {name}", "engine": "kernels", "decode_tok_s": 1 / seconds,
                     "ms_per_token": seconds * 1e3, "gb_per_s": nbytes / seconds / 1e9,
                     "gweights_per_s": weights / seconds / 1e9, "weight_mib": nbytes / 2**20,
                     "bandwidth_tok_s": bandwidth / nbytes})
        print(f"{name}: {seconds * 1e3:.2f} ms", flush=True)
        del products  # before the next format's weights are made
    for spec in args.qwenkit:
        options = {"quantize": spec} if spec in ("int8", "int4") else {"model": spec}
        whole = measure("qwenkit", "bfloat16", 512, 128, compile=True, **options)
        if "error" not in whole:
            whole["ms_per_token"] = 1e3 / whole["decode_tok_s"]
        rows.append({"name": f"qwenkit {Path(spec).name} compiled, whole step", **whole})
    if not args.no_peer and importlib.util.find_spec("llama_cpp") is None:
        print(LLAMA_CPP_MISSING)
    elif not args.no_peer:
        ours = [r for r in rows if "error" not in r]
        q4, q8 = (measure("llama.cpp", dtype, 512, 128) for dtype in ("gguf", "q8_0"))
        rows += [{"name": "llama.cpp Q4_K_M, whole step", **q4}, {"name": "llama.cpp Q8_0, whole step", **q8}]
        if "error" not in q4:
            for row in ours:
                row["vs_llama_cpp"] = row["decode_tok_s"] / q4["decode_tok_s"]
                # What the rest of qwenkit's step may take for 1.5x (int4 goal) and 1x (int8 goal).
                row["ms_left_at_1_5x"] = 1e3 / (1.5 * q4["decode_tok_s"]) - row["ms_per_token"]
                row["ms_left_at_1x"] = 1e3 / q4["decode_tok_s"] - row["ms_per_token"]
        if "error" not in q8:
            for row in ours:
                row["vs_llama_cpp_q8_0"] = row["decode_tok_s"] / q8["decode_tok_s"]
    columns = [("decode_tok_s", "tok/s", ".1f"), ("ms_per_token", "ms/token", ".2f"), ("gb_per_s", "GB/s", ".1f"),
               ("gweights_per_s", "Gweights/s", ".1f"), ("bandwidth_tok_s", "at read bandwidth tok/s", ".1f"),
               ("vs_llama_cpp", "vs llama.cpp", ".2f"), ("ms_left_at_1_5x", "ms left at 1.5x", ".2f"),
               ("ms_left_at_1x", "ms left at 1x", ".2f"), ("vs_llama_cpp_q8_0", "vs its Q8_0", ".2f")]
    report("decode-floor-no-peer" if args.no_peer else "decode-floor", rows, columns, {},
           read_gb_per_s=bandwidth / 1e9, threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
