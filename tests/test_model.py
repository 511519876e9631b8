"""Parity of the model with transformers on tiny random checkpoints, cached decode, NTK and LogN."""

import math

import pytest
import torch

from qwenkit.model import logn_scale, ntk_alpha

from .conftest import (TINY, assert_close, hf_config, hf_qwen2, hf_state, load_fp32, randomize, tokens, v1_checkpoint,
                       write_checkpoint)

transformers = pytest.importorskip("transformers")


def hf_qwen3(tie: bool = True):
    config = transformers.Qwen3Config(**TINY, num_key_value_heads=2, head_dim=32, tie_word_embeddings=tie,
                                      attention_bias=False)
    return randomize(transformers.Qwen3ForCausalLM(config).eval(), 1)


@pytest.mark.parametrize("tie", [False, True])
def test_qwen2_matches_transformers(tmp_path, tie):
    ref = hf_qwen2(tie)
    ours = load_fp32(write_checkpoint(tmp_path, hf_config(ref), hf_state(ref)))
    x = tokens()
    with torch.no_grad():
        assert_close(ours(x), ref(x).logits)


def test_qwen2_mha_sharded(tmp_path):
    ref = hf_qwen2(tie=False, kv_heads=4, seed=3)
    ours = load_fp32(write_checkpoint(tmp_path, hf_config(ref), hf_state(ref), shards=3))
    x = tokens(seed=1)
    with torch.no_grad():
        assert_close(ours(x), ref(x).logits)


@pytest.mark.parametrize("tie", [True, False])
def test_qwen3_matches_transformers(tmp_path, tie):
    ref = hf_qwen3(tie)
    ours = load_fp32(write_checkpoint(tmp_path, hf_config(ref), hf_state(ref)))
    assert ours.config.qk_norm and ours.config.head_dim == 32 and not ours.config.qkv_bias
    x = tokens()
    with torch.no_grad():
        assert_close(ours(x), ref(x).logits)


# ----------------------------------------------------------------------------- Qwen v1
@pytest.mark.parametrize("old_names,fmt", [(False, "safetensors"), (True, "bin")])
def test_qwen_v1_matches_transformers_qwen2(tmp_path, old_names, fmt):
    ref = hf_qwen2(tie=False, kv_heads=4, seed=5)
    config, state = v1_checkpoint(ref, old_names)
    ours = load_fp32(write_checkpoint(tmp_path, config, state, fmt=fmt))
    assert ours.config.arch == "qwen" and ours.config.intermediate_size == TINY["intermediate_size"]
    assert ours.config.use_dynamic_ntk and ours.config.use_logn_attn and ours.config.seq_length == 2048
    x = tokens(n=40)
    with torch.no_grad():
        assert_close(ours(x), ref(x).logits)


# ----------------------------------------------------------------------------- RoPE scaling
ROPE_SCALINGS = [{"rope_type": "linear", "factor": 2.0}, {"rope_type": "dynamic", "factor": 2.0},
                 {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
                 {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 16, "beta_fast": 16,
                  "mscale": 0.9, "mscale_all_dim": 0.5}]


@pytest.mark.parametrize("scaling", ROPE_SCALINGS, ids=lambda s: "-".join(map(str, s.values())))
def test_rope_scaling_matches_transformers_past_the_original_length(tmp_path, scaling):
    """Logits at positions past the original length (32) equal transformers', in one prefill and step by
    step with the cache (dynamic scaling moves its base with each step's length, as transformers does)."""
    config = transformers.Qwen2Config(**{**TINY, "max_position_embeddings": 32}, num_key_value_heads=2,
                                      rope_scaling=dict(scaling))
    ref = randomize(transformers.Qwen2ForCausalLM(config).eval(), 4)
    ours = load_fp32(write_checkpoint(tmp_path, hf_config(ref), hf_state(ref)))
    assert ours.config.rope_scaling["rope_type"] == scaling["rope_type"]
    x = tokens(n=80, batch=1)
    with torch.no_grad():  # step by step first: transformers' dynamic scaling keeps the longest base it saw
        past = transformers.DynamicCache(config=config)
        ref_steps = [ref(x[:, :40], cache=past, use_cache=True).logits]
        cache = ours.new_cache(batch_size=1, max_len=80)
        steps = [ours(x[:, :40], torch.arange(40), cache)]
        for t in range(40, 80):
            ref_steps.append(ref(x[:, t:t + 1], cache=past, use_cache=True).logits)
            steps.append(ours(x[:, t:t + 1], torch.tensor([t]), cache))
        assert_close(torch.cat(steps, dim=1), torch.cat(ref_steps, dim=1))
        assert_close(ours(x), ref(x).logits)


def test_rope_scaling_errors_and_context_length():
    from qwenkit.config import rope_scaling_of
    from qwenkit.errors import ConfigError, UnsupportedModelError

    assert rope_scaling_of("yarn:4", 32768) == {"rope_type": "yarn", "factor": 4.0,
                                                "original_max_position_embeddings": 32768}
    assert rope_scaling_of({"type": "default"}, 512) is None and rope_scaling_of("default:1", 512) is None
    with pytest.raises(UnsupportedModelError, match="'llama3' is not implemented.*linear, dynamic, yarn"):
        rope_scaling_of({"rope_type": "llama3", "factor": 8.0}, 512)
    for bad in ({"rope_type": "linear", "factor": 0}, {"rope_type": "linear", "factor": -2.0}, "yarn:x", "yarn"):
        with pytest.raises(ConfigError, match="rope scaling"):
            rope_scaling_of(bad, 512)
    from .conftest import tiny_config
    assert tiny_config(rope_scaling="linear:2").context_length == 2 * tiny_config().max_position_embeddings


# ----------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("maker", [lambda: hf_qwen2(tie=False), hf_qwen3])
def test_cached_decode_equals_full_forward(tmp_path, maker):
    ref = maker()
    ours = load_fp32(write_checkpoint(tmp_path, hf_config(ref), hf_state(ref)))
    x = tokens(n=20)
    with torch.no_grad():
        full = ours(x)
        cache = ours.new_cache(batch_size=2, max_len=64)
        steps = [ours(x[:, :8], torch.arange(8), cache)]
        for t in range(8, 20):
            steps.append(ours(x[:, t:t + 1], torch.tensor([t]), cache))
    assert_close(torch.cat(steps, dim=1), full)


def test_cache_rows_at_different_positions(tmp_path):
    ref = hf_qwen2(tie=True)
    ours = load_fp32(write_checkpoint(tmp_path, hf_config(ref), hf_state(ref)))
    a, b = tokens(n=12, batch=1, seed=1), tokens(n=7, batch=1, seed=2)
    with torch.no_grad():
        cache = ours.new_cache(batch_size=2, max_len=32)
        ours(a[:, :-1], torch.arange(11), cache.rows(0, 1))
        ours(b[:, :-1], torch.arange(6), cache.rows(1, 2))
        # One batched decode step, each row at its own position.
        step = ours(torch.cat([a[:, -1:], b[:, -1:]]), torch.tensor([[11], [6]]), cache)
        assert_close(step[0, -1], ours(a)[0, -1])
        assert_close(step[1, -1], ours(b)[0, -1])


def test_last_only_logits_at_and_cache_overflow(tmp_path):
    ref = hf_qwen2(tie=True)
    ours = load_fp32(write_checkpoint(tmp_path, hf_config(ref), hf_state(ref)))
    x = tokens(n=10)
    with torch.no_grad():
        assert_close(ours(x, last_only=True)[:, 0], ours(x)[:, -1])
        at = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) < 0.5
        assert_close(ours(x, logits_at=at), ours(x)[at])
        with pytest.raises(ValueError, match="past the KV cache length 8"):
            ours(x, torch.arange(10), ours.new_cache(batch_size=2, max_len=8))


# ----------------------------------------------------------------------------- Qwen v1 long context
@pytest.mark.parametrize("train_len,table", [
    (8192, {1: 1, 8192: 1, 8193: 3, 16384: 3, 16385: 7, 32768: 7}),
    (2048, {2048: 1, 4096: 3, 8192: 7, 16384: 15, 32768: 31}),
])
def test_ntk_alpha_table(train_len, table):
    assert {n: ntk_alpha(n, train_len) for n in table} == table


def test_ntk_base_and_logn_values():
    base = lambda alpha: 10000 * alpha ** (128 / 126)  # noqa: E731
    assert [round(base(a), 1) for a in (1, 3, 7)] == [10000.0, 30527.7, 72195.9]
    pos = torch.tensor([0, 8190, 8191, 8192, 16383, 32766])
    want = [1, 1, 1, math.log(8193) / math.log(8192), math.log(16384) / math.log(8192),
            math.log(32767) / math.log(8192)]
    assert torch.allclose(logn_scale(pos, 8192), torch.tensor(want, dtype=torch.float32))


@pytest.fixture
def v1_short(tmp_path):
    """A Qwen v1 model whose training length is 16, so 'long' prompts are cheap."""
    ref = hf_qwen2(tie=False, kv_heads=4, seed=7)
    config, state = v1_checkpoint(ref, old_names=False, seq_length=16)
    return load_fp32(write_checkpoint(tmp_path, config, state)), ref


def _with(model, ntk, logn):
    model.config.use_dynamic_ntk, model.config.use_logn_attn = ntk, logn
    with torch.no_grad():
        return model(tokens(n=40, batch=1, seed=9))


def test_long_context_only_acts_past_seq_length(v1_short):
    model, ref = v1_short
    x = tokens(n=16, batch=1, seed=9)
    with torch.no_grad():
        short_on = model(x)
        assert_close(short_on, ref(x).logits)  # up to seq_length both are exact no-ops

    off, logn_only, both = _with(model, False, False), _with(model, False, True), _with(model, True, True)
    assert torch.equal(off[:, :16], logn_only[:, :16])  # LogN touches queries past position 16 only
    assert (off[:, 16:] - logn_only[:, 16:]).abs().amax(-1).min() > 1e-4
    assert (both - logn_only).abs().max() > 1e-3  # a 40-token prompt gets alpha 7 (32 < 40 <= 64)


def test_ntk_and_logn_for_any_model_equal_qwen_v1s(v1_short, tmp_path):
    """A Qwen2 checkpoint with --dynamic-ntk --logn --train-length 16 computes what the same weights as Qwen
    v1 with seq_length 16 do (in one prefill and in cached decode); off again, it is plain Qwen2."""
    v1, ref = v1_short
    qwen2 = load_fp32(write_checkpoint(tmp_path / "q2", hf_config(ref), hf_state(ref)))
    x = tokens(n=40, batch=1, seed=9)
    with torch.no_grad():
        qwen2.set_long_context(dynamic_ntk=True, logn=True, train_length=16)
        assert_close(qwen2(x), v1(x))
        cache_a, cache_b = qwen2.new_cache(1, 48), v1.new_cache(1, 48)
        steps = [(qwen2(x[:, :20], torch.arange(20), cache_a), v1(x[:, :20], torch.arange(20), cache_b))]
        for t in range(20, 40):
            steps.append((qwen2(x[:, t:t + 1], torch.tensor([t]), cache_a), v1(x[:, t:t + 1], torch.tensor([t]), cache_b)))
        assert_close(torch.cat([a for a, _ in steps], 1), torch.cat([b for _, b in steps], 1))
        qwen2.set_long_context(dynamic_ntk=False, logn=False)
        assert_close(qwen2(x), ref(x).logits)
    with pytest.raises(Exception, match="train length 1 must be an integer of at least 2"):
        qwen2.set_long_context(train_length=1)


def test_ntk_alpha_fixed_at_prefill(v1_short):
    model, _ = v1_short
    x = tokens(n=40, batch=2, seed=4)
    with torch.no_grad():
        cache = model.new_cache(batch_size=2, max_len=64)
        model(x[:, :20], torch.arange(20), cache)
        assert cache.ntk_alpha.tolist() == [3.0, 3.0]  # 16 < 20 <= 32
        for t in range(20, 40):
            model(x[:, t:t + 1], torch.tensor([t]), cache)
        assert cache.ntk_alpha.tolist() == [3.0, 3.0]  # frozen past 32, as in the reference
        # Per-row alpha: rows prefilled with different lengths keep their own alpha.
        model(x[:1, :10], torch.arange(10), cache.rows(0, 1))
        assert cache.ntk_alpha.tolist() == [1.0, 3.0]


@pytest.mark.parametrize("rotary_dim", [32, 16])
def test_rotary_matches_the_rotate_half_formula(rotary_dim):
    """x·cos + rotate_half(x)·sin on the first rotary_dim dims of each head (Qwen v1 may rotate a
    prefix), the rest passed through; computed in fp32 and returned in x's dtype."""
    from qwenkit.config import ModelConfig
    from qwenkit.model import RotaryEmbedding, apply_rotary

    config = ModelConfig(arch="qwen2", vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=1,
                         num_heads=2, num_kv_heads=2, head_dim=32, rotary_dim=rotary_dim)
    positions = torch.tensor([[0, 5, 300], [7, 8, 9]])
    x = torch.randn(2, 3, 3, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    ours = apply_rotary(x, *RotaryEmbedding(config)(positions, None))

    inv = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    angles = torch.cat([positions.float()[..., None] * inv] * 2, dim=-1)[:, None]  # [B, 1, T, rot]
    rot, rest = x[..., :rotary_dim].float(), x[..., rotary_dim:]
    half = rotary_dim // 2
    rotate_half = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    expected = torch.cat(((rot * angles.cos() + rotate_half * angles.sin()).to(x.dtype), rest), dim=-1)
    assert ours.dtype == x.dtype and torch.equal(ours, expected)


@pytest.mark.parametrize("fp32_max", [1 << 21, 0])  # the CPU's fp32 matmuls, and the model-dtype ones
def test_decode_attention_matches_sdpa(monkeypatch, fp32_max):
    import torch.nn.functional as F

    import qwenkit.model as M

    monkeypatch.setattr(M, "FP32_DECODE_ATTENTION_MAX", fp32_max)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 1, 16, generator=gen).bfloat16()
    k, v = (torch.randn(2, 2, 40, 16, generator=gen).bfloat16() for _ in range(2))
    mask = torch.arange(40) <= torch.tensor([39, 25])[:, None, None, None]  # row 1 sees 26 positions
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    out = M.decode_attention(q, k, v, mask)
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 0.02
