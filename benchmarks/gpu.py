"""bf16 and int4 decode of a Qwen-7B-shaped model with random weights, batch 1, on one GPU.

    python benchmarks/gpu.py [--shape qwen-7b] [--modes bf16,int4] [--prompt-tokens 512]
                             [--new-tokens 128] [--compile] [--profile] [--device cuda] [--deadline S]
                             [--tokenizer QWEN_TIKTOKEN] [--out FILE]

One prepared script for a machine with a GPU: it needs no checkpoint or network. The
model is the seed's Qwen-7B shape (32 layers, hidden 4096, 32 heads, SwiGLU 11008, vocabulary
151936, q/k/v biases) with N(0, 0.02) weights, built on the device in bf16; `int4`
is qwenkit's round-to-nearest int4 (group 128) of the same weights with the head left in bf16,
as in the seed's Int4 checkpoint. Each mode: a prefill of --prompt-tokens random tokens into the
KV cache, then --new-tokens greedy steps (argmax on the device), timed after a warm-up run on the
same cache, three ways: `eager` (each kernel launched from Python), `graphs` (qwenkit's default on
a GPU: steps replayed as CUDA graphs; `first_step_ms` is the step that captured its graph) and,
with --compile, `compiled` (qwenkit.compile_decode, then graphs of the compiled step; its warm-up
time reported). The steps are queued without waiting for each other: positions are known on
the host, and each step's argmax stays on the GPU. With --tokenizer (a Qwen v1 `qwen.tiktoken`),
each way is also timed through qwenkit's decode loop (`qwenkit.evals.speed.run_bench`: the Decoder,
which reads every token back for streaming and stops), with its steps queued one ahead (the
default on a GPU) and one by one. Modes past --deadline seconds are skipped. Prints and writes
benchmarks/results/gpu-SHAPE-DATE.json (and --out): tokens/s, ms per token, the weight bandwidth
that implies, peak device memory. Goals: bf16 >= 150 tok/s, int4 >= 200 tok/s on an H100 (the
seed's table: 30 / 44 on an A100).

`--shape tiny --device cpu` runs the same code on a small model, to check the script anywhere
(graphs need CUDA: on the CPU that row is the eager step again).
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
from qwenkit.evals.speed import decode_bytes_per_token, run_bench
from qwenkit.loading import build_model
from qwenkit.model import Model
from qwenkit.quant import quantize_model
from qwenkit.runtime.cuda_graphs import use_cuda_graphs
from qwenkit.runtime.decode import decode_step
from qwenkit.tokenizer import Tokenizer

SHAPES = {
    "qwen-7b": dict(arch="qwen", vocab_size=151936, hidden_size=4096, intermediate_size=11008, num_layers=32,
                    num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=8192),
    "tiny": dict(arch="qwen", vocab_size=151936, hidden_size=256, intermediate_size=512, num_layers=2,
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


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a large device-to-device copy, bytes read plus written: the ceiling for a decode step."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    sync(device)
    return round(2 * 10 * src.numel() / (time.perf_counter() - start) / 1e9, 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def timed_decode(model: Model, cache, step, prompt_tokens: int, new_tokens: int) -> dict:
    """Prefill a random prompt into `cache`, then `new_tokens` greedy steps through `step` (the decode
    step a loop holds for that cache: graphs, compiled); seconds of each part."""
    device = model.device
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), device=device)
    sync(device)
    start = time.perf_counter()
    token = model(prompt, torch.arange(prompt_tokens, device=device), cache, last_only=True).argmax(-1)
    sync(device)
    prefill = time.perf_counter() - start
    positions = torch.arange(prompt_tokens, prompt_tokens + new_tokens)  # on the host: no step waits
    steps = []
    for i in range(new_tokens):
        start = time.perf_counter()
        token = step(token, positions[i:i + 1], cache).argmax(-1)
        if i == 0:  # the step that captures a graph, timed alone
            sync(device)
        steps.append(time.perf_counter() - start)
    sync(device)
    steps[-1] = time.perf_counter() - start
    return {"prefill_s": prefill, "first_step_s": steps[0], "decode_s": sum(steps[1:])}


@torch.inference_mode()
def kernel_profile(model: Model, cache, step, args, steps: int = 8) -> dict:
    """The kernels `steps` decode steps run (inside graphs too): how many, and the top ones by time."""
    from torch.profiler import ProfilerActivity, profile

    token = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    positions = torch.arange(args.prompt_tokens, args.prompt_tokens + steps, device=model.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            token = step(token, positions[i:i + 1], cache).argmax(-1)
        sync(model.device)
    kernels = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    kernels.sort(key=lambda e: -e.self_device_time_total)
    return {"kernels_per_step": round(sum(e.count for e in kernels) / steps),
            "kernel_ms_per_step": round(sum(e.self_device_time_total for e in kernels) / steps / 1e3, 3),
            "top": [[e.key[:80], round(e.count / steps, 1), round(e.self_device_time_total / steps)]
                    for e in kernels[:10]]}


def measure(model: Model, args, way: str, tokenizer: Tokenizer | None) -> dict:
    row = {}
    use_cuda_graphs(model, way != "eager")
    if way == "compiled":
        row["compile_s"] = round(qwenkit.compile_decode(model), 1)
    cache = model.new_cache(1, args.prompt_tokens + args.new_tokens)
    step = decode_step(model, cache)
    first = timed_decode(model, cache, step, args.prompt_tokens, args.new_tokens)  # warm-up: kernels, allocator, graph
    run = timed_decode(model, cache, step, args.prompt_tokens, args.new_tokens)
    per_token = run["decode_s"] / (args.new_tokens - 1)
    row.update({
        "prefill_tok_s": round(args.prompt_tokens / run["prefill_s"], 1),
        "decode_tok_s": round(1 / per_token, 2),
        "ms_per_token": round(per_token * 1e3, 3),
        "first_step_ms": round(first["first_step_s"] * 1e3, 1),
        "weight_gb_per_s": round(decode_bytes_per_token(model, 0) / per_token / 1e9, 1),
    })
    if tokenizer is not None:
        for key, ahead in (("loop_ahead_tok_s", True), ("loop_stepwise_tok_s", False)):
            row[key] = run_bench(model, tokenizer, args.prompt_tokens, args.new_tokens, ahead=ahead)["decode_tok_s"]
    if model.device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(model.device) / 2**30, 2)
    if args.profile:
        try:
            row["profile"] = kernel_profile(model, cache, step, args)
        except Exception as e:  # the profiler is a guest here: its failure costs no figures
            row["profile"] = f"{type(e).__name__}: {e}"[:500]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen-7b")
    p.add_argument("--modes", default="bf16,int4", help="comma-separated: bf16, int4 (default both)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--compile", action="store_true", help="also measure the compiled decode step (with graphs)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds after which the modes not yet started are skipped (a lease's end)")
    p.add_argument("--tokenizer", metavar="QWEN_TIKTOKEN",
                   help="a Qwen v1 qwen.tiktoken: also time each way through qwenkit's decode loop")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--profile", action="store_true",
                   help="also record each way's kernels per step and the ten that take longest (torch.profiler)")
    args = p.parse_args()
    tokenizer = Tokenizer.from_qwen_tiktoken(args.tokenizer) if args.tokenizer else None
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: this script is for a machine with a GPU "
                 "(try --shape tiny --device cpu to check it)")
    modes = args.modes.split(",")
    unknown = set(modes) - {"bf16", "int4"}
    if unknown:
        p.error(f"unknown mode(s) {', '.join(sorted(unknown))}: use bf16, int4")

    ways = ["eager", "graphs"] + (["compiled"] if args.compile else [])
    machine = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "device": str(device),
               "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "copy_gb_per_s": copy_bandwidth(device)}
    outputs = [Path(__file__).parent / "results" / f"gpu-{args.shape}-{time.strftime('%Y-%m-%d')}.json"]
    outputs += [Path(args.out)] if args.out else []
    rows, started = [], time.perf_counter()
    # Every mode eager and with graphs first, the compiles (minutes) last: a deadline cuts those.
    for compiled in (False, True):
        for mode in modes:
            mode_ways = [w for w in ways if (w == "compiled") == compiled]
            if not mode_ways:
                continue
            if args.deadline is not None and time.perf_counter() - started > args.deadline:
                rows.append({"mode": mode, "way": ", ".join(mode_ways), "skipped": f"past --deadline {args.deadline} s"})
                continue
            model = random_model(args.shape, device).eval()
            if mode == "int4":
                quantize_model(model, bits=4, group_size=128, lm_head_bits=None)
            for way in mode_ways:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    rows.append({"mode": mode, "way": way, **measure(model, args, way, tokenizer)})
                except Exception as e:  # one broken way must not cost the others' figures
                    rows.append({"mode": mode, "way": way, "error": f"{type(e).__name__}: {e}"[:2000]})
                print(json.dumps(rows[-1]), flush=True)
                for out in outputs:
                    out.write_text(json.dumps({"machine": machine, "settings": vars(args), "results": rows},
                                              indent=2) + "\n")
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print(f"\n{machine['name']} (copies {machine['copy_gb_per_s']} GB/s), torch {machine['torch']}, {args.shape}, "
          f"batch 1, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens")
    loop = "   decode loop tok/s: ahead, stepwise" if tokenizer is not None else ""
    print(f"{'mode':<16}{'prefill tok/s':>15}{'decode tok/s':>14}{'ms/token':>10}{'weights GB/s':>14}"
          f"{'1st step ms':>13}{loop}")
    for r in rows:
        name = f"{r['mode']} {r['way']}"
        if "decode_tok_s" not in r:
            print(f"{name:<16}  {r.get('error') or r.get('skipped')}")
            continue
        loop = f"{r['loop_ahead_tok_s']:>14.2f},{r['loop_stepwise_tok_s']:>9.2f}" if tokenizer is not None else ""
        print(f"{name:<16}{r['prefill_tok_s']:>15.1f}{r['decode_tok_s']:>14.2f}{r['ms_per_token']:>10.3f}"
              f"{r['weight_gb_per_s']:>14.1f}{r['first_step_ms']:>13.1f}{loop}")
    print("written to " + ", ".join(map(str, outputs)))


if __name__ == "__main__":
    main()
