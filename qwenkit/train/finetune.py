"""Full, LoRA or Q-LoRA fine-tuning on a conversation file, over `load()`, `train.load_dataset`,
`train.apply_lora` and `train.Trainer` (`qwenkit finetune` runs it).

    from qwenkit.train.finetune import FinetuneOptions, finetune
    finetune(FinetuneOptions(data="conv.json", out="run1", model="Qwen/Qwen2.5-0.5B-Instruct", max_steps=100))

Methods:
- full: every weight trains, held in float32 (the math runs in --dtype through autocast);
- lora: a frozen base in --dtype plus float32 LoRA matrices (peft's defaults of the Qwen-7B scripts: r 64,
  alpha 16, dropout 0.05, every linear);
- qlora: the same on a frozen 4-bit base: qwenkit's int4 linears (a float checkpoint or GGUF is
  quantized as it loads), or a checkpoint that is already int4 (GPTQ, `qwenkit quantize`).

The output directory holds `checkpoints/step-N/`, `loss.csv`, `loss.png`, `train_args.json`, and at the
end the adapter in peft's format (lora, qlora: `adapter_config.json`, `adapter_model.safetensors`) or
the model as a checkpoint directory `model/` (full).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from ..config import ModelConfig
from ..datasets import load_dataset
from ..errors import QwenkitError
from ..loading import build_model, load, resolve_device, resolve_dtype, resolve_source
from ..quant import QuantizedLinear, autogptq
from ..saving import save_checkpoint
from .checkpoint import resolve_resume, seed_everything
from .distributed import FSDP, DeepSpeed, SingleProcess
from .lora import apply_lora, save_adapter
from .trainer import TrainConfig, Trainer, config_dict

METHOD_LR = {"full": 1e-5, "lora": 3e-4, "qlora": 3e-4}  # the Qwen-7B scripts' (spec §7.5)
LORA_OPTIONS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "train_embeddings", "train_head")
RUN_FILES = ("checkpoints", "loss.csv", "loss.png", "train_args.json", "adapter_config.json",
             "adapter_model.safetensors", "model")  # what --overwrite deletes


@dataclass
class FinetuneOptions:
    """One fine-tuning run. The fields are `qwenkit finetune`'s long options (see its --help), with
    its defaults; the errors name them as flags."""

    data: str | Path
    out: str | Path
    model: str = "demo"
    method: str = "lora"
    eval_data: str | Path | None = None
    epochs: int = 5
    max_steps: int | None = None
    lr: float | None = None  # None: the method's (METHOD_LR)
    batch_size: int = 2
    grad_accum: int = 8
    max_length: int = 512
    warmup_ratio: float = 0.01
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    lora_r: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"
    train_embeddings: bool = False
    train_head: bool = False
    save_every: int = 100
    keep: int = 3
    eval_every: int = 0
    log_every: int = 10
    resume: str | None = None
    overwrite: bool = False
    seed: int = 42
    skip_bad: bool = False
    gradient_checkpointing: bool = False
    dtype: str = "auto"
    device: str = "auto"
    fsdp: bool = False
    deepspeed: str | Path | None = None

    def __post_init__(self):
        if self.method not in METHOD_LR:
            raise QwenkitError(f"--method must be one of {', '.join(METHOD_LR)}, not {self.method!r}")
        if self.lr is None:
            self.lr = METHOD_LR[self.method]
        if self.fsdp and self.deepspeed:
            raise QwenkitError("--fsdp and --deepspeed are two ways to do the same thing: pick one")
        defaults = {f.name: f.default for f in fields(self)}
        lora_set = [name for name in LORA_OPTIONS if getattr(self, name) != defaults[name]]
        if self.method == "full" and lora_set:
            flags = ", ".join("--" + name.replace("_", "-") for name in lora_set)
            raise QwenkitError(f"--method full trains every weight: leave out {flags} (LoRA options, for --method "
                               "lora / qlora)")


def finetune(options: FinetuneOptions) -> Path:
    """Train as `options` say; returns where the result is: `out` with the adapter (lora, qlora) or
    `out/model` (full). A signal (Ctrl-C, SIGTERM) saves a checkpoint and raises TrainingInterrupted."""
    out = Path(options.out)
    distributed = options.fsdp or options.deepspeed
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not distributed:
        raise QwenkitError("started by torchrun with several processes: pass --fsdp or --deepspeed CONFIG")
    backend = FSDP() if options.fsdp else DeepSpeed(options.deepspeed) if options.deepspeed else SingleProcess()
    main_process = backend.rank == 0
    resume = _on_rank0(lambda: prepare_out(out, options.resume, options.overwrite), backend)

    device = resolve_device(options.device)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    config = TrainConfig(  # checks the options before the slow load
        out=out, lr=options.lr, epochs=options.epochs, max_steps=options.max_steps, batch_size=options.batch_size,
        grad_accum=options.grad_accum, warmup_ratio=options.warmup_ratio, warmup_steps=options.warmup_steps,
        weight_decay=options.weight_decay, max_grad_norm=options.max_grad_norm,
        dtype=resolve_dtype(options.dtype, device), gradient_checkpointing=options.gradient_checkpointing,
        save_every=options.save_every, keep=options.keep, eval_every=options.eval_every,
        log_every=options.log_every, seed=options.seed)
    model, tokenizer, compute = prepare_model(
        options.model, options.method, config.dtype, device, seed=options.seed, fsdp=options.fsdp,
        lora_targets=options.lora_targets, lora_r=options.lora_r, lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout, train_embeddings=options.train_embeddings, train_head=options.train_head)

    examples, stats = load_dataset(options.data, tokenizer, options.max_length, skip_bad=options.skip_bad)
    _report_data(options.data, stats, main_process)
    eval_examples = None
    if options.eval_data:
        eval_examples, eval_stats = load_dataset(options.eval_data, tokenizer, options.max_length,
                                                 skip_bad=options.skip_bad)
        _report_data(options.eval_data, eval_stats, main_process)
    if options.deepspeed:
        backend.fill_config(options.batch_size, options.grad_accum, options.lr, options.weight_decay, config.betas,
                            options.max_grad_norm, compute, model.config.hidden_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = Trainer(model, examples, config, pad_id=pad_id, eval_examples=eval_examples, backend=backend)
    if main_process and resume is None:
        out.mkdir(parents=True, exist_ok=True)
        record = asdict(options) | {"train_config": config_dict(config)}
        (out / "train_args.json").write_text(json.dumps(record, indent=1, default=str))
    trainer.train(resume=resume)

    if options.method == "full":
        save_model(backend, model, tokenizer, out / "model")
        return out / "model"
    with trainer.full_model() as trained:
        if main_process:
            save_adapter(trained, out, base_model_name=options.model)
    return out


def prepare_out(out: Path, resume: str | None, overwrite: bool) -> Path | None:
    """Check --out against --resume / --overwrite; returns the checkpoint to resume from, if any."""
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


def save_model(backend, model, tokenizer, directory: Path) -> None:
    """The fully fine-tuned model as a checkpoint directory load() reads. Sharded runs gather the
    weights on rank 0 into a plain model first."""
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
    path = resolve_source(model)
    if path.is_file():  # a GGUF file: quantize="int4" keeps its 4-bit blocks exact
        return False
    config = ModelConfig.from_file(path / "config.json")
    return bool(config.extra.get("quantization_config")) or autogptq.gptq_config(path, config) is not None


def _has_quantized_linears(model) -> bool:
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
