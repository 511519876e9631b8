"""One trainer for full, LoRA and Q-LoRA fine-tuning: the method only decides which parameters
require grad (see finetune.py); the loop below is the same for all.

    trainer = Trainer(model, examples, TrainConfig(out="run/", lr=3e-4), pad_id=tokenizer.pad_id)
    trainer.train(resume=None)           # or a checkpoint directory

The loop: AdamW (β2 0.95, weight decay 0.1 on matrices), cosine schedule with linear warmup,
gradient accumulation, clipping at 1.0, autocast to `dtype` when it is below float32 (trainable
parameters and optimizer state stay float32), optional gradient checkpointing, evaluation loss on
held-out examples, a progress bar, and the loss curve as CSV (and PNG when matplotlib is there).

The loss of an optimizer step is the mean over all its label tokens (every micro-batch, every
process), so gradient accumulation and more processes give the same update as one big batch.

Checkpoints (see checkpoint.py) hold the trainable weights, optimizer, scheduler, every process's
RNG states and the data position (epoch, step within it; the order of an epoch is fixed by the
seed), so a resumed run computes exactly the losses the uninterrupted one would have. SIGINT
(Ctrl-C) and SIGTERM finish the current step, save a checkpoint and raise TrainingInterrupted.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..datasets import Example, collate, predicting_positions
from ..errors import QwenkitError
from ..progress import bars_enabled, progress
from ..runtime.allocator import keep_all_freed_memory
from .checkpoint import (
    checkpoint_dir,
    prune,
    remove_partial,
    rng_state,
    seed_everything,
    set_rng_state,
    write_atomically,
)
from .distributed import SingleProcess
from .loss import cross_entropy

HISTORY_FIELDS = ("step", "epoch", "loss", "eval_loss", "lr", "grad_norm", "tokens", "tokens_per_s")


@dataclass
class TrainConfig:
    out: Path
    lr: float
    epochs: int = 1
    max_steps: int | None = None  # when given, the run length (epochs are repeated as needed)
    batch_size: int = 1  # examples per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup_ratio: float = 0.01
    warmup_steps: int | None = None  # overrides warmup_ratio
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = 1.0
    dtype: torch.dtype = torch.float32  # compute dtype: autocast when below float32
    gradient_checkpointing: bool = False
    save_every: int = 100  # steps between checkpoints; 0 saves only at the end and when interrupted
    keep: int = 3  # checkpoints kept on disk; 0 keeps all
    eval_every: int = 0  # steps between evaluations; 0 evaluates with each checkpoint
    log_every: int = 10  # steps between log lines when no progress bar is drawn
    seed: int = 42

    def __post_init__(self):
        self.out = Path(self.out)
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise QwenkitError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise QwenkitError(f"max_steps must be at least 1, not {self.max_steps}")
        if not self.lr > 0:
            raise QwenkitError(f"the learning rate must be positive, not {self.lr}")
        if self.dtype == torch.float16:
            raise QwenkitError("float16 training needs loss scaling, which qwenkit does not do: use bfloat16 "
                               "(every GPU since Ampere and CPUs with AVX-512 BF16) or float32")


class TrainingInterrupted(Exception):
    """A signal stopped training after a checkpoint was saved."""

    def __init__(self, signum: int, checkpoint: Path, step: int):
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name} at step {step}; checkpoint saved to {checkpoint}")
        self.signum, self.checkpoint, self.step = signum, checkpoint, step


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0
    history: list[dict] = field(default_factory=list)


def cosine_schedule(warmup: int, total: int):
    """lr factor for the update at 0-based step s: linear warmup to 1 over `warmup` steps, then a
    cosine decay that would reach 0 one step after the last."""
    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
    return factor


class Trainer:
    def __init__(self, model: nn.Module, examples: list[Example], config: TrainConfig, pad_id: int,
                 eval_examples: list[Example] | None = None, backend: SingleProcess | None = None):
        self.config, self.pad_id = config, pad_id
        self.examples, self.eval_examples = examples, eval_examples or []
        self.backend = backend or SingleProcess()
        rank, world = self.backend.rank, self.backend.world_size
        self.rank_examples = len(examples) // world  # each epoch drops the last len % world examples
        if self.rank_examples == 0:
            raise QwenkitError(f"{len(examples)} training examples cannot be split over {world} processes")
        self.steps_per_epoch = math.ceil(math.ceil(self.rank_examples / config.batch_size) / config.grad_accum)
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        warmup = config.warmup_steps if config.warmup_steps is not None else math.ceil(
            config.warmup_ratio * self.total_steps)
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            keep_all_freed_memory()
        seed_everything(config.seed + rank)
        model.model.gradient_checkpointing = config.gradient_checkpointing
        model.train()
        self.backend.prepare(model, config.lr, config.weight_decay, config.betas, config.max_grad_norm,
                             cosine_schedule(warmup, self.total_steps))
        self.model = self.backend.model
        self.state = TrainState()

    # ------------------------------------------------------------------------- data

    def epoch_order(self, epoch: int) -> list[int]:
        """This process's example indices for `epoch`: a seeded shuffle, dealt round-robin to processes
        so that the processes' micro-batches together are the one-process batch."""
        gen = torch.Generator().manual_seed(self.config.seed * 1000 + epoch)
        order = torch.randperm(len(self.examples), generator=gen).tolist()
        world = self.backend.world_size
        return order[:self.rank_examples * world][self.backend.rank::world]

    def step_batches(self, epoch: int, step_in_epoch: int) -> list[list[Example]]:
        c = self.config
        order = self.epoch_order(epoch)
        start = step_in_epoch * c.grad_accum * c.batch_size
        picked = order[start:start + c.grad_accum * c.batch_size]
        return [[self.examples[i] for i in picked[j:j + c.batch_size]] for j in range(0, len(picked), c.batch_size)]

    # ------------------------------------------------------------------------- the loop

    def autocast(self):
        dtype = self.config.dtype
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self, micro_batches: list[list[Example]]) -> tuple[float, int]:
        """One optimizer step; returns (mean loss over its label tokens, input tokens), over all processes."""
        batches = [collate(mb, self.pad_id) for mb in micro_batches]
        predicted = [predicting_positions(b["labels"]) for b in batches]  # (positions, their labels)
        counts = [len(targets) for _, targets in predicted]
        totals = torch.tensor([sum(counts), sum(len(e.input_ids) for mb in micro_batches for e in mb)],
                              dtype=torch.float64)
        label_tokens, tokens = self.backend.all_reduce(totals).tolist()
        world, loss_sum = self.backend.world_size, torch.zeros((), dtype=torch.float64)
        for i, (batch, (at, targets), count) in enumerate(zip(batches, predicted, counts)):
            ids, at, targets = batch["input_ids"].to(self.device), at.to(self.device), targets.to(self.device)
            with self.autocast():
                logits = self.backend.forward(ids, at)
            # A batch with no labels adds nothing (but still runs, for FSDP's collectives).
            mean = cross_entropy(logits, targets) if count else logits.sum() * 0
            # Gradients are averaged over processes, hence * world: the sum over every token / all tokens.
            self.backend.backward(mean * (count * world / max(label_tokens, 1)), i == len(batches) - 1)
            loss_sum += float(mean.detach()) * count
        loss = float(self.backend.all_reduce(loss_sum)) / max(label_tokens, 1)
        return loss, int(tokens)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over every label token of the held-out examples (split over the processes)."""
        if not self.eval_examples:
            return None
        self.model.eval()
        rank, world, bs = self.backend.rank, self.backend.world_size, self.config.batch_size
        mine = self.eval_examples[rank::world]
        sums = torch.zeros(2, dtype=torch.float64)
        # Every process runs the same number of forwards (FSDP needs all of them in each): one with
        # fewer examples repeats the first one without counting it.
        for j in range(0, math.ceil(len(self.eval_examples) / world), bs):
            chunk = mine[j:j + bs]
            batch = collate(chunk or self.eval_examples[:1], self.pad_id)
            ids, labels = batch["input_ids"].to(self.device), batch["labels"].to(self.device)
            at, targets = predicting_positions(labels)
            with self.autocast():
                logits = self.backend.forward(ids, at)
            if chunk and len(targets):
                loss = cross_entropy(logits, targets, reduction="sum")
                sums += torch.tensor([float(loss), len(targets)], dtype=torch.float64)
        self.model.train()
        total, count = self.backend.all_reduce(sums).tolist()
        return total / count if count else None

    def train(self, resume: Path | None = None) -> TrainState:
        c, backend = self.config, self.backend
        if backend.is_main:
            c.out.mkdir(parents=True, exist_ok=True)
            remove_partial(c.out)
        backend.barrier()
        if resume is not None:
            self.load_checkpoint(resume)
        state = self.state
        if backend.is_main:
            self._write_csv()
        self._log(f"training {self.trainable_summary()} on {len(self.examples)} examples: {self.total_steps} steps "
                  f"of {c.batch_size * c.grad_accum * backend.world_size} examples"
                  + (f", resuming after step {state.step}" if state.step else ""))
        with stop_on_signal() as signals, progress("training", self.total_steps,
                                                   show=backend.is_main) as advance:
            advance(state.step)
            while state.step < self.total_steps:
                start, lr = time.perf_counter(), backend.lr
                loss, tokens = self.train_step(self.step_batches(state.epoch, state.step_in_epoch))
                grad_norm = backend.step()
                seconds = time.perf_counter() - start
                state.step += 1
                state.step_in_epoch += 1
                if state.step_in_epoch == self.steps_per_epoch:
                    state.epoch, state.step_in_epoch = state.epoch + 1, 0
                row = {"step": state.step, "epoch": round(state.epoch + state.step_in_epoch / self.steps_per_epoch, 4),
                       "loss": loss, "eval_loss": None, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                       "tokens_per_s": round(tokens / seconds, 1)}
                last = state.step == self.total_steps
                stop = self._agreed(bool(signals))
                scheduled = last or bool(c.save_every and state.step % c.save_every == 0)
                save = scheduled or stop  # a stop saves at once but does not evaluate: the curve stays the same
                if (c.eval_every and state.step % c.eval_every == 0) or (not c.eval_every and scheduled) or last:
                    row["eval_loss"] = self.evaluate()
                state.history.append(row)
                if backend.is_main:
                    self._append_csv(row)
                advance(1, description=self._status(row))
                if not bars_enabled() and (state.step % c.log_every == 0 or last or row["eval_loss"] is not None):
                    self._log(self._status(row))
                if save:
                    path = self.save_checkpoint()
                if stop:
                    self.plot()
                    raise TrainingInterrupted(signals[0] if signals else signal.SIGINT, path, state.step)
        self.plot()
        return state

    def _agreed(self, local_stop: bool) -> bool:
        """Whether any process was asked to stop: all must save the same step together."""
        if self.backend.world_size == 1:
            return local_stop
        return bool(self.backend.all_reduce(torch.tensor([float(local_stop)]))[0] > 0)

    def trainable_summary(self) -> str:
        trainable = sum(p.numel() for _, p in self.backend.params)
        total = sum(p.numel() for p in self.model.parameters())
        return f"{trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"

    def full_model(self):
        """Context manager: the model with whole (unsharded) parameters, for the final save."""
        return self.backend.full_model()

    # ------------------------------------------------------------------------- checkpoints

    def _data_signature(self) -> dict:
        """What fixes the examples of each step: it must match for a resume, the process count need not
        (two processes of batch 1 see the batches of one process of batch 2)."""
        c, world = self.config, self.backend.world_size
        return {"examples": self.rank_examples * world, "batch_size_x_processes": c.batch_size * world,
                "grad_accum": c.grad_accum, "seed": c.seed, "total_steps": self.total_steps}

    def save_checkpoint(self) -> Path:
        state, backend = self.state, self.backend
        final = checkpoint_dir(self.config.out) / f"step-{state.step:08d}"

        def write(tmp: Path) -> None:
            backend.save(tmp)
            torch.save(rng_state(), tmp / f"rng-{backend.rank}.pt")
            if backend.is_main:
                meta = {"step": state.step, "epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
                        "data": self._data_signature(), "history": state.history}
                (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1))

        write_atomically(final, write, is_writer=backend.is_main, barrier=backend.barrier)
        if backend.is_main:
            prune(self.config.out, self.config.keep)
        return final

    def load_checkpoint(self, directory: Path) -> None:
        directory = Path(directory)
        meta = json.loads((directory / "trainer_state.json").read_text())
        differs = {k: (v, meta["data"].get(k)) for k, v in self._data_signature().items() if meta["data"].get(k) != v}
        if differs:
            what = ", ".join(f"{k} {old} (now {new})" for k, (new, old) in differs.items())
            raise QwenkitError(f"checkpoint {directory} was made with {what}: resume with the same data and options "
                               "(--batch-size x processes, --grad-accum, --seed, --epochs / --max-steps)")
        rng_file = directory / f"rng-{self.backend.rank}.pt"
        if not rng_file.is_file():
            raise QwenkitError(f"{directory} has no {rng_file.name}: it was written by fewer processes")
        self.backend.load(directory)
        set_rng_state(torch.load(rng_file, weights_only=False))
        self.state = TrainState(meta["step"], meta["epoch"], meta["step_in_epoch"], meta["history"])

    # ------------------------------------------------------------------------- logs

    def _log(self, message: str) -> None:
        if self.backend.is_main:
            print(message, file=sys.stderr, flush=True)

    def _status(self, row: dict) -> str:
        text = (f"step {row['step']}/{self.total_steps} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                f"{row['tokens_per_s']:.0f} tok/s")
        return text + (f" eval {row['eval_loss']:.4f}" if row["eval_loss"] is not None else "")

    def _write_csv(self) -> None:
        with open(self.config.out / "loss.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, HISTORY_FIELDS)
            writer.writeheader()
            writer.writerows(self.state.history)

    def _append_csv(self, row: dict) -> None:
        with open(self.config.out / "loss.csv", "a", newline="") as f:
            csv.DictWriter(f, HISTORY_FIELDS).writerow(row)

    def plot(self) -> Path | None:
        """loss.png beside loss.csv: training loss per step, evaluation loss where measured."""
        if not self.backend.is_main or not self.state.history:
            return None
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self._log('loss.png skipped: matplotlib is not installed (pip install "qwenkit[train]"); '
                      "loss.csv has the curve")
            return None
        rows = self.state.history
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
        evals = [r for r in rows if r["eval_loss"] is not None]
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        path = self.config.out / "loss.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


@contextlib.contextmanager
def stop_on_signal():
    """Yields a list that receives SIGINT / SIGTERM as they arrive, instead of dying at once; a second
    signal of the same kind acts as usual (Ctrl-C twice aborts without a checkpoint)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield received
        return
    previous = {}

    def handler(signum, frame):
        received.append(signum)
        signal.signal(signum, previous[signum])

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def config_dict(config: TrainConfig) -> dict:
    """The config as JSON-ready values (for train_args.json)."""
    return {k: (str(v) if isinstance(v, (Path, torch.dtype)) else v) for k, v in asdict(config).items()}
