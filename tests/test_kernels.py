"""qwenkit's CPU kernels (qwenkit/kernels): exact against a torch emulation of their arithmetic, on
odd shapes, several rows, sibling weights and every instruction set this machine can build; close
to the float reference of the same quantized weights; and the build's failure modes.
"""

import copy
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.quant.linear import Int4Linear, Int8Linear
from qwenkit.runtime.cpu_plan import CLASSES, KERNEL_ISA, detected_class, kernel_ops

from .conftest import rel_err

ops = kernel_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="qwenkit's CPU kernels could not be built here")

# What the kernels add to torch's own rounding: activations on an int8 grid of 127 steps per side
# of each block of 32's largest magnitude. Measured 0.3-0.6 % on Gaussian inputs.
ACTIVATION_ROUNDING = 1.5e-2
# The same for the GEMMs' int16 grid (32767 steps): ~1e-5 over many outputs, up to 4e-4 on one short,
# cancelling sum (K = 32, N = 1).
ACTIVATION_ROUNDING_16 = 1e-3


def quantized_activations(x: torch.Tensor, block: int = 32, levels: int = 127) -> torch.Tensor:
    """x as the kernels see it, in float64: per block, d = amax / levels and q = round(x * levels / amax)
    (a block no larger than 1e-30 is zero). The decode ops: int8 (127) per 32; the GEMMs: int16 (32767)."""
    blocks = x.float().reshape(x.shape[0], -1, block)
    amax = blocks.abs().amax(-1, keepdim=True)
    amax = torch.where(amax > 1e-30, amax, torch.zeros_like(amax))
    # Tensor by tensor: `127 / amax` would be reciprocal(amax) * 127, rounded twice, which moves ties.
    full = torch.full_like(amax, float(levels))
    inv = torch.where(amax > 0, full / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv)  # the same float32 operations as cpu.cpp, rounding half to even
    return (q.double() * (amax / full).double()).reshape(x.shape)


def gemm_block(k: int, group: int) -> int:
    """The GEMMs' activation block (cpu.cpp's x_block): the widest of 128, 64, 32 that K and the group take."""
    return next(b for b in (128, 64, 32) if b <= group and group % b == 0 and k % b == 0)


def emulated(layers, x: torch.Tensor, gemm: bool = False) -> torch.Tensor:
    """What the op (`gemm`: the GEMM op) computes for `layers` side by side, in float64: their dequantized
    weights (exact in float64) against the quantized activations."""
    weight = torch.cat([layer.dequantize(torch.float64) for layer in layers])
    bias = None if layers[0].bias is None else torch.cat([layer.bias.double() for layer in layers])
    k = x.shape[1]
    xq = quantized_activations(x, gemm_block(k, layers[0].group_size or k), 32767) if gemm else \
        quantized_activations(x)
    return F.linear(xq, weight, bias)


def random_int4(k: int, n: int, group_size: int, dtype: torch.dtype, bias: bool, seed: int) -> Int4Linear:
    gen = torch.Generator().manual_seed(seed)
    layer = Int4Linear(k, n, bias, group_size, dtype, "cpu")
    with torch.no_grad():
        layer.qweight.copy_(torch.randint(0, 256, layer.qweight.shape, generator=gen, dtype=torch.uint8))
        layer.scales.copy_(torch.rand(layer.scales.shape, generator=gen) * 0.02 + 1e-3)
        layer.zeros.copy_(torch.randint(0, 16, layer.zeros.shape, generator=gen).float())
        if bias:
            layer.bias.copy_(torch.randn(n, generator=gen))
    return layer


def random_int8(k: int, n: int, dtype: torch.dtype, bias: bool, seed: int) -> Int8Linear:
    gen = torch.Generator().manual_seed(seed)
    layer = Int8Linear(k, n, bias, dtype, "cpu")
    with torch.no_grad():
        layer.weight.copy_(torch.randint(-127, 128, layer.weight.shape, generator=gen, dtype=torch.int8))
        layer.scales.copy_(torch.rand(n, generator=gen) * 0.01 + 1e-3)
        if bias:
            layer.bias.copy_(torch.randn(n, generator=gen))
    return layer


def run(op_layers, x, gemm: bool = False):
    """The raw op on `op_layers` (siblings), as the layers call it; `gemm`: the op for many rows."""
    first = op_layers[0]
    bias = None if first.bias is None else torch.cat([layer.bias.float() for layer in op_layers])
    if isinstance(first, Int4Linear):
        return (ops.int4_gemm if gemm else ops.int4_linear)(
            x, [layer.qweight for layer in op_layers], [layer.scales for layer in op_layers],
            [layer.zeros for layer in op_layers], bias, first.group_size)
    scales = torch.cat([layer.scales.float() for layer in op_layers])
    return (ops.int8_gemm if gemm else ops.int8_linear)(x, [layer.weight for layer in op_layers], scales, bias)


# (K, N): one block, odd N, and block counts that leave every tail of the int4 walk (chunks of 4, 2, 1 blocks)
SHAPES = [(32, 1), (64, 17), (96, 5), (192, 3), (224, 9), (896, 128), (4864, 40)]
CASES = [(k, n, group) for k, n in SHAPES for group in (None, 32, 64, 128) if not group or k % group == 0]


@pytest.mark.parametrize("k,n,group", CASES, ids=[f"K{k}-N{n}-{f'int4-g{g}' if g else 'int8'}" for k, n, g in CASES])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_op_equals_its_emulation(k, n, group, rows, dtype):
    layer = random_int4(k, n, group, dtype, True, k + n) if group else random_int8(k, n, dtype, True, k + n)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(dtype)
    y = run([layer], x)
    assert y.shape == (rows, n) and y.dtype == dtype
    want = emulated([layer], x)
    # float32 sums of a few thousand products; bf16 output rounding on top.
    assert rel_err(y, want) < (1e-5 if dtype == torch.float32 else 4e-3)
    # And the float reference of the same quantized weights, which the rounding of x alone separates.
    assert rel_err(y, F.linear(x.double(), layer.dequantize(torch.float64), layer.bias.double())) < ACTIVATION_ROUNDING


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("gemm", [False, True], ids=["decode", "gemm"])
def test_siblings_in_one_op_equal_each_alone(kind, gemm):
    make = (lambda n, s: random_int4(256, n, 64, torch.float32, True, s)) if kind == "int4" else \
        (lambda n, s: random_int8(256, n, torch.float32, True, s))
    siblings = [make(n, s) for s, n in ((0, 37), (1, 16), (2, 11))]  # the GEMM's tiles of 16 straddle them
    x = torch.randn(5, 256)
    together = run(siblings, x, gemm)
    alone = torch.cat([run([layer], x, gemm) for layer in siblings], dim=-1)
    assert torch.equal(together, alone)  # the same rows, the same arithmetic
    assert rel_err(together, emulated(siblings, x, gemm)) < 1e-5


@pytest.mark.parametrize("k,n,group", CASES, ids=[f"K{k}-N{n}-{f'int4-g{g}' if g else 'int8'}" for k, n, g in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gemm_equals_its_emulation(k, n, group, dtype):
    """The many-rows op: x as int16 per block against the stored weights, on the row counts that leave each
    tail of its passes of 3 rows, and odd N (its tiles of 16 columns)."""
    layer = random_int4(k, n, group, dtype, True, k + n) if group else random_int8(k, n, dtype, True, k + n)
    weight, bias = layer.dequantize(torch.float64), layer.bias.double()
    for rows in (1, 2, 3, 4, 5, 50):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(dtype)
        y = run([layer], x, gemm=True)
        assert y.shape == (rows, n) and y.dtype == dtype
        assert rel_err(y, emulated([layer], x, gemm=True)) < (1e-5 if dtype == torch.float32 else 4e-3)
        tol = ACTIVATION_ROUNDING_16 if dtype == torch.float32 else 4e-3
        assert rel_err(y, F.linear(x.double(), weight, bias)) < tol


def test_extreme_activations():
    """A block of zeros, one huge outlier, subnormals and all-equal values keep their meaning."""
    layer = random_int4(128, 32, 32, torch.float32, False, 7)
    x = torch.randn(4, 128)
    x[0, :32] = 0
    x[1, 40] = 1e4
    x[2, 64:96] = 1e-40
    x[3, 96:] = -3.0
    y = run([layer], x)
    assert torch.isfinite(y).all() and rel_err(y, emulated([layer], x)) < 1e-5


def test_layers_run_the_op_and_act_order_permutes_x():
    """Int4Linear with GPTQ's act-order stores columns in `perm` order: the layer hands the op x[:, perm]."""
    linear = nn.Linear(128, 48)
    layer = Int4Linear.from_float(linear, group_size=32)
    perm = torch.randperm(128)
    ordered = Int4Linear(128, 48, True, 32, torch.float32, "cpu", act_order=True)
    with torch.no_grad():
        ordered.load_state_dict({**layer.state_dict(), "perm": perm.int()})
        x = torch.randn(2, 128)
        y = ordered(x)
    assert ordered._kernel[1] is not None
    want = F.linear(quantized_activations(x[:, perm]), layer.dequantize(torch.float64), layer.bias.double())
    assert rel_err(y, want) < 1e-5


def test_many_rows_take_the_gemm_where_the_plan_has_it(monkeypatch):
    """Where the CPU plan prefers the integer GEMM (AVX2; forced here on any class), many rows through a layer
    and through a joint q/k/v projection take it: the float product of the same weights within int16 rounding."""
    from qwenkit.quant import linear
    from qwenkit.runtime.fused import joint_product

    monkeypatch.setattr(linear, "int_gemm_prefill", lambda: True)
    torch.manual_seed(0)
    siblings = tuple(Int4Linear.from_float(nn.Linear(256, n), group_size=64) for n in (64, 32, 32))
    x = torch.randn(2, 100, 256)  # 200 rows: past every layer kind's gemm_min_rows
    with torch.no_grad():
        for layer in (*siblings, Int8Linear.from_float(nn.Linear(256, 48))):
            y = layer(x)
            assert layer._gemm[1] is not None and layer._kernel is None  # the GEMM, never the decode op
            want = F.linear(x.double(), layer.dequantize(torch.float64), layer.bias.double())
            assert rel_err(y, want) < 1e-4
        joint = joint_product(None, x, siblings)
        assert torch.equal(joint, torch.cat([layer(x) for layer in siblings], dim=-1))


@pytest.mark.parametrize("plan_has_it", [False, True])
def test_a_batch_of_decoded_rows_takes_the_gemm_on_every_class(monkeypatch, plan_has_it):
    """Between int_gemm_min_rows and gemm_min_rows (sequences decoded together) a layer takes the integer GEMM
    whether or not the CPU plan has it for prefill; fewer rows take the matrix-vector op; from gemm_min_rows on,
    only the plan's GEMM, else dequantize-and-matmul."""
    from qwenkit.quant import linear

    monkeypatch.setattr(linear, "int_gemm_prefill", lambda: plan_has_it)
    torch.manual_seed(0)
    for layer in (Int4Linear.from_float(nn.Linear(256, 40), group_size=64), Int8Linear.from_float(nn.Linear(256, 48))):
        many = "gemm" if plan_has_it else "float"
        for rows, path in ((layer.int_gemm_min_rows - 1, "kernel"), (layer.int_gemm_min_rows, "gemm"),
                           (layer.gemm_min_rows - 1, "gemm"), (layer.gemm_min_rows, many)):
            layer._changed()
            x = torch.randn(rows, 256)
            with torch.no_grad():
                y = layer(x)
            taken = "gemm" if layer._gemm is not None else "kernel" if layer._kernel is not None else "float"
            assert taken == path, (type(layer).__name__, rows, plan_has_it)
            want = F.linear(x.double(), layer.dequantize(torch.float64), layer.bias.double())
            assert rel_err(y, want) < (ACTIVATION_ROUNDING if path == "kernel" else 1e-4)


def check_small_ops():
    """The one-call ops of an eager step against the model's torch code, on odd sizes (the vector
    loops' tails), grouped heads, a used prefix of a longer cache and a mask."""
    from qwenkit.model import Int8KV, RMSNorm, decode_attention

    gen = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 4e-3)):
        for k in (896, 100):
            norm = RMSNorm(k, 1e-6)
            norm.weight.data = torch.rand(k, generator=gen).add(0.5).to(dtype)
            x = torch.randn(3, 2, k, generator=gen).mul(4).to(dtype)
            assert rel_err(ops.rms_norm(x, norm.weight, 1e-6), norm(x)) < tol, ("rms_norm", dtype, k)
        for heads, kv_heads, dim, length in ((14, 2, 64, 37), (4, 4, 80, 5), (8, 2, 128, 300)):
            q = torch.randn(2, heads, 1, dim, generator=gen).mul(2).to(dtype)
            mask = torch.rand(2, 1, 1, length, generator=gen) > 0.3
            mask[..., 0] = True
            full = [torch.randn(2, kv_heads, length + 9, dim, generator=gen).to(dtype) for _ in "kv"]
            k, v = (t[:, :, :length] for t in full)
            # As an int8 cache holds them: a scale per position and head, read through the used prefix.
            scales = [t.abs().amax(-1, keepdim=True).float().clamp_min(1e-8) / 127 for t in full]
            kq, vq = (Int8KV((t / s).round().to(torch.int8)[:, :, :length], s[:, :, :length])
                      for t, s in zip(full, scales))
            for m in (None, mask):
                err = rel_err(ops.decode_attention(q, k, v, m), decode_attention(q, k, v, m))
                assert err < tol, ("decode_attention", dtype, heads, kv_heads, dim, length, m is None, err)
                # An int8 cache read as it is held, against the model's code, which widens it to q's dtype first.
                err = rel_err(ops.decode_attention_int8(q, kq.values, vq.values, kq.scales, vq.scales, m),
                              decode_attention(q, kq, vq, m))
                assert err < 2 * tol, ("decode_attention_int8", dtype, heads, kv_heads, dim, length, m is None, err)


def test_small_ops_equal_the_model_code():
    check_small_ops()


def check_self_attention_step():
    """A batch-1 decode step through decode_self_attention (rotary, cache write and attention in one call) gives
    the model's own step bit for bit: its logits and what it writes into the cache, float32 and bfloat16, with
    and without q/k/v biases, over prefill and eight steps."""
    from qwenkit.runtime import small_ops

    from .conftest import tiny_model

    calls = []

    class Counting:  # qwenkit's ops, counting the one-call steps
        def __getattr__(self, name):
            if name == "decode_self_attention":
                calls.append(name)
            return getattr(ops, name)

    for dtype in (torch.float32, torch.bfloat16):
        for bias in (False, True):
            fast = tiny_model(seed=3, scale=0.3, qkv_bias=bias, num_heads=4, num_kv_heads=2, head_dim=32).to(dtype)
            small_ops.use_small_ops(fast)
            plain = copy.deepcopy(fast)
            for block in plain.model.layers:  # the same kernels, without the one-call step
                block.self_attn.__class__ = type(block.self_attn).__bases__[-1]
            caches, logits = [], []
            for model in (fast, plain):
                cache = model.new_cache(1, 40)
                with torch.inference_mode(), mock.patch.object(small_ops, "kernel_ops", Counting):
                    out = [model(torch.tensor([[5, 9, 2, 7, 1, 3]]), torch.arange(6), cache)[:, -1]]
                    for pos in range(6, 14):
                        out.append(model(out[-1].argmax(-1, keepdim=True), torch.tensor([pos]), cache)[:, -1])
                caches.append(cache)
                logits.append(torch.cat(out))
            assert torch.equal(logits[0], logits[1]), (dtype, bias)
            assert all(torch.equal(a, b) for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v))
    assert len(calls) == 4 * 8 * len(fast.model.layers)  # every decode step of the fast model took it


def test_one_call_self_attention_is_the_model_code_bit_for_bit():
    check_self_attention_step()


def check_bf16_linear():
    """The bf16-weight op against F.linear in float64 over the same bf16 weights: only float32 sums (and a
    bf16 output's rounding) between them, on odd K and N (the vector loops' tails), several rows, siblings
    side by side, with and without a bias."""
    gen = torch.Generator().manual_seed(0)
    for k, n in ((1, 3), (37, 5), (200, 97), (896, 130)):
        weights = [torch.randn(rows, k, generator=gen).bfloat16() for rows in (n, 7)]
        bias = torch.randn(n + 7, generator=gen)
        for rows in (1, 2, 5):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(rows, k, generator=gen).to(dtype)
                for b in (None, bias):
                    y = ops.bf16_linear(x, weights, b)
                    want = F.linear(x.double(), torch.cat(weights).double(), None if b is None else b.double())
                    err = rel_err(y, want)
                    assert y.shape == (rows, n + 7) and y.dtype == dtype
                    assert err < (1e-6 if dtype == torch.float32 else 4e-3), ("bf16_linear", k, n, rows, dtype, err)
    with pytest.raises(RuntimeError, match="contiguous bfloat16"):
        ops.bf16_linear(torch.randn(1, 8), [torch.randn(4, 8)], None)


def test_bf16_weights_op_equals_float_reference():
    check_bf16_linear()


def test_a_loaded_model_takes_the_small_ops_except_under_autograd(tmp_path):
    import qwenkit
    from qwenkit.runtime.small_ops import KernelRMSNorm

    from .conftest import hf_config, hf_qwen2, hf_state, write_checkpoint

    ref = hf_qwen2(tie=True)
    model, _ = qwenkit.load(write_checkpoint(tmp_path, hf_config(ref), hf_state(ref)), dtype="float32", device="cpu")
    norm = model.model.norm
    assert isinstance(norm, KernelRMSNorm)
    x = torch.randn(2, norm.weight.shape[0], requires_grad=True)
    norm(x).sum().backward()  # the torch code, which autograd can differentiate
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_bad_operands_are_refused_clearly():
    layer = random_int8(64, 16, torch.float32, False, 0)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ops.int8_linear(torch.randn(1, 48), [torch.zeros(16, 48, dtype=torch.int8)], torch.ones(16), None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.int8_linear(torch.randn(1, 64).half(), [layer.weight], layer.scales, None)
    with pytest.raises(RuntimeError, match="scales must be"):
        ops.int8_linear(torch.randn(1, 64), [layer.weight], torch.ones(3), None)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ops.int8_gemm(torch.randn(60, 48), [torch.zeros(16, 48, dtype=torch.int8)], torch.ones(16), None)
    with pytest.raises(RuntimeError, match="scales must be"):
        ops.int8_gemm(torch.randn(60, 64), [layer.weight], torch.ones(3), None)
    four = random_int4(64, 16, 32, torch.float32, False, 0)
    with pytest.raises(RuntimeError, match="group_size"):
        ops.int4_gemm(torch.randn(60, 64), [four.qweight], [four.scales], [four.zeros], None, 48)


LOWER = [c for c in ("scalar", "avx2", "avx512") if CLASSES.index(c) < CLASSES.index(detected_class())
         and KERNEL_ISA[c] != KERNEL_ISA[detected_class()]]


@pytest.mark.parametrize("cpu_class", LOWER)
def test_every_buildable_instruction_set_computes_the_same(cpu_class, tmp_path):
    """Each lower class's build (scalar, AVX2, AVX-512 without VNNI) gives the emulation's results too (its
    decode and GEMM ops),
    its small ops the model code's and its bf16-weight op the float reference's."""
    script = f"""
import torch, sys
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
from tests import test_kernels as t
assert t.ops.isa() == {KERNEL_ISA[cpu_class]!r}, t.ops.isa()
for kind, k, group in (("int8", 896, None), ("int4", 224, 32), ("int4", 896, 64)):
    for dtype in (torch.float32, torch.bfloat16):
        layer = t.random_int4(k, 40, group, dtype, True, 3) if kind == "int4" else t.random_int8(k, 40, dtype, True, 3)
        x = torch.randn(5, k).to(dtype)
        for gemm in (False, True):
            err = t.rel_err(t.run([layer], x, gemm), t.emulated([layer], x, gemm))
            assert err < (1e-5 if dtype == torch.float32 else 4e-3), (kind, dtype, gemm, err)
t.check_small_ops()
t.check_bf16_linear()
print("ok")
"""
    env = {**os.environ, "QWENKIT_CPU_CLASS": cpu_class}
    if cpu_class == "avx2":
        env |= {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_a_failed_build_falls_back_with_one_warning(tmp_path):
    script = """
import warnings, torch
from qwenkit.quant.linear import Int8Linear
from qwenkit.runtime.cpu_plan import kernel_ops
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert kernel_ops() is None and kernel_ops() is None
    layer = Int8Linear.from_float(torch.nn.Linear(64, 16))
    y = layer(torch.randn(1, 64))
print(len([w for w in caught if "CPU kernels are unavailable" in str(w.message)]), "install g++" in str(caught[0].message))
"""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "QWENKIT_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["1", "True"]


def test_a_class_the_cpu_lacks_is_refused():
    above = [c for c in CLASSES if CLASSES.index(c) > CLASSES.index(detected_class())]
    if not above:
        pytest.skip("this CPU runs every class")
    env = {**os.environ, "QWENKIT_CPU_CLASS": above[0]}
    out = subprocess.run([sys.executable, "-c", "from qwenkit.runtime.cpu_plan import cpu_class; cpu_class()"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and f"QWENKIT_CPU_CLASS={above[0]} asks for more than this CPU runs" in out.stderr


# LargeBlocks is process-wide (torch's CPU allocator), so each case runs in its own interpreter.
_LARGE_BLOCKS = """if True:
    import os, torch
    from qwenkit.runtime.cpu_plan import kernel_ops
    ops = kernel_ops()
    MiB = 1 << 20
    ops.keep_large_blocks(MiB, 64 * MiB, 8)  # blocks from 1 MiB; 64 MiB free at most; idle after 8
    stats = lambda: tuple(ops.large_block_stats())  # (mapped, free)
"""

_LARGE_BLOCK_CASES = {
    "values and the small allocator": """
    small = torch.arange(1000.0)
    assert stats() == (0, 0)
    x = torch.arange(3 * MiB // 4, dtype=torch.float32)  # 3 MiB
    assert stats() == (3 * MiB, 0) and x.sum().item() == sum(range(3 * MiB // 4)) and small.sum() == 499500
    """,
    "a freed block is taken again by what it fits, up to twice the size": """
    a = torch.empty(4 * MiB, dtype=torch.uint8); at = a.data_ptr(); del a
    b = torch.empty(3 * MiB, dtype=torch.uint8)
    assert b.data_ptr() == at and stats() == (4 * MiB, 0)
    del b
    c = torch.empty(MiB, dtype=torch.uint8)  # 4 MiB is more than twice as much: a block of its own
    assert c.data_ptr() != at and stats() == (5 * MiB, 4 * MiB)
    """,
    "a layer's tensors made again and again map no more than they need at once": """
    residual = []
    for layer in range(50):
        x = torch.randn(512, 896)
        gate_up = torch.randn(512, 9728)
        act = torch.nn.functional.silu(gate_up[:, :4864]) * gate_up[:, 4864:]
        del gate_up
        residual.append(torch.empty(64, 1024))  # 256 KiB: small, and kept, between the layer's blocks
        out = act[:, :896] + x
        del act, x, out
    at_once = (512 * 896 + 512 * 9728 + 2 * 512 * 4864) * 4
    assert stats()[0] <= at_once + 512 * 896 * 4, (stats(), at_once)
    """,
    "idle blocks and blocks beyond the free limit are unmapped": """
    a = torch.empty(4 * MiB, dtype=torch.uint8); del a
    for _ in range(9):  # sizes that never fit it
        b = torch.empty(MiB, dtype=torch.uint8); del b
    assert stats() == (MiB, MiB)
    many = [torch.empty(16 * MiB, dtype=torch.uint8) for _ in range(6)]
    del many
    assert stats()[1] <= 64 * MiB and stats()[0] == stats()[1]
    ops.release_free_blocks()
    assert stats() == (0, 0)
    """,
    "the profiler counts them, and a forked child allocates": """
    with torch.profiler.profile(profile_memory=True) as prof:
        torch.ones(2 * MiB)
    assert max(e.cpu_memory_usage for e in prof.key_averages()) >= 8 * MiB
    pid = os.fork()
    if pid == 0:  # (no parallel op: OpenMP's threads do not survive a fork)
        x = torch.empty(4 * MiB); x[0] = 1.0
        os._exit(0 if x[0].item() == 1.0 else 1)
    assert os.waitpid(pid, 0)[1] == 0
    """,
}


@pytest.mark.parametrize("case", sorted(_LARGE_BLOCK_CASES))
def test_large_blocks(case):
    """LargeBlocks, torch's CPU allocator for large tensors after qwenkit.load: correct tensors, freed blocks
    reused by what they fit, a layer-like pattern mapping what lives at once (glibc's heap grew to ~3x
    that: qwenkit/runtime/allocator.py), and the rules that unmap."""
    script = _LARGE_BLOCKS + _LARGE_BLOCK_CASES[case] + "\n    print('ok')"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split()[-1:] == ["ok"], out.stderr[-3000:]
