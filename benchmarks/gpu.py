"""bf16 and int4 decode of a Qwen-7B-shaped model with random weights, batch 1, on one GPU.

    python benchmarks/gpu.py [--shape qwen-7b] [--modes bf16,int4] [--prompt-tokens 512]
                             [--new-tokens 128] [--compile] [--device cuda]

One prepared script for a machine with a GPU (issue 5): it needs no checkpoint, tokenizer or
network. The model is the seed's Qwen-7B shape (32 layers, hidden 4096, 32 heads, SwiGLU 11008,
vocabulary 151936, q/k/v biases) with N(0, 0.02) weights, built on the device in bf16; `int4`
is qwenkit's round-to-nearest int4 (group 128) of the same weights with the head left in bf16,
as in the seed's Int4 checkpoint. Each mode: a prefill of --prompt-tokens random tokens into the
KV cache, then --new-tokens greedy steps (argmax on the device, no host sync per token), timed
after a warm-up run; with --compile, also the same steps through qwenkit.compile_decode (its
warm-up time reported). Prints and writes benchmarks/results/gpu-DATE.json: tokens/s, ms per
token, the weight bandwidth that implies, peak device memory. Goals: bf16 >= 150 tok/s, int4 >=
200 tok/s on an H100 (the seed's table: 30 / 44 on an A100).

`--shape tiny --device cpu` runs the same code on a small model, to check the script anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import qwenkit
from qwenkit.config import ModelConfig
from qwenkit.loading import build_model
from qwenkit.model import Model
from qwenkit.quant import quantize_model

SHAPES = {
    "qwen-7b": dict(arch="qwen", vocab_size=151936, hidden_size=4096, intermediate_size=11008, num_layers=32,
                    num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=8192),
    "tiny": dict(arch="qwen", vocab_size=4096, hidden_size=256, intermediate_size=512, num_layers=2,
                 num_heads=4, num_kv_heads=4, head_dim=64, max_position_embeddings=2048),
}


def random_model(shape: str, device: torch.device, seed: int = 0) -> Model:
    """The shape's model with N(0, 0.02) matrices, unit norms and zero biases, made on `device`
    one tensor at a time (never on the host)."""
    config = ModelConfig(**SHAPES[shape])
    with torch.device("meta"):
        names = [(name, p.shape) for name, p in Model(config).named_parameters()]
    gen = torch.Generator(device).manual_seed(seed)

    def tensors():
        for name, shape_ in names:
            if name.endswith("norm.weight"):
                yield name, torch.ones(shape_, device=device)
            elif name.endswith(".bias"):
                yield name, torch.zeros(shape_, device=device)
            else:
                yield name, torch.randn(shape_, generator=gen, device=device, dtype=torch.bfloat16) * 0.02
    return build_model(config, tensors(), torch.bfloat16, device, description=f"random {shape}")


def weight_bytes(model: Model) -> int:
    """Bytes a decode step reads: every parameter but the embedding table, which is only indexed
    (unless the head is tied to it, when it is read whole)."""
    skip = () if model.config.tie_word_embeddings else ("model.embed_tokens.",)
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if not name.startswith(skip))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def timed_decode(model: Model, prompt_tokens: int, new_tokens: int) -> dict:
    """Prefill a random prompt, then `new_tokens` greedy steps; seconds of each part."""
    device = model.device
    cache = model.new_cache(1, prompt_tokens + new_tokens)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), device=device)
    sync(device)
    start = time.perf_counter()
    token = model(prompt, torch.arange(prompt_tokens, device=device), cache, last_only=True).argmax(-1)
    sync(device)
    prefill = time.perf_counter() - start
    positions = torch.arange(prompt_tokens, prompt_tokens + new_tokens, device=device)
    start = time.perf_counter()
    for i in range(new_tokens):
        token = model(token, positions[i:i + 1], cache).argmax(-1)
    sync(device)
    return {"prefill_s": prefill, "decode_s": time.perf_counter() - start}


def measure(model: Model, args, compiled: bool = False) -> dict:
    row = {}
    if compiled:
        row["compile_s"] = round(qwenkit.compile_decode(model), 1)
    timed_decode(model, args.prompt_tokens, min(8, args.new_tokens))  # warm-up: kernels, allocator
    run = timed_decode(model, args.prompt_tokens, args.new_tokens)
    per_token = run["decode_s"] / args.new_tokens
    row.update({
        "prefill_tok_s": round(args.prompt_tokens / run["prefill_s"], 1),
        "decode_tok_s": round(1 / per_token, 2),
        "ms_per_token": round(per_token * 1e3, 3),
        "weight_gb_per_s": round(weight_bytes(model) / per_token / 1e9, 1),
    })
    if model.device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(model.device) / 2**30, 2)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen-7b")
    p.add_argument("--modes", default="bf16,int4", help="comma-separated: bf16, int4 (default both)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--compile", action="store_true", help="also measure the compiled decode step")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: this script is for a machine with a GPU "
                 "(try --shape tiny --device cpu to check it)")
    modes = args.modes.split(",")
    unknown = set(modes) - {"bf16", "int4"}
    if unknown:
        p.error(f"unknown mode(s) {', '.join(sorted(unknown))}: use bf16, int4")

    rows = []
    for mode in modes:
        model = random_model(args.shape, device).eval()
        if mode == "int4":
            quantize_model(model, bits=4, group_size=128, lm_head_bits=None)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rows.append({"mode": mode, **measure(model, args)})
        print(json.dumps(rows[-1]), flush=True)
        if args.compile:
            rows.append({"mode": f"{mode} compiled", **measure(model, args, compiled=True)})
            print(json.dumps(rows[-1]), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    machine = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "device": str(device),
               "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    print(f"\n{machine['name']}, {args.shape}, batch 1, {args.prompt_tokens}-token prompt, "
          f"{args.new_tokens} new tokens")
    print(f"{'mode':<16}{'prefill tok/s':>15}{'decode tok/s':>14}{'ms/token':>10}{'weights GB/s':>14}")
    for r in rows:
        print(f"{r['mode']:<16}{r['prefill_tok_s']:>15.1f}{r['decode_tok_s']:>14.2f}{r['ms_per_token']:>10.3f}"
              f"{r['weight_gb_per_s']:>14.1f}")
    out = Path(__file__).parent / "results" / f"gpu-{args.shape}-{time.strftime('%Y-%m-%d')}.json"
    out.write_text(json.dumps({"machine": machine, "settings": vars(args), "results": rows}, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
