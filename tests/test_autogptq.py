"""AutoGPTQ checkpoints: a reference packer written here from the spec (§8.1) quantizes a tiny
model the way AutoGPTQ does, and `qwenkit.load` of the result must compute what the dequantized
float weights compute."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import qwenkit
from qwenkit.config import ModelConfig
from qwenkit.errors import CheckpointError, UnsupportedModelError
from qwenkit.saving import save_checkpoint
from qwenkit.model import Model
from qwenkit.quant import Int4Linear, Int8Linear, linear, quantization_config

from .conftest import load_fp32, random_tokens, randomize, write_checkpoint

# These tests check that checkpoints map to the last bit: on torch's kernels, which do not round the
# activations as qwenkit's do.
pytestmark = pytest.mark.usefixtures("torch_quant_kernels")

VOCAB, HIDDEN, FFN, HEADS, LAYERS = 256, 64, 96, 4, 2
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
# Qwen v1 module of each canonical one; q, k and v share the fused c_attn.
V1_NAMES = {"self_attn.o_proj": "attn.c_proj", "mlp.up_proj": "mlp.w1", "mlp.gate_proj": "mlp.w2",
            "mlp.down_proj": "mlp.c_proj"}
# Float32 activations: the int4 kernel and the dequantized reference differ by fp32 rounding only.
LOGIT_TOL = 1e-4


# ----------------------------------------------------------------------------- the reference packer
def gptq_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool, act_order: bool, seed: int):
    """AutoGPTQ's quantizer (round to nearest, per output row and group) on w [N, K].

    With act_order the columns are taken in a random order (standing in for the activation order)
    and grouped in that order, so g_idx scatters each group over K. Returns q [K, N] int, zero
    points [G, N] int, fp16 scales [G, N], g_idx [K] int32, and the weight they stand for [N, K].
    """
    n, k = w.shape
    maxq = 2 ** bits - 1
    g = k if group_size == -1 else group_size
    order = torch.randperm(k, generator=torch.Generator().manual_seed(seed)) if act_order else torch.arange(k)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // g).int()
    groups = int(g_idx.max()) + 1
    q = torch.empty(k, n, dtype=torch.int64)
    zeros = torch.empty(groups, n, dtype=torch.int64)
    scales = torch.empty(groups, n, dtype=torch.float16)
    for group in range(groups):
        cols = (g_idx == group).nonzero().flatten()
        x = w[:, cols]
        xmin, xmax = x.min(1).values.clamp(max=0), x.max(1).values.clamp(min=0)
        if sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = torch.where(xmin < 0, -xmax, xmin)
        scale = (xmax - xmin) / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-xmin / scale)
        scales[group] = scale.half()
        zeros[group] = zero.long()
        q[cols] = torch.clamp(torch.round(x / scales[group].float()[:, None] + zero[:, None]), 0, maxq).long().t()
    deq = torch.empty(n, k)
    for col in range(k):  # the spec's formula, one input at a time
        group = g_idx[col]
        deq[:, col] = scales[group].float() * (q[col] - zeros[group]).float()
    return q, zeros, scales, g_idx, deq


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's packing: 32/bits consecutive rows per int32 row, the first in the low bits."""
    v = values.numpy().astype(np.uint32)
    per = 32 // bits
    packed = np.zeros((v.shape[0] // per, v.shape[1]), dtype=np.uint32)
    for row in range(packed.shape[0]):
        for j in range(per):
            packed[row] |= v[row * per + j] << (bits * j)
    return torch.from_numpy(packed.astype(np.int32))


def gptq_layer(w, bits, group_size, sym, act_order, seed, bias=None):
    """The tensors AutoGPTQ saves for one linear, and the float weight they stand for."""
    q, zeros, scales, g_idx, deq = gptq_quantize(w, bits, group_size, sym, act_order, seed)
    tensors = {"qweight": pack_rows(q, bits), "qzeros": pack_rows((zeros - 1).t(), bits).t().contiguous(),
               "scales": scales, "g_idx": g_idx}
    if bias is not None:
        tensors["bias"] = bias
    return tensors, deq


# ----------------------------------------------------------------------------- tiny checkpoints
def float_model(arch: str) -> Model:
    config = ModelConfig(arch=arch, vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                         num_layers=LAYERS, num_heads=HEADS, num_kv_heads=HEADS if arch == "qwen" else 2,
                         head_dim=HIDDEN // HEADS, max_position_embeddings=256)
    return randomize(Model(config), seed=7, scale=0.1).eval()


def gptq_checkpoint(tmp_path, arch, bits, group_size, sym, act_order, head=False, fmt="safetensors"):
    """A GPTQ checkpoint directory of a random tiny model, and that model with the dequantized weights.

    "qwen": Qwen v1 names, v1 config.json, quantize_config.json beside it and a bias on every
    quantized linear (zeros where the model has none), as Qwen-7B-Chat-Int4 ships. "qwen2":
    Qwen2 names, quantization_config inside config.json, as Qwen2.5-*-GPTQ-Int4 ship. `head`: the
    lm_head quantized too, of a model whose config ties it to the embedding (GPTQModel's lm_head=True).
    """
    model = float_model(arch)
    state = model.state_dict()
    quantize_config = {"bits": bits, "group_size": group_size, "damp_percent": 0.01, "desc_act": act_order,
                       "static_groups": False, "sym": sym, "true_sequential": True}
    tensors = {"lm_head.weight": state["lm_head.weight"]}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        weights = {name: state[p + name + ".weight"] for name in LINEARS}
        biases = {name: state.get(p + name + ".bias") for name in LINEARS}
        if arch == "qwen":
            v1 = f"transformer.h.{i}."
            fused = torch.cat([weights.pop(f"self_attn.{x}_proj") for x in "qkv"])
            fused_bias = torch.cat([biases.pop(f"self_attn.{x}_proj") for x in "qkv"])
            layer, deq = gptq_layer(fused, bits, group_size, sym, act_order, seed=i, bias=fused_bias)
            tensors.update({v1 + "attn.c_attn." + k: v for k, v in layer.items()})
            for x, part in zip("qkv", deq.split(HIDDEN)):
                state[f"{p}self_attn.{x}_proj.weight"] = part
            for j, (name, w) in enumerate(weights.items()):
                layer, state[p + name + ".weight"] = gptq_layer(w, bits, group_size, sym, act_order, seed=10 * i + j,
                                                               bias=torch.zeros(w.shape[0], dtype=torch.float16))
                tensors.update({v1 + V1_NAMES[name] + "." + k: v for k, v in layer.items()})
            tensors.update({v1 + "ln_1.weight": state[p + "input_layernorm.weight"],
                            v1 + "ln_2.weight": state[p + "post_attention_layernorm.weight"]})
        else:
            for j, (name, w) in enumerate(weights.items()):
                layer, state[p + name + ".weight"] = gptq_layer(w, bits, group_size, sym, act_order, seed=10 * i + j,
                                                               bias=biases[name])
                tensors.update({p + name + "." + k: v for k, v in layer.items()})
            tensors.update({p + n: state[p + n] for n in ("input_layernorm.weight", "post_attention_layernorm.weight")})
    if arch == "qwen":
        tensors.update({"transformer.wte.weight": state["model.embed_tokens.weight"],
                        "transformer.ln_f.weight": state["model.norm.weight"]})
        config = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "vocab_size": VOCAB,
                  "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
                  "intermediate_size": 2 * FFN, "kv_channels": HIDDEN // HEADS, "max_position_embeddings": 256,
                  "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000, "rotary_pct": 1.0, "no_bias": True,
                  "seq_length": 256, "tie_word_embeddings": False, "fp16": True, "torch_dtype": "float16"}
    else:
        tensors.update({"model.embed_tokens.weight": state["model.embed_tokens.weight"],
                        "model.norm.weight": state["model.norm.weight"]})
        if head:
            layer, state["lm_head.weight"] = gptq_layer(tensors.pop("lm_head.weight"), bits, group_size, sym,
                                                        act_order, seed=99)
            tensors.update({"lm_head." + k: v for k, v in layer.items()})
        config = {"model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": FFN,
                  "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": 2,
                  "max_position_embeddings": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
                  "tie_word_embeddings": head,
                  "quantization_config": dict(quantize_config, quant_method="gptq", checkpoint_format="gptq")}
    path = write_checkpoint(tmp_path / "gptq", config, tensors, fmt=fmt)
    if arch == "qwen":
        (path / "quantize_config.json").write_text(json.dumps(dict(quantize_config, model_file_base_name="model")))
    model.load_state_dict(state)  # the reference: the same model with the weights GPTQ stands for
    return path, model


IDS = random_tokens(VOCAB, seed=3)  # the prompt every logits comparison runs


def max_diff(a, b):
    return (a - b).abs().max().item()


def quantized_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, (Int4Linear, Int8Linear))}


# ----------------------------------------------------------------------------- 4-bit
CASES_4BIT = [  # arch, group_size, sym, act_order, our group size (q_proj, down_proj), file format
    ("qwen2", 32, True, False, (32, 32), "safetensors"),
    ("qwen2", 64, False, True, (64, 32), "safetensors"),  # down_proj: K = 96 = 64 + a short last group
    ("qwen", 32, True, False, (32, 32), "safetensors"),   # Qwen-7B-Chat-Int4's recipe (with group 128 there)
    ("qwen", 32, False, True, (32, 32), "safetensors"),   # one permutation shared by the split q, k, v
    ("qwen", -1, False, True, (64, 32), "bin"),           # one group per row: g_idx all zeros, no real permutation
]


def ran_int4_kernels(layers) -> bool:
    """Every layer ran the int4 kernel, alone or fused with its siblings (q/k/v, gate/up)."""
    fused = {id(member) for layer in layers if layer._fused and layer._fused[1] is not None
             for member in layer._fused[0][2]}
    return all(id(layer) in fused or any(run and run[1] is not None for run in (layer._kernel, layer._gemm))
               for layer in layers)


@pytest.mark.parametrize("arch,group_size,sym,act_order,ours,fmt", CASES_4BIT,
                         ids=["qwen2-sym-g32", "qwen2-asym-g64-actorder", "v1-sym-g32", "v1-asym-g32-actorder",
                              "v1-asym-rows-actorder"])
def test_4bit_checkpoint_loads_exactly(tmp_path, monkeypatch, arch, group_size, sym, act_order, ours, fmt):
    path, reference = gptq_checkpoint(tmp_path, arch, 4, group_size, sym, act_order, fmt=fmt)
    model = load_fp32(path)
    layers = quantized_layers(model)
    assert len(layers) == LAYERS * len(LINEARS)
    assert type(model.lm_head) is nn.Linear and model.model.layers[0].mlp.down_proj.bias is None
    for name, layer in layers.items():
        assert type(layer) is Int4Linear and (layer.perm is not None) == act_order, name
        assert layer.group_size == (ours[1] if name.endswith("down_proj") else ours[0]), name
        # The packing round trip: our tensors stand for exactly the weights GPTQ's stand for.
        assert torch.equal(layer.dequantize(), reference.get_submodule(name).weight), name

    x = IDS
    with torch.no_grad():
        expected = reference(x)
        kernel = model(x)
        assert ran_int4_kernels(layers.values()), "the int4 kernel should run"
        monkeypatch.setattr(Int4Linear, "gemm_min_rows", 0)  # every call on the dequantize-and-matmul path,
        monkeypatch.setattr(linear, "int_gemm_prefill", lambda: False)  # not AVX2's integer GEMM either
        fallback = model(x)
    assert max_diff(kernel, expected) < LOGIT_TOL
    assert max_diff(fallback, expected) < LOGIT_TOL


def test_quantized_head_of_a_tied_model_gets_its_own_weights(tmp_path):
    path, reference = gptq_checkpoint(tmp_path, "qwen2", 4, 64, False, True, head=True)
    model = load_fp32(path)
    assert type(model.lm_head) is Int4Linear and not model.config.tie_word_embeddings
    with torch.no_grad():
        assert max_diff(model(IDS), reference(IDS)) < LOGIT_TOL


def test_act_order_round_trips_through_our_format(tmp_path):
    path, _ = gptq_checkpoint(tmp_path, "qwen", 4, 32, False, True)
    model, tokenizer = qwenkit.load(path, dtype="float32", device="cpu")
    qconfig = quantization_config(model)
    assert qconfig["act_order"] and qconfig["bits"] == 4 and qconfig["group_size"] == 32
    assert qconfig["modules_not_converted"] == ["lm_head"] and qconfig["lm_head_bits"] is None
    save_checkpoint(model, tokenizer, tmp_path / "saved")  # q, k, v each with its own perm
    saved = load_fp32(tmp_path / "saved")
    assert saved.model.layers[1].self_attn.k_proj.perm.dtype == torch.int32
    with torch.no_grad():
        assert torch.equal(saved(IDS), model(IDS))


def test_bfloat16_load(tmp_path):
    path, reference = gptq_checkpoint(tmp_path, "qwen2", 4, 32, False, True)
    model, _ = qwenkit.load(path, dtype="bfloat16", device="cpu")
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.qweight.dtype == torch.uint8 and layer.perm.dtype == torch.int32 and layer.scales.dtype == torch.bfloat16
    with torch.no_grad():
        logits, expected = model(IDS).float(), reference(IDS)
    assert ((logits - expected).norm() / expected.norm()).item() < 0.02  # bf16 activations


# ----------------------------------------------------------------------------- 8-bit
def test_8bit_symmetric_per_channel_is_exact(tmp_path):
    path, reference = gptq_checkpoint(tmp_path, "qwen2", 8, -1, True, False)
    model = load_fp32(path)
    for name, layer in quantized_layers(model).items():
        assert type(layer) is Int8Linear
        assert torch.equal(layer.dequantize(), reference.get_submodule(name).weight), name
    with torch.no_grad():
        assert max_diff(model(IDS), reference(IDS)) < LOGIT_TOL


@pytest.mark.parametrize("arch", ["qwen2", "qwen"])
def test_8bit_grouped_is_requantized_per_channel(tmp_path, arch):
    path, reference = gptq_checkpoint(tmp_path, arch, 8, 32, False, True)
    model = load_fp32(path)
    for name, layer in quantized_layers(model).items():
        assert type(layer) is Int8Linear
        w = reference.get_submodule(name).weight
        step = w.abs().amax(dim=1, keepdim=True) / 127  # symmetric per-channel int8 of the GPTQ weights
        assert ((layer.dequantize() - w).abs() <= step / 2 + 1e-7).all(), name
    with torch.no_grad():
        logits, expected = model(IDS), reference(IDS)
    # Per-channel int8 rounding on top of GPTQ's: about 0.6 % of each linear's output on random
    # weights (see test_quant), compounding over the layers of the model.
    assert ((logits - expected).norm() / expected.norm()).item() < 0.05


# ----------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A copy of one qwen2 / one v1 sym-g32 checkpoint for a test to break (written once)."""
    paths = {arch: gptq_checkpoint(tmp_path_factory.mktemp(arch), arch, 4, 32, True, False)[0]
             for arch in ("qwen2", "qwen")}
    return lambda arch, to: Path(shutil.copytree(paths[arch], to / "copy"))


def edit_quantization_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes,message", [
    ({"bits": 3}, "bits=3"),
    ({"bits": 2}, "bits=2"),
    ({"checkpoint_format": "gptq_v2"}, "'gptq_v2'"),
    ({"checkpoint_format": "marlin"}, "'marlin'"),
    ({"is_marlin_format": True}, "Marlin"),
    ({"dynamic": {r"+:.*down_proj": {"bits": 8}}}, "dynamic"),
])
def test_unsupported_gptq_variants_are_refused(written, tmp_path, changes, message):
    path = written("qwen2", tmp_path)
    edit_quantization_config(path, **changes)
    with pytest.raises(UnsupportedModelError, match=message) as e:
        load_fp32(path)
    assert "bits 4 or 8" in str(e.value) and "checkpoint_format \"gptq\"" in str(e.value)


def test_other_quant_methods_and_requantizing_are_refused(written, tmp_path):
    path = written("qwen2", tmp_path)
    with pytest.raises(ValueError, match="already quantized"):
        qwenkit.load(path, dtype="float32", device="cpu", quantize="int8")
    edit_quantization_config(path, quant_method="awq")
    with pytest.raises(UnsupportedModelError, match="'awq' is not supported.*'gptq'"):
        load_fp32(path)


def test_broken_gptq_tensors_are_named(written, tmp_path):
    path = written("qwen", tmp_path)
    (path / "quantize_config.json").write_text(json.dumps({"bits": 8, "group_size": 32}))
    with pytest.raises(CheckpointError, match="transformer.h.0.attn.c_attn do not fit together as 8-bit"):
        load_fp32(path)
    (path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32, "desc_act": False}))
    from safetensors.torch import load_file, save_file
    tensors = load_file(path / "model.safetensors")
    scales = tensors.pop("transformer.h.0.mlp.w2.scales")
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="transformer.h.0.mlp.w2 but no scales"):
        load_fp32(path)
    tensors["transformer.h.0.mlp.w2.scales"] = scales
    g_idx = tensors["transformer.h.1.mlp.w1.g_idx"]
    tensors["transformer.h.1.mlp.w1.g_idx"] = g_idx.flip(0).contiguous()
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="transformer.h.1.mlp.w1: g_idx scatters.*desc_act false"):
        load_fp32(path)


def test_modules_left_in_float_and_checkpoints_without_g_idx(written, tmp_path):
    """GPTQModel's "-pattern" dynamic rules skip modules: what has no qweight stays nn.Linear.
    Checkpoints from before AutoGPTQ saved g_idx have contiguous groups."""
    from safetensors.torch import load_file, save_file
    path = written("qwen2", tmp_path)
    quantized = load_fp32(path)
    tensors = load_file(path / "model.safetensors")
    for part in ("qweight", "qzeros", "scales", "g_idx"):
        del tensors[f"model.layers.1.mlp.down_proj.{part}"]
    tensors["model.layers.1.mlp.down_proj.weight"] = quantized.model.layers[1].mlp.down_proj.dequantize()
    tensors = {name: t for name, t in tensors.items() if not name.endswith(".g_idx")}
    save_file(tensors, path / "model.safetensors")
    edit_quantization_config(path, dynamic={r"-:model\.layers\.1\.mlp\.down_proj": {}})
    model = load_fp32(path)
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    assert type(model.model.layers[0].mlp.down_proj) is Int4Linear
    with torch.no_grad():
        assert max_diff(model(IDS), quantized(IDS)) < LOGIT_TOL
