"""`qwenkit finetune`: full, LoRA or Q-LoRA fine-tuning on a conversation file, thin over
`load()`, `train.load_dataset`, `train.apply_lora` and `train.Trainer`.

Methods:
- full: every weight trains, held in float32 (the math runs in --dtype through autocast);
- lora: a frozen base in --dtype plus float32 LoRA matrices (peft's defaults of the seed: r 64,
  alpha 16, dropout 0.05, every linear);
- qlora: the same on a frozen 4-bit base: qwenkit's int4 linears (a float checkpoint or GGUF is
  quantized as it loads), or a checkpoint that is already int4 (GPTQ, `qwenkit quantize`).

The output directory holds `checkpoints/step-N/`, `loss.csv`, `loss.png`, `train_args.json`, and at the
end the adapter in peft's format (lora, qlora: `adapter_config.json`, `adapter_model.safetensors`) or
the model as a checkpoint directory `model/` (full).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from .errors import QwenkitError

METHOD_LR = {"full": 1e-5, "lora": 3e-4, "qlora": 3e-4}  # the seed's scripts (spec §7.5)
# Defaults for options left out on the command line and in the -c file (argparse's own are None, so
# that a flag given on the command line can be told from a default, and wins over the file).
DEFAULTS = {
    "model": "demo", "method": "lora", "eval_data": None, "epochs": 5, "max_steps": None, "lr": None,
    "batch_size": 2, "grad_accum": 8, "max_length": 512, "warmup_ratio": 0.01, "warmup_steps": None,
    "weight_decay": 0.1, "max_grad_norm": 1.0, "lora_r": 64, "lora_alpha": 16.0, "lora_dropout": 0.05,
    "lora_targets": "all-linear", "train_embeddings": False, "train_head": False, "save_every": 100, "keep": 3,
    "eval_every": 0, "log_every": 10, "resume": None, "overwrite": False, "seed": 42, "skip_bad": False,
    "gradient_checkpointing": False, "dtype": "auto", "device": "auto", "fsdp": False, "deepspeed": None,
}
RUN_FILES = ("checkpoints", "loss.csv", "loss.png", "train_args.json", "adapter_config.json",
             "adapter_model.safetensors", "model")  # what --overwrite deletes


def add_arguments(p: argparse.ArgumentParser) -> None:
    flag = argparse.BooleanOptionalAction
    p.add_argument("-c", "--config", metavar="YAML", help="options from a YAML file whose keys are the long option "
                   "names (lora-r or lora_r); flags on the command line win")
    p.add_argument("-m", "--model", "--checkpoint-path", dest="model",
                   help="base model: checkpoint directory, .gguf file, hub id or demo (default: demo)")
    p.add_argument("--data", help="training conversations: the Qwen JSON ([{id, conversations}]), JSONL of such "
                                  "records, or OpenAI {messages} JSONL (required)")
    p.add_argument("--out", help="output directory: checkpoints, loss curve, and the adapter or model (required)")
    p.add_argument("--method", choices=("full", "lora", "qlora"), help="what trains (default: lora)")
    p.add_argument("--eval-data", help="held-out conversations: their loss is measured with each checkpoint")

    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=int, help="passes over the data (default: 5)")
    g.add_argument("--max-steps", type=int, help="optimizer steps to run instead of --epochs")
    g.add_argument("--lr", type=float, help="peak learning rate (default: 1e-5 full, 3e-4 lora / qlora)")
    g.add_argument("--batch-size", type=int, help="conversations per micro-batch, per process (default: 2)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default: 8)")
    g.add_argument("--max-length", type=int, help="tokens kept of each conversation (default: 512)")
    g.add_argument("--warmup-ratio", type=float, help="share of the steps spent warming up (default: 0.01)")
    g.add_argument("--warmup-steps", type=int, help="warmup steps, instead of --warmup-ratio")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices (default: 0.1; β2 is 0.95)")
    g.add_argument("--max-grad-norm", type=float, help="gradient clipping (default: 1.0)")
    g.add_argument("--seed", type=int, help="seeds the data order, initialisation and dropout (default: 42)")

    g = p.add_argument_group("LoRA (lora, qlora)")
    g.add_argument("--lora-r", type=int, help="rank (default: 64)")
    g.add_argument("--lora-alpha", type=float, help="scaling numerator, scaling = alpha / r (default: 16)")
    g.add_argument("--lora-dropout", type=float, help="dropout on the LoRA input (default: 0.05)")
    g.add_argument("--lora-targets", help="all-linear (default), names such as q_proj,v_proj, the Qwen v1 names "
                                          "c_attn,c_proj,w1,w2, or patterns over module names")
    g.add_argument("--train-embeddings", action=flag, help="also train the whole embedding table")
    g.add_argument("--train-head", action=flag, help="also train the whole lm_head. A base (not chat) model has never "
                   "produced <|im_start|> / <|im_end|>; without trainable embeddings and head it cannot learn "
                   "to end its turns, and never stops (the seed trains both for base models)")

    g = p.add_argument_group("checkpoints and logs")
    g.add_argument("--save-every", type=int, help="steps between checkpoints (default: 100; one is also saved at "
                                                  "the end and on Ctrl-C)")
    g.add_argument("--keep", type=int, help="checkpoints kept, the newest (default: 3; 0 keeps all)")
    g.add_argument("--eval-every", type=int, help="steps between evaluations (default: with each checkpoint)")
    g.add_argument("--log-every", type=int, help="steps between log lines when no progress bar is drawn (default: 10)")
    g.add_argument("--resume", metavar="DIR|auto", help="continue from a checkpoint directory, or auto: the newest "
                                                        "in --out (a fresh start if it has none)")
    g.add_argument("--overwrite", action=flag, help="start over in an --out that holds a run (deletes its "
                                                    "checkpoints, loss curve and saved weights)")

    g = p.add_argument_group("data, precision, devices")
    g.add_argument("--skip-bad", action=flag, help="drop malformed records (counted) instead of stopping at the first")
    g.add_argument("--gradient-checkpointing", action=flag,
                   help="recompute each block in the backward pass: much less memory, about a third more time")
    g.add_argument("--dtype", help="compute dtype: auto (bfloat16 where supported), bfloat16 or float32 (default: "
                                   "auto); trainable weights and optimizer state are always float32")
    g.add_argument("--device", help="cpu, cuda, cuda:1 or auto (default: auto; under torchrun each process "
                                    "takes cuda:LOCAL_RANK)")
    g.add_argument("--fsdp", action=flag, help="shard the model over the torchrun processes with FSDP2 "
                                               "(torchrun --nproc-per-node N -m qwenkit finetune ... --fsdp)")
    g.add_argument("--deepspeed", metavar="CONFIG", help="DeepSpeed ZeRO-2/3 with this JSON config, e.g. the "
                   "seed's ds_config_zero2.json (\"auto\" values come from these options)")


def read_config_file(path: str) -> dict:
    """The -c YAML file as {option dest: value}, each checked and converted as its flag would be."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise QwenkitError(f"-c {path}: cannot read it as YAML ({e})") from None
    if not isinstance(data, dict):
        raise QwenkitError(f"-c {path}: the file must be a mapping of option names to values")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    actions = {a.dest: a for a in parser._actions if a.dest in DEFAULTS or a.dest in ("data", "out")}
    values = {}
    for key, value in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in actions:
            raise QwenkitError(f"-c {path}: unknown option {key!r}; the keys are the long option names: "
                               f"{', '.join(sorted(k.replace('_', '-') for k in actions))}")
        action = actions[dest]
        try:
            if value is not None and action.type is not None and not isinstance(value, bool):
                value = action.type(value)
        except (TypeError, ValueError):
            raise QwenkitError(f"-c {path}: {key}: {value!r} is not a valid {action.type.__name__}") from None
        if isinstance(action, argparse.BooleanOptionalAction) and not isinstance(value, bool):
            raise QwenkitError(f"-c {path}: {key} takes true or false, not {value!r}")
        if action.choices and value not in action.choices:
            raise QwenkitError(f"-c {path}: {key}: {value!r} is not one of {', '.join(action.choices)}")
        values[dest] = value
    return values


def resolve_options(args: argparse.Namespace) -> argparse.Namespace:
    """Command line, then the -c file, then DEFAULTS."""
    from_file = read_config_file(args.config) if args.config else {}
    for dest in (*DEFAULTS, "data", "out"):
        if getattr(args, dest, None) is None:
            setattr(args, dest, from_file.get(dest, DEFAULTS.get(dest)))
    for required in ("data", "out"):
        if getattr(args, required) is None:
            raise QwenkitError(f"--{required} is required (on the command line or in the -c file)")
    if args.lr is None:
        args.lr = METHOD_LR[args.method]
    if args.fsdp and args.deepspeed:
        raise QwenkitError("--fsdp and --deepspeed are two ways to do the same thing: pick one")
    lora_set = [k for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "train_embeddings", "train_head")
                if getattr(args, k) != DEFAULTS[k]]
    if args.method == "full" and lora_set:
        flags = ", ".join("--" + k.replace("_", "-") for k in lora_set)
        raise QwenkitError(f"--method full trains every weight: leave out {flags} (LoRA options, for --method "
                           "lora / qlora)")
    return args


def prepare_out(out: Path, resume: str | None, overwrite: bool) -> Path | None:
    """Check --out against --resume / --overwrite; returns the checkpoint to resume from, if any."""
    from .train.checkpoint import resolve_resume

    if out.is_file():
        raise QwenkitError(f"--out {out} is a file; pass a directory")
    if resume is not None:
        if overwrite:
            raise QwenkitError("--resume continues the run in --out and --overwrite deletes it: pick one")
        checkpoint = resolve_resume(resume, out)
        if checkpoint is not None:
            return checkpoint
        overwrite = True  # auto, and nothing saved yet: a fresh start; a run that saved nothing loses nothing
    existing = [p for p in out.iterdir()] if out.is_dir() else []
    if existing and not overwrite:
        raise QwenkitError(f"--out {out} already holds files ({', '.join(sorted(p.name for p in existing)[:4])}): "
                           "continue that run with --resume auto, start it over with --overwrite, or pick "
                           "another --out")
    for name in RUN_FILES if overwrite else ():
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return None


def run(args: argparse.Namespace) -> int:
    from .loading import resolve_device, resolve_dtype
    from .train import load_dataset, save_adapter
    from .train.distributed import FSDP, DeepSpeed, SingleProcess
    from .train.trainer import TrainConfig, Trainer, TrainingInterrupted, config_dict

    args = resolve_options(args)
    out = Path(args.out)
    distributed = args.fsdp or args.deepspeed
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not distributed:
        raise QwenkitError("started by torchrun with several processes: pass --fsdp or --deepspeed CONFIG")
    backend = FSDP() if args.fsdp else DeepSpeed(args.deepspeed) if args.deepspeed else SingleProcess()
    main_process = backend.rank == 0
    resume = _on_rank0(lambda: prepare_out(out, args.resume, args.overwrite), backend)

    device = resolve_device(args.device)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    config = TrainConfig(  # checks the options before the slow load
        out=out, lr=args.lr, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, warmup_ratio=args.warmup_ratio, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, dtype=resolve_dtype(args.dtype, device),
        gradient_checkpointing=args.gradient_checkpointing, save_every=args.save_every, keep=args.keep,
        eval_every=args.eval_every, log_every=args.log_every, seed=args.seed)
    model, tokenizer, compute = prepare_model(
        args.model, args.method, config.dtype, device, seed=args.seed, fsdp=args.fsdp, lora_targets=args.lora_targets,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        train_embeddings=args.train_embeddings, train_head=args.train_head)

    examples, stats = load_dataset(args.data, tokenizer, args.max_length, skip_bad=args.skip_bad)
    _report_data(args.data, stats, main_process)
    eval_examples = None
    if args.eval_data:
        eval_examples, eval_stats = load_dataset(args.eval_data, tokenizer, args.max_length, skip_bad=args.skip_bad)
        _report_data(args.eval_data, eval_stats, main_process)
    if args.deepspeed:
        backend.fill_config(args.batch_size, args.grad_accum, args.lr, args.weight_decay, config.betas,
                            args.max_grad_norm, compute, model.config.hidden_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = Trainer(model, examples, config, pad_id=pad_id, eval_examples=eval_examples, backend=backend)
    if main_process and resume is None:
        out.mkdir(parents=True, exist_ok=True)
        options = {k: v for k, v in vars(args).items() if k != "func"}
        options |= {"train_config": config_dict(config)}
        (out / "train_args.json").write_text(json.dumps(options, indent=1, default=str))
    try:
        trainer.train(resume=resume)
    except TrainingInterrupted as e:
        if main_process:
            print(f"qwenkit: {e}. Continue with the same command plus --resume auto", file=sys.stderr)
        return 128 + e.signum

    if args.method == "full":
        save_model(backend, model, tokenizer, out / "model")
        if main_process:
            print(f"wrote the fine-tuned model to {out / 'model'}; chat with: qwenkit chat -m {out / 'model'}")
        return 0
    with trainer.full_model() as trained:
        if main_process:
            save_adapter(trained, out, base_model_name=args.model)
            print(f"wrote the adapter to {out}; chat with: qwenkit chat -m {args.model} --adapter {out}")
    return 0


def save_model(backend, model, tokenizer, directory: Path) -> None:
    """The fully fine-tuned model as a checkpoint directory load() reads. Sharded runs gather the
    weights on rank 0 into a plain model first."""
    from .loading import build_model
    from .loading.save import save_checkpoint

    if not backend.sharded:
        save_checkpoint(model, tokenizer, directory, force=True)
        return
    state = backend.full_state_dict()
    if backend.is_main:
        whole = build_model(model.config, state.items(), torch.float32, torch.device("cpu"))
        whole.generation_config = getattr(model, "generation_config", {})
        save_checkpoint(whole, tokenizer, directory, force=True)


def prepare_model(model_name: str, method: str, dtype: str | torch.dtype = "auto", device="auto", *, seed: int = 42,
                  fsdp: bool = False, lora_targets: str = "all-linear", lora_r: int = 64, lora_alpha: float = 16,
                  lora_dropout: float = 0.05, train_embeddings: bool = False, train_head: bool = False):
    """Load `model_name` ready for `method` -> (model, tokenizer, compute dtype).

    Trained weights are float32 masters (the math runs in the compute dtype through autocast); a
    frozen base is stored in the compute dtype, or int4 for qlora, except under FSDP, which shards
    one dtype per block (float32).
    """
    from .loading import load, resolve_device, resolve_dtype
    from .train import apply_lora
    from .train.checkpoint import seed_everything

    device = resolve_device(device)
    compute = resolve_dtype(dtype, device)
    base_dtype = torch.float32 if method == "full" or fsdp else compute
    quantize = "int4" if method == "qlora" and not _already_quantized(model_name) else None
    model, tokenizer = load(model_name, dtype=base_dtype, device=device, quantize=quantize, pack=False)
    seed_everything(seed)  # the same LoRA initialisation in every process and every run
    if method == "full":
        model.requires_grad_(True)
        return model, tokenizer, compute
    if method == "qlora" and not _has_quantized_linears(model):
        raise QwenkitError(f"--method qlora needs a 4-bit base, but {model_name} has no quantized linears")
    apply_lora(model, targets=lora_targets, r=lora_r, alpha=lora_alpha, dropout=lora_dropout,
               train_embeddings=train_embeddings, train_head=train_head)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # a trained embedding / head becomes a float32 master
    return model, tokenizer, compute


def _already_quantized(model: str) -> bool:
    """Whether `model` is a checkpoint directory saved quantized (GPTQ, qwenkit quantize)."""
    from .config import ModelConfig
    from .loading import resolve_source
    from .quant import autogptq

    path = resolve_source(model)
    if path.is_file():  # a GGUF file: quantize="int4" keeps its 4-bit blocks exact
        return False
    config = ModelConfig.from_file(path / "config.json")
    return bool(config.extra.get("quantization_config")) or autogptq.gptq_config(path, config) is not None


def _has_quantized_linears(model) -> bool:
    from .quant import QuantizedLinear
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def _report_data(path: str, stats, main_process: bool) -> None:
    if not main_process:
        return
    print(f"{path}: {stats.summary()}", file=sys.stderr)
    for error in stats.skipped_errors[:5]:
        print(f"  skipped {error}", file=sys.stderr)


def _on_rank0(fn, backend):
    """fn() run by rank 0; its result (or its error) reaches every process."""
    if backend.world_size == 1:
        return fn()
    import torch.distributed as dist

    box = [None, None]
    if backend.rank == 0:
        try:
            box[0] = fn()
        except QwenkitError as e:
            box[1] = str(e)
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise QwenkitError(box[1])
    return box[0]
