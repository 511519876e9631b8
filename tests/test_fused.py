"""Sibling q/k/v and gate/up weights laid out as one tensor per layer at load (qwenkit.runtime.fused): the
joint product runs, the model still matches transformers, and whatever replaces, trains, merges or
saves those weights stays correct."""

import pytest
import torch
from torch import nn

import qwenkit
from qwenkit.errors import CheckpointError
from qwenkit.saving import save_checkpoint
from qwenkit.runtime.fused import JointWeights
from qwenkit.train import apply_lora, merge_lora

from .conftest import assert_close, hf_config, hf_qwen2, hf_state, tokens, write_checkpoint

LAYERS = 2


@pytest.fixture
def joint_calls(monkeypatch):
    """How many joint products run (JointWeights.linear calls)."""
    calls = []
    linear = JointWeights.linear
    monkeypatch.setattr(JointWeights, "linear", lambda self, x: calls.append(1) or linear(self, x))
    return calls


@pytest.fixture
def ref_and_path(tmp_path):
    ref = hf_qwen2(tie=False)
    return ref, write_checkpoint(tmp_path / "ckpt", hf_config(ref), hf_state(ref))


def load(path):
    return qwenkit.load(path, dtype="float32", device="cpu")


def logits(model, x):
    with torch.inference_mode():
        return model(x)


def test_siblings_share_one_tensor_run_as_one_product_and_match_transformers(ref_and_path, joint_calls):
    ref, path = ref_and_path
    model, _ = load(path)
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        for group in ((a.q_proj, a.k_proj, a.v_proj), (m.gate_proj, m.up_proj)):
            assert all(type(linear) is nn.Linear for linear in group)  # quantizers and LoRA look for these
            assert len({linear.weight.untyped_storage().data_ptr() for linear in group}) == 1
    x = tokens()
    assert_close(logits(model, x), ref(x).logits)
    assert len(joint_calls) == 2 * LAYERS

    cache = model.new_cache(2, 32)  # a prefill and a one-token step through the cache, too
    with torch.inference_mode():
        model(x[:, :-1], torch.arange(23), cache)
        step = model(x[:, -1:], torch.tensor([23]), cache)
    assert_close(step[:, 0], ref(x).logits[:, -1])
    assert len(joint_calls) == 6 * LAYERS


def test_replaced_weights_run_as_separate_products(ref_and_path, joint_calls):
    ref, path = ref_and_path
    model, _ = load(path)
    x = tokens()
    model.to(torch.float64)  # new data under the same Parameter objects
    assert_close(logits(model, x).float(), ref(x).logits)
    assert not joint_calls

    model, _ = load(path)
    q = model.model.layers[0].self_attn.q_proj
    q.weight = nn.Parameter(torch.zeros_like(q.weight), requires_grad=False)  # a new Parameter
    with torch.no_grad():
        ref.model.layers[0].self_attn.q_proj.weight.zero_()
    assert_close(logits(model, x), ref(x).logits)
    assert len(joint_calls) == 2 * LAYERS - 1  # layer 0's q/k/v now run separately


def test_a_missing_sibling_is_named(tmp_path):
    ref = hf_qwen2(tie=False)
    state = hf_state(ref)
    del state["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(CheckpointError, match=r"lacks 1 tensors, e\.g\. model\.layers\.1\.self_attn\.k_proj\.weight"):
        load(write_checkpoint(tmp_path, hf_config(ref), state))


def test_saved_checkpoint_holds_each_weight_and_loads_back(ref_and_path, tmp_path):
    from safetensors import safe_open

    ref, path = ref_and_path
    model, tok = load(path)
    out = save_checkpoint(model, tok, tmp_path / "saved")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        for name, tensor in ref.state_dict().items():
            assert torch.equal(f.get_tensor(name), tensor), name
    x = tokens()
    assert torch.equal(logits(load(out)[0], x), logits(model, x))


def test_merged_lora_keeps_the_joint_tensor(ref_and_path, joint_calls):
    _, path = ref_and_path
    model, _ = load(path)
    apply_lora(model, targets=["q_proj", "v_proj", "up_proj"], r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    x = tokens()
    before = logits(model, x)
    merge_lora(model)
    attn = model.model.layers[0].self_attn
    assert type(attn.q_proj) is nn.Linear and \
        attn.q_proj.weight.untyped_storage().data_ptr() == attn.k_proj.weight.untyped_storage().data_ptr()
    joint_calls.clear()
    assert_close(logits(model, x), before)
    assert len(joint_calls) == 2 * LAYERS


@pytest.mark.parametrize("everything", [True, False])  # or the siblings alone: layer 0's input needs no grad
def test_training_reaches_each_sibling(ref_and_path, joint_calls, everything):
    _, path = ref_and_path
    model, _ = load(path)
    model.train().requires_grad_(everything)
    for layer in model.model.layers:
        for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                       layer.mlp.gate_proj, layer.mlp.up_proj):
            linear.requires_grad_(True)
    model(tokens()).float().square().mean().backward()
    assert not joint_calls  # autograd goes through the separate products
    for layer in model.model.layers:
        for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.up_proj):
            assert linear.weight.grad.abs().sum() > 0


def test_hooked_siblings_see_their_own_calls(ref_and_path, joint_calls):
    _, path = ref_and_path
    model, _ = load(path)
    seen = []
    handle = model.model.layers[0].self_attn.k_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = tokens()
    logits(model, x)
    handle.remove()
    assert len(seen) == 1 and seen[0].shape == (2, 24, 64)  # GPTQ's calibration hooks rely on this
    assert len(joint_calls) == 2 * LAYERS - 1


def test_a_deep_copy_computes_the_same(ref_and_path):
    import copy

    _, path = ref_and_path
    model, _ = load(path)
    twin = copy.deepcopy(model)
    x = tokens()
    assert torch.equal(logits(twin, x), logits(model, x))
    with torch.no_grad():  # the copy's weights are its own
        twin.model.layers[0].self_attn.k_proj.weight.zero_()
    assert not torch.equal(logits(twin, x), logits(model, x))
