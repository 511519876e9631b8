"""bf16 CPU linears in their inference layout as they load (qwenkit.runtime.packed): qwenkit's bf16 kernel
(Bf16Linear: F.linear's values within float32 sums) or oneDNN's packed layout (PackedLinear: bit-identical to
plain nn.Linear); checkpoints unchanged, and quantizers, LoRA and moves see plain layers or a clear error."""

import pytest
import torch
from torch import nn

import qwenkit
from qwenkit.errors import QwenkitError
from qwenkit.evals.speed import decode_bytes_per_token
from qwenkit.saving import save_checkpoint
from qwenkit.quant import quantize_model
from qwenkit.runtime import packed as packed_module
from qwenkit.runtime.cpu_plan import kernel_ops
from qwenkit.runtime.packed import Bf16Linear, PackedLinear, packing_works, unpack_linears
from qwenkit.train import apply_lora

from .conftest import hf_config, hf_qwen2, hf_state, rel_err, tokens, write_checkpoint


@pytest.fixture(params=[Bf16Linear, PackedLinear], ids=["bf16-kernel", "onednn-packed"], autouse=True)
def layout(request, monkeypatch):
    """The layer a load packs into: qwenkit's kernel where built, else oneDNN's (forced by hiding the kernels)."""
    if request.param is Bf16Linear and kernel_ops() is None:
        pytest.skip("qwenkit's CPU kernels could not be built here")
    if request.param is PackedLinear:
        if not packing_works():
            pytest.skip("this CPU has no bit-identical packed bf16 kernel")
        monkeypatch.setattr(packed_module, "kernel_ops", lambda: None)
    return request.param


def assert_same(ours, ref, layout):
    """oneDNN's packed kernel is F.linear's own; qwenkit's sums float32 products in another order."""
    if layout is PackedLinear:
        assert torch.equal(ours, ref)
    else:
        assert rel_err(ours, ref) < 2e-2  # bf16 activations: an output rounded differently moves what follows


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def checkpoint(tmp_path, request):
    ref = hf_qwen2(tie=request.param)
    return write_checkpoint(tmp_path / "ckpt", hf_config(ref), hf_state(ref))


def load(path, pack=True):
    return qwenkit.load(path, dtype="bfloat16", device="cpu", pack=pack)


def logits_and_step(model):
    """Full-sequence logits, and a prefill + one-token step through the cache."""
    x = tokens()
    cache = model.new_cache(2, 32)
    with torch.inference_mode():
        full = model(x)
        model(x[:, :-1], torch.arange(23), cache)
        return full, model(x[:, -1:], torch.tensor([23]), cache)


def test_packed_layers_compute_what_plain_ones_do(checkpoint, layout):
    packed, _ = load(checkpoint)
    plain, _ = load(checkpoint, pack=False)
    linears = [name for name, m in plain.named_modules() if type(m) is nn.Linear]
    assert len(linears) == 2 * 7 + 1  # every block linear and the head
    assert all(isinstance(packed.get_submodule(name), layout) for name in linears)
    assert type(packed.model.embed_tokens) is nn.Embedding  # a tied head got its own packed copy
    for ours, ref in zip(logits_and_step(packed), logits_and_step(plain)):
        assert_same(ours, ref, layout)
    assert decode_bytes_per_token(packed) == decode_bytes_per_token(plain)


def test_float32_activations_over_bf16_weights(checkpoint, layout, monkeypatch):
    """dtype="auto" on a CPU without native bf16: float32 activations, the linear weights stored in bf16
    (the same values as a float32 model of the bf16-rounded weights, summed in another order)."""
    from qwenkit.runtime import cpu_plan

    if layout is PackedLinear:
        pytest.skip("oneDNN's packed layout is for bf16 activations")
    monkeypatch.setattr(cpu_plan, "auto_dtype", lambda: torch.float32)
    monkeypatch.setattr(cpu_plan, "auto_weight_dtype", lambda: torch.bfloat16)
    model, _ = qwenkit.load(checkpoint, device="cpu")
    assert model.dtype == torch.float32 and isinstance(model.lm_head, Bf16Linear)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.embed_tokens.weight.dtype == torch.float32
    reference, _ = qwenkit.load(checkpoint, dtype="float32", device="cpu")  # asked for: float32 weights
    assert type(reference.lm_head) is nn.Linear and reference.lm_head.weight.dtype == torch.float32
    for m in reference.modules():
        if type(m) is nn.Linear:  # new tensors: a tied embedding keeps its float32 table, as the loaded one does
            m.weight = nn.Parameter(m.weight.bfloat16().float(), requires_grad=False)
    for ours, ref in zip(logits_and_step(model), logits_and_step(reference)):
        assert rel_err(ours, ref) < 1e-5
    assert unpack_linears(model).lm_head.weight.dtype == torch.float32  # back to the model's dtype


def test_checkpoint_of_a_packed_model_is_unchanged(checkpoint, tmp_path):
    from safetensors import safe_open

    packed, tok = load(checkpoint)
    plain, _ = load(checkpoint, pack=False)
    out = save_checkpoint(packed, tok, tmp_path / "saved")
    expected = {k: v for k, v in plain.state_dict().items()
                if not (k == "lm_head.weight" and plain.config.tie_word_embeddings)}
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(f.get_tensor(name), tensor), name
    assert torch.equal(logits_and_step(load(out)[0])[0], logits_and_step(packed)[0])


def test_quantizers_and_lora_unpack_first(checkpoint, layout):
    packed, _ = load(checkpoint)
    plain, _ = load(checkpoint, pack=False)
    quantize_model(packed, bits=8)
    quantize_model(plain, bits=8)
    for ours, ref in zip(logits_and_step(packed), logits_and_step(plain)):
        assert torch.equal(ours, ref)

    model, _ = load(checkpoint)
    apply_lora(model, targets="all-linear", r=4, dropout=0.0)
    assert not any(isinstance(m, layout) for m in model.model.modules())
    model.train()
    model(tokens()).float().logsumexp(-1).mean().backward()
    assert model.model.layers[0].self_attn.q_proj.lora_A.grad is not None


def test_moving_a_packed_model_names_the_fix(checkpoint, layout):
    model, _ = load(checkpoint)
    if layout is Bf16Linear:  # plain parameters: it moves, and F.linear runs where the kernel does not apply
        model.to(torch.float32)
        reference = unpack_linears(load(checkpoint)[0]).to(torch.float32)
        for ours, ref in zip(logits_and_step(model), logits_and_step(reference)):
            assert rel_err(ours, ref) < 1e-5
        return
    with pytest.raises(QwenkitError, match=r"unpack_linears\(model\) first"):
        model.to(torch.float32)
    model.to("cpu")  # staying a bf16 CPU model is fine
    unpack_linears(model).to(torch.float32)
    assert model.dtype == torch.float32 and type(model.lm_head) is nn.Linear


def test_gradients_reach_inputs_and_training_is_refused(layout):
    weight = torch.randn(8, 16).bfloat16()
    if layout is Bf16Linear:  # F.linear under autograd, in training mode too
        x = torch.randn(3, 16).requires_grad_()
        Bf16Linear(weight, None, torch.float32).train()(x).sum().backward()
        assert torch.allclose(x.grad, torch.ones(3, 8) @ weight.float())
        return
    layer = PackedLinear(weight, None).eval()
    x = torch.randn(3, 16).bfloat16().requires_grad_()
    layer(x).float().sum().backward()  # e.g. saliency through an inference model
    assert torch.equal(x.grad, torch.ones(3, 8).bfloat16() @ weight)
    with pytest.raises(QwenkitError, match="cannot train"):
        layer.train()(x)
    with torch.no_grad():
        layer(x)  # train mode without gradients is still inference


def test_an_adapter_is_folded_in_before_packing(checkpoint, tmp_path, layout):
    from qwenkit.train import save_adapter

    model, _ = load(checkpoint, pack=False)
    apply_lora(model, targets=["q_proj", "down_proj"], r=4, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    adapter = save_adapter(model, tmp_path / "adapter")
    packed, _ = qwenkit.load(checkpoint, dtype="bfloat16", device="cpu", adapter=adapter)
    plain, _ = qwenkit.load(checkpoint, dtype="bfloat16", device="cpu", adapter=adapter, pack=False)
    assert isinstance(packed.model.layers[0].self_attn.q_proj, layout)
    for ours, ref in zip(logits_and_step(packed), logits_and_step(plain)):
        assert_same(ours, ref, layout)


def test_a_packed_model_deep_copies_and_pickles(checkpoint, layout):
    import copy
    import io

    model, _ = load(checkpoint)
    twin = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    unpickled = torch.load(buffer, weights_only=False)
    for other in (twin, unpickled):
        assert isinstance(other.lm_head, layout)
        for ours, ref in zip(logits_and_step(other), logits_and_step(model)):
            assert torch.equal(ours, ref)
