"""LoRA: peft interop both ways on transformers' Qwen2, Qwen v1 adapters, merge, Q-LoRA gradients,
gradient checkpointing, a short training run, load(adapter=) and `qwenkit merge`."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwenkit
from qwenkit.cli import main
from qwenkit.errors import AdapterError
from qwenkit.quant import Int4Linear
from qwenkit.train import (Example, LoRALinear, apply_lora, collate, lm_loss, load_adapter, merge_lora,
                           save_adapter, trainable_parameters)
from qwenkit.train.lora import resolve_targets

from .conftest import (TINY, assert_close, assert_greedy, hf_config, hf_qwen2, hf_state, load_fp32, tokens,
                       v1_checkpoint, write_checkpoint)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def base(tmp_path):
    """(transformers Qwen2, path of the same weights as a checkpoint qwenkit loads)."""
    ref = hf_qwen2(tie=False, seed=5)
    return ref, write_checkpoint(tmp_path / "base", hf_config(ref), hf_state(ref))


def randomize_adapter(model, seed=1):
    """Non-zero B (a fresh adapter is the identity) and changed embedding / head where trained."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("tie", [False, True])
def test_saved_adapter_loads_in_peft(tmp_path, tie):
    ref = hf_qwen2(tie=tie, seed=5)
    path = write_checkpoint(tmp_path / "base", hf_config(ref), hf_state(ref))
    ours = load_fp32(path)
    apply_lora(ours, r=4, alpha=8, dropout=0.1, train_embeddings=True, train_head=True)
    randomize_adapter(ours)
    out = save_adapter(ours, tmp_path / "adapter", base_model_name=str(path))

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    assert config["lora_alpha"] == 8 and config["lora_dropout"] == 0.1
    assert sorted(config["modules_to_save"]) == ["embed_tokens", "lm_head"]
    keys = set(load_file(str(out / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= keys
    assert len(keys) == 2 * 7 * TINY["num_hidden_layers"] + 2

    theirs = peft.PeftModel.from_pretrained(ref, str(out)).eval()
    x = tokens()
    with torch.no_grad():
        assert_close(ours.eval()(x), theirs(x).logits)


@pytest.mark.parametrize("options", [
    {"target_modules": ["q_proj", "v_proj", "down_proj"], "modules_to_save": ["lm_head"]},
    {"target_modules": "all-linear", "use_rslora": True, "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"q_proj": 3}},
])
def test_peft_adapter_loads_into_qwenkit(base, tmp_path, options):
    ref, path = base
    theirs = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                      **options)).eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    theirs.save_pretrained(str(tmp_path / "adapter"))
    x = tokens(seed=3)
    with torch.no_grad():
        want = theirs(x).logits
        ours = load_adapter(load_fp32(path), tmp_path / "adapter")
        assert_close(ours(x), want)
        assert_close(merge_lora(ours)(x), want)  # merged: plain linears again
        assert not any(isinstance(m, LoRALinear) for m in ours.modules())
        merged, _ = qwenkit.load(path, dtype="float32", device="cpu", adapter=tmp_path / "adapter")
        assert_close(merged(x), want)
        assert_close(merged(x), theirs.merge_and_unload()(x).logits)


def test_qwen_v1_adapter_is_mapped(tmp_path):
    """An adapter the Qwen v1 scripts make (targets c_attn, c_proj, w1, w2; wte trained) on a v1 checkpoint."""
    ref = hf_qwen2(tie=False, kv_heads=TINY["num_attention_heads"], seed=4)
    config, tensors = v1_checkpoint(ref, old_names=False)
    path = write_checkpoint(tmp_path / "v1", config, tensors)
    gen = torch.Generator().manual_seed(0)
    r, alpha, H, F = 4, 8, TINY["hidden_size"], TINY["intermediate_size"]
    shapes = {"attn.c_attn": (3 * H, H), "attn.c_proj": (H, H), "mlp.w1": (F, H), "mlp.w2": (F, H), "mlp.c_proj": (H, F)}
    adapter = {}
    for i in range(TINY["num_hidden_layers"]):
        for module, (n_out, n_in) in shapes.items():
            key = f"base_model.model.transformer.h.{i}.{module}"
            adapter[f"{key}.lora_A.weight"] = 0.1 * torch.randn(r, n_in, generator=gen)
            adapter[f"{key}.lora_B.weight"] = 0.1 * torch.randn(n_out, r, generator=gen)
    adapter["base_model.model.transformer.wte.weight"] = torch.randn(TINY["vocab_size"], H, generator=gen)
    (tmp_path / "adapter").mkdir()
    save_file(adapter, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["c_attn", "c_proj", "w1", "w2"],
        "modules_to_save": ["wte", "lm_head"], "task_type": "CAUSAL_LM", "bias": "none"}))

    # The reference: the v1 update W += alpha/r * B A written onto transformers' Qwen2 by hand.
    state = ref.state_dict()
    renames = {"attn.c_attn": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
               "attn.c_proj": ["self_attn.o_proj"], "mlp.w1": ["mlp.up_proj"], "mlp.w2": ["mlp.gate_proj"],
               "mlp.c_proj": ["mlp.down_proj"]}
    for i in range(TINY["num_hidden_layers"]):
        for module, targets in renames.items():
            key = f"base_model.model.transformer.h.{i}.{module}"
            delta = alpha / r * adapter[f"{key}.lora_B.weight"] @ adapter[f"{key}.lora_A.weight"]
            for target, part in zip(targets, delta.chunk(len(targets))):
                state[f"model.layers.{i}.{target}.weight"] += part
    state["model.embed_tokens.weight"] = adapter["base_model.model.transformer.wte.weight"]
    ref.load_state_dict(state)
    x = tokens()
    with torch.no_grad():
        ours = load_adapter(load_fp32(path), tmp_path / "adapter")
        assert_close(ours(x), ref(x).logits)


def test_targets():
    model = qwenkit.Model(qwenkit.ModelConfig.from_dict(hf_config(hf_qwen2(tie=False))))

    def per_layer(names):
        return [f"model.layers.{i}.{n}" for i in range(2) for n in names]
    assert resolve_targets(model, "all-linear") == per_layer(
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj"])
    assert resolve_targets(model, "c_attn,c_proj,w1,w2") == resolve_targets(model, "all-linear")
    assert resolve_targets(model, ["c_attn"]) == per_layer(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])
    assert resolve_targets(model, "mlp.c_proj,w2") == per_layer(["mlp.gate_proj", "mlp.down_proj"])
    assert resolve_targets(model, "model.layers.1.*") == [
        n for n in resolve_targets(model, "all-linear") if n.startswith("model.layers.1.")]
    assert resolve_targets(model, "self_attn.*") == resolve_targets(model, "q_proj,k_proj,v_proj,o_proj")
    with pytest.raises(AdapterError, match="'qkv'.*all-linear.*c_attn"):
        resolve_targets(model, "qkv")
    with pytest.raises(AdapterError, match="lm_head"):
        resolve_targets(model, "lm_head")


def test_qlora_on_int4_base_trains_only_the_adapter(base, torch_quant_kernels):
    _, path = base
    model = load_fp32(path)
    for layer in model.model.layers:  # int4 blocks, as Q-LoRA loads them (group 32: the tiny width is 64)
        for parent, name in [(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
                (layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]:
            setattr(parent, name, Int4Linear.from_float(getattr(parent, name), group_size=32))
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    randomize_adapter(model)
    model.train()
    x = tokens()
    loss = lm_loss(model(x), x)
    loss.backward()
    trainable = dict(trainable_parameters(model))
    assert trainable and all(".lora_" in n for n in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)

    model.eval()
    with torch.no_grad():
        want = model(x)
        merged = merge_lora(model)  # int4 base dequantized: float linears
        assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
        assert_close(merged(x), want)


def test_gradient_checkpointing_gives_the_same_gradients(base):
    _, path = base
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same lora_A initialisation
        model = apply_lora(load_fp32(path), r=4, alpha=8, dropout=0.0)
        randomize_adapter(model)
        model.train()
        model.model.gradient_checkpointing = checkpointing
        x = tokens()
        lm_loss(model(x), x).backward()
        grads.append(torch.cat([p.grad.flatten() for _, p in trainable_parameters(model)]))
    assert_close(grads[1], grads[0], tol=1e-5)


def test_lora_training_drives_the_loss_down(base):
    """Plain AdamW on a tiny dataset: the loss must fall (gradients reach the adapter)."""
    _, path = base
    torch.manual_seed(0)
    model = apply_lora(load_fp32(path), r=8, alpha=16, dropout=0.0).train()
    gen = torch.Generator().manual_seed(7)
    examples = []
    for _ in range(4):
        ids = torch.randint(0, TINY["vocab_size"], (20,), generator=gen).tolist()
        examples.append(Example(ids, [-100] * 10 + ids[10:]))
    batch = collate(examples, pad_id=0)
    optimizer = torch.optim.AdamW([p for _, p in trainable_parameters(model)], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = lm_loss(model(batch["input_ids"]), batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_adapter_errors(base, tmp_path):
    _, path = base
    model = load_fp32(path)
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(AdapterError, match="only LORA"):
        load_adapter(model, tmp_path)
    with pytest.raises(AdapterError, match="no LoRA layers"):
        save_adapter(model, tmp_path / "out")
    apply_lora(model, r=2)
    with pytest.raises(AdapterError, match="already has LoRA"):
        apply_lora(model)
    save_adapter(model, tmp_path / "r2")
    other = apply_lora(load_fp32(path), r=4)
    with pytest.raises(AdapterError, match="shape .* another model"):
        load_adapter(other, tmp_path / "r2")


def test_cli_merge_and_adapter(base, tmp_path, capsys):
    _, path = base
    model = apply_lora(load_fp32(path), r=4, alpha=8)
    randomize_adapter(model)
    save_adapter(model, tmp_path / "adapter", str(path))
    out = tmp_path / "merged"
    args = ["-m", str(path), "--adapter", str(tmp_path / "adapter"), "--dtype", "float32", "--device", "cpu"]
    assert main(["merge", *args, "--out", str(out)]) == 0
    assert main(["merge", *args, "--out", str(out)]) == 2  # refuses to overwrite
    assert "--force" in capsys.readouterr().err
    x = tokens()
    with torch.no_grad():
        assert_close(load_fp32(out)(x), model.eval()(x))
    # (the prompt "0" is token 15: the tiny model knows only 256 tokens)
    capsys.readouterr()
    assert main(["generate", *args, "--prompt", "0", "--max-new-tokens", "2", "--temperature", "0"]) == 0
    # It prints what the adapted model says: the greedy tokens of base + adapter.
    adapted, tok = qwenkit.load(path, dtype="float32", device="cpu", adapter=tmp_path / "adapter")
    want = qwenkit.generate(adapted, tok, "0", max_new_tokens=2, temperature=0)
    assert capsys.readouterr().out == want.text + "\n"
    assert_greedy(model, tok, tok.encode("0"), want.token_ids, tol=1e-4)  # the unmerged LoRA model agrees
    assert main(["generate", "-m", str(path), "--adapter", str(tmp_path / "nothing"), "--prompt", "hi"]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err


def test_lora_dropout_drops_at_its_rate_and_keeps_the_mean():
    from qwenkit.train.lora import LoRADropout

    dropout = LoRADropout(0.05)
    x = torch.ones(400, 1000)
    torch.manual_seed(0)
    y = dropout(x)
    assert abs(float((y == 0).float().mean()) - 0.05) < 0.002
    assert abs(float(y.mean()) - 1) < 0.01 and float(y.max()) == pytest.approx(1 / (1 - 1638 / 32768))
    dropped = (y == 0).flatten().view(-1, 4).float().mean(0)  # each of a random word's four fields
    assert (dropped - 0.05).abs().max() < 0.003, dropped
    torch.manual_seed(0)
    assert torch.equal(dropout(x), y)  # the global seed reproduces it
    assert dropout(torch.ones(3, 7)).shape == (3, 7)  # a size that is no multiple of four
    assert dropout.eval()(x) is x
