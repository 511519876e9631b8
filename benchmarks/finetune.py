"""Training tokens/s and peak memory of LoRA, Q-LoRA and full fine-tuning on the demo model, qwenkit
next to transformers + peft on the same tokens and settings, each run in its own process.

    python benchmarks/finetune.py [--steps 4] [--batch-size 2] [--seq-len 256] [--methods lora,qlora,full]
                                  [--rounds 2]

Settings shared by both engines: the same examples (conversations rendered and masked by
qwenkit.train.load_dataset, every one truncated to --seq-len tokens), batch --batch-size, no
gradient accumulation or checkpointing, fused AdamW (β2 0.95, weight decay 0.1, the method's lr), clipping
at 1.0, bf16 autocast; LoRA r 64, alpha 16, dropout 0.05 on every linear (peft's all-linear).
Frozen bases are bf16 (LoRA), 4-bit (Q-LoRA: qwenkit int4 group 128 with an int8 head; transformers
bitsandbytes NF4, the seed's recipe on GPUs, when bitsandbytes is installed), trained weights float32.
transformers loads the demo GGUF with `gguf_file=` (dequantized). A plain training loop drives it
(no Trainer), the cheapest way to run it.

tokens/s counts the input tokens of the steps after the first (a warm-up), per step timed from
batch to optimizer update. Peak RSS is the process's VmHWM after the last step (qwenkit: before the
end-of-run checkpoint, whose peak is reported as peak_rss_with_save_mib). Writes
benchmarks/results/finetune-DATE.json.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from qwenkit.evals.speed import peak_rss_mib

LR = {"full": 1e-5, "lora": 3e-4, "qlora": 3e-4}
LORA = dict(r=64, alpha=16, dropout=0.05)


def write_conversations(path: Path, n: int) -> Path:
    """Long assistant replies (standard-library source, offline everywhere) so truncation to the
    sequence length leaves mostly trained tokens."""
    text = inspect.getsource(argparse) + inspect.getsource(json.decoder)
    chunk = 3000
    rows = [{"messages": [{"role": "user", "content": "Continue this Python code."},
                          {"role": "assistant", "content": text[i * chunk:(i + 1) * chunk]}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def examples(tokenizer, n: int, seq_len: int):
    from qwenkit.train import load_dataset

    with tempfile.TemporaryDirectory() as tmp:
        data, _ = load_dataset(write_conversations(Path(tmp) / "data.jsonl", n), tokenizer, seq_len)
    assert all(len(e.input_ids) == seq_len for e in data), "every conversation must be cut to --seq-len"
    return data


def run_qwenkit(method: str, steps: int, batch_size: int, seq_len: int) -> dict:
    from qwenkit.train.finetune import prepare_model
    from qwenkit.train.trainer import TrainConfig, Trainer

    start = time.perf_counter()
    model, tokenizer, dtype = prepare_model("demo", method, "bfloat16", "cpu", lora_r=LORA["r"],
                                            lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"])
    load_s = time.perf_counter() - start
    data = examples(tokenizer, batch_size * (steps + 1), seq_len)

    class Measured(Trainer):
        def save_checkpoint(self):
            self.peak_before_save = peak_rss_mib()
            return super().save_checkpoint()

    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(out=out, lr=LR[method], max_steps=steps + 1, batch_size=batch_size, dtype=dtype,
                             save_every=0, warmup_steps=0)
        trainer = Measured(model, data, config, pad_id=tokenizer.pad_token_id)
        history = trainer.train().history
    timed = history[1:]
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in timed)
    return {"load_s": load_s, "tokens_per_s": sum(r["tokens"] for r in timed) / seconds,
            "s_per_step": seconds / len(timed), "losses": [r["loss"] for r in history],
            "peak_rss_mib": trainer.peak_before_save, "peak_rss_with_save_mib": peak_rss_mib()}


def run_transformers(method: str, steps: int, batch_size: int, seq_len: int) -> dict:
    import transformers

    from qwenkit.loading.demo import demo_gguf_path
    from qwenkit.loading.gguf import GGUFFile
    from qwenkit.tokenizer import Tokenizer
    from qwenkit.train import collate

    path = demo_gguf_path()
    tokenizer = Tokenizer.from_gguf_fields(GGUFFile(path).tokenizer_fields())  # the same ids as qwenkit's run
    data = examples(tokenizer, batch_size * (steps + 1), seq_len)

    kwargs = {"dtype": torch.float32 if method == "full" else torch.bfloat16}
    source = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
    if method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return {"skipped": "bitsandbytes is not installed"}
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        source = {"pretrained_model_name_or_path": str(hf_checkpoint(path))}  # bnb cannot quantize a GGUF load
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(**source, **kwargs)
    if method != "full":
        import peft
        if method == "qlora":
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        config = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules="all-linear", task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, config)
    load_s = time.perf_counter() - start
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    decay = [p for p in params if p.ndim >= 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=LR[method], betas=(0.9, 0.95), eps=1e-8,
                                  fused=True)  # the Trainer's default (adamw_torch_fused) with torch >= 2.8
    losses, times = [], []
    for step in range(steps + 1):
        begin = time.perf_counter()
        batch = collate(data[step * batch_size:(step + 1) * batch_size], tokenizer.pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - begin)
        losses.append(loss.item())
    seconds = sum(times[1:])
    return {"load_s": load_s, "tokens_per_s": steps * batch_size * seq_len / seconds, "s_per_step": seconds / steps,
            "losses": losses, "peak_rss_mib": peak_rss_mib()}


def hf_checkpoint(gguf: Path) -> Path:
    """The demo GGUF dequantized to a bf16 safetensors checkpoint, written once by another process
    (so its memory does not count here)."""
    out = Path(tempfile.gettempdir()) / "qwenkit-bench-demo-hf"
    if not (out / "config.json").is_file():
        # (save_pretrained refuses a GGUF-loaded model: write the tensors and config by hand)
        code = ("import json, os, sys, torch, transformers; from safetensors.torch import save_file; "
                "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], gguf_file=sys.argv[2], "
                "dtype=torch.bfloat16); os.makedirs(sys.argv[3], exist_ok=True); "
                "save_file({k: v.contiguous() for k, v in m.state_dict().items()}, sys.argv[3] + '/model.safetensors', "
                "metadata={'format': 'pt'}); c = m.config.to_dict(); c.pop('quantization_config', None); "
                "open(sys.argv[3] + '/config.json', 'w').write(json.dumps(c))")
        subprocess.run([sys.executable, "-c", code, str(gguf.parent), gguf.name, str(out)], check=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="timed steps, after one warm-up step (default 4)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--methods", default="lora,qlora,full")
    p.add_argument("--engines", default="qwenkit,transformers")
    p.add_argument("--rounds", type=int, default=2, help="runs of every engine and method, in turn (default 2): "
                                                         "the table shows each one's best")
    p.add_argument("--one", nargs=2, metavar=("ENGINE", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        engine, method = args.one
        run = {"qwenkit": run_qwenkit, "transformers": run_transformers}[engine]
        print(json.dumps(run(method, args.steps, args.batch_size, args.seq_len)))
        return

    settings = {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "rounds": args.rounds,
                "threads": torch.get_num_threads(), "torch": torch.__version__}
    results = []
    for round_ in range(1, args.rounds + 1):  # engines alternate, so a slow spell of the machine hits both
        for method in args.methods.split(","):
            for engine in args.engines.split(","):
                cmd = [sys.executable, __file__, "--one", engine, method, "--steps", str(args.steps),
                       "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    row = {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
                else:
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                results.append({"engine": engine, "method": method, "round": round_, **row})
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)

    def best(engine: str, method: str) -> dict:
        rows = [r for r in results if r["engine"] == engine and r["method"] == method]
        return max((r for r in rows if "tokens_per_s" in r), key=lambda r: r["tokens_per_s"], default=rows[-1])

    print(f"best of {args.rounds} round(s)")
    print(f"{'method':<7} {'engine':<13} {'tok/s':>8} {'range':>13} {'s/step':>7} {'peak RSS MiB':>13} "
          f"{'ratio tok/s':>12} {'ratio RSS':>10}")
    for method in args.methods.split(","):
        peer = best("transformers", method) if "transformers" in args.engines.split(",") else {}
        for engine in args.engines.split(","):
            r = best(engine, method)
            if "tokens_per_s" not in r:
                print(f"{method:<7} {engine:<13} {r.get('skipped') or r.get('error')}")
                continue
            speeds = [x["tokens_per_s"] for x in results if x["engine"] == engine and x["method"] == method
                      and "tokens_per_s" in x]
            ratio = (f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}x" if "tokens_per_s" in peer else "-")
            rss = (f"{r['peak_rss_mib'] / peer['peak_rss_mib']:.2f}x" if "peak_rss_mib" in peer else "-")
            print(f"{method:<7} {engine:<13} {r['tokens_per_s']:>8.1f} {f'{min(speeds):.0f}-{max(speeds):.0f}':>13} "
                  f"{r['s_per_step']:>7.2f} {r['peak_rss_mib']:>13.0f} {ratio:>12} {rss:>10}")
    out = Path(__file__).parent / "results" / f"finetune-{datetime.date.today()}.json"
    if out.is_file():  # a rerun of some rows with the same settings replaces just those rows
        earlier = json.loads(out.read_text())
        if earlier["settings"] == settings:
            ran = {(r["engine"], r["method"]) for r in results}
            results = [r for r in earlier["results"] if (r["engine"], r["method"]) not in ran] + results
    out.write_text(json.dumps({"settings": settings, "results": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
