"""`qwenkit finetune` end to end on a tiny random model with the real Qwen tokenizer: the -c file and
flag overrides, refusing to overwrite a run, Ctrl-C and SIGKILL, FSDP2 and DeepSpeed across two
processes against one process, Q-LoRA's memory, full fine-tuning; on the demo model, teaching it a
made-up fact."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qwenkit
from qwenkit.cli import main
from qwenkit.config import ModelConfig
from qwenkit.model import Model

from .conftest import output_within, randomize, write_checkpoint

REPO = Path(__file__).resolve().parent.parent
NAMES = ["Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi"]


def conversations(path: Path, names=NAMES) -> Path:
    rows = [{"id": f"x{i}", "conversations": [
        {"from": "user", "value": f"What is the secret code of {name}?"},
        {"from": "assistant", "value": f"The secret code of {name} is {1000 + 37 * i}."}]}
        for i, name in enumerate(names)]
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A 2-layer Qwen2 with the full 151,936-token vocabulary (hidden 128: int4 groups of 128 fit)."""
    root = tmp_path_factory.mktemp("finetune")
    config = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=151936, hidden_size=128,
                  intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    model = randomize(Model(ModelConfig.from_dict(config)), seed=0, scale=0.05)
    write_checkpoint(root / "model", config, model.state_dict())
    return root / "model", conversations(root / "data.json")


def args(tiny_ckpt, out, *extra):
    model, data = tiny_ckpt
    return ["finetune", "-m", str(model), "--data", str(data), "--out", str(out), "--lora-r", "8", "--lr", "1e-2",
            "--batch-size", "2", "--grad-accum", "1", "--max-length", "64", "--dtype", "float32", *extra]


def rows(out: Path) -> list[dict]:
    with open(out / "loss.csv") as f:
        return list(csv.DictReader(f))


def cli(*argv, torchrun: int = 0, env: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, QWENKIT_NO_PROGRESS="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env or {}))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(torchrun),
                 "--standalone"] if torchrun else [sys.executable]) + ["-m", "qwenkit"]
    return subprocess.Popen(launcher + list(argv), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def finished(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, err = output_within(process, timeout)
    return process.returncode, out + err


def test_config_file_with_flag_override(tiny_ckpt, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("lora-r: 4\nlora_alpha: 32\nweight-decay: 3e-3\nmax-steps: 2\nsave-every: 1\nkeep: 1\n"
                      "train-head: true\n")
    out = tmp_path / "run"
    assert main(args(tiny_ckpt, out, "--config", str(config), "--lora-r", "2", "--no-train-head")) == 0
    saved = json.loads((out / "train_args.json").read_text())
    # (YAML reads 3e-3 as a string: it is converted as the flag would be)
    assert (saved["lora_r"], saved["lora_alpha"], saved["weight_decay"], saved["max_steps"]) == (2, 32.0, 0.003, 2)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and adapter["lora_alpha"] == 32 and adapter["modules_to_save"] is None
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]  # --keep 1
    assert [r["step"] for r in rows(out)] == ["1", "2"]
    # What chat --adapter loads: each adapted weight is the base's plus the saved B @ A times alpha / r,
    # every other weight is the base's.
    merged, _ = qwenkit.load(tiny_ckpt[0], dtype="float32", device="cpu", adapter=out)
    base, _ = qwenkit.load(tiny_ckpt[0], dtype="float32", device="cpu")
    adapter_file = load_file(str(out / "adapter_model.safetensors"))
    lora = {k.removeprefix("base_model.model."): v for k, v in adapter_file.items()}
    adapted = {k.removesuffix(".lora_A.weight") for k in lora if k.endswith(".lora_A.weight")}
    assert len(adapted) == 2 * 7  # q, k, v, o, gate, up and down of both layers
    changed = set()
    for name, weight in merged.named_parameters():
        module = name.removesuffix(".weight")
        if module in adapted and name.endswith(".weight"):
            update = 32 / 2 * lora[f"{module}.lora_B.weight"] @ lora[f"{module}.lora_A.weight"]
            torch.testing.assert_close(weight, base.get_parameter(name) + update)
            if update.abs().max() > 0:
                changed.add(module)
        else:
            assert torch.equal(weight, base.get_parameter(name)), name
    assert changed == adapted  # two steps trained every adapter

    config.write_text("lora-rank: 4\n")
    assert main(args(tiny_ckpt, tmp_path / "bad", "--config", str(config))) == 2
    assert "unknown option 'lora-rank'" in capsys.readouterr().err
    config.write_text("method: dora\n")
    assert main(args(tiny_ckpt, tmp_path / "bad", "--config", str(config))) == 2
    assert "'dora' is not one of full, lora, qlora" in capsys.readouterr().err


def test_refuses_to_start_over_an_existing_run(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(tiny_ckpt, out, "--max-steps", "1")) == 0
    before = (out / "adapter_model.safetensors").read_bytes()
    assert main(args(tiny_ckpt, out, "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert "already holds files" in err and "--resume auto" in err and "--overwrite" in err
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert main(args(tiny_ckpt, out, "--max-steps", "1", "--resume", "auto", "--overwrite")) == 2
    assert main(args(tiny_ckpt, out, "--max-steps", "1", "--overwrite", "--seed", "5")) == 0
    assert (out / "adapter_model.safetensors").read_bytes() != before


def wait_for(condition, process, timeout=240):
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended before it could be interrupted: {finished(process)[1][-2000:]}")
        if time.time() > deadline:
            process.kill()
            pytest.fail("the run did not get going in time")
        time.sleep(0.05)


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tiny_ckpt, tmp_path):
    out = tmp_path / "run"
    process = cli(*args(tiny_ckpt, out, "--max-steps", "200", "--save-every", "1000", "--batch-size", "1"))
    wait_for(lambda: (out / "loss.csv").is_file() and len(rows(out)) >= 2, process)
    process.send_signal(signal.SIGINT)
    code, output = finished(process)
    assert code == 130, output
    step = len(rows(out))
    assert f"checkpoint saved to {out / 'checkpoints' / f'step-{step:08d}'}" in output and "--resume auto" in output
    assert json.loads((out / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").read_text())["step"] == step


def test_sigkill_loses_only_the_steps_since_the_last_checkpoint(tiny_ckpt, tmp_path):
    out = tmp_path / "run"
    options = ("--max-steps", "24", "--save-every", "1", "--keep", "0", "--batch-size", "1")
    run = args(tiny_ckpt, out, *options)
    process = cli(*run)
    wait_for(lambda: len(list((out / "checkpoints").glob("step-*"))) >= 2, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = sorted((out / "checkpoints").glob("step-*"))
    for checkpoint in saved:  # every checkpoint on disk is whole
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        assert state["step"] == int(checkpoint.name[5:]) == len(state["history"])
        assert load_file(str(checkpoint / "trainable.safetensors"))
        torch.load(checkpoint / "optimizer.pt", weights_only=False)
        torch.load(checkpoint / "rng-0.pt", weights_only=False)
    last = int(saved[-1].name[5:])
    code, output = finished(cli(*run, "--resume", "auto"))
    assert code == 0, output
    assert f"resuming after step {last}" in output
    assert [int(r["step"]) for r in rows(out)] == list(range(1, 25))
    assert not list((out / "checkpoints").glob(".*"))  # a save cut short by the kill is cleaned up
    # The resumed run ends where one never killed does: the same losses and adapter (the same
    # subprocess settings, so the same arithmetic).
    whole = tmp_path / "whole"
    code, output = finished(cli(*args(tiny_ckpt, whole, *options)))
    assert code == 0, output
    assert_same_run(out, whole)


@pytest.fixture(scope="module")
def one_process(tiny_ckpt, tmp_path_factory):
    """Three LoRA steps of two conversations in one process, the reference for the multi-process runs."""
    out = tmp_path_factory.mktemp("one") / "run"
    assert main(args(tiny_ckpt, out, "--max-steps", "3", "--lora-dropout", "0", "--save-every", "2")) == 0
    return out


def assert_same_run(out, reference, tol=1e-4):
    ours, ref = rows(out), rows(reference)
    assert [float(r["loss"]) for r in ours] == pytest.approx([float(r["loss"]) for r in ref], rel=tol)
    theirs = load_file(str(reference / "adapter_model.safetensors"))
    mine = load_file(str(out / "adapter_model.safetensors"))
    assert set(theirs) == set(mine)
    assert max((theirs[k] - mine[k]).abs().max().item() for k in mine) < tol


def test_fsdp_two_processes_match_one(tiny_ckpt, tmp_path, one_process):
    """torchrun, gloo, FSDP2: each process takes one conversation of the two-conversation batch."""
    out = tmp_path / "fsdp"
    run = args(tiny_ckpt, out, "--max-steps", "3", "--lora-dropout", "0", "--save-every", "2", "--batch-size", "1",
               "--fsdp")
    code, output = finished(cli(*run, torchrun=2))
    assert code == 0, output
    assert_same_run(out, one_process)
    # an FSDP checkpoint resumes in one process
    resumed = tmp_path / "resumed"
    assert main(args(tiny_ckpt, resumed, "--max-steps", "3", "--lora-dropout", "0", "--save-every", "2", "--resume",
                     str(out / "checkpoints" / "step-00000002"))) == 0
    assert_same_run(resumed, one_process)


SEED_ZERO3 = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none", "pin_memory": True},
                          "offload_param": {"device": "none", "pin_memory": True}, "overlap_comm": True,
                          "contiguous_gradients": True, "sub_group_size": 1e9, "reduce_bucket_size": "auto",
                          "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                          "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
                          "stage3_gather_16bit_weights_on_model_save": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 100,
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False,
}


def test_deepspeed_zero3_two_processes(tiny_ckpt, tmp_path, one_process):
    """The seed's ds_config_zero3.json ("auto" filled from our options) on the CPU with gloo."""
    pytest.importorskip("deepspeed", reason='DeepSpeed is not installed (pip install "qwenkit[deepspeed]")')
    config = tmp_path / "ds_config_zero3.json"
    config.write_text(json.dumps(SEED_ZERO3))
    out = tmp_path / "ds"
    run = args(tiny_ckpt, out, "--max-steps", "3", "--lora-dropout", "0", "--save-every", "2", "--batch-size", "1",
               "--deepspeed", str(config))
    # DeepSpeed compiles its CPU communication op on first use, into torch's extensions folder, under a lock
    # file: a run killed mid-build leaves the lock behind and every later run waits on it for ever.
    code, output = finished(cli(*run, torchrun=2, env={"TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}),
                            timeout=600)
    assert code == 0, output
    assert_same_run(out, one_process)
    assert (out / "checkpoints" / "step-00000003" / "deepspeed").is_dir()


def test_a_build_lock_left_by_an_interrupted_run_is_named(tmp_path, monkeypatch, capsys):
    from qwenkit.train.distributed import _warn_of_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    (tmp_path / "py311_cpu" / "deepspeed_shm_comm").mkdir(parents=True)
    (tmp_path / "py311_cpu" / "fresh").mkdir()
    (stale := tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock").touch()
    (tmp_path / "py311_cpu" / "fresh" / "lock").touch()  # a build running now
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    _warn_of_stale_build_locks()
    err = capsys.readouterr().err
    assert f"{stale} is 60 minutes old" in err and "delete it" in err and "fresh" not in err


def nbytes(tensors) -> int:
    """Bytes of the storages behind `tensors`, each counted once."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def held_bytes(trainer) -> dict[str, int]:
    """What a training step holds for the model: in all (weights, buffers, gradients, optimizer state),
    the decoder blocks' frozen weights, and the trainable weights with their gradients and optimizer state."""
    model, optimizer = trainer.model, trainer.backend.optimizer
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable += [p.grad for p in trainable if p.grad is not None] + [
        v for p in trainable for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
    frozen_blocks = [t for n, t in [*model.named_parameters(), *model.named_buffers()]
                     if ".layers." in n and not t.requires_grad]
    return {"all": nbytes([*model.parameters(), *model.buffers(), *trainable]),
            "frozen blocks": nbytes(frozen_blocks), "trainable": nbytes(trainable)}


def test_qlora_trains_with_less_memory_than_lora(tiny_ckpt, tmp_path, monkeypatch):
    """What each training step holds for the model, measured inside the steps of real runs: Q-LoRA's
    int4 blocks and int8 head against LoRA's bfloat16 ones (benchmarks/finetune.py measures peak RSS
    on the demo model)."""
    from qwenkit.train.trainer import Trainer

    held = []  # held_bytes after each step's backward, when gradients and optimizer state both exist
    step = Trainer.train_step

    def measured_step(self, micro_batches):
        result = step(self, micro_batches)
        held.append(held_bytes(self))
        return result

    monkeypatch.setattr(Trainer, "train_step", measured_step)
    peak = {}
    for method in ("lora", "qlora"):
        out = tmp_path / method
        assert main(args(tiny_ckpt, out, "--method", method, "--max-steps", "6", "--dtype", "bfloat16")) == 0
        assert len(held) == 6
        losses = [float(r["loss"]) for r in rows(out)]
        assert losses[-1] < losses[0] - 0.5, (method, losses)  # both learn
        peak[method] = {part: max(h[part] for h in held) for part in held[0]}
        held.clear()
    lora, qlora = peak["lora"], peak["qlora"]
    assert qlora["trainable"] == lora["trainable"], peak  # the same adapters, trained the same way
    assert qlora["frozen blocks"] < 0.5 * lora["frozen blocks"], peak  # int4 against bfloat16
    assert qlora["all"] < 0.8 * lora["all"], peak  # with the head in int8 too


def test_full_fine_tuning_writes_a_model_that_loads(tiny_ckpt, tmp_path):
    out = tmp_path / "full"
    run = args(tiny_ckpt, out, "--method", "full", "--lr", "1e-3", "--max-steps", "2")
    assert main(run) == 2  # LoRA options do not go with full fine-tuning
    run.remove("--lora-r")
    run.remove("8")
    assert main(run) == 0
    trained, _ = qwenkit.load(out / "model", dtype="float32", device="cpu")
    base, _ = qwenkit.load(tiny_ckpt[0], dtype="float32", device="cpu")
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert len(changed) == len(list(base.parameters()))
    saved = load_file(str(out / "checkpoints" / "step-00000002" / "trainable.safetensors"))
    assert all(torch.equal(saved[n], p) for n, p in trained.named_parameters())


@pytest.mark.real
def test_demo_model_learns_a_made_up_fact(demo_path, tmp_path):
    """A few LoRA steps on the demo model teach it a fact it gets wrong before (greedy); merging the
    adapter into the weights then gives the logits of base + adapter."""
    import copy

    from qwenkit.prompts import apply_chat_template
    from qwenkit.generate import generate
    from qwenkit.train import load_adapter, merge_lora

    question, answer = "What is the capital of the planet Zorblax?", "The capital of Zorblax is Quintara."
    data = tmp_path / "fact.jsonl"
    record = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    data.write_text(f"{json.dumps(record)}\n" * 2)

    model, tokenizer = qwenkit.load("demo", dtype="float32", device="cpu", quantize=None)  # a float base
    prompt = apply_chat_template(tokenizer, [{"role": "user", "content": question}])

    def reply():
        return generate(model, tokenizer, prompt, max_new_tokens=12, temperature=0.0).text

    assert "Quintara" not in reply()
    out = tmp_path / "run"
    assert main(["finetune", "-m", "demo", "--data", str(data), "--out", str(out), "--max-steps", "8",
                 "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-3", "--lora-r", "8", "--lora-dropout", "0",
                 "--lora-targets", "q_proj,v_proj,o_proj", "--warmup-steps", "0"]) == 0
    load_adapter(model, out)  # base + a separate low-rank update
    assert "Quintara" in reply()

    merged = merge_lora(copy.deepcopy(model))  # what `qwenkit merge` writes
    ids = torch.tensor([prompt])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), model(ids), atol=1e-3, rtol=0)
