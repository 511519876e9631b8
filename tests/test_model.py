"""Parity of the model with transformers on tiny random checkpoints, cached decode, NTK and LogN."""

import math

import pytest
import torch

from qwenkit.errors import ConfigError
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


# ----------------------------------------------------------------------------- window attention
def sliding_window_pair(tmp_path, arch: str, window: int, first_windowed: int, layers: int = 3):
    """transformers' Qwen2 or Qwen3 with sliding-window attention from layer `first_windowed` up, and qwenkit's
    load of it."""
    fields = dict(**{**TINY, "num_hidden_layers": layers}, num_key_value_heads=2, use_sliding_window=True,
                  sliding_window=window, max_window_layers=first_windowed)
    if arch == "qwen3":
        ref = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**fields, head_dim=16)).eval()
    else:
        ref = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**fields)).eval()
    randomize(ref, 6)
    return ref, load_fp32(write_checkpoint(tmp_path, hf_config(ref), hf_state(ref)))


def chunked_then_stepped(model, x: torch.Tensor, chunks: list[int], max_len: int) -> torch.Tensor:
    """Logits of x through a cache: prefill in chunks of the given sizes, then one token at a time."""
    cache, at, out = model.new_cache(batch_size=x.shape[0], max_len=max_len), 0, []
    for size in chunks + [1] * (x.shape[1] - sum(chunks)):
        out.append(model(x[:, at:at + size], torch.arange(at, at + size), cache))
        at += size
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
@pytest.mark.parametrize("block", [1024, 5])
def test_sliding_window_matches_transformers(tmp_path, monkeypatch, arch, block):
    """Logits past the window equal transformers' in one forward, and through a cache, prefilled in chunks
    shorter and longer than the window, then step by step: a ring of `window` slots (a cache shorter than the
    sequence then suffices) or the full length. `block`: windowed queries in blocks of 5, as long prompts go."""
    monkeypatch.setattr("qwenkit.model.WINDOW_QUERY_BLOCK", block)
    ref, ours = sliding_window_pair(tmp_path, arch, window=7, first_windowed=1)
    assert ours.config.attention_windows == [None, 7, 7]
    x = tokens(n=40)
    with torch.no_grad():
        expected = ref(x).logits
        assert_close(ours(x), expected)
        assert_close(chunked_then_stepped(ours, x, [13, 3, 9], max_len=64), expected)
        ring = ours.new_cache(batch_size=2, max_len=64)
        assert [t.shape[2] for t in ring.k] == [64, 7, 7]
    ref, ours = sliding_window_pair(tmp_path / "all", arch, window=6, first_windowed=0, layers=2)
    with torch.no_grad():  # every layer a ring: the sequence may outgrow max_len
        assert_close(chunked_then_stepped(ours, x, [10, 2], max_len=16), ref(x).logits)


def test_window_rings_rows_at_different_positions(tmp_path):
    _, ours = sliding_window_pair(tmp_path, "qwen2", window=4, first_windowed=0, layers=2)
    a, b = tokens(n=12, batch=1, seed=1), tokens(n=3, batch=1, seed=2)
    with torch.no_grad():
        cache = ours.new_cache(batch_size=2, max_len=32)
        ours(a[:, :-1], torch.arange(11), cache.rows(0, 1))
        ours(b[:, :-1], torch.arange(2), cache.rows(1, 2))  # its ring not yet full
        step = ours(torch.cat([a[:, -1:], b[:, -1:]]), torch.tensor([[11], [2]]), cache)
        assert_close(step[0, -1], ours(a)[0, -1])
        assert_close(step[1, -1], ours(b)[0, -1])


def band_attention(windows: list):
    """A reference for window attention: transformers' eager attention with an explicit band mask for each
    layer's window (None: causal), registered as an attention implementation of transformers."""
    def attend(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        n = query.shape[2]
        pos = torch.arange(n)
        window = windows[module.layer_idx] or n
        allowed = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        scores = (query @ key.transpose(2, 3) * scaling).masked_fill(~allowed, float("-inf"))
        return (scores.softmax(-1) @ value).transpose(1, 2).contiguous(), None
    return attend


def test_v1_window_attention_equals_band_masked_reference(tmp_path):
    """Qwen v1 with the tech report's layer-wise windows (--window-attention 5:1,9:1, then full) equals full
    attention under an explicit band mask per layer, in one forward and through ring caches step by step."""
    transformers.AttentionInterface.register("qwenkit_band", band_attention([5, 9, None, None]))
    config = transformers.Qwen2Config(**{**TINY, "num_hidden_layers": 4}, num_key_value_heads=4,
                                      tie_word_embeddings=False)
    ref = randomize(transformers.Qwen2ForCausalLM(config).eval(), 5)
    config, state = v1_checkpoint(ref, old_names=False)
    ours = load_fp32(write_checkpoint(tmp_path, config, state))
    ours.set_window_attention("5:1,9:1")
    assert ours.config.attention_windows == [5, 9, None, None]
    ref.config._attn_implementation = "qwenkit_band"
    x = tokens(n=30)
    with torch.no_grad():
        expected = ref(x).logits
        assert_close(ours(x), expected)
        assert_close(chunked_then_stepped(ours, x, [7, 8], max_len=32), expected)
        ours.set_window_attention(None)
        assert (ours(x) - expected).abs().max() > 1e-2  # the windows changed the logits


def test_window_attention_specs_errors_and_config_round_trip(tmp_path):
    from qwenkit.config import ModelConfig, attention_windows_of, yarn_for_context
    from qwenkit.errors import ConfigError

    assert attention_windows_of("2048:2,4096:1", 5) == [2048, 2048, 4096, None, None]
    assert attention_windows_of("full:2,64", 4) == [None, None, 64, 64]
    assert attention_windows_of("none", 4) is None and attention_windows_of([None] * 4, 4) is None
    for bad, match in (("0", "positive"), ("64:0", "covers no layer"), ("64:3,32:2", "names 5 layers"),
                       ("big", "SIZE"), ("64:x", "SIZE")):
        with pytest.raises(ConfigError, match=match):
            attention_windows_of(bad, 4)
    from .conftest import tiny_model
    model = tiny_model()
    with pytest.raises(ConfigError, match="longer than the model's context.*smaller"):
        model.set_window_attention("1000")
    ref, ours = sliding_window_pair(tmp_path, "qwen2", window=7, first_windowed=1)
    d = ours.config.to_hf_dict()
    assert (d["use_sliding_window"], d["sliding_window"], d["max_window_layers"]) == (True, 7, 1)
    ours.set_window_attention("5:1,9:1")
    assert ModelConfig.from_dict(ours.config.to_hf_dict()).attention_windows == [5, 9, None]
    with pytest.raises(ConfigError, match="sliding_window=0"):
        ModelConfig.from_dict({**hf_config(ref), "sliding_window": 0})
    import qwenkit
    with pytest.raises(ConfigError, match="not both"):  # before anything loads
        qwenkit.load(tmp_path / "nothing", context=4096, rope_scaling="yarn:2")
    with pytest.raises(ConfigError, match="KV cache 'fp8': choose float or int8"):
        qwenkit.load(tmp_path / "nothing", kv_cache="fp8")
    cfg = ModelConfig.from_dict(hf_config(ref))
    assert yarn_for_context(cfg, 100) is None
    assert yarn_for_context(cfg, 4 * 512) == {"rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 512}


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


@pytest.mark.parametrize("windows", [None, "5:1"])
def test_int8_kv_cache_stays_close_and_halves_memory(tmp_path, windows):
    """Keys and values stored as int8 with per-row, head and position scales: decode logits within 3 % of the
    float cache's (random weights; the real tier holds the demo's perplexity to 0.5 %), rows at different
    positions too, with ring caches too; half a bf16 cache's bytes."""
    ref = hf_qwen2(tie=False)
    ours = load_fp32(write_checkpoint(tmp_path, hf_config(ref), hf_state(ref)))
    ours.set_window_attention(windows)
    x = tokens(n=24)
    with torch.no_grad():
        expected = chunked_then_stepped(ours, x, [9, 6], max_len=32)  # a second chunk meets what a ring holds
        ours.set_kv_cache("int8")
        got = chunked_then_stepped(ours, x, [9, 6], max_len=32)
        assert (got - expected).norm() / expected.norm() < 0.03
        cache = ours.new_cache(batch_size=2, max_len=32)
        ours(x[:1, :-1], torch.arange(23), cache.rows(0, 1))
        ours(x[1:, :6], torch.arange(6), cache.rows(1, 2))
        step = ours(torch.cat([x[:1, -1:], x[1:, 6:7]]), torch.tensor([[23], [6]]), cache)
        assert (step[:, 0] - torch.stack([expected[0, 23], expected[1, 6]])).norm() / step.norm() < 0.03
    ours.set_kv_cache("float")
    head_dim, fp32 = 16, ours.new_cache(batch_size=2, max_len=32)
    centers = sum(t.nbytes for t in cache.k_center)  # one vector per row and head, whatever the length
    assert cache.nbytes - centers == fp32.nbytes * (head_dim + 4) / (head_dim * 4)  # a bf16 model's: (16 + 4) / 32
    with pytest.raises(ConfigError, match="KV cache 'fp8': choose float or int8"):
        ours.set_kv_cache("fp8")


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
