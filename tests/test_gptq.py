"""GPTQ against an independent OBQ reference and against RTN; checkpoints written by save_checkpoint
read back by qwenkit (identical logits) and by transformers (same logits, same token ids)."""

import json

import pytest
import torch

import qwenkit
from qwenkit.saving import save_checkpoint
from qwenkit.model import Model
from qwenkit.quant import Int4Linear, Int8Linear, quantization_config, quantize_model, unpack_int4
from qwenkit.quant.calibration import calibration_ids, heldout_ids, stdlib_files
from qwenkit.quant.gptq import gptq_quantize, gptq_quantize_model
from qwenkit.runtime.small_ops import use_small_ops
from qwenkit.tokenizer import Tokenizer

from .conftest import (BYTE_VOCAB, CHATML, GGUF_SAMPLES, qwen_tiktoken_path, random_texts, randomize, rel_err,
                       tiny_config, tiny_model)

# ---------------------------------------------------------------------------------- the algorithm

def reference_gptq(W, H, bits, group_size, act_order, damp=0.01):
    """Optimal Brain Quantization one column at a time (Frantar et al., eq. 2-3), in float64, with the
    inverse Hessian updated by Gaussian elimination after each column: no Cholesky, no lazy batches.

    Grids as the spec of our layers: int8 symmetric per row from the original weights; int4
    asymmetric per group (min -> 0, max -> 15), from the weights as updated when the group is reached,
    or, with act-order, from the original weights (static groups)."""
    W, H = W.double().clone(), H.double().clone()
    n, k = W.shape
    Hinv = torch.linalg.inv(H + damp * H.diagonal().mean() * torch.eye(k, dtype=torch.float64))
    order = torch.argsort(H.diagonal(), descending=True).tolist() if act_order else list(range(k))

    def int4_params(w):  # [n, g] -> scale, zero [n]
        lo, hi = w.min(1).values, w.max(1).values
        scale = (hi - lo) / 15
        return scale, -lo / scale

    if bits == 8:
        row_scale = W.abs().max(1).values / 127
    static = [int4_params(W[:, g:g + group_size]) for g in range(0, k, group_size)] if bits == 4 else None
    Q = torch.zeros(n, k, dtype=torch.float64)
    params = {}
    for j in order:
        if bits == 8:
            q = (W[:, j] / row_scale).round().clamp(-127, 127)
            deq = q * row_scale
        else:
            g = j // group_size
            if act_order:
                scale, zero = static[g]
            else:
                if g not in params:
                    params[g] = int4_params(W[:, j:j + group_size])
                scale, zero = params[g]
            q = (W[:, j] / scale + zero).round().clamp(0, 15)
            deq = (q - zero) * scale
        Q[:, j] = q
        err = (W[:, j] - deq) / Hinv[j, j]
        W -= err[:, None] * Hinv[j][None, :]  # column j itself becomes deq; done columns have Hinv[j] = 0
        Hinv -= Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    return Q


def correlated_inputs(n_tokens, k, seed=0):
    """Inputs with correlated features and uneven scales, as hidden states have."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    scales = torch.exp(torch.randn(k, generator=gen))
    return (torch.randn(n_tokens, k, generator=gen) @ mix) * scales


@pytest.mark.parametrize("bits,group_size,act_order", [(8, 128, False), (4, 32, False), (4, 64, True),
                                                       (4, 128, False)])
def test_gptq_matches_one_column_at_a_time_reference(bits, group_size, act_order):
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(48, 256, generator=gen) * 0.05
    X = correlated_inputs(2048, 256)
    X[:, 7] = 0  # a dead input: its weights are dropped
    H = 2 * X.T @ X / X.shape[0]
    q, scales, zeros = gptq_quantize(W, H, bits, group_size, act_order)

    W_ref = W.clone()
    W_ref[:, 7] = 0
    H_ref = H.clone()
    H_ref[7, 7] = 1
    want = reference_gptq(W_ref, H_ref, bits, group_size, act_order)
    same = (q.double() == want).float().mean()
    assert same > 0.995, f"{same:.4f} of the integers agree"
    # The errors GPTQ minimises: output error on X, well below round-to-nearest's.
    deq = _dequantize(q, scales, zeros, group_size)
    rtn = Int8Linear.from_float(_linear(W)) if bits == 8 else Int4Linear.from_float(_linear(W), group_size)
    gptq_err = ((X @ (deq - W_ref).T).norm() / (X @ W_ref.T).norm())
    rtn_err = ((X @ (rtn.dequantize() - W_ref).T).norm() / (X @ W_ref.T).norm())
    assert gptq_err < 0.9 * rtn_err


def _linear(W):
    linear = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    linear.weight.data.copy_(W)
    return linear


def _dequantize(q, scales, zeros, group_size):
    if zeros is None:
        return q.float() * scales[:, None]
    n, k = q.shape
    g = q.float().view(n, k // group_size, group_size)
    return ((g - zeros[..., None]) * scales[..., None]).reshape(n, k)


def structured_ids(n, length, seed, vocab=320):
    """Token streams with structure (a few dozen frequent tokens, repeated patterns), so activations
    are correlated the way real text makes them."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 40, (n, length), generator=gen) * 7
    return (base + torch.randint(0, 3, (n, length), generator=gen)) % vocab


@pytest.mark.parametrize("bits,act_order", [(4, False), (4, True), (8, False), (8, True)])
def test_gptq_model_has_lower_output_error_than_rtn(bits, act_order):
    calib, test = structured_ids(16, 64, seed=0), structured_ids(8, 64, seed=1)
    with torch.no_grad():
        ref = tiny_model(**BYTE_VOCAB)(test)
        rtn = quantize_model(tiny_model(**BYTE_VOCAB), bits=bits, group_size=32, lm_head_bits=None)(test)
        model = gptq_quantize_model(tiny_model(**BYTE_VOCAB), calib, bits=bits, group_size=32, act_order=act_order,
                                    lm_head_bits=None, show_progress=False)
        gptq = model(test)
    assert type(model.model.layers[1].mlp.down_proj) is (Int4Linear if bits == 4 else Int8Linear)
    assert rel_err(gptq, ref) < 0.9 * rel_err(rtn, ref)


# ---------------------------------------------------------------------------------- calibration data

def test_stdlib_calibration_and_heldout_are_disjoint_and_deterministic(byte_tokenizer):
    calib, heldout = stdlib_files(heldout=False), stdlib_files(heldout=True)
    assert calib and heldout and not set(calib) & set(heldout)
    assert stdlib_files(heldout=False) == calib
    ids, described = calibration_ids(byte_tokenizer, None, samples=4, seq_len=64)
    assert ids.shape == (4, 64) and int(ids.max()) < byte_tokenizer.vocab_size
    assert described == "python-stdlib: 4 x 64 tokens"
    assert torch.equal(calibration_ids(byte_tokenizer, None, samples=4, seq_len=64)[0], ids)
    assert len(heldout_ids(byte_tokenizer, 500)) == 500


def test_conversation_calibration_uses_the_chat_template(byte_tokenizer, tmp_path):
    record = {"conversations": [{"from": "user", "value": "hi " * 30}, {"from": "assistant", "value": "yo " * 30}]}
    (tmp_path / "c.json").write_text(json.dumps([record, record]))
    ids, described = calibration_ids(byte_tokenizer, tmp_path / "c.json", samples=2, seq_len=16)
    assert ids.shape == (2, 16) and described == "c.json: 2 x 16 tokens"
    assert ids[0].tolist() == byte_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi " * 30}], add_generation_prompt=False)[:16]
    lines = [json.dumps({"messages": [{"role": "user", "content": "a b c " * 20},
                                      {"role": "assistant", "content": "d"}]})] * 3
    (tmp_path / "c.jsonl").write_text("\n".join(lines))
    with pytest.warns(UserWarning, match="not the 100 asked for"):
        ids, _ = calibration_ids(byte_tokenizer, tmp_path / "c.jsonl", samples=100, seq_len=32)
    assert 1 < ids.shape[0] < 100


# ---------------------------------------------------------------------------------- saving

@pytest.mark.parametrize("bits,act_order,tied", [(4, True, True), (4, False, False), (8, False, True)])
def test_saved_quantized_checkpoint_loads_with_identical_logits(tmp_path, byte_tokenizer, bits, act_order, tied):
    model = gptq_quantize_model(tiny_model(**BYTE_VOCAB, tie_word_embeddings=tied), structured_ids(8, 32, seed=0),
                                bits=bits, group_size=64, act_order=act_order, show_progress=False)
    model.generation_config = {"temperature": 0.7, "max_new_tokens": 9}
    recipe = {"method": "gptq", "gptq": {"desc_act": act_order, "calibration": "test"}}
    save_checkpoint(model, byte_tokenizer, tmp_path / "q", quantization=recipe)

    loaded, tok = qwenkit.load(tmp_path / "q", dtype="float32", device="cpu")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"] == quantization_config(model) | recipe
    assert {k: config["quantization_config"][k] for k in ("quant_method", "bits", "group_size", "lm_head_bits")} == {
        "quant_method": "qwenkit", "bits": bits, "group_size": 64 if bits == 4 else None, "lm_head_bits": 8}
    assert config["tie_word_embeddings"] is False  # the int8 head has its own table
    layer = loaded.model.layers[0].self_attn.q_proj
    assert type(layer) is type(model.model.layers[0].self_attn.q_proj)
    assert (layer.qweight if bits == 4 else layer.weight).dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert loaded.generation_config == model.generation_config
    ids = structured_ids(2, 20, seed=3)
    use_small_ops(model)  # the ops load() gives the loaded model, for bit-equal arithmetic
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert tok.encode("the theory") == byte_tokenizer.encode("the theory")
    if bits == 4:
        assert unpack_int4(layer.qweight).max() <= 15


def test_existing_output_is_kept_unless_forced(tmp_path, byte_tokenizer):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(qwenkit.errors.QwenkitError, match="not empty"):
        save_checkpoint(tiny_model(**BYTE_VOCAB), byte_tokenizer, out)
    assert (out / "keep.txt").read_text() == "mine"
    save_checkpoint(tiny_model(**BYTE_VOCAB), byte_tokenizer, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directories left


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_saved_float_checkpoint_matches_transformers(tmp_path, byte_tokenizer, arch):
    transformers = pytest.importorskip("transformers")
    kw = {"qkv_bias": False, "o_bias": False, "qk_norm": True} if arch == "qwen3" else {}
    model = tiny_model(**BYTE_VOCAB, arch=arch, tie_word_embeddings=True, **kw)
    save_checkpoint(model, byte_tokenizer, tmp_path / "f")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "f", dtype=torch.float32).eval()
    ids = structured_ids(2, 24, seed=4)
    with torch.no_grad():
        assert (theirs(ids).logits - model(ids)).abs().max() < 1e-4
    their_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "f")
    for text in ["the theory of everything", "<|im_start|>user\nhi<|im_end|>", "naïve 你好 \t\n x"]:
        assert their_tok.encode(text, add_special_tokens=False) == byte_tokenizer.encode(text)
    assert their_tok.eos_token == "<|im_end|>" and their_tok.chat_template == CHATML


def test_qwen_v1_saves_in_qwen2_form_and_keeps_its_long_context_settings(tmp_path, tok):
    config = tiny_config(**BYTE_VOCAB, arch="qwen", num_kv_heads=4, seq_length=64, use_dynamic_ntk=True,
                         use_logn_attn=True)
    model = randomize(Model(config), seed=2, scale=0.1).eval()
    save_checkpoint(model, tok, tmp_path / "v1")
    assert (tmp_path / "v1" / "qwen.tiktoken").read_bytes() == qwen_tiktoken_path().read_bytes()
    loaded, loaded_tok = qwenkit.load(tmp_path / "v1", dtype="float32", device="cpu")
    assert loaded.config.arch == "qwen2" and loaded_tok.kind == "qwen"
    for key in ("seq_length", "use_dynamic_ntk", "use_logn_attn", "rotary_dim", "qkv_bias", "o_bias"):
        assert getattr(loaded.config, key) == getattr(config, key), key
    ids = structured_ids(1, 150, seed=5)  # past seq_length: NTK and LogN at work
    use_small_ops(model)  # the ops load() gives the loaded model, for bit-equal arithmetic
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


@pytest.mark.real
def test_demo_tokenizer_round_trips_through_saved_files(demo_tok, tmp_path):
    tok = demo_tok
    tok.save_pretrained(tmp_path)
    saved = Tokenizer.from_pretrained(tmp_path)
    assert saved.special_tokens == tok.special_tokens and saved.chat_template == tok.chat_template
    assert (saved.eos_token_id, saved.pad_token_id, saved.bos_token_id) == (151645, 151643, 151643)
    assert [saved.is_special(i) for i in range(151643, 151665)] == [tok.is_special(i) for i in range(151643, 151665)]
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in GGUF_SAMPLES + random_texts(30, seed=2):
        ids = tok.encode(text)
        assert saved.encode(text) == ids and theirs.encode(text, add_special_tokens=False) == ids, repr(text)
