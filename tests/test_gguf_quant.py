"""GGUF weights kept quantized and quantize-while-loading: block conversions against gguf.quants,
tiny GGUF files and checkpoints loaded with quantize=..., the demo model in gguf mode."""

import io
import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import qwenkit
from qwenkit.loading.gguf import StoredTensor, TensorInfo
from qwenkit.model import Model
from qwenkit.quant import Int4Linear, Int8Linear, quantize_model
from qwenkit.quant.embedding import Int8Embedding
from qwenkit.loading.on_load import int4_from_blocks, quantized_linear, requantize
from tests.conftest import (FIB, assert_a_fibonacci_function, model_meta, quantized_bytes, randomize, rel_err,
                            tiny_config, write_checkpoint, write_gguf)

ROWS, COLS = 24, 512


def stored(data: np.ndarray, qtype: Q, shape: tuple[int, int]) -> StoredTensor:
    """Raw block bytes as the loader hands them over (read from a file object)."""
    raw = data.tobytes()
    return StoredTensor("mem", io.BytesIO(raw), "w", TensorInfo(qtype, shape, 0, len(raw)))


def blocks(qtype: Q, seed: int = 0) -> np.ndarray:
    """[ROWS, row bytes] of `qtype` blocks, some of them degenerate (scale 0, with and without an offset)."""
    rng = np.random.default_rng(seed)
    data = quantized_bytes(rng.standard_normal((ROWS, COLS)).astype(np.float32), qtype, rng)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    b = data.reshape(-1, type_size)
    if qtype == Q.Q4_K:  # ggml's 6-bit packing: sub-block 0's scale is the low 6 bits of byte 4
        b[:5, 4] &= 0xC0
        b[:2, 2:4] = 0  # ... and in two of those blocks dmin = 0 too: all zeros
    elif qtype in (Q.Q4_0, Q.Q4_1):
        b[:3, 0:2] = 0  # d = 0: Q4_0 all zeros, Q4_1 the constant m
    return data


def reference(data: np.ndarray, qtype: Q) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(data, qtype).astype(np.float32))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K], ids=lambda q: q.name)
def test_four_bit_blocks_become_int4_exactly(qtype, monkeypatch, torch_quant_kernels):
    monkeypatch.setattr("qwenkit.loading.on_load._CHUNK_VALUES", 5 * COLS)  # several chunks, the last partial
    data = blocks(qtype)
    ref = reference(data, qtype)
    layer = int4_from_blocks(stored(data, qtype, (ROWS, COLS)))
    assert (layer.group_size, layer.scales.dtype, layer.qweight.shape) == (32, torch.float32, (ROWS, COLS // 2))
    torch.testing.assert_close(layer.dequantize(), ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    groups = ref.reshape(-1, 32)
    degenerate = groups[0:40:8] if qtype == Q.Q4_K else groups[:3]
    assert (degenerate == degenerate[:, :1]).all()  # the degenerate groups really are constant...
    # ... and the kernel (not only dequantize) computes with them.
    x = torch.randn(3, COLS, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(layer(x), x @ ref.T, rtol=0, atol=2e-3 * float((x @ ref.T).abs().max()))


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_wider_blocks_requantize_to_int8_per_channel(qtype):
    data = blocks(qtype) if qtype not in (Q.Q5_0, Q.Q5_1, Q.Q8_0) else quantized_bytes(
        np.random.default_rng(1).standard_normal((ROWS, COLS)).astype(np.float32), qtype, None)
    ref = reference(data, qtype)
    layer = quantized_linear("model.layers.0.mlp.up_proj.weight", stored(data, qtype, (ROWS, COLS)), "gguf",
                             torch.float32)
    assert type(layer) is Int8Linear
    # Round to nearest on a symmetric grid of 127 steps per side of each row's largest magnitude.
    step = ref.abs().amax(dim=1, keepdim=True) / 127
    assert ((layer.dequantize() - ref).abs() <= step / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q8_0])
def test_int8_adds_little_to_what_the_format_lost(qtype):
    weights = np.random.default_rng(2).standard_normal((256, 1024)).astype(np.float32)
    data = gguf.quants.quantize(weights, qtype).view(np.uint8)
    ref, w = reference(data, qtype), torch.from_numpy(weights)
    int8 = requantize(stored(data, qtype, weights.shape), 8, torch.float32).dequantize()
    format_error, total_error = float((ref - w).norm()), float((int8 - w).norm())
    print(f"{qtype.name}: format error {format_error / w.norm():.4f}, after int8 {total_error / w.norm():.4f}")
    # Q5_0 loses ~4.3 % of the weights' norm and int8 brings it to ~4.35 %; Q8_0's 0.54 % becomes ~0.93 %.
    assert total_error < (1.05 if qtype == Q.Q5_0 else 2.0) * format_error


def test_what_each_mode_makes_of_each_stored_type():
    def kind(name, qtype, mode):
        data = blocks(qtype) if qtype in (Q.Q4_K, Q.Q6_K) else quantized_bytes(
            np.random.default_rng(0).standard_normal((ROWS, COLS)).astype(np.float32), qtype, None)
        layer = quantized_linear(name, stored(data, qtype, (ROWS, COLS)), mode, torch.bfloat16)
        return None if layer is None else (type(layer).__name__, layer.group_size)

    up, head = "model.layers.0.mlp.up_proj.weight", "lm_head.weight"
    assert kind(up, Q.Q4_K, "gguf") == kind(up, Q.Q4_0, "int4") == kind(head, Q.Q4_1, "gguf") == ("Int4Linear", 32)
    assert kind(up, Q.Q6_K, "gguf") == kind(up, Q.Q4_K, "int8") == kind(head, Q.Q4_K, "int4") == ("Int8Linear", None)
    assert kind(up, Q.Q5_0, "int4") == ("Int4Linear", 128)
    assert kind(up, Q.F16, "gguf") is None and kind(up, Q.F32, "int4") == ("Int4Linear", 128)
    with pytest.raises(ValueError, match="'gguf'"):
        kind(up, Q.Q4_K, "nf4")


# ---------------------------------------------------------------------- tiny files
H, HEADS, KV_HEADS, FFN, VOCAB, LAYERS = 256, 4, 2, 512, 257, 2


def byte_tokens():
    """GPT-2's byte-level alphabet (one printable character per byte), the least a GGUF tokenizer needs."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_model(path, types, tied=False):
    """A qwen2 GGUF (hidden 256, so K-quant rows fit) with each linear stored as types[its GGUF name]."""
    tensors = {"token_embd.weight": ((VOCAB, H), types["token_embd"]), "output_norm.weight": ((H,), Q.F32)}
    if not tied:
        tensors["output.weight"] = ((VOCAB, H), types["output"])
    head_dim = H // HEADS
    widths = {"attn_q": (H, H), "attn_k": (KV_HEADS * head_dim, H), "attn_v": (KV_HEADS * head_dim, H),
              "attn_output": (H, H), "ffn_gate": (FFN, H), "ffn_up": (FFN, H), "ffn_down": (H, FFN)}
    for i in range(LAYERS):
        b = f"blk.{i}."
        tensors |= {b + "attn_norm.weight": ((H,), Q.F32), b + "ffn_norm.weight": ((H,), Q.F32)}
        tensors |= {b + f"attn_{p}.bias": ((widths[f"attn_{p}"][0],), Q.F32) for p in "qkv"}
        tensors |= {b + f"{n}.weight": (shape, types[n]) for n, shape in widths.items()}
    meta = model_meta("qwen2", embedding_length=H, feed_forward_length=FFN, **{"attention.head_count_kv": KV_HEADS})
    meta |= {"tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": byte_tokens() + ["ab"],
             "tokenizer.ggml.merges": ["a b"]}
    write_gguf(path, "qwen2", meta, tensors, scale=0.1)  # small, like trained weights: noise is not amplified
    return path


FOUR_BIT = {"token_embd": Q.F16, "output": Q.Q4_1, "attn_q": Q.Q4_K, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1,
            "attn_output": Q.Q4_0, "ffn_gate": Q.Q4_K, "ffn_up": Q.Q4_0, "ffn_down": Q.Q4_K}
MIXED = {"token_embd": Q.Q8_0, "output": Q.Q6_K, "attn_q": Q.Q5_0, "attn_k": Q.F16, "attn_v": Q.Q8_0,
         "attn_output": Q.Q4_K, "ffn_gate": Q.Q5_K, "ffn_up": Q.Q4_0, "ffn_down": Q.Q6_K}


def logits_of(path, **kw):
    model, _ = qwenkit.load(path, dtype="float32", device="cpu", **kw)
    with torch.no_grad():
        return model, model(torch.arange(128).view(4, -1) * 2)


def test_four_bit_file_kept_quantized_computes_the_float_model(tmp_path):
    path = write_model(tmp_path / "q4.gguf", FOUR_BIT)
    _, ref = logits_of(path)
    model, kept = logits_of(path, quantize="gguf")
    linears = [m for n, m in model.named_modules() if n.endswith(("_proj", "lm_head"))]
    assert len(linears) == 7 * LAYERS + 1 and all(type(m) is Int4Linear and m.group_size == 32 for m in linears)
    assert type(model.model.embed_tokens) is torch.nn.Embedding  # F16: stays float
    assert rel_err(kept, ref) < 1e-4  # float rounding only


def test_mixed_file_in_each_mode(tmp_path):
    path = write_model(tmp_path / "mixed.gguf", MIXED)
    _, ref = logits_of(path)
    layer = lambda model, name: model.get_submodule(f"model.layers.1.{name}")  # noqa: E731

    model, logits = logits_of(path, quantize="gguf")
    assert [type(layer(model, n)).__name__ for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj")] == [
        "Int8Linear", "Linear", "Int4Linear"]
    assert type(model.lm_head) is Int8Linear and type(model.model.embed_tokens) is Int8Embedding
    assert model.dtype == torch.float32 and model.new_cache(1, 8).k[0].dtype == torch.float32
    assert rel_err(logits, ref) < 0.05  # int8 over 5..8-bit blocks (random K-quant blocks are a worst case)

    model, logits = logits_of(path, quantize="int4")
    assert layer(model, "self_attn.o_proj").group_size == 32 and layer(model, "self_attn.q_proj").group_size == 128
    assert type(model.lm_head) is Int8Linear and type(model.model.embed_tokens) is torch.nn.Embedding
    assert rel_err(logits, ref) < 0.4  # int4 g128 from random weights: see test_quant

    model, logits = logits_of(path, quantize="int8")
    assert all(type(m) is Int8Linear for n, m in model.named_modules() if n.endswith(("_proj", "lm_head")))
    assert rel_err(logits, ref) < 0.05


def test_tied_file_shares_one_int8_table(tmp_path):
    path = write_model(tmp_path / "tied.gguf", MIXED, tied=True)
    _, ref = logits_of(path)
    model, logits = logits_of(path, quantize="gguf")
    assert model.model.embed_tokens.weight is model.lm_head.weight and model.config.tie_word_embeddings
    assert rel_err(logits, ref) < 0.05
    model, _ = logits_of(path, quantize="int4")  # the head gets its own int8 copy; the embedding stays float
    assert type(model.lm_head) is Int8Linear and model.model.embed_tokens.weight.dtype == torch.float32
    assert not model.config.tie_word_embeddings


@pytest.mark.parametrize("bits", [8, 4])
def test_checkpoint_quantized_while_loading_equals_quantized_after(tmp_path, bits):
    config = tiny_config(tie_word_embeddings=True)
    model = randomize(Model(config), seed=3, scale=0.1)
    hf_config = {"model_type": "qwen2", "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
                 "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
                 "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
                 "max_position_embeddings": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
                 "tie_word_embeddings": True}
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    path = write_checkpoint(tmp_path / "tiny", hf_config, state)
    # float32 weights loaded as float32: both round the same values (loading to bfloat16, the model
    # quantized while loading rounds the checkpoint's float32 values, the other their bfloat16 copies).
    after, _ = qwenkit.load(path, dtype="float32", device="cpu")
    quantize_model(after, bits=bits)
    during, _ = qwenkit.load(path, dtype="float32", device="cpu", quantize=f"int{bits}")
    assert during.config.tie_word_embeddings is after.config.tie_word_embeddings is False
    expected, got = after.state_dict(), during.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    with pytest.raises(ValueError, match="gguf.*checkpoint directory"):
        qwenkit.load(path, quantize="gguf")


# ---------------------------------------------------------------------- the demo model
_LOAD = """
import json, re, sys, torch
from pathlib import Path
import qwenkit

def peak_rss():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

base = peak_rss()
model, tok = qwenkit.load("demo", dtype="bfloat16", device="cpu", quantize=sys.argv[1])
peak = peak_rss()
weights = sum(p.numel() * p.element_size() for p in model.parameters())  # shared tensors counted once
ids = tok.apply_chat_template([{"role": "user", "content": sys.argv[2]}])
out = qwenkit.generate(model, tok, ids, max_new_tokens=40, temperature=0, repetition_penalty=1.0).text
kinds = sorted({type(m).__name__ for m in model.modules() if not list(m.children())})
print(json.dumps({"base": base, "peak": peak, "weights": weights, "text": out, "kinds": kinds}))
"""


@pytest.mark.real
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc")
def test_demo_kept_quantized(demo_path):
    # A fresh process, so the peak RSS is this load's alone.
    out = subprocess.run([sys.executable, "-c", _LOAD, "gguf", FIB], capture_output=True, text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    growth = m["peak"] - m["base"]
    print(f"\ndemo, quantize='gguf': {m['weights'] / 2**20:.0f} MiB of weights, peak RSS {m['peak'] / 2**20:.0f} MiB, "
          f"{growth / 2**20:.0f} MiB above the process before loading")
    # (KernelRMSNorm: the one-call norm of qwenkit.runtime.small_ops, where the kernels are built)
    assert [kind.removeprefix("Kernel") for kind in m["kinds"]] == ["Int4Linear", "Int8Embedding", "Int8Linear",
                                                                    "RMSNorm", "RotaryEmbedding"]
    assert_a_fibonacci_function(m["text"])
    # The weights, the tokenizer and header (~100 MiB), sympy (~75 MiB: torch imports it for the meta
    # embedding's init) and a few MiB of scratch: never a float copy of a big tensor.
    assert growth < m["weights"] + (300 << 20)
