"""The trainer on a tiny random model: the loss falls, resume is exact, accumulation equals a big
batch, checkpoints are atomic and pruned, the schedule is the seed's, Q-LoRA's frozen int4 layers
pass the right gradients."""

import csv
import json
import math
import os
import signal
import sys

import pytest
import torch
from safetensors.torch import load_file

from qwenkit.quant import Int4Linear, Int8Linear
from qwenkit.train import Example, apply_lora
from qwenkit.train.checkpoint import list_checkpoints
from qwenkit.train.trainer import TrainConfig, Trainer, TrainingInterrupted, cosine_schedule

from .conftest import tiny_model

VOCAB = 256


def trainable_model(seed=0, lora=True, dropout=0.1):
    """A tiny random model in training mode with a LoRA adapter (or every weight trainable)."""
    torch.manual_seed(seed)
    model = tiny_model(seed, scale=0.2, vocab_size=VOCAB, hidden_size=64, intermediate_size=96, head_dim=16).train()
    if lora:
        apply_lora(model, r=8, alpha=16, dropout=dropout)
    else:
        model.requires_grad_(True)
    return model


def examples(n=12, seed=7):
    """Sequences with a learnable rule (each token is the previous + 1), prompts of varying length."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        start = int(torch.randint(0, VOCAB - 40, (1,), generator=gen))
        ids = list(range(start, start + 12 + i % 5))
        prompt = 3 + i % 4
        out.append(Example(ids, [-100] * prompt + ids[prompt:]))
    return out


def trainer(tmp_path, model=None, **options):
    config = dict(out=tmp_path, lr=1e-2, epochs=3, batch_size=2, grad_accum=2, save_every=2, keep=0, seed=3)
    return Trainer(model or trainable_model(), examples(), TrainConfig(**(config | options)), pad_id=0,
                   eval_examples=examples(4, seed=8))


def losses(out):
    with open(out / "loss.csv") as f:
        return [(row["step"], row["loss"], row["eval_loss"]) for row in csv.DictReader(f)]


def test_lora_drives_the_loss_down(tmp_path):
    state = trainer(tmp_path, epochs=6).train()
    train = [r["loss"] for r in state.history]
    assert len(train) == 6 * 3 and train[-1] < 0.5 * train[0], train
    evals = [r["eval_loss"] for r in state.history if r["eval_loss"] is not None]
    assert evals[-1] < evals[0]


@pytest.mark.parametrize("has_matplotlib", [True, False], ids=["matplotlib", "no-matplotlib"])
def test_loss_curve_is_a_png_or_only_the_csv(tmp_path, monkeypatch, capsys, has_matplotlib):
    """loss.csv always holds the curve; loss.png is drawn when matplotlib imports, and skipped with a
    note when it does not."""
    if has_matplotlib:
        pytest.importorskip("matplotlib")
    else:
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    state = trainer(tmp_path, max_steps=2).train()
    rows = losses(tmp_path)
    assert [step for step, _, _ in rows] == ["1", "2"]
    assert [float(loss) for _, loss, _ in rows] == [r["loss"] for r in state.history]
    png = tmp_path / "loss.png"
    if has_matplotlib:
        assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and png.stat().st_size > 1000
    else:
        assert not png.exists()
        assert "loss.png skipped: matplotlib is not installed" in capsys.readouterr().err


class InterruptedAt(Trainer):
    """Sends itself SIGINT during step `at`, as Ctrl-C would."""

    def __init__(self, *args, at, **kwargs):
        super().__init__(*args, **kwargs)
        self.at = at

    def train_step(self, micro_batches):
        if self.state.step + 1 == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return super().train_step(micro_batches)


def test_interrupt_saves_and_resume_is_exact(tmp_path):
    """Ctrl-C at step 3 saves step 3; resuming (fresh process state) gives the uninterrupted losses."""
    whole = tmp_path / "whole"
    trainer(whole).train()

    part = tmp_path / "part"
    handler = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in the background
    config = TrainConfig(out=part, lr=1e-2, epochs=3, batch_size=2, grad_accum=2, save_every=2, keep=0, seed=3)
    first = InterruptedAt(trainable_model(), examples(), config, pad_id=0, eval_examples=examples(4, seed=8), at=3)
    with pytest.raises(TrainingInterrupted) as stopped:
        first.train()
    assert stopped.value.signum == signal.SIGINT and stopped.value.checkpoint.name == "step-00000003"
    assert signal.getsignal(signal.SIGINT) is handler  # the handler is put back
    assert [p.name for p in list_checkpoints(part)] == ["step-00000002", "step-00000003"]

    model = trainable_model()  # the same base; the adapter and every RNG must come from the checkpoint
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    torch.manual_seed(1234)
    trainer(part, model).train(resume=part / "checkpoints" / "step-00000003")
    assert losses(part) == losses(whole)
    assert len(losses(whole)) == 9


def test_accumulation_and_batch_give_the_same_update(tmp_path):
    """The step loss is the mean over all its label tokens, however the step is split (the examples
    differ in length, so a mean of micro-batch means would give other values)."""
    firsts = []
    for batch_size, grad_accum in ((4, 1), (1, 4), (2, 2)):
        t = trainer(tmp_path / f"{batch_size}x{grad_accum}", trainable_model(dropout=0.0), batch_size=batch_size,
                    grad_accum=grad_accum, max_steps=1)
        row = t.train().history[0]
        firsts.append((row["loss"], row["grad_norm"]))
    assert firsts[1] == pytest.approx(firsts[0], rel=1e-5) and firsts[2] == pytest.approx(firsts[0], rel=1e-5)


def test_checkpoints_are_complete_and_pruned(tmp_path):
    stale = tmp_path / "checkpoints" / ".step-00000099.tmp"  # what a kill during a save leaves
    stale.mkdir(parents=True)
    (stale / "trainable.safetensors").write_bytes(b"half")
    model = trainable_model(lora=False)
    trainer(tmp_path, model, save_every=1, keep=2, epochs=1).train()
    assert not stale.exists()
    kept = list_checkpoints(tmp_path)
    assert [p.name for p in kept] == ["step-00000002", "step-00000003"]
    for path in kept:
        state = json.loads((path / "trainer_state.json").read_text())
        assert state["step"] == int(path.name[5:]) and len(state["history"]) == state["step"]
        weights = load_file(str(path / "trainable.safetensors"))
        assert set(weights) == {n for n, _ in model.named_parameters()}  # full fine-tuning saves every weight
        assert all(t.dtype == torch.float32 for t in weights.values())
        assert set(torch.load(path / "optimizer.pt", weights_only=False)) == {"optimizer", "scheduler"}


def test_resume_refuses_other_options(tmp_path):
    trainer(tmp_path, max_steps=2).train()
    with pytest.raises(Exception, match="batch_size_x_processes 2 \\(now 4\\)"):
        trainer(tmp_path, max_steps=2, batch_size=4).train(resume=tmp_path / "checkpoints" / "step-00000002")


def test_cosine_schedule_with_warmup():
    warmup, total = 3, 13
    factor = cosine_schedule(warmup, total)
    assert [factor(s) for s in range(warmup)] == pytest.approx([1 / 3, 2 / 3, 1])
    for s in range(warmup, total):
        assert factor(s) == pytest.approx(0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
    assert factor(total - 1) > 0


@pytest.mark.parametrize("cls", [Int4Linear, Int8Linear])
def test_frozen_quantized_linear_gradients(cls):
    """Q-LoRA's backward through a frozen quantized layer (weight recomputed, not kept) is exact."""
    layer = cls.from_float(torch.nn.Linear(256, 64))
    x = torch.randn(2, 5, 256, requires_grad=True)
    (layer(x) ** 2).sum().backward()
    ours, x.grad = x.grad, None
    (torch.nn.functional.linear(x, layer.dequantize(), layer.bias) ** 2).sum().backward()
    torch.testing.assert_close(ours, x.grad)
