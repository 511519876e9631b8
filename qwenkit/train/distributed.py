"""Where a training step runs: one process, FSDP2 across processes, or DeepSpeed ZeRO.

The trainer's loop is the same for all three; a backend owns what differs: wrapping the model,
building the optimizer, backward/step, and saving/loading the trained state. Multi-process runs
start under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) and use NCCL on GPUs,
gloo on the CPU. Checkpoints hold full (unsharded) tensors written by rank 0 for one process and
FSDP alike, so a run can resume with a different number of processes; DeepSpeed checkpoints are
DeepSpeed's own (one file per rank) and resume under DeepSpeed only.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..errors import QwenkitError

MODEL_FILE, OPTIMIZER_FILE = "trainable.safetensors", "optimizer.pt"


def init_process_group() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; a lone process is a group of one."""
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    """Whether this process is the one that reports: torchrun's rank 0, or a process on its own."""
    return int(os.environ.get("RANK", "0")) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adamw(params: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
          betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (biases and norm weights are not decayed, as in the
    Qwen-7B scripts' Hugging Face Trainer)."""
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates a parameter in one pass instead of several, far faster on the CPU
    # (benchmarks/results/README.md, "Fine-tuning against transformers + peft"). Plain tensors only:
    # FSDP's sharded DTensors take the default implementation.
    fused = all(type(p) is nn.Parameter and p.device.type in ("cpu", "cuda") and p.is_floating_point()
                for _, p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=1e-8,
                             fused=fused or None)


class SingleProcess:
    """Plain PyTorch in this process; the other backends override what differs."""

    rank, world_size = 0, 1
    sharded = False  # whether parameters may be split over processes (the final save gathers them)

    def prepare(self, model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                max_grad_norm: float, lr_lambda: Callable[[int], float]) -> None:
        self.model, self.max_grad_norm = model, max_grad_norm
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.params:
            raise QwenkitError("the model has no trainable parameters")
        self.optimizer = adamw(self.params, lr, weight_decay, betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def forward(self, input_ids: torch.Tensor, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, logits_at=logits_at)

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip, update, advance the schedule; returns the gradient norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.params], self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def barrier(self) -> None:
        pass

    # Trainable tensors and optimizer state, unsharded, keyed by parameter name.
    _options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)

    def save(self, directory: Path) -> None:
        weights = get_model_state_dict(self.model, options=self._options)
        optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=self._options)
        if self.is_main:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / MODEL_FILE))
            torch.save({"optimizer": optimizer, "scheduler": self.scheduler.state_dict()}, directory / OPTIMIZER_FILE)

    def load(self, directory: Path) -> None:
        if not (directory / MODEL_FILE).is_file():
            raise QwenkitError(f"{directory} holds no {MODEL_FILE}: it was not written by a one-process or "
                               "--fsdp run (a --deepspeed checkpoint resumes with --deepspeed)")
        weights = load_file(str(directory / MODEL_FILE))
        expected = {n for n, _ in self.params}
        if set(weights) != expected:
            missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
            raise QwenkitError(f"checkpoint {directory} does not fit this run's trainable parameters "
                               f"(missing {missing[:3]}, unexpected {extra[:3]}): resume with the same --method "
                               "and LoRA options")
        state = torch.load(directory / OPTIMIZER_FILE, weights_only=False)
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.model, weights, options=options)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        self.scheduler.load_state_dict(state["scheduler"])

    @contextlib.contextmanager
    def full_model(self):
        """The model with every parameter whole as an attribute (what save_adapter reads), for the
        final save on rank 0; every process enters it."""
        yield self.model

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight, whole, on rank 0 (other processes get {}); every process calls it."""
        return self.model.state_dict()


class FSDP(SingleProcess):
    """FSDP2: each decoder block and then the root are `fully_shard`ed over all processes.

    Parameters stay in float32 shards (one dtype per FSDP group is required, and the trainer's
    autocast does the low-precision math, as in one process); gradients are reduced once per
    optimizer step, on the last micro-batch.
    """

    sharded = True

    def __init__(self):
        self.rank, self.world_size, _ = init_process_group()

    def prepare(self, model, lr, weight_decay, betas, max_grad_norm, lr_lambda):
        from torch.distributed.fsdp import fully_shard

        if any(p.dtype != torch.float32 for p in model.parameters()):
            raise QwenkitError("--fsdp shards float32 parameters (the compute still runs in --dtype through "
                               "autocast); quantized bases (--method qlora) cannot be sharded: use --method lora")
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        super().prepare(model, lr, weight_decay, betas, max_grad_norm, lr_lambda)

    def backward(self, loss, last_micro_batch):
        self.model.set_requires_gradient_sync(last_micro_batch)
        loss.backward()

    def all_reduce(self, t):
        dist.all_reduce(t)
        return t

    def barrier(self):
        dist.barrier()

    @contextlib.contextmanager
    def full_model(self):
        from torch.distributed.fsdp import FSDPModule

        sharded = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
        for m in sharded:
            m.unshard()
        try:
            yield self.model
        finally:
            for m in sharded:
                m.reshard()


    def full_state_dict(self):
        # (FSDP's state_dict() is sharded even while the model is unsharded)
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class DeepSpeed(SingleProcess):
    """DeepSpeed ZeRO (stage 2 or 3) from a DeepSpeed config file, such as the Qwen-7B scripts' ds_config_zero2.json.

    `"auto"` values are filled from the trainer's options as Hugging Face's integration does. An
    optimizer or scheduler section whose values are all "auto" becomes ours (AdamW, cosine with
    warmup); one with explicit values is DeepSpeed's to build.
    """

    sharded = True

    def __init__(self, config_path: str | Path):
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise QwenkitError('--deepspeed needs DeepSpeed: pip install "qwenkit[deepspeed]"') from None
        self.rank, self.world_size, _ = init_process_group()
        try:
            self.config = json.loads(Path(config_path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise QwenkitError(f"--deepspeed {config_path}: cannot read it as JSON ({e})") from None

    def fill_config(self, batch_size: int, grad_accum: int, lr: float, weight_decay: float,
                    betas: tuple[float, float], max_grad_norm: float, dtype: torch.dtype, hidden_size: int) -> None:
        c = self.config
        auto = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": grad_accum,
                "train_batch_size": batch_size * grad_accum * self.world_size, "gradient_clipping": max_grad_norm}
        for key, value in auto.items():
            if c.get(key, "auto") == "auto":
                c[key] = value
        for key, on in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
            if c.get(key, {}).get("enabled") == "auto":
                c[key]["enabled"] = on
        zero = c.get("zero_optimization", {})
        for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                           ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                           ("stage3_param_persistence_threshold", 10 * hidden_size)):
            if zero.get(key) == "auto":
                zero[key] = value
        self.own_optimizer = _all_auto(c.get("optimizer"))
        if self.own_optimizer:
            c.pop("optimizer", None)
        self.own_scheduler = _all_auto(c.get("scheduler"))
        if self.own_scheduler:
            c.pop("scheduler", None)
        leftover = _auto_keys(c)
        if leftover:
            raise QwenkitError(f"--deepspeed config: qwenkit cannot fill 'auto' for {', '.join(leftover)}; "
                               "give explicit values")

    def prepare(self, model, lr, weight_decay, betas, max_grad_norm, lr_lambda):
        import deepspeed

        if self.rank == 0:
            _warn_of_stale_build_locks()
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        optimizer = adamw(self.params, lr, weight_decay, betas) if self.own_optimizer else None
        scheduler = (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)) if self.own_scheduler else None
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=[p for _, p in self.params], optimizer=optimizer,
            lr_scheduler=scheduler, config=self.config)
        self.model = self.engine.module

    def forward(self, input_ids, logits_at=None):
        return self.engine(input_ids, logits_at=logits_at)

    def backward(self, loss, last_micro_batch):
        # The trainer already divides the loss over the step's tokens; DeepSpeed must not divide again.
        self.engine.set_gradient_accumulation_boundary(last_micro_batch)
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # DeepSpeed steps every micro-batch and updates on the boundary

    def step(self):
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self):
        return self.engine.get_lr()[0]

    def all_reduce(self, t):
        dist.all_reduce(t)
        return t

    def barrier(self):
        dist.barrier()

    def save(self, directory):
        self.engine.save_checkpoint(str(directory), tag="deepspeed")

    def load(self, directory):
        if not (directory / "deepspeed").is_dir():
            raise QwenkitError(f"{directory} is not a --deepspeed checkpoint; resume it without --deepspeed")
        self.engine.load_checkpoint(str(directory), tag="deepspeed")

    @contextlib.contextmanager
    def full_model(self):
        import deepspeed

        if self.engine.zero_optimization_stage() == 3:
            with deepspeed.zero.GatheredParameters(list(self.model.parameters())):
                yield self.model
        else:
            yield self.model

    def full_state_dict(self):
        if self.engine.zero_optimization_stage() == 3:
            return self.engine._zero3_consolidated_16bit_state_dict() or {}
        return self.model.state_dict() if self.is_main else {}


def _warn_of_stale_build_locks(age_s: float = 600) -> None:
    """Name the lock files an interrupted build left in torch's extensions folder. DeepSpeed builds its
    ops there on first use (on the CPU, always), and torch waits on such a lock without end or message."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    for lock in root.glob("*/*/lock"):
        with contextlib.suppress(OSError):  # a build that just ended
            age = time.time() - lock.stat().st_mtime
            if age > age_s:
                print(f"qwenkit: {lock} is {age / 60:.0f} minutes old; if no build is running, an interrupted one "
                      "left it, and DeepSpeed will wait on it for ever: delete it", file=sys.stderr, flush=True)


def _all_auto(section: dict | None) -> bool:
    return section is not None and all(v == "auto" for v in section.get("params", {}).values())


def _auto_keys(d: dict, prefix: str = "") -> list[str]:
    found = []
    for k, v in d.items():
        if isinstance(v, dict):
            found += _auto_keys(v, f"{prefix}{k}.")
        elif v == "auto":
            found.append(prefix + k)
    return found
